"""Every shipped workflow converts to an API prompt by the frontend's rules and runs in a real ComfyUI.

The server is the host of ``COMFYUI_PATH`` (ComfyUI 0.3.64 or 0.33.0) headless on CPU with the tiny seeded
checkpoint standing in for each placeholder (the SDXL ones: the tiny SDXL checkpoint with SDXL's text encoders,
``tools.tiny_sdxl_sd2``; the warp + inpaint ones: the tiny inpainting checkpoints, LoRA, FLUX Fill, VAE and
CLIP-L of ``tools.tiny_inpaint``), and the tiny generated ControlNet and 2x upscaler
standing in for the user's (``tools.tiny_models``); the image is a small synthetic one (the tiny
UNet is slow at 512 px on CPU), DDIM Invert runs 10 steps, LoRA Fine-tune 2
(batch 1), motion supervision a few. Also: the ControlNet chained into
KV-Injected Sample acts (in-process), the runner's single-sample and batch
modes on downscaled Drag100 samples, and a timed-out prompt being cancelled
(against a fake server).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dragrun.run_workflow import editor_state_for, fill_inputs, saved_images
from dragrun.workflow_format import ui_to_api
from tools.make_workflows import missing_on_host
from tools.tiny_inpaint import stand_ins_for, tiny_checkpoints
from tools.tiny_models import UPSCALER_SCALE
from tools.tiny_sam3 import feed_sam3_mask

from .batch_data import DRAG100, downscaled_drag100

pytestmark = pytest.mark.host

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "art_0"  # the README's first-run sample
POINTS = json.dumps({"points": [[40, 50], [70, 52], [90, 30], [96, 40]]})


def is_sdxl(workflow: Path) -> bool:
    """Whether a shipped workflow is made for an SDXL checkpoint (``<name>_sdxl.json``)."""
    return workflow.stem.endswith("_sdxl")


def tiny_checkpoint_for(workflow: dict, tiny_checkpoint: Path) -> Path:
    """The tiny checkpoint standing in for the workflow's Load Checkpoint placeholder (the tiny SD1.5 one by default)."""
    named = {n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple"}
    return next((build() for name, build in tiny_checkpoints().items() if name in named), tiny_checkpoint)


START_HERE = {
    "warp_inpaint_sd15": "START HERE: 1. Load Checkpoint: pick your SD1.5 inpainting checkpoint",
    "warp_inpaint_sdxl": "START HERE: 1. Load Checkpoint: pick your SDXL inpainting checkpoint",
    "warp_inpaint_flux_fill": "START HERE: 1. Load Diffusion Model: pick FLUX.1 Fill [dev]",
    "warp_inpaint_sam3": "START HERE: 1. Load Checkpoint: pick your SD1.5 inpainting checkpoint",
    "drag_to_video_wanmove": "START HERE: 1. Load Diffusion Model: pick Wan-Move",
    "fastdrag_flux": "START HERE: 1. Load Diffusion Model: pick FLUX.1 [dev]",
    "dragflow_flux": "START HERE: 1. Load Diffusion Model: pick FLUX.1 [dev]",
    "fastdrag_dragflow_flux": "START HERE: 1. Load Diffusion Model: pick FLUX.1 [dev]",
}
"""How each workflow's Note starts where it is not "pick your SD1.5 / SDXL checkpoint"."""

RUN_ELSEWHERE = {
    "drag_to_video_wanmove.json": "tests/host/test_wanmove_host.py (the tiny Wan, its text encoder swapped, CLIP vision "
                                  "dropped, 9 frames)",
    "fastdrag_flux.json": "tests/host/test_flux_workflow_host.py (the tiny FLUX.1 [dev], checked node by node)",
    "dragflow_flux.json": "tests/host/test_flux_workflow_host.py (the tiny FLUX.1 [dev], 3 + 1 supervision iterations)",
    "fastdrag_dragflow_flux.json": "tests/host/test_flux_workflow_host.py (the tiny FLUX.1 [dev], 2 + 1 supervision "
                                   "iterations, against runs without the supervision and without the warp)",
}
"""Workflows run to the end by a test of their own, on the same server, with what a generic run cannot set up."""
RUN_HERE = [w for w in WORKFLOWS if w.name not in RUN_ELSEWHERE]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, comfy_server):
    folder = tmp_path_factory.mktemp("workflow-inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 132, 3), dtype=np.uint8)).save(folder / "image.png")
    mask = np.zeros((100, 132), dtype=np.uint8)
    mask[20:80, 25:110] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    state = editor_state_for(folder / "image.png", POINTS, folder / "mask.png")
    return comfy_server.upload_image(folder / "image.png"), comfy_server.upload_image(folder / "mask.png"), state


def test_the_workflows_run_elsewhere_have_their_test():
    """A workflow left out of the generic run is run by the test file named for it (which names the workflow)."""
    tests = Path(__file__).resolve().parents[2]
    for name, where in RUN_ELSEWHERE.items():
        assert (WORKFLOWS[0].parent / name).is_file(), name
        assert name in (tests / where.split(" ")[0]).read_text(), (name, where)


@pytest.mark.parametrize("workflow", RUN_HERE, ids=[p.name for p in RUN_HERE])
def test_workflow_runs_on_the_tiny_checkpoint(workflow, comfy_server, tiny_checkpoint, tiny_controlnet, tiny_upscaler,
                                              inputs):
    if missing_on_host(workflow.name, comfy_server.object_info()):
        pytest.skip(missing_on_host(workflow.name, comfy_server.object_info()))
    saved_workflow = json.loads(workflow.read_text())
    prompt = ui_to_api(saved_workflow, comfy_server.object_info())
    feed_sam3_mask(prompt, inputs[1])  # no tiny SAM3 (tools/tiny_sam3.py): its mask is the test's mask image
    checkpoint = tiny_checkpoint_for(saved_workflow, tiny_checkpoint)
    fill_inputs(prompt, inputs[0], inputs[1], POINTS, checkpoint.name, "a test image", inputs[2],
                tiny_controlnet.name, tiny_upscaler.name, stand_ins=stand_ins_for(saved_workflow["nodes"]))
    kinds = {node["class_type"] for node in prompt.values()}
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
        if node["class_type"] == "DragKitDDIMInvert":
            node["inputs"]["steps"] = 10
        if node["class_type"] == "DragKitMotionSupervisionOptimize":
            node["inputs"].update(iterations=2, drag_steps=2, drags_per_step=1, grad_steps=1)
        if node["class_type"] == "DragKitLoRAFineTune":
            node["inputs"].update(steps=2, batch=1)
    entry = comfy_server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success"
    saved = [p for p in saved_images(comfy_server, entry) if p.suffix == ".png"]
    assert saved
    image = np.asarray(Image.open(saved[0]))
    scale = UPSCALER_SCALE if "ImageUpscaleWithModel" in kinds else 1
    assert image.shape == (100 * scale, 132 * scale, 3)
    if "DragKitLoRAFineTune" in kinds:  # trained (2 steps) and cached in the server's own loras folder
        assert list((comfy_server.dir("models") / "loras" / "dragkit-lora-cache").glob("*.safetensors"))
    if scale != 1:
        return  # the upscaled pixels are the model's, not the source's
    source = np.asarray(Image.open(comfy_server.dir("input") / inputs[0]).convert("RGB"))
    if kinds & {"DragKitFastDragWarp", "DragKitMotionSupervisionOptimize"}:
        outside = np.asarray(Image.open(comfy_server.dir("input") / inputs[1])) == 0
        assert np.array_equal(image[outside], source[outside])
    if "DragKitPixelWarp" in kinds:  # the moves are <= 30 px right and 10 px down, the band 5 px: rows and
        # columns that far from the mask (rows 20-79, columns 25-109) are the source's, exactly
        assert np.array_equal(image[:5], source[:5]) and np.array_equal(image[95:], source[95:])
        assert np.array_equal(image[:, :20], source[:, :20])
        assert not np.array_equal(image, source)


@pytest.mark.parametrize("name, steps", [("dragdiffusion.json", 80), ("gooddrag.json", 70), ("dragdiffusion_sdxl.json", 80)])
def test_motion_workflows_fine_tune_a_lora_first(comfy_server, name, steps):
    workflow = json.loads((WORKFLOWS[0].parent / name).read_text())
    prompt = ui_to_api(workflow, comfy_server.object_info())
    [(lora_id, lora)] = [(i, n) for i, n in prompt.items() if n["class_type"] == "DragKitLoRAFineTune"]
    checkpoint = next(i for i, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple")
    assert lora["inputs"]["model"] == [checkpoint, 0] and lora["inputs"]["steps"] == steps
    prompt_node = next(i for i, n in prompt.items() if n["class_type"] == "CLIPTextEncode")
    assert lora["inputs"]["positive"] == [prompt_node, 0]
    dragkit = [n for n in prompt.values() if n["class_type"].startswith("DragKit") and "model" in n["inputs"]
               and n is not lora]
    assert sorted(n["class_type"] for n in dragkit) == [
        "DragKitDDIMInvert", "DragKitKVInjectedSample", "DragKitMotionSupervisionOptimize"]
    assert all(n["inputs"]["model"] == [lora_id, 0] for n in dragkit)
    [note] = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "Note"]
    assert f"LoRA Fine-tune: the per-image identity LoRA the method trains first ({steps} steps" in note
    assert "until" not in note


@pytest.fixture(scope="module")
def controlnet_folder(comfy_inproc, tiny_controlnet):
    """The tiny ControlNet's folder registered as an in-process ``controlnet`` folder (removed afterwards)."""
    import folder_paths

    folder = str(tiny_controlnet.parent)
    folder_paths.add_model_folder_path("controlnet", folder)
    yield tiny_controlnet.name
    folder_paths.folder_names_and_paths["controlnet"][0].remove(folder)


def test_controlnet_in_the_conditioning_acts_on_kv_injected_sample(comfy_inproc, tiny_comfy_models, controlnet_folder):
    """Chaining: ControlNetApplyAdvanced's conditioning into KV-Injected Sample, in-process.

    With the ControlNet (strength 1) the sampled latent differs from the plain
    run; at strength 0 it is bit-identical -- both through ControlNetApplyAdvanced
    (which then passes the conditioning through) and with the ControlNet left in
    the conditioning at strength 0 (it runs, and adds exact zeros).
    """
    nodes, models = comfy_inproc.nodes, tiny_comfy_models
    image = torch.rand(1, 64, 80, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        (cond,) = nodes.CLIPTextEncode().encode(models.clip, "a test image")
        (latent,) = nodes.VAEEncode().encode(models.vae, image)
        (controlnet,) = nodes.ControlNetLoader().load_controlnet(controlnet_folder)
    z_t, cache = comfy_inproc.run_node("DragKitDDIMInvert", model=models.model, latent=latent, positive=cond,
                                       steps=10, strength=0.7, cache_layers="decoder", cache_device="auto")

    def sample(positive):
        return comfy_inproc.run_node("DragKitKVInjectedSample", model=models.model, latent=z_t, attn_cache=cache,
                                     positive=positive, kv_source="inversion cache", inject_layers="decoder",
                                     inject_start=0.0, inject_end=1.0)[0]["samples"]

    def controlled(strength):
        with torch.inference_mode():
            return nodes.ControlNetApplyAdvanced().apply_controlnet(cond, cond, controlnet, image, strength, 0.0, 1.0)[0]

    plain = sample(cond)
    with_controlnet = sample(controlled(1.0))
    assert torch.isfinite(with_controlnet).all()
    change = float((with_controlnet - plain).abs().mean() / plain.abs().mean())
    assert change > 0.01, change  # measured 5.1: the seeded (non-zero) zero-convs act from the first step
    assert torch.equal(sample(controlled(0.0)), plain)
    with torch.inference_mode():
        silent = controlnet.copy().set_cond_hint(image.movedim(-1, 1), 0.0, (0.0, 1.0))
    assert torch.equal(sample([[cond[0][0], {**cond[0][1], "control": silent}]]), plain)


def test_ui_conversion_matches_the_widget_order(comfy_server):
    info = comfy_server.object_info()
    workflow = json.loads((WORKFLOWS[0].parent / "fastdrag.json").read_text())
    prompt = ui_to_api(workflow, info)
    invert = next(n for n in prompt.values() if n["class_type"] == "DragKitDDIMInvert")
    assert invert["inputs"]["steps"] == 10 and invert["inputs"]["strength"] == 0.7
    assert invert["inputs"]["cache_layers"] == "decoder" and invert["inputs"]["cache_device"] == "auto"
    assert isinstance(invert["inputs"]["model"], list)
    load = next(n for n in prompt.values() if n["class_type"] == "LoadImage")
    assert set(load["inputs"]) == {"image"}
    assert not any(n["class_type"] == "Note" for n in prompt.values())


def test_fastdrag_workflows_take_points_and_mask_from_the_editor(comfy_server):
    """fastdrag, fastdrag_refine and fastdrag_controlnet_upscale: Load Image -> editor and VAE Encode; editor -> drag nodes."""
    info = comfy_server.object_info()
    for name in ("fastdrag.json", "fastdrag_refine.json", "fastdrag_controlnet_upscale.json"):
        prompt = ui_to_api(json.loads((WORKFLOWS[0].parent / name).read_text()), info)
        kinds = {node["class_type"] for node in prompt.values()}
        assert "DragKitPointsFromJSON" not in kinds and "LoadImageMask" not in kinds, name
        [editor] = [i for i, n in prompt.items() if n["class_type"] == "DragKitPointsEditor"]
        [load] = [i for i, n in prompt.items() if n["class_type"] == "LoadImage"]
        assert prompt[editor]["inputs"]["image"] == [load, 0]
        assert next(n for n in prompt.values() if n["class_type"] == "VAEEncode")["inputs"]["pixels"] == [load, 0]
        for node in prompt.values():
            if node["class_type"] in ("DragKitFastDragWarp", "DragKitVAEDecode", "DragKitMotionSupervisionOptimize"):
                assert node["inputs"]["points"] == [editor, 1] and node["inputs"]["mask"] == [editor, 2], name
    scripted = ui_to_api(json.loads((WORKFLOWS[0].parent / "fastdrag_json_points.json").read_text()), info)
    assert {"DragKitPointsFromJSON", "LoadImageMask"} <= {n["class_type"] for n in scripted.values()}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_each_workflow_has_a_thumbnail_and_a_note_that_says_what_to_select_first(workflow):
    assert workflow.with_suffix(".jpg").is_file()
    with Image.open(workflow.with_suffix(".jpg")) as thumbnail:
        assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 256
    notes = [n for n in json.loads(workflow.read_text())["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and notes[0]["pos"] == [40, 40]  # where the view opens
    text = notes[0]["widgets_values"][0]
    family = "SDXL" if is_sdxl(workflow) else "SD1.5"
    assert text.startswith(START_HERE.get(workflow.stem, f"START HERE: 1. Load Checkpoint: pick your {family} checkpoint"))
    assert "2. Load Image: pick or upload your photo." in text and "\nNeeds: " in text


def test_main_job_command_runs(tmp_path, comfyui):
    from dragrun.run_workflow import main

    sample = SAMPLE
    small = tmp_path / "sample"
    small.mkdir()
    Image.open(sample / "original.jpg").resize((128, 128)).save(small / "original.jpg")
    Image.open(sample / "mask.png").resize((128, 128)).save(small / "mask.png")
    points = json.loads((sample / "points.json").read_text())["points"]
    (small / "points.json").write_text(json.dumps({"points": [[x / 4, y / 4] for x, y in points]}))
    assert main([str(WORKFLOWS[0].parent / "fastdrag.json"), "--sample", str(small), "--out", str(tmp_path / "out")]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "original_side_by_side.png" in written and len(written) == 2
    assert torch.tensor(np.asarray(Image.open(tmp_path / "out" / "original_side_by_side.png"))).shape == (128, 256, 3)


def test_runner_batch_mode_resumes_and_records_failures(tmp_path, comfyui, capsys):
    """``--batch`` on two Drag100 samples (downscaled 4x) and a broken one, tiny checkpoint; then again."""
    from dragrun.run_workflow import main

    if not DRAG100.exists():
        pytest.skip(f"{DRAG100} (the Drag100 samples) is not present")
    data = tmp_path / "data"
    for name in ("art_0", "art_1"):
        downscaled_drag100(DRAG100 / name, data / name, 4)
    broken = data / "broken_0"
    shutil.copytree(data / "art_0", broken)
    (broken / "points.json").write_text("{not json")
    out = tmp_path / "out"
    argv = [str(WORKFLOWS[0].parent / "fastdrag.json"), "--batch", str(data), "--out", str(out)]

    assert main(argv) == 1  # the broken sample failed; the others ran
    timings = json.loads((out / "timings.json").read_text())
    assert timings["workflow"].endswith("fastdrag.json") and timings["tiny_checkpoint"] is True
    assert timings["checkpoint"].endswith(".safetensors")
    assert timings["run"]["prompt"] is None and timings["run"]["batch"] == str(data.resolve())
    assert len(timings["run"]["workflow_sha256"]) == 64 and timings["run"]["controlnet"] is None
    assert set(timings["samples"]) == {"art_0", "art_1", "broken_0"}
    for name, size in (("art_0", (128, 128)), ("art_1", (128, 168))):
        entry = timings["samples"][name]
        assert entry["status"] == "ok" and entry["seconds"] > 0 and (entry["width"], entry["height"]) == size
        assert "error" not in entry
        assert Image.open(out / name / "edited.png").size == size
        assert Image.open(out / name / "side_by_side.png").size == (2 * size[0], size[1])
    failure = timings["samples"]["broken_0"]
    assert failure["status"] == "error" and "points.json" in failure["error"] and not (out / "broken_0").exists()
    assert timings["summary"]["done"] == 2 and timings["summary"]["failed"] == 1 and timings["summary"]["skipped"] == 0
    assert timings["summary"]["median_seconds"] > 0
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert len(written) == 4

    assert main(argv) == 1  # art_0 and art_1 are skipped, broken_0 is tried (and fails) again
    again = json.loads((out / "timings.json").read_text())
    assert again["summary"] == {**timings["summary"], "skipped": 2}
    assert {k: again["samples"][k] for k in ("art_0", "art_1")} == {k: timings["samples"][k] for k in ("art_0", "art_1")}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == written
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # atomic writes leave no temporary files

    capsys.readouterr()
    assert main(argv + ["--prompt", "another prompt"]) == 2  # not the same run: refused, nothing run
    error = capsys.readouterr().err
    assert "holds the results of another run" in error and "--prompt: None before, 'another prompt' now" in error
    assert json.loads((out / "timings.json").read_text()) == again


def test_runner_timeout_cancels_the_prompt(tmp_path):
    """A prompt past its timeout is deleted from the queue and interrupted (a fake server that never finishes)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from dragrun.comfy_host import ComfyServer, ComfyServerError

    posts = []

    class NeverFinishes(BaseHTTPRequestHandler):
        def do_GET(self):  # /history/<id>: no entry yet
            self._reply(b"{}")

        def do_POST(self):
            posts.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self._reply(b"")

        def _reply(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NeverFinishes)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        server = ComfyServer(comfyui=tmp_path)
        server.port = httpd.server_address[1]
        with pytest.raises(ComfyServerError, match=r"did not finish within 0 s \(cancelled\)"):
            server.wait("p1", timeout=0.3, poll=0.05)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert posts == [("/queue", {"delete": ["p1"]}), ("/interrupt", {"prompt_id": "p1"})]


def test_shipped_workflows_are_what_the_generator_makes_now(comfy_server):
    """Every workflows/*.json equals tools.make_workflows' output for the live /object_info (a new input or widget
    of a node -- e.g. the editor's mask socket -- must be regenerated into them)."""
    from tools.make_workflows import WORKFLOWS as BUILDERS

    info = comfy_server.object_info()
    folder = WORKFLOWS[0].parent
    stale = [name for name, build in BUILDERS.items() if not missing_on_host(name, info)
             and json.loads((folder / name).read_text()) != json.loads(json.dumps(build(info)))]
    assert stale == [], f"regenerate with `python -m tools.make_workflows`: {stale}"
