"""Run a shipped workflow headless through ComfyUI's own execution engine: one sample, or a folder of them.

    COMFYUI_PATH=/path/to/ComfyUI bash scripts/run_workflow.sh workflows/fastdrag.json \\
        --sample samples/art_0 --checkpoint /models/sd15.safetensors --out out/

    COMFYUI_PATH=/path/to/ComfyUI bash scripts/run_workflow.sh workflows/fastdrag.json \\
        --batch ../shared/data/Drag100 --checkpoint /models/sd15.safetensors --out runs/fastdrag [--limit N]

Starts ComfyUI (``COMFYUI_PATH``) headless with this pack, converts the UI
workflow to an API prompt by the frontend's rules, fills in the image,
points, mask and models, queues it, and writes the results.

**One sample**: ``--image`` (and ``--points`` JSON / ``--mask`` image), or
``--sample`` a folder in the Drag100 layout (``original.jpg``, ``mask.png``,
``points.json``). Every saved image is copied into ``--out``, plus
``<image stem>_side_by_side.png`` (source | result with the points drawn).

**Batch** (``--batch DIR``): every sample folder under ``DIR`` in the Drag100
or DragBench layout (:func:`dragkit.datasets.sample_folders`), sorted, the
first ``--limit`` of them, through one ComfyUI server. Output layout (read
by the evaluator; :mod:`dragrun.batch_layout`)::

    OUT/<sample folder name>/edited.png          the workflow's first saved image
    OUT/<sample folder name>/side_by_side.png    source | edited, points drawn
    OUT/timings.json                             see write_timings()

**Beyond one server**: ``--server URL`` (repeatable) shares the samples out
over ComfyUI servers that are already running (:mod:`dragrun.servers`:
each is checked up front for the pack and the workflow's models);
``--ray [ADDRESS]`` over Ray actors that start one ComfyUI each
(:mod:`dragrun.ray_workers`). The workers get each sample's inputs over
HTTP and send back its image (:mod:`dragrun.distribute`); this process alone
writes ``OUT``, in the same layout.

``timings.json`` is rewritten atomically after every sample. A rerun with
the same ``--out`` skips every sample recorded ``ok`` whose ``edited.png``
exists; it must be the same run (workflow content, ``--prompt``, model files,
``--batch`` folder: see :func:`run_identity`), else it is refused. A failing
sample is recorded and the batch goes on; a sample that runs past
``--timeout`` is interrupted and removed from ComfyUI's queue first. A
DragBench sample's own prompt is used unless ``--prompt`` is given.

Exit codes: 0 done; 1 some sample failed (batch) or the workflow saved no
image; 2 bad input (a message says which); 3 ComfyUI failed (did not start,
exited during the batch: every worker lost, or the single run's prompt
failed); 130 Ctrl+C during a batch (finished samples stay; a rerun resumes).

Models: without ``--checkpoint`` the tiny seeded test checkpoint is used (for
a workflow whose Load Checkpoint names the shipped SDXL placeholder, the tiny
SDXL checkpoint with SDXL's text encoders; for the inpainting and FLUX Fill
placeholders, the tiny models of ``tools.tiny_inpaint``) and the runner says loudly that
the output is a pipeline check, not an edit. A
workflow with a ControlNet or an upscale model needs ``--controlnet`` /
``--upscale-model`` files with a real checkpoint; with the tiny checkpoint
they default to the tiny generated ones.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dragkit.atomic import write_bytes_atomic
from dragkit.errors import DragInputError
from dragkit.points import DragPoints, parse_drag_points
from dragrun.refusals import NOT_FOR_THE_RUNNER

from .batch_layout import EDITED, SIDE_BY_SIDE, TIMINGS, batch_sample_folders, draw_points, read_timings, write_png
from .comfy_host import ComfyServer, ComfyServerError, comfyui_path, comfyui_problem
from .distribute import Job, Recipe, Result, ServerWorker, distribute
from .run_progress import NodeProgress, node_names, say, started
from .workflow_format import MODE_BYPASS, MODE_MUTED, ui_to_api

EXIT_SAMPLES_FAILED = 1
"""Exit code: a sample of the batch failed, or the single run saved no image."""
EXIT_BAD_INPUT = 2
"""Exit code: bad input (the message says which); nothing was run."""
EXIT_COMFYUI = 3
"""Exit code: ComfyUI did not start, exited during the batch (every worker lost), or the single run's prompt failed."""
EXIT_INTERRUPTED = 130
"""Exit code: Ctrl+C during a batch (the finished samples are on disk; a rerun resumes)."""
STARTUP_TIMEOUT = 600.0
"""Seconds ComfyUI may take to answer after its start: 10-60 s on two idle cores, minutes when they are shared."""

