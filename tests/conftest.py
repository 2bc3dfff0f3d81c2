"""Shared fixtures of DragKit's tests.

Fixtures
--------
``backend``            The engine's DiffusersBackend over ``micro_unet(seed=0)`` (no ComfyUI needed).
``repo_root``          Path of the repository (= the pack).
``comfyui``            Path of the ComfyUI checkout (``COMFYUI_PATH``); skips without it.
``comfy_nodes``        ComfyUI's ``nodes`` module in this process (CPU, built-in nodes initialised,
                       input/output/temp/user redirected to a temp folder); no pack loaded.
``comfy_inproc``       :class:`dragrun.comfy_host.InprocHost`: ComfyUI in this process (CPU),
                       built-in nodes initialised, the pack loaded as ComfyUI loads it.
                       ``comfy_inproc.nodes`` is ComfyUI's ``nodes`` module,
                       ``comfy_inproc.pack`` the pack package (``.nodes``, ``.dragkit``).
``tiny_checkpoint``    Path of the cached tiny SD1.5 checkpoint (built once; needs ComfyUI).
``tiny_comfy_models``  :class:`dragrun.comfy_host.LoadedCheckpoint` -- the tiny checkpoint loaded
                       in-process with CheckpointLoaderSimple: ``.model`` (MODEL), ``.clip``,
                       ``.vae``, ``.log`` (ComfyUI's log records during the load, DEBUG level).
``tiny_sd15_diffusers`` ``tiny_sd15_unet(seed=0, levels=4)``: the same UNet weights as the
                       checkpoint, as a diffusers model. Shared: do not modify it (build your
                       own with ``tiny_models.tiny_sd15_unet()`` if a test must).
``tiny_controlnet``    Path of the cached tiny SD1.5 ControlNet (matches the tiny checkpoint's UNet).
``tiny_upscaler``      Path of the cached tiny 2x upscale model (RealESRGAN Compact).
``tiny_sdxl_checkpoint`` Path of the cached tiny SDXL checkpoint with SDXL's text encoders
                       (``tools.tiny_sdxl_sd2.tiny_sdxl_checkpoint_path(with_clip=True)``).
``tiny_sd15_inpaint_checkpoint`` / ``tiny_sdxl_inpaint_checkpoint`` Paths of the cached tiny SD1.5- and
                       SDXL-inpainting checkpoints (9-channel UNets; ``tools.tiny_inpaint``).
``tiny_lcm_lora``      Path of the cached tiny LoRA for the SD1.5-inpainting UNet (the LCM-LoRA's stand-in).
``tiny_flux_fill``     Path of the cached tiny FLUX.1 Fill diffusion model (UNETLoader).
``tiny_flux_vae``      Path of the cached 16-channel tiny VAE (VAELoader; FLUX's ``ae.safetensors``).
``tiny_clip_l``        Path of the cached stand-alone tiny CLIP-L (CLIPLoader type sd3 conditions the tiny FLUX).
``tiny_flux_dev``      Path of the cached tiny FLUX.1 [dev] diffusion model (UNETLoader; ``tools.tiny_flux``).
``tiny_wan_i2v`` / ``tiny_wan_vae`` Paths of the cached tiny Wan 2.1 I2V model and Wan VAE (``tools.tiny_wan``).
``loras_dir``          A fresh ``loras`` folder (one per test module), first in the in-process
                       ComfyUI's list: where LoRA Fine-tune writes and LoraLoader looks.
``comfy_server``       :class:`dragrun.comfy_host.ComfyServer` running ``main.py --cpu`` with the
                       pack in ``custom_nodes/dragkit``, the tiny checkpoint and the tiny SDXL
                       checkpoint in ``models/checkpoints``, the tiny ControlNet in
                       ``models/controlnet`` and the tiny upscaler in ``models/upscale_models``;
                       the tiny inpainting checkpoints, LoRA, FLUX Fill, FLUX.1 [dev], their VAE and CLIP-L, the
                       tiny Wan I2V and its VAE too (one server per pytest worker serves every test);
                       ``PYTHONWARNINGS=always``, so every warning reaches its log.

All ComfyUI fixtures are session-scoped and skip with a clear message when
``COMFYUI_PATH`` is unset or not a checkout. Tests under ``tests/host/`` are
marked ``host`` automatically; any test marked ``host`` is skipped without
ComfyUI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dragrun import comfy_host
from tools import tiny_flux, tiny_inpaint, tiny_models, tiny_sdxl_sd2, tiny_wan

HOST_DIR = Path(__file__).resolve().parent / "host"


HEAVY_FIRST = (
    "host/test_workflows.py",
    "host/test_batch_ray.py",
    "host/test_fresh_clone.py",
    "host/test_workflows_browser.py",
    "host/test_flux_workflow_host.py",
    "host/test_bench_sdxl_host.py",
    "test_bench.py",
    "host/test_sdxl_sd2_host.py",
    "host/test_workflows_open_clean.py",
    "host/test_batch_servers.py",
    "host/test_sdxl_workflows_host.py",
    "host/test_capture_host.py",
)
"""The test files that take about a minute or more on 2 cores (CI's JUnit times), longest first. They run
first: ``scripts/test.sh`` hands whole files to its pytest workers in collection order
(``--dist loadfile --no-loadscope-reorder``), so starting with the longest lets the workers finish together
instead of one running a long file alone at the end. Order only; ``tests/test_suite_order.py`` checks each exists."""


def _schedule_heavy_first(items: list) -> None:
    """Reorder ``items`` in place: the files of :data:`HEAVY_FIRST` in its order, then the others by their number
    of tests, most first (what pytest-xdist's own reordering does), each file's tests in their own order."""
    files: dict[Path, list] = {}
    for item in items:
        files.setdefault(Path(item.path).resolve(), []).append(item)
    rank = {(Path(__file__).resolve().parent / name).resolve(): i for i, name in enumerate(HEAVY_FIRST)}
    order = sorted(files, key=lambda path: (rank.get(path, len(rank)), -len(files[path])))
    items[:] = [item for path in order for item in files[path]]


def pytest_collection_modifyitems(config, items):
    _schedule_heavy_first(items)
    problem = comfy_host.comfyui_problem()
    skip_host = pytest.mark.skip(reason=problem) if problem else None
    for item in items:
        path = Path(str(getattr(item, "path", item.fspath))).resolve()
        if HOST_DIR in path.parents:
            item.add_marker(pytest.mark.host)
        if skip_host is not None and item.get_closest_marker("host") is not None:
            item.add_marker(skip_host)


def pytest_report_header(config):
    path = comfy_host.comfyui_path()
    if path is None:
        return "ComfyUI host: none (COMFYUI_PATH unset; host tests skip)"
    problem = comfy_host.comfyui_problem()
    version = comfy_host.comfyui_version(path)
    return f"ComfyUI host: {path} (version {version})" + (f" -- UNUSABLE: {problem}" if problem else "")


@pytest.fixture(scope="session")
def backend():
    """The engine's diffusers backend over ``micro_unet(seed=0)`` (shared: tests must not change its weights)."""
    from dragkit.diffusers_backend import DiffusersBackend

    return DiffusersBackend(tiny_models.micro_unet(seed=0).eval())


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return comfy_host.repo_root()


@pytest.fixture(scope="session")
def comfyui() -> Path:
    problem = comfy_host.comfyui_problem()
    if problem is not None:
        pytest.skip(problem)
    return comfy_host.comfyui_path()


@pytest.fixture(scope="session")
def comfy_nodes(comfyui, tmp_path_factory):
    return comfy_host.init_comfy_inproc(work_dir=tmp_path_factory.mktemp("comfy-inproc"))


@pytest.fixture(scope="session")
def comfy_inproc(comfy_nodes) -> comfy_host.InprocHost:
    return comfy_host.load_pack_inproc()


@pytest.fixture(scope="session")
def tiny_checkpoint(comfyui) -> Path:
    return tiny_models.tiny_checkpoint_path()


@pytest.fixture(scope="session")
def tiny_comfy_models(comfy_nodes, tiny_checkpoint) -> comfy_host.LoadedCheckpoint:
    return comfy_host.load_checkpoint_inproc(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_sd15_diffusers():
    return tiny_models.tiny_sd15_unet(seed=0, levels=4)


@pytest.fixture(scope="session")
def tiny_controlnet(comfyui) -> Path:
    return tiny_models.tiny_controlnet_path()


@pytest.fixture(scope="session")
def tiny_upscaler(comfyui) -> Path:
    return tiny_models.tiny_upscaler_path()


@pytest.fixture(scope="module")
def loras_dir(comfy_inproc, tmp_path_factory):
    """A fresh loras folder, first in ComfyUI's list (where LoRA Fine-tune writes)."""
    import folder_paths

    path = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(path), is_default=True)
    yield path
    folder_paths.folder_names_and_paths["loras"][0].remove(str(path))


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(comfyui) -> Path:
    return tiny_sdxl_sd2.tiny_sdxl_checkpoint_path(with_clip=True)


@pytest.fixture(scope="session")
def tiny_sd15_inpaint_checkpoint(comfyui) -> Path:
    return tiny_inpaint.tiny_sd15_inpaint_checkpoint_path()


@pytest.fixture(scope="session")
def tiny_sdxl_inpaint_checkpoint(comfyui) -> Path:
    return tiny_inpaint.tiny_sdxl_inpaint_checkpoint_path()


@pytest.fixture(scope="session")
def tiny_lcm_lora(comfyui) -> Path:
    return tiny_inpaint.tiny_lcm_lora_path()


@pytest.fixture(scope="session")
def tiny_flux_fill(comfyui) -> Path:
    return tiny_inpaint.tiny_flux_fill_path()


@pytest.fixture(scope="session")
def tiny_flux_vae(comfyui) -> Path:
    return tiny_inpaint.tiny_flux_vae_path()


@pytest.fixture(scope="session")
def tiny_clip_l(comfyui) -> Path:
    return tiny_inpaint.tiny_clip_l_path()


@pytest.fixture(scope="session")
def tiny_flux_dev(comfyui) -> Path:
    return tiny_flux.tiny_flux_dev_path()


@pytest.fixture(scope="session")
def tiny_wan_i2v(comfyui) -> Path:
    return tiny_wan.tiny_wan_i2v_path()


@pytest.fixture(scope="session")
def tiny_wan_vae(comfyui) -> Path:
    return tiny_wan.tiny_wan_vae_path()


@pytest.fixture(scope="session")
def comfy_server(comfyui, tiny_checkpoint, tiny_sdxl_checkpoint, tiny_controlnet, tiny_upscaler,
                 tiny_sd15_inpaint_checkpoint, tiny_sdxl_inpaint_checkpoint, tiny_lcm_lora, tiny_flux_fill,
                 tiny_flux_dev, tiny_flux_vae, tiny_clip_l, tiny_wan_i2v, tiny_wan_vae):
    with comfy_host.ComfyServer(
            checkpoints=[tiny_checkpoint, tiny_sdxl_checkpoint, tiny_sd15_inpaint_checkpoint, tiny_sdxl_inpaint_checkpoint],
            controlnets=[tiny_controlnet], upscale_models=[tiny_upscaler], loras=[tiny_lcm_lora],
            diffusion_models=[tiny_flux_fill, tiny_flux_dev, tiny_wan_i2v], vae=[tiny_flux_vae, tiny_wan_vae],
            text_encoders=[tiny_clip_l],
            env={**os.environ, "PYTHONWARNINGS": "always"}) as server:
        yield server
