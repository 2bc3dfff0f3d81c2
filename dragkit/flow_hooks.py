"""FLUX's key/value blocks: listing, the layer-selection text, and the hooks that let a control edit keys/values.

Works on any network in Black Forest Labs' FLUX layout (BFL's reference,
FireFlow's ``flux`` package, ComfyUI's ``comfy.ldm.flux``): ``double_blocks[i]``
compute the image stream's queries/keys/values with one linear layer
``img_attn.qkv`` (output ``[q | k | v]``, each ``hidden`` wide), and
``single_blocks[j]`` with the first ``3 · hidden`` outputs of ``linear1``
(then the MLP input), on the text tokens followed by the image tokens.

The keys/values a control sees are those linear layers' outputs, before the
QK norm and RoPE (both per token, so replacing them before equals replacing
them after) -- the outputs of the diffusers layout's ``attn.to_k``/``to_v``
that DragFlow hooks. Shapes: double block ``(B, img_tokens, hidden)``; single
block ``(B, txt_tokens + img_tokens, hidden)``. ``img_tokens = (h/2)(w/2)``
for an ``h x w`` latent (2x2 patches); FLUX.1: hidden 3072, 512 text tokens
(T5), 4096 image tokens at 1024².
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.utils.checkpoint

from .attention import AttentionControl, AttnLayer
from .errors import DragInputError

NON_RIDGE = {"double": (0, 7, 8, 9, 10, 18), "single": (6, 9, 18, 23, 26, 31, 37)}
"""DragFlow's ``hook_block_combo: non-ridge`` blocks of FLUX.1 (19 double, 38 single)."""

FLUX_LAYER_HELP = (
    'Comma-separated: "non-ridge" (DragFlow\'s blocks: double 0,7,8,9,10,18 and single 6,9,18,23,26,31,37, those '
    'this model has), "all", "double", "single", "none", a block "d7" / "s18", or a range "d7-10" / "s30-". '
    "FLUX.1 has 19 double-stream (d0-d18) and 38 single-stream (s0-s37) blocks."
)

_TERM = re.compile(r"^([ds])(\d+)(?:\s*-\s*(\d*))?$")


