"""LoRA Fine-tune: a per-image identity LoRA on the MODEL, cached and saved as a regular LoRA file."""

from __future__ import annotations

from pathlib import Path

import comfy.utils
import folder_paths

from ..dragkit.errors import DragInputError
from ..dragkit.atomic import save_safetensors_atomic
from ..dragkit.lora import LoRATrainingConfig, cache_key, config_fingerprint, pixel_digest, weights_fingerprint
from .comfy_backend import check_conditioning_fits
from .comfy_lora import (
    ComfyLoRATrainer,
    apply_lora,
    conditioning_digest,
    effective_weights_fingerprint,
    encode_latent,
    single_prompt,
)
from .common import CATEGORY, log, node_errors, progress_reporter
from .file_names import check_save_name, check_target, without_path
from .model_family import require_unet

NODE_NAME = "LoRA Fine-tune"
CACHE_FOLDER = "dragkit-lora-cache"
"""Sub-folder of ComfyUI's first ``loras`` folder that holds cached LoRAs (``<key>.safetensors``)."""
FORMAT_VERSION = "dragkit-lora-v2"
"""Part of every cache key; bump when training or the file format changes."""
NONE = "none"
SUFFIX = ".safetensors"

STATS = {"trainings": 0, "cache_hits": 0, "loaded": 0}
"""Counters (this process): LoRAs trained, cache hits, existing LoRAs loaded. Tests read them."""


def loras_root() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])


def _lora_choices() -> list[str]:
    try:
        return [NONE] + list(folder_paths.get_filename_list("loras"))
    except Exception:  # noqa: BLE001 - a broken models folder must not hide the node
        return [NONE]


def _save(lora_sd: dict, path: Path, relative: str, metadata: dict) -> None:
    """Write the LoRA; a failure names the file inside the loras folder, not its server path."""
    try:
        save_safetensors_atomic(lora_sd, path, metadata)
    except OSError as err:
        raise DragInputError(f"cannot write loras/{relative}: {err.strerror or type(err).__name__}") from None


def _load(path: Path | str, relative: str) -> dict:
    """Read the LoRA file ``path`` (``relative`` to the loras folder); a failure names it ``loras/<relative>``.

    ComfyUI's loader and safetensors name a corrupt file by its server path
    (``File path: /...``); the message keeps only the first line, without it.
    """
    try:
        return comfy.utils.load_torch_file(str(path), safe_load=True)
    except Exception as err:  # safetensors, torch.load (pickle) and OS errors alike: the file is unusable
        shown = f"loras/{relative}"
        detail = without_path(str(err).strip().split("\n")[0], str(path), shown) or type(err).__name__
        raise DragInputError(f"cannot read {shown} as a LoRA file ({detail}); replace or delete it") from None


