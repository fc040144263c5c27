"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def import_dataset(source: str, work: Path) -> Path:
    """Import `source` into the cifarctl cache under `work` once (not timed); returns the data dir."""
    data_dir = work / "data"
    subprocess.run([sys.executable, "-m", "cifarctl", "download", "--source", source, "--data-dir", str(data_dir),
                    "--json"], check=True, capture_output=True)
    return data_dir