def flux_layers(network: torch.nn.Module) -> tuple[AttnLayer, ...]:
    """The key/value blocks of a FLUX-layout ``network``: every double block, then every single block.

    ``AttnLayer.stage`` is ``"double"`` or ``"single"``, ``index`` the
    position in execution order, ``name`` e.g. ``"double_blocks.7"``,
    ``channels`` the hidden width.
    """
    doubles = list(getattr(network, "double_blocks", []))
    singles = list(getattr(network, "single_blocks", []))
    if not doubles and not singles:
        raise DragInputError("this network has no FLUX double- or single-stream blocks")
    layers = []
    for stage, blocks in (("double", doubles), ("single", singles)):
        for number, block in enumerate(blocks):
            hidden = int(getattr(block, "hidden_size", 0) or block.img_attn.qkv.weight.shape[0] // 3)
            layers.append(AttnLayer(index=len(layers), stage=stage, name=f"{stage}_blocks.{number}", channels=hidden))
    return tuple(layers)


def block_number(layer: AttnLayer) -> int:
    """The block's number within its stream (``"single_blocks.6"`` -> 6)."""
    return int(layer.name.rsplit(".", 1)[1])


def select_flux_layers(layers: tuple[AttnLayer, ...], spec: str) -> tuple[AttnLayer, ...]:
    """The blocks a spec names (see :data:`FLUX_LAYER_HELP`), in execution order."""
    if not isinstance(spec, str):
        raise DragInputError(f"the block selection must be text, got {type(spec).__name__}")
    terms = [t.strip().lower() for t in spec.split(",") if t.strip()]
    if not terms:
        raise DragInputError(f"empty block selection. {FLUX_LAYER_HELP}")
    counts = {stage: sum(layer.stage == stage for layer in layers) for stage in ("double", "single")}
    chosen: set[tuple[str, int]] = set()
    for term in terms:
        if term == "none":
            continue
        if term == "all":
            chosen.update((layer.stage, block_number(layer)) for layer in layers)
        elif term == "non-ridge":
            chosen.update((stage, n) for stage, numbers in NON_RIDGE.items() for n in numbers if n < counts[stage])
        elif term in ("double", "single"):
            chosen.update((term, n) for n in range(counts[term]))
        elif match := _TERM.match(term):
            stage = "double" if match.group(1) == "d" else "single"
            lo = int(match.group(2))
            hi = lo if match.group(3) is None else (int(match.group(3)) if match.group(3) else counts[stage] - 1)
            if lo > hi or hi >= counts[stage]:
                raise DragInputError(
                    f'block "{term}" is outside this model\'s {counts[stage]} {stage}-stream blocks. {FLUX_LAYER_HELP}'
                )
            chosen.update((stage, n) for n in range(lo, hi + 1))
        else:
            raise DragInputError(f'cannot read block selection term "{term}" on a FLUX model. {FLUX_LAYER_HELP}')
    return tuple(layer for layer in layers if (layer.stage, block_number(layer)) in chosen)


def _projection(network: torch.nn.Module, layer: AttnLayer) -> torch.nn.Module:
    block = getattr(network, f"{layer.stage}_blocks")[block_number(layer)]
    return block.img_attn.qkv if layer.stage == "double" else block.linear1


def _hook(layer: AttnLayer, control: AttentionControl):
    hidden = layer.channels

    def hook(module, inputs, output):
        k, v = output[..., hidden : 2 * hidden], output[..., 2 * hidden : 3 * hidden]
        new_k, new_v = control(layer, k, v)
        if new_k is k and new_v is v:
            return output
        return torch.cat([output[..., :hidden], new_k.to(output.dtype), new_v.to(output.dtype), output[..., 3 * hidden :]], dim=-1)

    return hook


@contextmanager
def kv_hooks(network: torch.nn.Module, layers: tuple[AttnLayer, ...], control: AttentionControl):
    """While open, every block of ``layers`` passes its keys/values through ``control`` (forward hooks, removed on exit)."""
    handles = [_projection(network, layer).register_forward_hook(_hook(layer, control)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


FEATURE_POINTS = ("modulated", "output")
"""Where a double-stream block's image-stream features are read (DragFlow's ``DOUBLE-i-0`` and ``DOUBLE-i-2``):
``modulated`` = the image tokens after the block's first modulated LayerNorm, the input of ``img_attn.qkv``
(diffusers' ``norm1`` output ``norm_hidden_states``); ``output`` = the block's image-stream output, after the
attention and MLP residuals."""


class FeaturesCaptured(Exception):
    """Raised by :func:`feature_hooks` after the last feature block when the rest of the network is not wanted."""


@contextmanager
def feature_hooks(network: torch.nn.Module, blocks: tuple[tuple[int, str], ...], capture: dict):
    """While open, the image-stream features ``(block number, point)`` of the double-stream blocks land in ``capture``.

    ``capture[(block, point)]`` is ``(B, img_tokens [+ reference tokens], hidden)``, in the autograd graph.
    When ``capture["stop"]`` is true, the forward raises :class:`FeaturesCaptured` right after the last
    block named in ``blocks`` (the caller catches it; the single-stream blocks are skipped).

    Blocks 0 to the last one are made differentiable as they run: ComfyUI's double blocks update their
    streams in place (``txt +=``; 0.33.0 also ``img +=``) after a LayerNorm saved them for the backward,
    so each of their four LayerNorms (``img_norm1/2``, ``txt_norm1/2``) gets a copy of its input, and a
    captured block output is a copy (the next block adds to it in place).
    """
    doubles = list(getattr(network, "double_blocks", []))
    for number, point in blocks:
        if point not in FEATURE_POINTS:
            raise DragInputError(f"feature point {point!r} is not one of {FEATURE_POINTS}")
        if not 0 <= number < len(doubles):
            raise DragInputError(f"feature block d{number} is outside this model's {len(doubles)} double-stream blocks")
    last = max(number for number, _ in blocks)
    handles = []

    def modulated(number):
        def hook(module, inputs):
            capture[(number, "modulated")] = inputs[0]
        return hook

    def output(number):
        def hook(module, inputs, out):
            if (number, "output") in blocks:
                capture[(number, "output")] = out[0].clone()
            if number == last and capture.get("stop"):
                raise FeaturesCaptured
        return hook

    def copy_input(module, inputs):
        return (inputs[0].clone(),) + tuple(inputs[1:])

    for block in doubles[: last + 1]:
        for name in ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2"):
            handles.append(getattr(block, name).register_forward_pre_hook(copy_input))
    for number in sorted({number for number, _ in blocks}):
        block = doubles[number]
        if (number, "modulated") in blocks:
            handles.append(block.img_attn.qkv.register_forward_pre_hook(modulated(number)))
        handles.append(block.register_forward_hook(output(number)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def checkpointed_double_blocks(network: torch.nn.Module, upto: int, enabled: bool = True):
    """While open, double-stream blocks 0..``upto`` recompute their activations in the backward (gradient checkpointing).

    Each block's ``forward`` is wrapped in ``torch.utils.checkpoint`` (non-reentrant) on the instance and
    restored on exit; hooks registered on the block itself still run outside the checkpoint. Saves the
    activations of every block but its inputs and outputs, for one more forward of those blocks in the backward.
    """
    if not enabled:
        yield
        return
    blocks = list(network.double_blocks)[: upto + 1]
    originals = [block.forward for block in blocks]
    own = [block.__dict__.get("forward") for block in blocks]

    def wrap(forward):
        def streams_copied(*args, **kwargs):  # the block adds to its streams in place: keep the saved inputs intact
            args = tuple(a.clone() if i < 2 and isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
            kwargs = {k: a.clone() if k in ("img", "txt") and isinstance(a, torch.Tensor) else a for k, a in kwargs.items()}
            return forward(*args, **kwargs)

        def checkpointed(*args, **kwargs):
            return torch.utils.checkpoint.checkpoint(streams_copied, *args, use_reentrant=False, **kwargs)
        return checkpointed

    for block, forward in zip(blocks, originals):
        block.forward = wrap(forward)
    try:
        yield
    finally:
        for block, previous in zip(blocks, own):
            if previous is None:
                del block.forward
            else:
                block.forward = previous