def _text_progress(node_id, total: int):
    """Sends 'step k/N loss x' under the node in the UI (when a server runs), and logs every tenth."""
    server = None
    try:
        from server import PromptServer

        server = PromptServer.instance if node_id is not None else None
    except Exception:  # noqa: BLE001 - no server in headless/in-process use
        server = None
    every = max(1, total // 10)

    def show(done: int, loss: float) -> None:
        if done % every == 0 or done == total:
            log.info("DragKit LoRA Fine-tune: step %d/%d loss %.4f", done, total, loss)
        if server is not None:
            try:
                server.send_progress_text(f"LoRA step {done}/{total}  loss {loss:.4f}", node_id)
            except Exception:  # noqa: BLE001
                pass

    return show


class LoRAFineTune:
    DESCRIPTION = (
        "Fine-tunes a per-image identity LoRA (rank r on to_q/to_k/to_v/to_out of every attention layer) on the "
        "image, as DragDiffusion (80 steps) and GoodDrag (70 steps, empty prompt) do before editing: ε-MSE at "
        "uniformly drawn timesteps, AdamW, constant lr. The input MODEL is not changed; the output MODEL is a clone "
        "with the LoRA applied as a regular LoRA patch. The LoRA is saved as safetensors in ComfyUI's loras folder "
        "(loadable with LoraLoader) and cached by image, model, prompt and every parameter, so a re-run costs nothing."
    )
    CATEGORY = CATEGORY
    FUNCTION = "finetune"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "lora_name")
    OUTPUT_TOOLTIPS = (
        "A clone of the input MODEL with the LoRA applied (strength 1). Connect it to DDIM Invert, the drag nodes "
        "and KSampler.",
        "The LoRA's file name in the loras folder (as LoraLoader lists it); empty when nothing was written.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to adapt (it is not changed)."}),
                "vae": ("VAE", {"tooltip": "The VAE that encodes the image (the same one the edit uses)."}),
                "image": ("IMAGE", {"tooltip": "The one image to fine-tune on (the image being edited)."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt describing the image (DragDiffusion); encode an empty prompt for GoodDrag's default."}),
                "steps": ("INT", {"default": 80, "min": 1, "max": 10000, "tooltip": "Training steps: 80 DragDiffusion, 70 GoodDrag."}),
                "rank": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": "LoRA rank r (16 as the references)."}),
                "alpha": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 1024.0, "step": 0.01, "tooltip": "LoRA alpha; the update is scaled by alpha / rank (16/16 = 1 as the references)."}),
                "lr": ("FLOAT", {"default": 5e-4, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False, "tooltip": "AdamW learning rate, constant (5e-4 as the references)."}),
                "batch": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Items per step, each with its own timestep and noise (4 as the references)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False, "tooltip": "Seed of the LoRA initialisation and of every random draw (same seed, same LoRA on CPU)."}),
                "save_name": ("STRING", {"default": "", "tooltip": "Also save the LoRA as loras/<save_name>.safetensors (empty = do not save under a name)."}),
                "use_cache": ("BOOLEAN", {"default": True, "tooltip": "Reuse a LoRA trained before on the same image, model, prompt and parameters (kept in loras/dragkit-lora-cache/); off = always train and write no cache file."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace loras/<save_name>.safetensors when it already exists (off = refuse before training and name the file)."}),
            },
            "optional": {
                "existing_lora": (_lora_choices(), {"default": NONE, "tooltip": "Load this LoRA from the loras folder instead of training (none = train)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, save_name=None):
        """Refuses a bad save_name before anything runs (a linked one is checked when the node starts)."""
        if save_name is None:
            return True
        try:
            check_save_name(save_name, SUFFIX, CACHE_FOLDER)
        except DragInputError as err:
            return f"[{NODE_NAME}] {err}"
        return True

    def finetune(self, model, vae, image, positive, steps, rank, alpha, lr, batch, seed, save_name, use_cache,
                 overwrite=False, existing_lora=NONE, unique_id=None):
        with node_errors(NODE_NAME):
            require_unet(model, "The per-image LoRA (on the UNet's attention layers)")
            relative = check_save_name(save_name, SUFFIX, CACHE_FOLDER)
            if existing_lora and existing_lora != NONE:
                path = folder_paths.get_full_path("loras", existing_lora)
                if path is None:
                    raise DragInputError(f"existing_lora={existing_lora!r} is not in the loras folder")
                lora_sd = _load(path, existing_lora)
                STATS["loaded"] += 1
                log.info("DragKit LoRA Fine-tune: loaded %s instead of training", existing_lora)
                return (apply_lora(model, lora_sd), existing_lora)

            config = LoRATrainingConfig(steps=steps, rank=rank, alpha=alpha, lr=lr, batch=batch, seed=seed).validate()
            single_prompt(positive)
            check_conditioning_fits(model, positive)
            target = None if relative is None else check_target("loras", loras_root(), relative, overwrite, CACHE_FOLDER)
            key = cache_key([
                ("format", FORMAT_VERSION),
                ("image", pixel_digest(image)),
                ("vae", weights_fingerprint(vae.first_stage_model)),
                ("model", effective_weights_fingerprint(model)),
                ("prompt", conditioning_digest(positive)),
                ("config", config_fingerprint(config)),
            ])
            cache_relative = f"{CACHE_FOLDER}/{key[:32]}.safetensors"
            cache_path = loras_root() / cache_relative
            if use_cache and cache_path.is_file():
                lora_sd = _load(cache_path, cache_relative)
                STATS["cache_hits"] += 1
                log.info("DragKit LoRA Fine-tune: cache hit %s, not training", cache_relative)
            else:
                mean, std = encode_latent(model, vae, image)
                lora_sd = _train(model, positive, config, mean, std, unique_id)
                if use_cache:
                    _save(lora_sd, cache_path, cache_relative, _metadata(key, config))
            name = cache_relative if use_cache else ""
            if target is not None:
                _save(lora_sd, target, relative, _metadata(key, config))
                name = relative
                log.info("DragKit LoRA Fine-tune: saved loras/%s", name)
        return (apply_lora(model, lora_sd), name)


def _train(model, positive, config: LoRATrainingConfig, mean, std, unique_id) -> dict:
    """Train a LoRA on a clone of ``model`` with a progress bar; returns its state dict (ComfyUI keys)."""
    report = progress_reporter(config.steps)
    show = _text_progress(unique_id, config.steps)

    def progress(done: int, loss: float) -> None:
        report(done)
        show(done, loss)

    trainer = ComfyLoRATrainer(model, positive, config)
    try:
        result = trainer.train(mean, std, progress)
        STATS["trainings"] += 1
        log.info(
            "DragKit LoRA Fine-tune: trained %d steps in %.1f s (%.3f s/step), loss %.4f -> %.4f",
            config.steps, result.seconds, result.seconds_per_step, result.losses[0], result.losses[-1],
        )
        return trainer.lora_state_dict()
    finally:
        trainer.close()


def _metadata(key: str, config: LoRATrainingConfig) -> dict:
    return {"dragkit_lora": FORMAT_VERSION, "dragkit_cache_key": key, **{f"dragkit_{k}": v for k, v in config.as_dict().items()}}


NODE_CLASS_MAPPINGS = {"DragKitLoRAFineTune": LoRAFineTune}
NODE_DISPLAY_NAME_MAPPINGS = {"DragKitLoRAFineTune": "LoRA Fine-tune (DragKit)"}
