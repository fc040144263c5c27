"""Everything the CLI shows a person: tables, summaries and error lines, built with Rich.

Data (paths, file and class names, URLs, error text, anything read from a weights file) only ever
reaches Rich as `Text` objects through `plain`/`styled` below, never inside a markup string, so a
file called `holiday [draft].png` or a class called `[bold]cat` prints exactly as written.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

TOP_CONFUSIONS = 5  # the largest off-diagonal counts stand out in the confusion table
MAX_LISTED = 20  # skipped files listed before "... and N more (see --json)"
MAX_TABLE_CLASSES = 20  # beyond this the per-class table shows the worst and best classes only
MAX_MATRIX_CLASSES = 12  # a wider confusion matrix does not fit a terminal: it goes to the PNG only


def plain(value: Any) -> Text:
    """Any value as literal text: no markup, no emoji codes, no highlighting."""
    return Text(str(value))


def styled(value: Any, style: str) -> Text:
    """Literal text in a style."""
    return Text(str(value), style=style)


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """'1 image', '2 images', '1,000 images'."""
    return f"{n:,} {noun if n == 1 else (nouns or noun + 's')}"


def say(console: Console, *parts: Any) -> None:
    """Print one line assembled from Text parts and literal strings."""
    console.print(Text.assemble(*(p if isinstance(p, (Text, tuple)) else str(p) for p in parts)),
                  highlight=False, soft_wrap=True)


def error_line(message: str, label: str = "error:") -> None:
    """One line on stderr: the label in red, then the message exactly as written."""
    say(Console(stderr=True), styled(label, "bold red"), " ", plain(message))


def print_json(obj: Any) -> None:
    """One JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def _key_value_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=plain(title), title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(plain(key), value if isinstance(value, Text) else plain(value))
    return table


def download(console: Console, summary: dict[str, Any]) -> None:
    """The per-class table of a dataset cache and what the import converted or skipped."""
    splits = summary["splits"]
    table = Table(title=plain(f"{summary.get('dataset', 'cifar10')} dataset cache"), title_justify="left")
    table.add_column("class")
    for name in splits:
        table.add_column(plain(name), justify="right")
    for cls in summary["class_names"]:
        table.add_row(plain(cls), *(plain(f"{s['per_class'][cls]:,}") for s in splits.values()))
    table.add_section()
    table.add_row(styled("images", "bold"), *(styled(f"{s['images']:,}", "bold") for s in splits.values()))
    console.print(table)
    verb = "already downloaded and verified: " if summary["status"] == "cached" else "cached at "
    say(console, verb, plain(summary["cache"]))
    if summary["converted"]:
        say(console, f"{plural(summary['converted'], 'image')} were not 32x32 RGB and were converted and resized")
    skipped = summary["skipped"]
    if skipped:
        say(console, styled(f"skipped {plural(len(skipped), 'unreadable file')}:", "yellow"))
        for item in skipped[:MAX_LISTED]:
            say(console, "  ", plain(item["path"]), ": ", plain(item["error"]))
        if len(skipped) > MAX_LISTED:
            say(console, f"  ... and {len(skipped) - MAX_LISTED:,} more (see --json)")


def train(console: Console, s: dict[str, Any]) -> None:
    """The final table of a training run."""
    rows: list[tuple[str, Any]] = [("test accuracy", f"{100 * s['test_accuracy']:.2f}%"),
                                   ("time", f"{s['time_s']:.1f} s")]
    if s["images_per_s"]:
        rows.append(("images/s", f"{s['images_per_s']:,.0f}"))
    rows += [("device", s["device"]), ("seed", s["seed"]), *s["files"].items()]
    console.print(_key_value_table(f"trained {s['model']}", rows))


def evaluate(console: Console, s: dict[str, Any], per_class: bool, confusion: bool) -> None:
    """Accuracy, then optionally the per-class table and the confusion matrix."""
    console.print(_key_value_table(f"{s['model']} on {s['split']}", [
        ("top-1 accuracy", f"{100 * s['accuracy']:.2f}%  ({s['correct']:,} of {plural(s['images'], 'image')})"),
        ("top-3 accuracy", f"{100 * s['top3_accuracy']:.2f}%"),
        ("mean loss", f"{s['loss']:.4f}"),
        ("time", f"{s['time_s']:.2f} s  ({s['images_per_s']:,.0f} images/s on {s['device']})"),
        ("weights", s["weights"]),
    ]))
    if per_class:
        console.print(per_class_table(s["per_class"]))
    if confusion:
        if len(s["class_names"]) <= MAX_MATRIX_CLASSES:
            console.print(confusion_table(s["confusion"], s["class_names"]))
        else:
            say(console, f"the {len(s['class_names'])}x{len(s['class_names'])} confusion matrix is too wide for a "
                         "terminal: see the PNG, or --json")
        say(console, "confusion matrix drawn in ", plain(s["files"]["confusion_png"]))


