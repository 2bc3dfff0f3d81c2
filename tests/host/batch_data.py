"""Small Drag100 samples for the runner's batch tests (``test_workflows.py``, ``test_batch_*.py``)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DRAG100 = Path(__file__).resolve().parents[3] / "shared" / "data" / "Drag100"
"""The Drag100 samples beside the repository (the tests that need them skip when absent)."""


def downscaled_drag100(source: Path, target: Path, factor: int) -> None:
    """Copy a Drag100 sample folder with the image, mask and points scaled down by ``factor``."""
    from dragkit.datasets import DragSample, load_sample, save_drag100
    from dragkit.points import DragPoints

    sample = load_sample(source)
    width, height = sample.width // factor, sample.height // factor
    image = np.asarray(Image.fromarray(sample.image).resize((width, height), Image.BICUBIC))
    mask = np.asarray(Image.fromarray(sample.mask).resize((width, height), Image.NEAREST))
    scale = [tuple(c / factor for c in p) for p in sample.points.handles], [tuple(c / factor for c in p) for p in sample.points.targets]
    save_drag100(DragSample(image, DragPoints(*scale, width, height), mask), target)


def small_samples(folder: Path, names: tuple[str, ...]) -> Path:
    """``folder`` holding the named Drag100 samples downscaled 4x (about 128 px); skips when Drag100 is absent."""
    if not DRAG100.exists():
        pytest.skip(f"{DRAG100} (the Drag100 samples) is not present")
    for name in names:
        downscaled_drag100(DRAG100 / name, folder / name, 4)
    return folder


def records(out: Path) -> dict:
    """A batch's timings.json without what differs between runs of the same samples (seconds)."""
    timings = json.loads((out / "timings.json").read_text())
    for entry in timings["samples"].values():
        entry.pop("seconds")
    timings["summary"].pop("median_seconds")
    return timings


def files(out: Path) -> list[str]:
    """Every file under a batch's output folder, relative to it, sorted."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
