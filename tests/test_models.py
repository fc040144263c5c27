"""Models: rebuilt from weights metadata alone, safetensors round trip, and they learn."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cifarctl.metrics import evaluate, logits, plain_and_tta_logits
from cifarctl.models import build_model, model_names
from cifarctl.weights import load_weights, save_weights

CONFIGS = {"tutorial": {"num_classes": 10}, "fast": {"num_classes": 10, "widths": [8, 16, 16], "stem": 8},
           "resnet18": {"num_classes": 10}}


def test_registry_lists_the_documented_models() -> None:
    """The registry offers tutorial, fast and resnet18 by name."""
    assert set(model_names()) >= {"tutorial", "fast", "resnet18"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_round_trips_through_safetensors(name: str, tmp_path: Path) -> None:
    """Every model is rebuilt from its weights file alone and gives the same outputs."""
    torch.manual_seed(0)
    model = build_model(name, CONFIGS[name]).eval()
    meta = {"model": name, "model_config": CONFIGS[name], "class_names": [str(i) for i in range(10)],
            "mean": [0.5] * 3, "std": [0.5] * 3}
    save_weights(tmp_path / "w.safetensors", model.state_dict(), meta)
    loaded = load_weights(tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.model.state_dict().keys() == model.state_dict().keys()


def test_tutorial_net_is_the_tutorials_architecture() -> None:
    """The tutorial model has the tutorial's layers and 62,006 parameters."""
    model = build_model("tutorial")
    assert sum(p.numel() for p in model.parameters()) == 62006
    assert [tuple(m.weight.shape) for m in (model.conv1, model.conv2, model.fc1, model.fc2, model.fc3)] == [
        (6, 3, 5, 5), (16, 6, 5, 5), (120, 400), (84, 120), (10, 84)]


@pytest.mark.parametrize("name", ["fast", "resnet18"])
def test_a_few_steps_lower_the_loss(name: str) -> None:
    """A few SGD steps on a fixed tiny batch lower its loss."""
    torch.manual_seed(0)
    model = build_model(name, CONFIGS[name])
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_flip_tta_equals_averaging_logits_by_hand() -> None:
    """Flip TTA is the mean of the logits of the batch and of its mirror image."""
    torch.manual_seed(0)
    model = build_model("fast", CONFIGS["fast"]).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        by_hand = (model(x) + model(x.flip(-1))) / 2
    assert torch.allclose(logits(model, x, batch_size=4, tta="flip"), by_hand, atol=1e-6)


def test_one_pass_gives_the_plain_and_the_tta_logits() -> None:
    """The final score's single pass gives the same plain and TTA logits as two separate passes."""
    torch.manual_seed(0)
    model = build_model("fast", CONFIGS["fast"]).to(memory_format=torch.channels_last).eval()
    x = torch.randn(10, 3, 32, 32)
    plain, averaged = plain_and_tta_logits(model, x, batch_size=4, tta="flip-translate")
    assert torch.allclose(plain, logits(model, x, batch_size=4), atol=1e-5)
    assert torch.allclose(averaged, logits(model, x, batch_size=4, tta="flip-translate"), atol=1e-5)
    assert not model.training


def test_evaluate_with_tta_scores_the_averaged_logits() -> None:
    """evaluate(tta=flip) counts top-1 hits of the averaged logits."""
    torch.manual_seed(0)
    model = build_model("fast", CONFIGS["fast"]).eval()
    x, y = torch.randn(20, 3, 32, 32), torch.arange(20) % 10
    with torch.no_grad():
        pred = ((model(x) + model(x.flip(-1))) / 2).argmax(1)
    assert evaluate(model, x, y, 10, tta="flip").correct == int((pred == y).sum())


def _write_header(path: Path, header: bytes) -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header)


def test_deeply_nested_header_is_a_clear_error(tmp_path: Path) -> None:
    """A header of deeply nested JSON is refused with a usage error, not a RecursionError traceback."""
    from cifarctl.errors import UsageError

    _write_header(tmp_path / "w.safetensors", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(UsageError, match="not JSON"):
        load_weights(tmp_path / "w.safetensors")


def test_metadata_of_the_wrong_type_is_a_clear_error(tmp_path: Path) -> None:
    """class_names that are not a list of names, or a mean that is not 3 numbers, are refused."""
    from cifarctl.errors import UsageError

    model = build_model("tutorial")
    good = {"model": "tutorial", "model_config": {"num_classes": 10}, "class_names": [str(i) for i in range(10)],
            "mean": [0.5] * 3, "std": [0.5] * 3}
    for key, value in (("class_names", 5), ("mean", [0.5]), ("class_names", ["a", "b"])):
        save_weights(tmp_path / "w.safetensors", model.state_dict(), {**good, key: value})
        with pytest.raises(UsageError):
            load_weights(tmp_path / "w.safetensors")


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_fast_model_trains_in_bf16() -> None:
    """torch.compile'd `fast` gives finite bf16 gradients close to eager ones (--compile used to give NaN)."""
    torch.manual_seed(0)
    eager = build_model("fast", CONFIGS["fast"])
    compiled = build_model("fast", CONFIGS["fast"])
    compiled.load_state_dict(eager.state_dict())
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    grads = []
    for model, forward in ((eager, eager), (compiled, torch.compile(compiled))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(forward(x), y).backward()
        grads.append(model.head.weight.grad)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.allclose(grads[0], grads[1], rtol=0.1, atol=1e-2)


def test_whitening_init_sums_its_moments_in_chunks_without_changing_them() -> None:
    """The stem's filters from chunked float64 moments equal those from all 2x2 patches at once,
    at 32x32 and 64x64 (the chunking exists to keep 5,000 images' patches out of memory)."""
    from cifarctl.models import build_model

    for size in (32, 64):
        images = torch.rand(1200, 3, size, size, dtype=torch.float64)
        images[:, 1] = 0.7 * images[:, 0] + 0.3 * images[:, 1]  # correlated channels, as in photos
        model = build_model("fast", {"num_classes": 10})
        model.init_whitening(images.float())
        patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
        patches = patches - patches.mean(0)
        eigvals, eigvecs = torch.linalg.eigh(patches.T @ patches / len(patches))
        k = model.stem[0].out_channels // 2
        filters = (eigvecs[:, -k:].T / torch.sqrt(eigvals[-k:, None] + 5e-4)).view(k, 3, 2, 2)
        got = model.stem[0].weight[:k].double()
        # eigenvectors are defined up to sign: compare each filter with the same or the negated one
        signs = torch.sign((got * filters).sum((1, 2, 3))).view(k, 1, 1, 1)
        assert torch.allclose(got, signs * filters, rtol=1e-3, atol=1e-3)
