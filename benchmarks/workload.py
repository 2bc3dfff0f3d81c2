"""What each benchmarked method does: schedules, iteration counts, LoRA steps.

:data:`FULL` is the methods' released defaults (METHODS.md). :data:`TINY`
(``--tiny``) keeps every stage but shortens the schedules and loops so the
whole benchmark runs in seconds on a CPU; its numbers check the pipeline,
they are not method timings. The JSON states the workload used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dragkit.dragdiffusion import DragDiffusionSettings
from dragkit.gooddrag import GoodDragSettings
from dragkit.lora import LoRATrainingConfig

_DD, _GD, _LORA = DragDiffusionSettings(), GoodDragSettings(), LoRATrainingConfig()

METHODS = ("fastdrag", "lora", "dragdiffusion", "gooddrag")
"""Benchmarked method groups, in run order (``--methods``)."""

SDXL_METHODS = ("fastdrag", "lora", "dragdiffusion")
"""The groups benchmarked by default for SDXL (``--model sdxl``): those issue 17 sets goals for."""

FEATHER = 8
"""Feather (pixels) of the decode paste, as the workflows' VAE Decode (DragKit)."""


@dataclass(frozen=True)
class Workload:
    """Knobs of the benchmarked edits (defaults: the released methods)."""

    fastdrag_steps: int = 10
    fastdrag_strength: float = 0.7
    lora_steps: int = _LORA.steps
    lora_batch: int = _LORA.batch
    lora_rank: int = _LORA.rank
    dragdiffusion_steps: int = 50
    dragdiffusion_strength: float = 0.7
    dragdiffusion_iterations: int = _DD.iterations
    gooddrag_steps: int = 50
    gooddrag_strength: float = 0.75
    gooddrag_drag_steps: int = _GD.drag_steps
    gooddrag_drags_per_step: int = _GD.drags_per_step
    gooddrag_grad_steps: int = _GD.grad_steps

    def as_dict(self) -> dict:
        return asdict(self)

    def dragdiffusion_iterations_for(self, short: bool) -> int:
        """DragDiffusion iterations: the workload's, or 2 for a warm-up (``short``)."""
        return 2 if short else self.dragdiffusion_iterations

    def gooddrag_counts(self, short: bool) -> tuple[int, int, int]:
        """GoodDrag's (T drag steps, B drags per step, J gradient steps): the workload's, or (1, 1, 1) for a warm-up."""
        return (1, 1, 1) if short else (self.gooddrag_drag_steps, self.gooddrag_drags_per_step, self.gooddrag_grad_steps)


FULL = Workload()
TINY = Workload(
    lora_steps=4, dragdiffusion_steps=10, dragdiffusion_iterations=4, gooddrag_steps=10,
    gooddrag_drag_steps=2, gooddrag_drags_per_step=2, gooddrag_grad_steps=1,
)
