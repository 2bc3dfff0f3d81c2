"""Drag-editing metrics: DAI, MD and IF (METHODS.md, "Metrics (the evaluator)").

- :mod:`~dragkit.metrics.dai`: GoodDrag's Dragging Accuracy Index, in both
  normalisations (``DAI (paper)`` and ``DAI (as released)``); no weights.
- :mod:`~dragkit.metrics.matching` and :mod:`~dragkit.metrics.dift`:
  DragDiffusion's Mean Distance (MD): DIFT features of the source and the
  result, cosine argmax of each handle's feature over the whole result,
  pixel distance to the target. Needs an SD2.1 diffusers folder the user
  supplies.
- :mod:`~dragkit.metrics.lpips`: Image Fidelity IF = 1 − LPIPS (AlexNet),
  with LPIPS weights the user supplies.

A metric whose weights are absent or incomplete raises
:class:`MetricUnavailable` with the reason; callers report the metric as
skipped with that reason, never a made-up value.

Images are ``(H, W, 3)`` RGB, either uint8 or float in [0, 1]; points are
``(x, y)`` source-image pixels (x right, y down).
"""

from .dai import DAI_GAMMAS, DAI_PAPER, DAI_RELEASED, dai, dai_pair_sums, patch
from .dift import load_dift
from .errors import MetricUnavailable
from .images import as_float_image
from .lpips import image_fidelity, load_lpips
from .matching import match_points, mean_distance

__all__ = [
    "DAI_GAMMAS",
    "DAI_PAPER",
    "DAI_RELEASED",
    "MetricUnavailable",
    "as_float_image",
    "dai",
    "dai_pair_sums",
    "image_fidelity",
    "load_dift",
    "load_lpips",
    "match_points",
    "mean_distance",
    "patch",
]
