"""Run a shipped workflow headless through ComfyUI's own execution engine.

    COMFYUI_PATH=/path/to/ComfyUI python -m tools.run_workflow workflows/fastdrag.json \\
        --sample ../shared/data/Drag100/art_0 --checkpoint /models/sd15.safetensors --out out/

Starts ComfyUI (``COMFYUI_PATH``) headless with this pack, converts the UI
workflow to an API prompt by the frontend's rules, fills in the image,
points, mask and checkpoint, queues it, and writes every saved image plus a
side-by-side (source | result with the points drawn) into ``--out``.

Inputs: ``--image`` (and ``--points`` JSON / ``--mask`` image), or
``--sample`` a folder in the Drag100 layout (``original.jpg``, ``mask.png``,
``points.json``). Without ``--checkpoint`` the tiny seeded test checkpoint
is used and the runner says loudly that the output is a pipeline check, not
an edit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .comfy_host import ComfyServer, comfyui_problem
from .workflow_format import ui_to_api

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
    parser.add_argument("--checkpoint", type=Path, help="an SD1.x checkpoint file; default: the tiny test checkpoint")
    parser.add_argument("--prompt", default=None, help="text for every CLIP Text Encode node (default: as in the workflow)")
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out/)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the run")
    args = parser.parse_args(argv)
    if args.sample is not None:
        args.image = args.image or args.sample / "original.jpg"
        args.points = args.points or args.sample / "points.json"
        args.mask = args.mask or (args.sample / "mask.png" if (args.sample / "mask.png").exists() else None)
    if args.image is None:
        parser.error("give --image or --sample")
    return args


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
    editor_state: str | None = None,
) -> None:
    """Point the prompt's loaders at the run's files (in place).

    ``image`` and ``mask`` are names in ComfyUI's input folder; ``editor_state``
    fills any Drag Points Editor (see :func:`editor_state_for`).
    """
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "DragKitPointsEditor":
            inputs["image_file"] = image
            if editor_state is not None:
                inputs["editor_state"] = editor_state
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = checkpoint
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = comfyui_problem()
    if problem:
        print(f"error: {problem}. Set COMFYUI_PATH to a ComfyUI checkout.", file=sys.stderr)
        return 2
    if args.checkpoint is None:
        from .tiny_models import tiny_checkpoint_path

        checkpoint = tiny_checkpoint_path()
        print(TINY_WARNING, file=sys.stderr)
    else:
        checkpoint = args.checkpoint.resolve()
    points_json = args.points.read_text() if args.points else None
    workflow = json.loads(args.workflow.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    with ComfyServer(checkpoints=[checkpoint]) as server:
        prompt = ui_to_api(workflow, server.object_info())
        image_name = server.upload_image(args.image)
        mask_name = server.upload_image(args.mask) if args.mask else None
        state = None
        if any(node["class_type"] == "DragKitPointsEditor" for node in prompt.values()):
            state = editor_state_for(args.image, points_json, args.mask)
        fill_inputs(prompt, image_name, mask_name, points_json, checkpoint.name, args.prompt, state)
        entry = server.run(prompt, timeout=args.timeout)
        outputs = [p for p in server.output_files(entry) if "/output/" in str(p) or p.parent.name == "output"]
        outputs = outputs or server.output_files(entry)
        saved = []
        for path in outputs:
            target = args.out / path.name
            shutil.copyfile(path, target)
            saved.append(target)
    if not saved:
        print("error: the workflow saved no image", file=sys.stderr)
        return 1
    combined = args.out / f"{args.image.stem}_side_by_side.png"
    side_by_side(args.image, saved[0], points_json, combined)
    for path in saved + [combined]:
        print(f"wrote {path}")
    if args.checkpoint is None:
        print(TINY_WARNING, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
