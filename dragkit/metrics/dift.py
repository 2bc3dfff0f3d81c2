"""DIFT features for MD (DragDiffusion's ``dift_sd.py`` protocol) on the diffusers UNet API.

For an image at its own size (no resize), in [-1, 1]:

1. encode it with the VAE and draw ``ensemble`` (8) posterior samples, times
   the VAE's ``scaling_factor``;
2. noise each to timestep ``t`` = 261: z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε
   (``scheduler.add_noise``; ᾱ from the model's scheduler config);
3. one UNet pass at ``t`` with the sample's prompt embedding (no CFG); keep the
   output of decoder block ``up_blocks[1]`` (SD2.1: 1280 channels at H/16 ×
   W/16) and skip the rest of the UNet;
4. average over the ensemble → ``(C, h, w)``.

:func:`~dragkit.metrics.matching.mean_distance` then upsamples and matches.

The published MD numbers used ``stabilityai/stable-diffusion-2-1`` (the
768-v model) in float32; give its diffusers folder to :func:`load_dift`.

Randomness: every :meth:`DIFTFeaturizer.features` call draws its posterior
samples and noise from a CPU generator seeded with ``seed`` (default 42), so
a result gets the same draws whatever was evaluated before it and on every
device. (The reference seeds the global RNG once per evaluated folder and
consumes it in directory order, so its draws depend on file-system order.)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..errors import DragInputError
from ..schedule import scaled_linear_alphas_cumprod
from .errors import MetricUnavailable
from .images import to_model_input

DIFT_TIMESTEP = 261
DIFT_UP_BLOCK = 1
DIFT_ENSEMBLE = 8
DIFT_SEED = 42

TOKENIZER_FILES = ("vocab.json", "tokenizer.json")
"""A CLIP tokenizer folder holds at least one of these (SD2.1's: vocab.json and merges.txt)."""

PromptEncoder = Callable[[str], torch.Tensor]
"""``encode(prompt) -> (1, tokens, dim)`` text embedding the UNet's cross-attention takes."""


class _StopForward(Exception):
    """Raised by the feature hook to skip the UNet after the chosen decoder block."""


class DIFTFeaturizer:
    """DIFT features from a diffusers ``UNet2DConditionModel`` and ``AutoencoderKL``.

    Args:
        unet, vae: the models, on the same device (float32 as the reference).
        encode_prompt: text → ``(1, tokens, dim)`` embedding.
        alphas_cumprod: ᾱ per training timestep ``(T,)``; default SD's
            scaled_linear schedule (that of SD2.1).
        timestep, up_block, ensemble, seed: the protocol's constants.
        batch: ensemble members per UNet call (lower it to save memory).
    """

    def __init__(
        self,
        unet,
        vae,
        encode_prompt: PromptEncoder,
        alphas_cumprod: torch.Tensor | None = None,
        timestep: int = DIFT_TIMESTEP,
        up_block: int = DIFT_UP_BLOCK,
        ensemble: int = DIFT_ENSEMBLE,
        seed: int = DIFT_SEED,
        batch: int | None = None,
    ) -> None:
        if not 0 <= up_block < len(unet.up_blocks):
            raise DragInputError(f"this UNet has {len(unet.up_blocks)} decoder blocks; DIFT reads block {up_block}")
        self.unet, self.vae, self.encode_prompt = unet, vae, encode_prompt
        self.alphas = (scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).to(torch.float64)
        if not 0 <= timestep < self.alphas.shape[0]:
            raise DragInputError(f"DIFT timestep {timestep} is outside the model's {self.alphas.shape[0]} timesteps")
        self.timestep, self.up_block, self.ensemble, self.seed = int(timestep), int(up_block), int(ensemble), int(seed)
        self.batch = int(batch or ensemble)
        self.prompt_note: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def features(self, image, prompt: str = "") -> torch.Tensor:
        """DIFT features of one ``(H, W, 3)`` image (uint8 or [0, 1] float): ``(C, h, w)`` float32 on the CPU."""
        device, dtype = self.device, next(self.unet.parameters()).dtype
        x = to_model_input(image).to(device, next(self.vae.parameters()).dtype)
        posterior = self.vae.encode(x).latent_dist
        scale = float(self.vae.config.scaling_factor)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        shape = (self.ensemble,) + tuple(posterior.mean.shape[1:])
        draws = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
        noise = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
        z0 = (posterior.mean.float() + posterior.std.float() * draws) * scale
        alpha = float(self.alphas[self.timestep])
        z_t = alpha**0.5 * z0 + (1.0 - alpha) ** 0.5 * noise
        context = self.encode_prompt(prompt).to(device, dtype)
        total = None
        for start in range(0, self.ensemble, self.batch):
            chunk = z_t[start : start + self.batch].to(dtype)
            block = self._block_output(chunk, context.expand(chunk.shape[0], -1, -1)).float()
            total = block.sum(0) if total is None else total + block.sum(0)
        return (total / self.ensemble).cpu()

    def _block_output(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        captured = {}

        def hook(module, inputs, output):
            captured["out"] = output
            raise _StopForward

        handle = self.unet.up_blocks[self.up_block].register_forward_hook(hook)
        try:
            t = torch.full((z.shape[0],), self.timestep, dtype=torch.long, device=z.device)
            self.unet(z, t, encoder_hidden_states=context)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "out" not in captured:
            raise DragInputError(f"the UNet's decoder block {self.up_block} never ran")
        return captured["out"]


# ----------------------------------------------------------------------------------------------
# Loading a user-supplied model


@contextlib.contextmanager
def _unavailable_on_load_error(what: str) -> Iterator[None]:
    """Turn a loader's error on a missing, partial or corrupt file into :class:`MetricUnavailable` naming ``what``."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as err:
        raise MetricUnavailable(f"MD: cannot load {what}: {type(err).__name__}: {err}") from None


def _require(folder: Path, sub: str, what: str) -> Path:
    path = folder / sub
    if not (path / "config.json").is_file():
        raise MetricUnavailable(
            f"MD needs a DIFT model: {folder} has no {sub}/config.json ({what}). Give --dift the diffusers folder "
            "of stabilityai/stable-diffusion-2-1 (unet/, vae/, scheduler/, tokenizer/, text_encoder/)"
        )
    return path


def fixed_prompt_encoder(path: Path) -> PromptEncoder:
    """An encoder that returns the ``prompt_embeds`` tensor ``(1, tokens, dim)`` stored in a safetensors file."""
    import safetensors.torch

    if not path.is_file():
        raise MetricUnavailable(f"MD: the prompt embedding file {path} does not exist")
    with _unavailable_on_load_error(f"the prompt embedding file {path}"):
        tensors = safetensors.torch.load_file(str(path))
    embeds = tensors.get("prompt_embeds")
    if embeds is None or embeds.dim() != 3 or embeds.shape[0] != 1:
        raise MetricUnavailable(
            f"MD: {path} must hold a tensor 'prompt_embeds' of shape (1, tokens, dim), found {sorted(tensors)}"
        )
    return lambda prompt: embeds


def clip_prompt_encoder(folder: Path, device: torch.device) -> PromptEncoder:
    """The folder's CLIP tokenizer + text encoder (transformers).

    Prompts are padded (and truncated) to the shorter of the tokenizer's and
    the encoder's maximum length (77 for SD's CLIP), as the diffusers pipeline
    the reference used encodes them; the output is the last hidden state.
    """
    _require(folder, "text_encoder", "the text encoder")
    if not any((folder / "tokenizer" / name).is_file() for name in TOKENIZER_FILES):
        # (transformers would build a two-token tokenizer from an empty folder without a word)
        raise MetricUnavailable(f"MD: {folder} has no tokenizer/ folder with {' or '.join(TOKENIZER_FILES)}")
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise MetricUnavailable(
            "MD: encoding the samples' prompts needs the transformers package (pip install transformers), "
            "or pass a fixed prompt embedding with --dift-prompt-embeds"
        ) from None
    with _unavailable_on_load_error(f"the tokenizer from {folder / 'tokenizer'}"):
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    with _unavailable_on_load_error(f"the text encoder from {folder / 'text_encoder'}"):
        encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True).to(device).eval()
    length = min(int(tokenizer.model_max_length), int(encoder.config.max_position_embeddings))
    cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(prompt: str) -> torch.Tensor:
        if prompt not in cache:
            ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
            cache[prompt] = encoder(ids.to(device))[0].float()
        return cache[prompt]

    return encode


def scheduler_alphas(folder: Path) -> torch.Tensor:
    """ᾱ from ``scheduler/scheduler_config.json`` (scaled_linear or linear betas); SD's default without one."""
    config_path = folder / "scheduler" / "scheduler_config.json"
    if not config_path.is_file():
        return scaled_linear_alphas_cumprod()
    with _unavailable_on_load_error(f"the scheduler config {config_path}"):
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        steps = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    kind = config.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        return scaled_linear_alphas_cumprod(steps, start, end)
    if kind == "linear":
        return torch.cumprod(1.0 - torch.linspace(start, end, steps, dtype=torch.float64), dim=0)
    raise MetricUnavailable(f"MD: unsupported beta_schedule {kind!r} in {config_path}")


def load_dift(
    folder, device: str | torch.device = "cpu", prompt_embeds: str | Path | None = None, batch: int | None = None
) -> DIFTFeaturizer:
    """Load a diffusers model folder (SD2.1 for the published protocol) as a :class:`DIFTFeaturizer`.

    ``folder`` must hold ``unet/`` and ``vae/`` (``config.json`` + weights),
    and either ``tokenizer/`` + ``text_encoder/`` (needs transformers) or a
    ``prompt_embeds`` safetensors file with the embedding to use for every
    sample (then the featurizer's ``prompt_note`` says the prompts were not
    encoded). ``scheduler/scheduler_config.json`` gives ᾱ (default: SD's).
    Nothing is downloaded; raises :class:`MetricUnavailable` naming what is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MetricUnavailable(f"MD: the DIFT model folder {folder} does not exist")
    from diffusers import AutoencoderKL, UNet2DConditionModel

    device = torch.device(device)
    unet_dir, vae_dir = _require(folder, "unet", "the UNet"), _require(folder, "vae", "the VAE")
    with _unavailable_on_load_error(f"the DIFT UNet from {unet_dir}"):
        unet = UNet2DConditionModel.from_pretrained(str(unet_dir), local_files_only=True).to(device).eval()
    with _unavailable_on_load_error(f"the DIFT VAE from {vae_dir}"):
        vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).to(device).eval()
    vae.decoder = None
    if prompt_embeds is not None:
        encoder = fixed_prompt_encoder(Path(prompt_embeds))
    else:
        encoder = clip_prompt_encoder(folder, device)
    alphas = scheduler_alphas(folder)
    try:
        featurizer = DIFTFeaturizer(unet, vae, encoder, alphas, batch=batch)
    except DragInputError as err:  # a UNet or schedule the protocol cannot use
        raise MetricUnavailable(f"MD: the model in {folder} does not fit the DIFT protocol: {err}") from None
    if prompt_embeds is not None:
        featurizer.prompt_note = f"one fixed prompt embedding from {prompt_embeds} for every sample"
    return featurizer
