"""Small Drag100 samples for the runner's batch tests (``test_workflows.py``, ``test_batch_*.py``)."""

from pathlib import Path

import numpy as np
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