TINY_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! No --checkpoint given: using the tiny seeded TEST checkpoint (random weights).\n"
    "!! The output is a pipeline check, NOT an edit. Pass --checkpoint <your .safetensors> for real results.\n"
    + "!" * 78 + "\n"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path, help="a UI-format workflow JSON (e.g. workflows/fastdrag.json)")
    parser.add_argument("--image", type=Path, help="the image to edit")
    parser.add_argument("--points", type=Path, help="points JSON (Drag100 {'points': [[x, y], ...]} or DragKit form)")
    parser.add_argument("--mask", type=Path, help="editable-region image (white = editable)")
    parser.add_argument("--sample", type=Path, help="a Drag100-layout folder (original.jpg, mask.png, points.json)")
    parser.add_argument("--batch", type=Path, help="a folder of sample folders (Drag100 or DragBench layout): batch mode")
    parser.add_argument("--limit", type=int, default=None, help="batch mode: run only the first N samples (sorted by path)")
    parser.add_argument("--checkpoint", type=Path,
                        help="a checkpoint file (SD1.x; SDXL for the *_sdxl workflows); default: a tiny test checkpoint")
    parser.add_argument("--controlnet", type=Path, help="ControlNet file for a workflow with Load ControlNet Model")
    parser.add_argument("--upscale-model", type=Path, help="upscale model file for a workflow with Load Upscale Model")
    parser.add_argument("--prompt", default=None, help="text for every CLIP Text Encode node (default: as in the workflow)")
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out/)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the run (batch: per sample)")
    parser.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                        help="where ComfyUI computes: auto = the GPU when PyTorch sees CUDA, else the CPU")
    parser.add_argument("--comfy-arg", dest="comfy_args", action="append", default=[], metavar="ARG",
                        help="an argument for ComfyUI's main.py, e.g. --comfy-arg=--disable-dynamic-vram; repeatable")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE_TYPE.INPUT=VALUE",
                        help="set a widget of every node of that type, e.g. DragKitLoRAFineTune.steps=10 "
                             "(VALUE read as JSON, else as text); repeatable")
    parser.add_argument("--server", action="append", default=[], metavar="URL",
                        help="batch mode: run the samples on this already running ComfyUI (with the DragKit pack and "
                             "the workflow's models), e.g. http://gpu-box:8188; repeatable: the samples are shared out")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="batch mode: run the samples on Ray actors, one ComfyUI each (one per GPU; with --device "
                             "cpu one per --cpus-per-actor CPUs); ADDRESS: auto joins the running cluster, none "
                             "starts a local one (needs: pip install -r requirements-cluster.txt)")
    parser.add_argument("--cpus-per-actor", type=int, default=4,
                        help="--ray with --device cpu: CPUs per actor (default 4)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        args.overrides = [parse_override(text) for text in args.overrides]
    except DragInputError as error:
        parser.error(str(error))
    if args.batch is not None:
        given = [name for name in ("image", "points", "mask", "sample") if getattr(args, name) is not None]
        if given:
            parser.error(f"--batch takes its inputs from the sample folders; drop --{', --'.join(given)}")
        if args.limit is not None and args.limit < 1:
            parser.error("--limit must be at least 1")
        if args.server and args.ray is not None:
            parser.error("give --server or --ray, not both")
        if args.cpus_per_actor < 1:
            parser.error("--cpus-per-actor must be at least 1")
        return args
    if args.server or args.ray is not None:
        parser.error("--server and --ray share out a --batch")
    if args.limit is not None:
        parser.error("--limit only applies to --batch")
    if args.sample is not None:
        args.image = args.image or args.sample / "original.jpg"
        args.points = args.points or args.sample / "points.json"
        args.mask = args.mask or (args.sample / "mask.png" if (args.sample / "mask.png").exists() else None)
    if args.image is None:
        parser.error("give --image, --sample or --batch")
    missing = [f"--{name} {path}" for name in ("image", "points", "mask")
               if (path := getattr(args, name)) is not None and not path.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    return args


@dataclass(frozen=True)
class Models:
    """The model files a run uses: the checkpoint, and the ControlNet / upscale model when the workflow loads one."""

    checkpoint: Path
    tiny: bool
    """True when the checkpoint is the tiny seeded test checkpoint (the output is a pipeline check)."""
    controlnet: Path | None = None
    upscale_model: Path | None = None
    gpu: bool = False
    """Run ComfyUI on the GPU (else ``--cpu``)."""
    stand_ins: tuple = ()
    """Tiny files for the workflow's other placeholder models (``tools.tiny_inpaint.stand_ins_for``)."""
    comfy_args: tuple[str, ...] = ()
    """More arguments for ComfyUI's ``main.py`` (``--comfy-arg``)."""

    def server(self, die_with_parent: bool = False) -> ComfyServer:
        """A ComfyServer (not started) with these files in its model folders (``die_with_parent``: see there)."""
        folders: dict[str, list[Path]] = {}
        for _, _, folder, path in self.stand_ins:
            folders.setdefault(folder, []).append(path)
        return ComfyServer(checkpoints=[self.checkpoint], controlnets=[p for p in (self.controlnet,) if p],
                           upscale_models=[p for p in (self.upscale_model,) if p], cpu=not self.gpu,
                           extra_args=self.comfy_args, startup_timeout=STARTUP_TIMEOUT,
                           die_with_parent=die_with_parent, **folders)


def resolve_models(args: argparse.Namespace, workflow: dict) -> Models:
    """The model files for ``workflow`` (UI format); raises :class:`DragInputError` naming the missing option.

    No ``--checkpoint``: the tiny checkpoint (the tiny SDXL one with its text
    encoders when the workflow's Load Checkpoint names
    :data:`tools.make_workflows.SDXL_CHECKPOINT`, the tiny inpainting ones for
    the inpainting placeholders: ``tools.tiny_inpaint.tiny_checkpoints``), the
    tiny LoRA / FLUX Fill / VAE / CLIP-L for the other placeholder loaders
    (``tools.tiny_inpaint.stand_ins_for``), and the tiny ControlNet /
    upscaler for a workflow that loads one (unless given). A real checkpoint needs real
    ``--controlnet`` / ``--upscale-model`` files when the workflow loads them.
    With ``--server`` only the files' names count (each server is checked for
    them); with ``--server`` / ``--ray`` the cluster decides what ``--device auto`` means.
    """
    from tools import tiny_inpaint, tiny_models

    active = [node for node in workflow.get("nodes", []) if node.get("mode") not in (MODE_MUTED, MODE_BYPASS)]
    kinds = {node.get("type") for node in active}
    named = {node["widgets_values"][0] for node in active if node.get("type") == "CheckpointLoaderSimple"
             and isinstance(node.get("widgets_values"), list) and node["widgets_values"]}
    tiny = args.checkpoint is None
    if not tiny:
        checkpoint = args.checkpoint.resolve()
    else:
        build = next((b for name, b in tiny_inpaint.tiny_checkpoints().items() if name in named),
                     tiny_models.tiny_checkpoint_path)
        checkpoint = build()
    found = {}
    for option, loader, tiny_file in (("controlnet", "ControlNetLoader", tiny_models.tiny_controlnet_path),
                                      ("upscale_model", "UpscaleModelLoader", tiny_models.tiny_upscaler_path)):
        given = getattr(args, option)
        if loader not in kinds:
            found[option] = None
        elif given is not None:
            found[option] = given.resolve()
        elif tiny:
            found[option] = tiny_file()
        else:
            raise DragInputError(f"{args.workflow} has a {loader} node: give --{option.replace('_', '-')} <file>")
    remote = bool(args.server) or args.ray is not None
    for path in [checkpoint, *(p for p in found.values() if p)] if not args.server else []:
        if not path.is_file():
            raise DragInputError(f"{path} is not a file")
    stand_ins = tuple(tiny_inpaint.stand_ins_for(active)) if tiny else ()
    return Models(checkpoint=checkpoint, tiny=tiny, gpu=args.device == "gpu" if remote else use_gpu(args.device),
                  stand_ins=stand_ins, comfy_args=tuple(args.comfy_args), **found)


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file; a :class:`DragInputError` naming the file when it is not one."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError) as error:
        raise DragInputError(f"{path} is not a readable image ({error})") from None


def editor_state_for(image: Path, points_json: str | None, mask: Path | None) -> str:
    """The Drag Points Editor state (points + mask) for an image, from a points JSON and a mask image."""
    from dragkit.editor_state import editor_state_json

    width, height = image_size(image)
    if points_json is None:
        raise DragInputError("this workflow has a Drag Points Editor: give --points or --sample")
    points = parse_drag_points(points_json, width=width, height=height)
    mask_array = None
    if mask is not None:
        mask_array = np.asarray(Image.open(mask).convert("L").resize((width, height), Image.NEAREST)) > 127
    return editor_state_json(points, mask_array)


def fill_inputs(
    prompt: dict, image: str, mask: str | None, points_json: str | None, checkpoint: str, text: str | None,
    editor_state: str | None = None, controlnet: str | None = None, upscale_model: str | None = None,
    stand_ins: tuple | list = (),
) -> None:
    """Point the prompt's loaders at the run's files (in place).

    ``image`` and ``mask`` are names in ComfyUI's input folder; ``editor_state``
    fills any Drag Points Editor (see :func:`editor_state_for`); ``checkpoint``,
    ``controlnet`` and ``upscale_model`` are file names in the server's model
    folders (None keeps the workflow's name); ``stand_ins``: tiny files for
    the other placeholder loaders (``tools.tiny_inpaint.apply_stand_ins``).
    ``text`` goes to every CLIP Text Encode but a negative prompt's.
    """
    from tools.make_workflows import NEGATIVE_TITLE
    from tools.tiny_inpaint import apply_stand_ins

    apply_stand_ins(prompt, stand_ins)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "DragKitPointsEditor":
            inputs["image_file"] = image
            if editor_state is not None:
                inputs["editor_state"] = editor_state
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = checkpoint
        elif kind == "ControlNetLoader" and controlnet is not None:
            inputs["control_net_name"] = controlnet
        elif kind == "UpscaleModelLoader" and upscale_model is not None:
            inputs["model_name"] = upscale_model
        elif kind == "LoadImage":
            inputs["image"] = image
        elif kind == "LoadImageMask":
            inputs["image"] = mask or image
        elif kind == "DragKitPointsFromJSON" and points_json is not None:
            inputs["points_json"] = points_json
        elif kind == "CLIPTextEncode" and text is not None and node.get("_meta", {}).get("title") != NEGATIVE_TITLE:
            inputs["text"] = text
    if mask is None:
        for node_id in [i for i, n in prompt.items() if n["class_type"] == "LoadImageMask"]:
            del prompt[node_id]
            for other in prompt.values():
                other["inputs"] = {k: v for k, v in other["inputs"].items() if not (isinstance(v, list) and v[:1] == [node_id])}


def use_gpu(device: str) -> bool:
    """Whether ``--device`` asks for the GPU (``auto``: when PyTorch sees CUDA); ``gpu`` without CUDA is an error."""
    import torch

    if device == "cpu":
        return False
    available = torch.cuda.is_available()
    if device == "gpu" and not available:
        raise DragInputError("--device gpu: PyTorch sees no CUDA device here (use --device cpu or auto)")
    return available


def parse_override(text: str) -> tuple[str, str, object]:
    """``"NODE_TYPE.INPUT=VALUE"`` -> ``(node type, input, value)``; VALUE is JSON when it parses, else text."""
    target, sep, raw = text.partition("=")
    kind, dot, name = target.partition(".")
    if not sep or not dot or not kind or not name:
        raise DragInputError(f"--set {text!r}: write NODE_TYPE.INPUT=VALUE, e.g. DragKitLoRAFineTune.steps=10")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return kind, name, value


def apply_overrides(prompt: dict, overrides: list[tuple[str, str, object]]) -> None:
    """Set each ``(node type, input, value)`` on every node of that type in the API prompt (in place).

    Raises :class:`DragInputError` when no node of the type has that input
    (a typo must not run the workflow unchanged).
    """
    for kind, name, value in overrides:
        nodes = [node for node in prompt.values() if node["class_type"] == kind and name in node["inputs"]]
        if not nodes:
            raise DragInputError(f"--set {kind}.{name}: this workflow has no {kind} node with an input {name!r}")
        for node in nodes:
            node["inputs"][name] = value


def side_by_side(source: Path, result: Path, points: DragPoints | None, target: Path) -> None:
    """Write ``source | result`` atomically, the drag pairs of ``points`` (DragPoints or None) drawn on both halves."""
    write_png(target, side_by_side_image(Image.open(source), Image.open(result), points))


def side_by_side_image(source: Image.Image, result: Image.Image, points: DragPoints | None) -> Image.Image:
    """``source | result`` (the result resized to the source's size), the drag pairs of ``points`` drawn on both."""
    halves = [source.convert("RGB")]
    halves.append(result.convert("RGB").resize(halves[0].size))
    canvas = Image.new("RGB", (halves[0].width * 2, halves[0].height), "white")
    for index, half in enumerate(halves):
        if points is not None:
            draw_points(half, points.handles, points.targets)
        canvas.paste(half, (index * half.width, 0))
    return canvas


def saved_images(server: ComfyServer, entry: dict) -> list[Path]:
    """The images a finished prompt saved (SaveImage: the output folder); previews only if nothing was saved."""
    outputs = [p for p in server.output_files(entry) if "/output/" in str(p) or p.parent.name == "output"]
    return outputs or server.output_files(entry)


def read_workflow(path: Path) -> tuple[dict, str]:
    """The UI-format workflow at ``path`` and the sha256 of its bytes; :class:`DragInputError` if unreadable."""
    try:
        data = path.read_bytes()
        workflow = json.loads(data)
    except (OSError, ValueError) as error:
        raise DragInputError(f"cannot read the workflow {path}: {error}") from None
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        raise DragInputError(f"{path} is not a UI-format workflow (a JSON object with a 'nodes' list)")
    return workflow, hashlib.sha256(data).hexdigest()


SETUP_COMMAND = "COMFYUI_PATH={path} bash scripts/test.sh"
"""The set-up command for a given ComfyUI: makes .venv with this pack's and ComfyUI's requirements (and runs the
tests). The README's own is ``bash scripts/test.sh``, which gets the newest tested ComfyUI itself."""

RUN_COMMAND = "bash scripts/run_workflow.sh"
"""The README's main-job script: it picks ComfyUI (``scripts/comfyui.sh``) before starting this runner."""

REQUIREMENT_MODULES = {"pyyaml": "yaml", "pillow": "PIL"}
"""Import names of ComfyUI requirements whose distribution name is not the module name (lower case, - as _)."""


def comfyui_requirements_missing(comfyui: Path) -> list[str]:
    """ComfyUI's essential requirements (``requirements.txt`` up to "non essential") not importable here."""
    import importlib.util
    import re

    try:
        lines = (comfyui / "requirements.txt").read_text().splitlines()
    except OSError:
        return []
    missing = []
    for line in lines:
        if "non essential" in line.lower():
            break
        name = re.split(r"[<>=~!;\[ ]", line.strip(), maxsplit=1)[0]
        if not name or name.startswith("#"):
            continue
        module = REQUIREMENT_MODULES.get(name.lower(), name.lower().replace("-", "_"))
        if importlib.util.find_spec(module) is None:
            missing.append(name)
    return missing


def setup_problem() -> str | None:
    """What is missing to run ComfyUI from here, with the exact command that fixes it (None when nothing is)."""
    path = comfyui_path()
    shown = str(path) if path else "/path/to/ComfyUI"
    setup = SETUP_COMMAND.format(path=shown)
    if path is None:
        return ("COMFYUI_PATH is not set. Run the workflow through the script, which uses the ComfyUI that the "
                f"set-up got (set this repository up first with: bash scripts/test.sh):\n  {RUN_COMMAND} ...\n"
                "or set COMFYUI_PATH to a ComfyUI whose requirements are installed in this Python.")
    problem = comfyui_problem()
    if problem:
        return (f"{problem}.\nLeave COMFYUI_PATH unset to use the ComfyUI that the set-up (bash scripts/test.sh) "
                "gets, or set it to a ComfyUI checkout.")
    missing = comfyui_requirements_missing(path)
    if missing:
        return (f"ComfyUI's requirements are not installed in this Python ({sys.executable}; missing: "
                f"{', '.join(missing)}). Run the set-up command, which installs them into .venv:\n  {setup}\n"
                f"or install them into this Python:\n  {sys.executable} -m pip install -r {path / 'requirements.txt'}")
    return None


def startup_hint(error: ComfyServerError) -> str:
    """A line saying what to run when ComfyUI failed to start for a missing module ('' otherwise)."""
    import re

    found = re.search(r"No module named '([^']+)'", str(error))
    if not found:
        return ""
    path = comfyui_path() or Path("/path/to/ComfyUI")
    return (f"\nComfyUI could not import '{found.group(1)}': install ComfyUI's requirements with\n"
            f"  {SETUP_COMMAND.format(path=path)}\nor\n  {sys.executable} -m pip install -r {path / 'requirements.txt'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = None if args.server and args.checkpoint is not None else setup_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        workflow, digest = read_workflow(args.workflow)
        refused = NOT_FOR_THE_RUNNER.get(args.workflow.name)
        if refused:
            raise DragInputError(f"{args.workflow.name} does not run headless yet: {refused}. Open it in ComfyUI.")
        say("preparing the models (without --checkpoint the tiny test checkpoint is built once into "
            "~/.cache/dragkit-tests: seconds; the tiny SDXL one with its text encoders about 1 min)")
        models = resolve_models(args, workflow)
        say(f"checkpoint: {models.checkpoint}")
        if models.tiny:
            print(TINY_WARNING, file=sys.stderr)
        if args.batch is not None:
            return run_batch(args, workflow, models, run_identity(args, digest, models))
        return run_one(args, workflow, models)
    except DragInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ComfyServerError as error:
        print(f"error: {error}{startup_hint(error)}", file=sys.stderr)
        return EXIT_COMFYUI


def run_one(args: argparse.Namespace, workflow: dict, models: Models) -> int:
    """One sample (``--image`` / ``--sample``): every saved image and the side-by-side into ``--out``."""
    points_json = args.points.read_text() if args.points else None
    width, height = image_size(args.image)
    points = parse_drag_points(points_json, width=width, height=height) if points_json else None
    args.out.mkdir(parents=True, exist_ok=True)
    with started(models.server()) as server:
        object_info = server.object_info()
        prompt = ui_to_api(workflow, object_info)
        image_name = server.upload_image(args.image)
        mask_name = server.upload_image(args.mask) if args.mask else None
        state = None
        if any(node["class_type"] == "DragKitPointsEditor" for node in prompt.values()):
            state = editor_state_for(args.image, points_json, args.mask)
        fill_inputs(prompt, image_name, mask_name, points_json, models.checkpoint.name, args.prompt, state,
                    *_model_names(models), stand_ins=models.stand_ins)
        apply_overrides(prompt, args.overrides)
        start = time.monotonic()
        with NodeProgress(server, node_names(prompt, object_info)):
            entry = server.run(prompt, timeout=args.timeout)
        say(f"the workflow ran in {time.monotonic() - start:.1f} s")
        saved = []
        for path in saved_images(server, entry):
            target = args.out / path.name
            write_bytes_atomic(target, path.read_bytes())
            saved.append(target)
    if not saved:
        print("error: the workflow saved no image", file=sys.stderr)
        return EXIT_SAMPLES_FAILED
    combined = args.out / f"{args.image.stem}_side_by_side.png"
    side_by_side(args.image, saved[0], points, combined)
    for path in saved + [combined]:
        print(f"wrote {path}")
    if models.tiny:
        print(TINY_WARNING, file=sys.stderr)
    return 0


def _model_names(models: Models) -> tuple[str | None, str | None]:
    """File names of the ControlNet and upscale model for :func:`fill_inputs` (None where the workflow has none)."""
    return tuple(p.name if p else None for p in (models.controlnet, models.upscale_model))


# ----------------------------------------------------------------------------------------------
# Batch mode

ERROR_CHARS = 4000
"""Longest error message kept per sample in timings.json (ComfyUI's log tail makes them long)."""

RUN_FIELDS = {
    "workflow_sha256": "workflow content (sha256)",
    "prompt": "--prompt",
    "checkpoint": "checkpoint file",
    "controlnet": "ControlNet file",
    "upscale_model": "upscale model file",
    "batch": "--batch folder",
    "overrides": "--set values",
}
"""The ``run`` record of timings.json (see :func:`run_identity`): key → what it is, for the refusal message."""


def run_identity(args: argparse.Namespace, workflow_sha256: str, models: Models) -> dict:
    """What a resumed batch must share with the run that started the folder (timings.json's ``run``).

    The sha256 of the workflow file's bytes, the ``--prompt`` override (null:
    the workflow's / each sample's own), the checkpoint, ControlNet and
    upscale model file names (null where the workflow loads none), the
    resolved ``--batch`` folder and the ``--set`` values.
    """
    controlnet, upscale_model = _model_names(models)
    return {"workflow_sha256": workflow_sha256, "prompt": args.prompt, "checkpoint": models.checkpoint.name,
            "controlnet": controlnet, "upscale_model": upscale_model, "batch": str(args.batch.resolve()),
            "overrides": [list(item) for item in args.overrides]}


def run_differences(old: object, new: dict) -> list[str]:
    """How an earlier run's ``run`` record differs from ``new``, one line per field (empty when they match)."""
    old = old if isinstance(old, dict) else {}
    return [f"{label}: {old[key]!r} before, {new[key]!r} now" if key in old else f"{label}: not recorded before"
            for key, label in RUN_FIELDS.items() if key not in old or old[key] != new[key]]


def load_timings(path: Path, fresh: dict) -> dict:
    """``fresh`` (a new record, see :func:`write_timings`) with the samples of an earlier run into the same folder.

    Raises :class:`DragInputError` when the file is unreadable or records
    another run (:func:`run_differences`): mixing their results in one
    folder would be wrong.
    """
    if not path.is_file():
        return fresh
    old = read_timings(path, "; move it away to start over")
    differences = run_differences(old.get("run"), fresh["run"])
    if differences:
        raise DragInputError(
            f"{path} holds the results of another run; use another --out (or the earlier options to resume). "
            "Differences:\n  " + "\n  ".join(differences)
        )
    samples = old.get("samples")
    samples = samples if isinstance(samples, dict) else {}
    return {**fresh, "samples": {name: entry for name, entry in samples.items() if isinstance(entry, dict)}}


def write_timings(path: Path, timings: dict, skipped: int) -> None:
    """Update the summary and write ``timings.json`` atomically.

    Layout: ``{"workflow", "checkpoint", "tiny_checkpoint", "run", "samples":
    {name: {"status": "ok"|"error", "seconds", "width", "height", "error"
    (errors only)}}, "summary": {"done", "skipped", "failed",
    "median_seconds"}}``. ``workflow`` and ``checkpoint`` are the paths of
    the latest run, ``tiny_checkpoint`` whether it was the tiny test
    checkpoint, ``run`` what a resume must match (:func:`run_identity`).
    ``seconds`` is the wall time of the sample's prompt (queue to finish; the
    first sample of a run also loads the models), for a failed sample the
    time until it failed; ``width``/``height`` are the sample image's (absent
    when the sample could not be read); ``lost_workers`` (only where not 0):
    how many workers were lost while running the sample before it ran to the
    end on another (``--server`` / ``--ray``). ``done`` and ``failed`` count the
    samples recorded ok / error in the file (earlier runs included),
    ``skipped`` the samples this run skipped as already done;
    ``median_seconds`` is over the ok samples (null if none).
    """
    samples = timings["samples"]
    ok = [entry["seconds"] for entry in samples.values() if entry.get("status") == "ok"]
    timings["summary"] = {
        "done": len(ok),
        "skipped": skipped,
        "failed": sum(entry.get("status") == "error" for entry in samples.values()),
        "median_seconds": statistics.median(ok) if ok else None,
    }
    write_bytes_atomic(path, (json.dumps(timings, indent=2) + "\n").encode())


def run_batch(args: argparse.Namespace, workflow: dict, models: Models, identity: dict) -> int:
    """Batch mode (see the module docstring); returns the exit code (see there).

    ``identity`` is this run's :func:`run_identity`. Raises
    :class:`DragInputError` for a bad ``--batch`` folder, a ``--out`` of
    another run or a ``--server`` / ``--ray`` cluster that cannot run the
    workflow, :class:`ComfyServerError` when ComfyUI does not start.
    """
    folders = batch_sample_folders(args.batch, args.limit)
    timings_path = args.out / TIMINGS
    timings = load_timings(timings_path, {"workflow": str(args.workflow), "checkpoint": str(models.checkpoint),
                                          "tiny_checkpoint": models.tiny, "run": identity, "samples": {}, "summary": {}})
    done_before = {name for name, entry in timings["samples"].items()
                   if entry.get("status") == "ok" and (args.out / name / EDITED).is_file()}
    pending = [folder for folder in folders if folder.name not in done_before]
    skipped = len(folders) - len(pending)
    print(f"{len(folders)} samples: {skipped} already done (skipped), {len(pending)} to run", file=sys.stderr)
    code = 0
    with contextlib.ExitStack() as stack:
        workers, recipe = open_workers(args, workflow, models, stack) if pending else ([], None)
        args.out.mkdir(parents=True, exist_ok=True)
        write_timings(timings_path, timings, skipped)
        if pending:
            code = BatchDriver(args, timings, timings_path, skipped, workers).run(recipe, pending)
    summary = timings["summary"]
    print(f"wrote {timings_path}: {summary['done']} ok, {summary['failed']} failed, {skipped} skipped, "
          f"median {_seconds(summary['median_seconds'])}", file=sys.stderr)
    if models.tiny:
        print(TINY_WARNING, file=sys.stderr)
    return code


def open_workers(args: argparse.Namespace, workflow: dict, models: Models,
                 stack: contextlib.ExitStack) -> tuple[list, Recipe]:
    """The batch's workers (closed by ``stack``) and the recipe they share.

    One ComfyUI this process starts (the default), the ``--server`` URLs
    (checked: :func:`dragrun.servers.check_servers`) or Ray actors
    (``--ray``: :mod:`dragrun.ray_workers`).
    """
    if args.server:
        from .servers import check_servers, connect

        servers = connect(args.server)
        recipe = make_recipe(args, workflow, models, servers[0][1])
        check_servers(servers, probe_prompt(recipe))
        return [ServerWorker(client, client.url) for client, _ in servers], recipe
    if args.ray is not None:
        from .ray_workers import start_actors

        workers, object_info = start_actors(args, models, stack)
        return workers, make_recipe(args, workflow, models, object_info)
    server = stack.enter_context(started(models.server()))
    return [ServerWorker(server, "local ComfyUI")], make_recipe(args, workflow, models, server.object_info())


def make_recipe(args: argparse.Namespace, workflow: dict, models: Models, object_info: dict) -> Recipe:
    """The API prompt of ``workflow`` for a server with ``object_info`` (``--set`` applied) and the model names."""
    template = ui_to_api(workflow, object_info)
    apply_overrides(template, args.overrides)
    return Recipe(template, models.checkpoint.name, *_model_names(models), models.stand_ins, args.timeout)


def probe_prompt(recipe: Recipe) -> dict:
    """The recipe's prompt filled in as a sample's would be (for the checks of the servers' nodes and models)."""
    prompt = copy.deepcopy(recipe.template)
    fill_inputs(prompt, "probe.png", "probe_mask.png", '{"points": [[0, 0], [1, 1]]}', recipe.checkpoint, None,
                None, recipe.controlnet, recipe.upscale_model, stand_ins=recipe.stand_ins)
    return prompt


def make_job(folder: Path, text: str | None):
    """A sample folder as a :class:`Job` (its files' bytes), and the sample (read here: a broken one fails before
    it is sent, and its size goes into the record)."""
    from dragkit.datasets import load_sample

    sample = load_sample(folder)
    files = {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}
    return Job(folder.name, files, text), sample


def png_bytes(image: Image.Image) -> bytes:
    """``image`` as PNG bytes at zlib level 1 (lossless; 3x faster than level 6 for 5% more bytes)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class BatchDriver:
    """Hands the pending samples to the workers and alone writes ``--out``: each result's images, then timings.json."""

    def __init__(self, args: argparse.Namespace, timings: dict, timings_path: Path, skipped: int, workers: list) -> None:
        self.args, self.timings, self.timings_path, self.skipped = args, timings, timings_path, skipped
        self.workers = workers
        self.samples: dict[str, tuple] = {}
        self.done = {worker.label: 0 for worker in workers}
        """Samples each worker finished in this run (for its rate on the progress bar)."""
        self.failed = 0
        self.bar = None
        self.start = time.monotonic()

    def run(self, recipe: Recipe, pending: list[Path]) -> int:
        from tqdm import tqdm

        self.bar = tqdm(total=len(pending), unit="sample", file=sys.stderr, dynamic_ncols=True)
        jobs = []
        for folder in pending:
            start = time.monotonic()
            try:
                job, sample = make_job(folder, self.args.prompt)
            except Exception as error:  # noqa: BLE001 - one bad sample must not stop the batch
                self.record(folder.name, {}, error, time.monotonic() - start)
                continue
            self.samples[job.name] = sample
            jobs.append(job)
        try:
            left, lost = distribute(jobs, self.workers, recipe, self.on_result, self.on_failure)
        except KeyboardInterrupt:
            self.bar.close()
            print("interrupted: the workers are stopped; every finished sample is on disk. Rerun the same command "
                  "to run the rest.", file=sys.stderr)
            return EXIT_INTERRUPTED
        self.bar.close()
        if len(lost) == len(self.workers):
            print("error: " + "; ".join(lost) + f". Stopping the batch ({len(left)} samples not run). "
                  "Rerun the same command to resume.", file=sys.stderr)
            return EXIT_COMFYUI
        return EXIT_SAMPLES_FAILED if self.failed else 0

    def on_result(self, worker, job: Job, result: Result) -> None:
        sample = self.samples[job.name]
        out = self.args.out / job.name
        write_bytes_atomic(out / EDITED, result.edited_png)
        write_bytes_atomic(out / SIDE_BY_SIDE, result.side_by_side_png)
        entry = {"status": "ok", "seconds": result.seconds, "width": sample.width, "height": sample.height}
        self.timings["samples"][job.name] = {**entry, "lost_workers": job.attempt} if job.attempt else entry
        write_timings(self.timings_path, self.timings, self.skipped)
        self.done[worker.label] += 1
        self.advance()

    def on_failure(self, worker, job: Job, error: BaseException, seconds: float) -> None:
        sample = self.samples[job.name]
        self.record(job.name, {"width": sample.width, "height": sample.height}, error, seconds)

    def record(self, name: str, size: dict, error: BaseException, seconds: float) -> None:
        self.failed += 1
        self.timings["samples"][name] = {"status": "error", "seconds": seconds, **size,
                                         "error": f"{type(error).__name__}: {error}"[:ERROR_CHARS]}
        write_timings(self.timings_path, self.timings, self.skipped)
        self.bar.write(f"{name}: FAILED: {_short_error(error)}")
        self.advance()

    def advance(self) -> None:
        """One more sample on the bar; with several workers, each one's rate (samples per minute) beside it."""
        self.bar.update(1)
        summary = self.timings["summary"]
        text = f"{summary['done']} ok, {summary['failed']} failed"
        if len(self.workers) > 1:
            minutes = max(time.monotonic() - self.start, 1e-6) / 60
            text += " | " + ", ".join(f"{label} {done / minutes:.1f}/min" for label, done in self.done.items())
        self.bar.set_postfix_str(text)


def _short_error(error: BaseException) -> str:
    """The first two non-empty lines of an error (a failed prompt's second line names the node)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " | ".join(lines[:2]) or type(error).__name__


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


if __name__ == "__main__":
    sys.exit(main())
