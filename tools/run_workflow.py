"""Run a shipped workflow headless through ComfyUI's own execution engine: one sample, or a folder of them.

    COMFYUI_PATH=/path/to/ComfyUI python -m tools.run_workflow workflows/fastdrag.json \\
        --sample ../shared/data/Drag100/art_0 --checkpoint /models/sd15.safetensors --out out/

    COMFYUI_PATH=/path/to/ComfyUI python -m tools.run_workflow workflows/fastdrag.json \\
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
by the evaluator)::

    OUT/<sample folder name>/edited.png          the workflow's first saved image
    OUT/<sample folder name>/side_by_side.png    source | edited, points drawn
    OUT/timings.json                             see write_timings()

``timings.json`` is rewritten atomically after every sample. A rerun with
the same ``--out`` skips every sample recorded ``ok`` whose ``edited.png``
exists; a failing sample is recorded and the batch goes on (exit code 1 if
any sample of the run failed). A DragBench sample's own prompt is used
unless ``--prompt`` is given.

Models: without ``--checkpoint`` the tiny seeded test checkpoint is used and
the runner says loudly that the output is a pipeline check, not an edit. A
workflow with a ControlNet or an upscale model needs ``--controlnet`` /
``--upscale-model`` files with a real checkpoint; with the tiny checkpoint
they default to the tiny generated ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dragkit.atomic import write_bytes_atomic

from .comfy_host import ComfyServer, comfyui_problem
from .workflow_format import MODE_BYPASS, MODE_MUTED, ui_to_api

TINY_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! No --checkpoint given: using the tiny seeded TEST checkpoint (random weights).\n"
    "!! The output is a pipeline check, NOT an edit. Pass --checkpoint <SD1.5 .safetensors> for real results.\n"
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
    parser.add_argument("--checkpoint", type=Path, help="an SD1.x checkpoint file; default: the tiny test checkpoint")
    parser.add_argument("--controlnet", type=Path, help="ControlNet file for a workflow with Load ControlNet Model")
    parser.add_argument("--upscale-model", type=Path, help="upscale model file for a workflow with Load Upscale Model")
    parser.add_argument("--prompt", default=None, help="text for every CLIP Text Encode node (default: as in the workflow)")
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out/)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the run (batch: per sample)")
    args = parser.parse_args(argv)
    if args.batch is not None:
        given = [name for name in ("image", "points", "mask", "sample") if getattr(args, name) is not None]
        if given:
            parser.error(f"--batch takes its inputs from the sample folders; drop --{', --'.join(given)}")
        if args.limit is not None and args.limit < 1:
            parser.error("--limit must be at least 1")
        return args
    if args.limit is not None:
        parser.error("--limit only applies to --batch")
    if args.sample is not None:
        args.image = args.image or args.sample / "original.jpg"
        args.points = args.points or args.sample / "points.json"
        args.mask = args.mask or (args.sample / "mask.png" if (args.sample / "mask.png").exists() else None)
    if args.image is None:
        parser.error("give --image, --sample or --batch")
    return args


@dataclass(frozen=True)
class Models:
    """The model files a run uses: the checkpoint, and the ControlNet / upscale model when the workflow loads one."""

    checkpoint: Path
    tiny: bool
    """True when the checkpoint is the tiny seeded test checkpoint (the output is a pipeline check)."""
    controlnet: Path | None = None
    upscale_model: Path | None = None

    def server(self) -> ComfyServer:
        """A ComfyServer (not started) with these files in its model folders."""
        return ComfyServer(checkpoints=[self.checkpoint], controlnets=[p for p in (self.controlnet,) if p],
                           upscale_models=[p for p in (self.upscale_model,) if p])


def resolve_models(args: argparse.Namespace, workflow: dict) -> Models:
    """The model files for ``workflow`` (UI format); raises ``SystemExit`` naming the missing option.

    No ``--checkpoint``: the tiny checkpoint, and the tiny ControlNet / upscaler
    for a workflow that loads one (unless given). A real checkpoint needs real
    ``--controlnet`` / ``--upscale-model`` files when the workflow loads them.
    """
    from . import tiny_models

    kinds = {node.get("type") for node in workflow.get("nodes", []) if node.get("mode") not in (MODE_MUTED, MODE_BYPASS)}
    tiny = args.checkpoint is None
    checkpoint = tiny_models.tiny_checkpoint_path() if tiny else args.checkpoint.resolve()
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
            raise SystemExit(f"error: {args.workflow} has a {loader} node: give --{option.replace('_', '-')} <file>")
    for path in [checkpoint, *(p for p in found.values() if p)]:
        if not path.is_file():
            raise SystemExit(f"error: {path} is not a file")
    return Models(checkpoint=checkpoint, tiny=tiny, **found)


def editor_state_for(image: Path, points_json: str | None, mask: Path | None) -> str:
    """The Drag Points Editor state (points + mask) for an image, from a points JSON and a mask image."""
    from dragkit.editor_state import editor_state_json
    from dragkit.points import parse_drag_points

    width, height = Image.open(image).size
    if points_json is None:
        raise SystemExit("error: this workflow has a Drag Points Editor: give --points or --sample")
    points = parse_drag_points(points_json, width=width, height=height)
    mask_array = None
    if mask is not None:
        mask_array = np.asarray(Image.open(mask).convert("L").resize((width, height), Image.NEAREST)) > 127
    return editor_state_json(points, mask_array)


def fill_inputs(
    prompt: dict, image: str, mask: str | None, points_json: str | None, checkpoint: str, text: str | None,
    editor_state: str | None = None, controlnet: str | None = None, upscale_model: str | None = None,
) -> None:
    """Point the prompt's loaders at the run's files (in place).

    ``image`` and ``mask`` are names in ComfyUI's input folder; ``editor_state``
    fills any Drag Points Editor (see :func:`editor_state_for`); ``checkpoint``,
    ``controlnet`` and ``upscale_model`` are file names in the server's model
    folders (None keeps the workflow's name).
    """
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
        elif kind == "CLIPTextEncode" and text is not None:
            inputs["text"] = text
    if mask is None:
        for node_id in [i for i, n in prompt.items() if n["class_type"] == "LoadImageMask"]:
            del prompt[node_id]
            for other in prompt.values():
                other["inputs"] = {k: v for k, v in other["inputs"].items() if not (isinstance(v, list) and v[:1] == [node_id])}


def side_by_side(source: Path, result: Path, points_json: str | None, target: Path) -> None:
    """Write ``source | result`` with the drag arrows drawn on both (red handle, blue target)."""
    left = Image.open(source).convert("RGB")
    right = Image.open(result).convert("RGB").resize(left.size)
    canvas = Image.new("RGB", (left.width * 2, left.height), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    if points_json:
        flat = json.loads(points_json).get("points", [])
        draw = ImageDraw.Draw(canvas)
        radius = max(3, left.width // 120)
        for offset in (0, left.width):
            for (hx, hy), (tx, ty) in zip(flat[0::2], flat[1::2]):
                draw.line([(hx + offset, hy), (tx + offset, ty)], fill="white", width=max(1, radius // 2))
                draw.ellipse([hx + offset - radius, hy - radius, hx + offset + radius, hy + radius], fill=(230, 25, 25))
                draw.ellipse([tx + offset - radius, ty - radius, tx + offset + radius, ty + radius], fill=(25, 75, 240))
    tmp = target.with_suffix(".tmp.png")
    canvas.save(tmp)
    tmp.replace(target)


def saved_images(server: ComfyServer, entry: dict) -> list[Path]:
    """The images a finished prompt saved (SaveImage: the output folder); previews only if nothing was saved."""
    outputs = [p for p in server.output_files(entry) if "/output/" in str(p) or p.parent.name == "output"]
    return outputs or server.output_files(entry)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = comfyui_problem()
    if problem:
        print(f"error: {problem}. Set COMFYUI_PATH to a ComfyUI checkout.", file=sys.stderr)
        return 2
    workflow = json.loads(args.workflow.read_text())
    models = resolve_models(args, workflow)
    if models.tiny:
        print(TINY_WARNING, file=sys.stderr)
    if args.batch is not None:
        return run_batch(args, workflow, models)
    points_json = args.points.read_text() if args.points else None
    args.out.mkdir(parents=True, exist_ok=True)
    with models.server() as server:
        prompt = ui_to_api(workflow, server.object_info())
        image_name = server.upload_image(args.image)
        mask_name = server.upload_image(args.mask) if args.mask else None
        state = None
        if any(node["class_type"] == "DragKitPointsEditor" for node in prompt.values()):
            state = editor_state_for(args.image, points_json, args.mask)
        fill_inputs(prompt, image_name, mask_name, points_json, models.checkpoint.name, args.prompt, state,
                    *_model_names(models))
        entry = server.run(prompt, timeout=args.timeout)
        saved = []
        for path in saved_images(server, entry):
            target = args.out / path.name
            write_bytes_atomic(target, path.read_bytes())
            saved.append(target)
    if not saved:
        print("error: the workflow saved no image", file=sys.stderr)
        return 1
    combined = args.out / f"{args.image.stem}_side_by_side.png"
    side_by_side(args.image, saved[0], points_json, combined)
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

TIMINGS = "timings.json"
EDITED = "edited.png"
SIDE_BY_SIDE = "side_by_side.png"
ERROR_CHARS = 4000
"""Longest error message kept per sample in timings.json (ComfyUI's log tail makes them long)."""


def load_timings(path: Path, workflow: str, checkpoint: str, tiny: bool) -> dict:
    """The timings of an earlier run into the same folder, or a fresh record.

    Raises ``SystemExit`` when the file belongs to another workflow or
    checkpoint (compared by file name; mixing their results in one folder
    would be wrong).
    """
    fresh = {"workflow": workflow, "checkpoint": checkpoint, "tiny_checkpoint": tiny, "samples": {}, "summary": {}}
    if not path.is_file():
        return fresh
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {path} is not readable JSON ({error}); move it away to start over")
    if [Path(str(old.get(key))).name for key in ("workflow", "checkpoint")] != [Path(workflow).name, Path(checkpoint).name]:
        raise SystemExit(
            f"error: {path} holds results of workflow {old.get('workflow')!r} with checkpoint "
            f"{old.get('checkpoint')!r}, not {workflow!r} with {checkpoint!r}; use another --out"
        )
    fresh["samples"] = dict(old.get("samples") or {})
    return fresh


def write_timings(path: Path, timings: dict, skipped: int) -> None:
    """Update the summary and write ``timings.json`` atomically.

    Layout: ``{"workflow", "checkpoint", "tiny_checkpoint", "samples": {name:
    {"status": "ok"|"error", "seconds", "width", "height", "error" (errors
    only)}}, "summary": {"done", "skipped", "failed", "median_seconds"}}``.
    ``seconds`` is the wall time of the sample's prompt (queue to finish; the
    first sample of a run also loads the models), for a failed sample the
    time until it failed; ``width``/``height`` are the sample image's (absent
    when the sample could not be read). ``done`` and ``failed`` count the
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


def run_batch(args: argparse.Namespace, workflow: dict, models: Models) -> int:
    """Batch mode (see the module docstring); returns the exit code (1 if any sample of this run failed)."""
    from tqdm import tqdm

    from dragkit.datasets import load_sample, sample_folders

    folders = sample_folders(args.batch)
    if not folders:
        print(f"error: no Drag100 or DragBench sample folders under {args.batch}", file=sys.stderr)
        return 2
    folders = folders[: args.limit] if args.limit else folders
    names = [folder.name for folder in folders]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        print(f"error: sample folder names must be unique (they name the output folders): {duplicates}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    timings_path = args.out / TIMINGS
    timings = load_timings(timings_path, str(args.workflow), str(models.checkpoint), models.tiny)
    done_before = {name for name, entry in timings["samples"].items()
                   if entry.get("status") == "ok" and (args.out / name / EDITED).is_file()}
    pending = [folder for folder in folders if folder.name not in done_before]
    skipped = len(folders) - len(pending)
    print(f"{len(folders)} samples: {skipped} already done (skipped), {len(pending)} to run", file=sys.stderr)
    write_timings(timings_path, timings, skipped)
    failed = 0
    if pending:
        with models.server() as server, tempfile.TemporaryDirectory(prefix="dragkit-batch-") as staging:
            template = ui_to_api(workflow, server.object_info())
            bar = tqdm(pending, unit="sample", file=sys.stderr, dynamic_ncols=True)
            for folder in bar:
                bar.set_postfix_str(folder.name)
                entry = {}
                start = time.monotonic()
                try:
                    sample = load_sample(folder)
                    entry.update(width=sample.width, height=sample.height)
                    seconds = _run_sample(server, template, sample, folder.name, Path(staging), args, models)
                    entry = {"status": "ok", "seconds": seconds, **entry}
                except Exception as error:  # noqa: BLE001 - one bad sample must not stop the batch
                    failed += 1
                    entry = {"status": "error", "seconds": time.monotonic() - start, **entry,
                             "error": f"{type(error).__name__}: {error}"[:ERROR_CHARS]}
                    bar.write(f"{folder.name}: FAILED: {_short_error(error)}")
                timings["samples"][folder.name] = entry
                write_timings(timings_path, timings, skipped)
                if server.proc is not None and server.proc.poll() is not None:
                    bar.close()
                    print(f"error: ComfyUI exited (code {server.proc.returncode}); stopping the batch. "
                          f"Rerun the same command to resume.", file=sys.stderr)
                    return 1
            bar.close()
    summary = timings["summary"]
    print(f"wrote {timings_path}: {summary['done']} ok, {summary['failed']} failed, {skipped} skipped, "
          f"median {_seconds(summary['median_seconds'])}", file=sys.stderr)
    if models.tiny:
        print(TINY_WARNING, file=sys.stderr)
    return 1 if failed else 0


def _short_error(error: Exception) -> str:
    """The first two non-empty lines of an error (a failed prompt's second line names the node)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " | ".join(lines[:2]) or type(error).__name__


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _run_sample(server: ComfyServer, template: dict, sample, name: str, staging: Path,
                args: argparse.Namespace, models: Models) -> float:
    """Run one sample (a :class:`dragkit.datasets.DragSample`) and write ``OUT/<name>/``; returns the seconds.

    The image and mask are written as PNG into ``staging/<name>/`` and
    uploaded to the input sub-folder ``<name>``; the points go to every points
    node as a Drag100 ``{"points": [...]}`` JSON.
    """
    folder = staging / name
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / "image.png"
    Image.fromarray(sample.image).save(image_path)
    mask_name = None
    if sample.mask is not None:
        Image.fromarray(sample.mask.astype(np.uint8) * 255).save(folder / "mask.png")
        mask_name = server.upload_image(folder / "mask.png", subfolder=name)
    image_name = server.upload_image(image_path, subfolder=name)
    flat = [list(p) for pair in zip(sample.points.handles, sample.points.targets) for p in pair]
    points_json = json.dumps({"points": flat})
    text = args.prompt if args.prompt is not None else (sample.prompt or None)
    prompt = copy.deepcopy(template)
    fill_inputs(prompt, image_name, mask_name, points_json, models.checkpoint.name, text, sample.editor_state(),
                *_model_names(models))
    start = time.monotonic()
    entry = server.run(prompt, timeout=args.timeout)
    seconds = time.monotonic() - start
    saved = saved_images(server, entry)
    if not saved:
        raise RuntimeError("the workflow saved no image")
    out = args.out / name
    write_bytes_atomic(out / EDITED, saved[0].read_bytes())
    side_by_side(image_path, out / EDITED, points_json, out / SIDE_BY_SIDE)
    return seconds


if __name__ == "__main__":
    sys.exit(main())