def per_class_table(rows: list[dict[str, Any]]) -> Table:
    """Correct/total and accuracy per class; with many classes, sorted by accuracy and cut to the
    worst and best MAX_TABLE_CLASSES / 2 (--json keeps all)."""
    shown: list[dict[str, Any] | None] = list(rows)
    title = "per class"
    if len(rows) > MAX_TABLE_CLASSES:
        ranked = sorted(rows, key=lambda r: (r["accuracy"], r["class"]))
        half = MAX_TABLE_CLASSES // 2
        shown = ranked[:half] + [None] + ranked[-half:]
        title = f"per class: the {half} worst and {half} best of {len(rows)} (all in --json)"
    table = Table(title=plain(title), title_justify="left")
    table.add_column("class")
    table.add_column("correct / total", justify="right")
    table.add_column("accuracy", justify="right")
    for row in shown:
        if row is None:
            table.add_row(plain("..."), plain(""), plain(""))
            continue
        table.add_row(plain(row["class"]), plain(f"{row['correct']:,} / {row['total']:,}"),
                      plain(f"{100 * row['accuracy']:.1f}%"))
    return table


def confusion_table(matrix: list[list[int]], class_names: list[str]) -> Table:
    """Rows true, columns predicted; the diagonal green, the largest confusions red."""
    from cifarctl.data import ALIASES

    short = {full: alias for alias, full in ALIASES.items()}  # the tutorial's "plane" and "car" fit the columns
    names = [short.get(n, n[:6]) for n in class_names]
    off = sorted(((count, t, p) for t, row in enumerate(matrix) for p, count in enumerate(row) if t != p and count),
                 reverse=True)
    worst = {(t, p) for _, t, p in off[:TOP_CONFUSIONS]}
    # Left padding only and no vertical rules: 10 columns of 4-digit counts fit 80 characters.
    table = Table(title=plain("confusion matrix: rows true, columns predicted"), title_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    table.add_column("", no_wrap=True)
    for name in names:
        table.add_column(plain(name), justify="right", no_wrap=True)
    for t, row in enumerate(matrix):
        cells = []
        for p, count in enumerate(row):
            style = "bold green" if t == p else "bold red" if (t, p) in worst else "dim" if not count else ""
            cells.append(styled(count, style))
        table.add_row(plain(names[t]), *cells)
    return table


def predict(console: Console, s: dict[str, Any]) -> None:
    """One row per classified file: its class, probability and the next classes."""
    table = Table(title=plain(f"{plural(len(s['results']), 'image')}, {s['model']} model"), title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("class", style="bold")
    table.add_column("probability", justify="right")
    if s["top_k"] > 1:
        table.add_column(f"next {s['top_k'] - 1}")
    for r in s["results"]:
        others = "  ".join(f"{o['class']} {100 * o['probability']:.1f}%" for o in r["top_k"][1:])
        cells = [plain(r["path"]), plain(r["class"]), plain(f"{100 * r['probability']:.1f}%")]
        table.add_row(*cells, *([plain(others)] if s["top_k"] > 1 else []))
    console.print(table)


def path_errors(errors: list[dict[str, str]]) -> None:
    """One line on stderr per path that produced no result."""
    for e in errors:
        error_line(f"{e['path']}: {e['error']}")


def show_batch(console: Console, s: dict[str, Any]) -> None:
    """The tutorial's label lines, predictions (wrong ones in red) and where the grid went."""
    def cell(label: str, style: str = "") -> Text:
        return styled(f"{label:5s}", style)

    labels = Text(" ").join(cell(label) for label in s["labels"])  # the tutorial's print of the labels
    if s["predicted"] is None:
        say(console, labels)
    else:
        say(console, "GroundTruth: ", labels)
        say(console, "Predicted:   ", Text(" ").join(cell(p, "" if p == t else "bold red")
                                                     for p, t in zip(s["predicted"], s["labels"])))
        say(console, f"{s['correct']} of {len(s['labels'])} correct")
    width, height = s["size"]
    say(console, "saved ", plain(s["out"]), f" ({width}x{height}); --seed {s['seed']} shows this batch again")


def dim_line(console: Console, message: str) -> None:
    """A quiet note, such as why the terminal preview was skipped."""
    say(console, styled(message, "dim"))


def datasets(console: Console, s: dict[str, Any]) -> None:
    """One row per cached dataset."""
    if not s["datasets"]:
        say(console, "no datasets in ", plain(s["data_dir"]), "; fetch one with `cifarctl download`")
        return
    table = Table(title=Text.assemble("datasets in ", plain(s["data_dir"])), title_justify="left")
    for name, justify in (("name", "left"), ("classes", "right"), ("train", "right"), ("test", "right"),
                          ("size", "right"), ("source", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for d in s["datasets"]:
        size = f"{d['bytes'] / 2**20:,.1f} MiB"
        if d["status"] != "ok":
            table.add_row(plain(d["name"]), styled(d["status"], "red"), plain(""), plain(""), plain(size), plain(""))
            continue
        source = d["source"] + (f" (test split {d['test_split']})" if d.get("test_split") else "")
        table.add_row(plain(d["name"]), plain(f"{d['classes']:,}"), plain(f"{d['train']:,}"), plain(f"{d['test']:,}"),
                      plain(size), plain(source))
    console.print(table)
