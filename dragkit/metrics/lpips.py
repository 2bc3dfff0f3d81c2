"""IF = 1 − LPIPS (AlexNet, v0.1), with weights the user supplies.

LPIPS (Zhang et al. 2018, the ``lpips`` package with ``net="alex"``):
inputs in [-1, 1] are shifted and scaled per channel, passed through
AlexNet's convolutional trunk, and at each of the five ReLU outputs (64, 192,
384, 256, 256 channels) the features are unit-normalised over channels
(``x / (‖x‖ + 1e-10)``); the squared difference of the two images' features
is weighted per channel by a learned non-negative 1×1 convolution, averaged
over space, and summed over the five layers.

IF protocol (DragDiffusion's ``run_eval_similarity.py``): the result is
resized to the source's size (bilinear), both go to [-1, 1] and are resized
with ``F.interpolate(..., (224, 224), mode="bilinear")``; IF = 1 − LPIPS.

The AlexNet trunk is built here with torchvision's layer layout (the same
``features.N`` indices), so neither torchvision nor a download is needed.

Weights (:func:`load_lpips`), either

- one file (``.pth`` or ``.safetensors``) holding the whole LPIPS state dict
  as ``lpips.LPIPS(net="alex").state_dict()`` saves it:
  ``net.slice{1..5}.{N}.weight|bias`` (N = torchvision's index: 0, 3, 6, 8, 10)
  and ``lin{0..4}.model.1.weight``; or
- a folder with the two files the ``lpips`` package itself combines:
  ``alex.pth`` (the linear layers, ``lin{k}.model.1.weight`` of shape
  ``(1, C, 1, 1)``, shipped in ``lpips/weights/v0.1/``) and torchvision's
  ImageNet AlexNet, ``alexnet-owt-7be5be79.pth`` (``features.{N}.weight|bias``;
  ``classifier.*`` is ignored). Any ``alexnet*.pth`` / ``alexnet*.safetensors``
  file in the folder is taken for the latter.

``.pth`` files are read with ``torch.load(weights_only=True)`` (no code runs).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DragInputError
from .errors import MetricUnavailable
from .images import to_model_input

CHANNELS = (64, 192, 384, 256, 256)
"""Channels of AlexNet's five ReLU outputs that LPIPS compares."""

CONV_INDICES = (0, 3, 6, 8, 10)
"""torchvision's ``alexnet().features`` indices of the five convolutions."""

RELU_INDICES = (1, 4, 7, 9, 11)
"""Indices of the ReLUs whose outputs LPIPS reads."""

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
IF_SIZE = 224
NORM_EPS = 1e-10


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet convolutional trunk up to the fifth ReLU (same module indices)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
    )


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet trunk; :meth:`forward` gives ``(B,)`` distances for inputs in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.features = alexnet_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in CHANNELS)

    def _layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        h = (x - self.shift) / self.scale
        for index, module in enumerate(self.features):
            h = module(h)
            if index in RELU_INDICES:
                outs.append(h)
        return outs

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS between ``a`` and ``b``, ``(B, 3, H, W)`` in [-1, 1] → ``(B,)``."""
        total = 0.0
        for fa, fb, lin in zip(self._layers(a), self._layers(b), self.lins):
            na = fa / (fa.square().sum(dim=1, keepdim=True).sqrt() + NORM_EPS)
            nb = fb / (fb.square().sum(dim=1, keepdim=True).sqrt() + NORM_EPS)
            total = total + lin((na - nb).square()).mean(dim=(2, 3))
        return total[:, 0]


@torch.no_grad()
def image_fidelity(model: LPIPS, source, result) -> float:
    """IF = 1 − LPIPS of two same-size ``(H, W, 3)`` images (uint8 or [0, 1]), both resized to 224²."""
    a, b = to_model_input(source), to_model_input(result)
    if a.shape != b.shape:
        raise DragInputError("IF compares images of the same size; resize the result to the source's size first")
    device = next(model.parameters()).device
    a = F.interpolate(a, size=(IF_SIZE, IF_SIZE), mode="bilinear", align_corners=False).to(device)
    b = F.interpolate(b, size=(IF_SIZE, IF_SIZE), mode="bilinear", align_corners=False).to(device)
    return 1.0 - float(model(a, b)[0])


# ----------------------------------------------------------------------------------------------
# Weights


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            return safetensors.torch.load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file: say which, whatever the loader raised
        raise MetricUnavailable(f"IF: cannot read LPIPS weights from {path}: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict):
        raise MetricUnavailable(f"IF: {path} does not hold a state dict")
    return state


def _mapped(state: dict) -> dict[str, torch.Tensor]:
    """This module's keys from LPIPS (``net.sliceK.N``) or torchvision (``features.N``) keys + ``linK``.

    A value that is not a tensor is left out (then reported missing).
    """
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    out = {}
    slice_of = {index: s + 1 for s, index in enumerate(CONV_INDICES)}
    for index in CONV_INDICES:
        for param in ("weight", "bias"):
            for key in (f"net.slice{slice_of[index]}.{index}.{param}", f"features.{index}.{param}"):
                if key in tensors:
                    out[f"features.{index}.{param}"] = tensors[key]
    for k in range(len(CHANNELS)):
        for key in (f"lin{k}.model.1.weight", f"lin{k}.model.0.weight"):
            if key in tensors:
                out[f"lins.{k}.weight"] = tensors[key]
                break
    return out


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MetricUnavailable(f"IF needs LPIPS weights: {path} does not exist")
    lin = [p for p in (path / "alex.pth", path / "alex.safetensors") if p.is_file()]
    trunk = sorted(p for p in path.iterdir() if p.name.startswith("alexnet") and p.suffix in (".pth", ".safetensors"))
    if not lin or not trunk:
        raise MetricUnavailable(
            f"IF needs LPIPS weights: {path} must contain alex.pth (the lpips package's linear layers, "
            "lpips/weights/v0.1/alex.pth) and torchvision's alexnet-owt-7be5be79.pth"
        )
    return [lin[0], trunk[0]]


def load_lpips(path, device: str | torch.device = "cpu") -> LPIPS:
    """An :class:`LPIPS` with the weights at ``path`` (a file or a folder; see the module docstring).

    Raises :class:`MetricUnavailable` naming the missing keys or files.
    """
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        state.update(_read(file))
    model = LPIPS()
    wanted = {k: v.shape for k, v in model.state_dict().items() if k not in ("shift", "scale")}
    mapped = _mapped(state)
    missing = sorted(set(wanted) - set(mapped))
    if missing:
        raise MetricUnavailable(
            f"IF: the LPIPS weights at {path} are incomplete, missing {missing} "
            "(expected lin0..lin4.model.1.weight and AlexNet features.0/3/6/8/10 weights and biases)"
        )
    wrong = [f"{k} {tuple(mapped[k].shape)} != {tuple(s)}" for k, s in wanted.items() if mapped[k].shape != s]
    if wrong:
        raise MetricUnavailable(f"IF: the LPIPS weights at {path} have wrong shapes: {wrong}")
    model.load_state_dict(mapped, strict=False)
    return model.to(device).eval().requires_grad_(False)
