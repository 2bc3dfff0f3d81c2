"""Evaluate drag edits of a benchmark folder: DAI, MD and IF per method, a table and a grid image.

    python -m tools.evaluate --data ../shared/data/Drag100 --edited runs/fastdrag --method fastdrag \\
        [--edited gooddrag=runs/gooddrag ...] [--dift models/sd21] [--lpips models/lpips] \\
        [--report report.json] [--grid grid.png]

    COMFYUI_PATH=... python -m tools.evaluate --data ../shared/data/Drag100 --run workflows/fastdrag.json \\
        --checkpoint sd15.safetensors --edited runs/fastdrag

``--data`` holds sample folders in the Drag100 or DragBench layout
(:func:`dragkit.datasets.sample_folders`). Each ``--edited`` folder is the
headless runner's batch output: ``<sample folder name>/edited.png`` per
sample and ``timings.json`` (``{"samples": {name: {"status": "ok"|"error",
"seconds", ...}}}``); ``NAME=DIR`` names the method (several give one table
each), a bare ``DIR`` takes ``--method`` or the folder's name. ``--run
WORKFLOW`` first runs the workflow over the data with the runner's batch mode
into the (single) ``--edited`` folder; only that needs ComfyUI.

Metrics (METHODS.md, "Metrics (the evaluator)"; :mod:`dragkit.metrics`):

- DAI for γ = 1, 5, 10, 20 in both normalisations, labelled ``DAI (paper)``
  and ``DAI (as released)``; mean over the evaluated samples.
- MD with DIFT features (``--dift``: a diffusers SD2.1 folder you supply);
  mean over all pairs of the evaluated samples.
- IF = 1 − LPIPS (``--lpips``: AlexNet LPIPS weights you supply); mean over samples.

MD and IF without their weights are reported as skipped with the reason; no
value is made up. A result whose size differs from its source is resized to
it (bilinear, as the reference scripts do) and the sample says so. Samples
without ``edited.png`` or recorded as failed are listed, not averaged.

Outputs: a markdown table per method on stdout, ``--report`` JSON (see
:func:`build_report`) and ``--grid`` PNG (rows = samples; columns = source
with points, then each method's result with the targets), written atomically.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dragkit.atomic import write_bytes_atomic
from dragkit.datasets import DragSample, load_sample, sample_folders
from dragkit.errors import DragInputError
from dragkit.metrics import DAI_GAMMAS, DAI_PAPER, DAI_RELEASED, MetricUnavailable, dai, mean_distance

from .eval_report import encode_png, grid_image, markdown_table

EDITED_NAME = "edited.png"
TIMINGS_NAME = "timings.json"


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Method:
    """One method's results: its name and the runner's output folder."""

    name: str
    folder: Path


def parse_methods(entries: list[str], method: str | None) -> list[Method]:
    """``NAME=DIR`` or ``DIR`` entries of ``--edited`` → methods (unique names)."""
    methods = []
    for entry in entries:
        name, sep, folder = entry.partition("=")
        if not sep:
            if method is not None and len(entries) > 1:
                raise DragInputError("--method names a single --edited folder; use NAME=DIR for several")
            name, folder = method or Path(entry).name, entry
        if not name or not folder:
            raise DragInputError(f"--edited {entry!r}: expected NAME=DIR or DIR")
        methods.append(Method(name, Path(folder)))
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise DragInputError(f"method names must be unique, got {names}")
    return methods


def read_timings(folder: Path) -> dict[str, dict]:
    """``timings.json``'s per-sample entries (empty when the folder has none)."""
    path = folder / TIMINGS_NAME
    if not path.is_file():
        return {}
    try:
        samples = json.loads(path.read_text()).get("samples", {})
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as err:
        raise DragInputError(f"{path} is not the runner's timings JSON: {err}") from None
    return samples if isinstance(samples, dict) else {}


def read_result(path: Path, width: int, height: int) -> tuple[np.ndarray, str | None]:
    """The edited image as ``(height, width, 3)`` uint8, resized (bilinear) if needed, and a note if it was."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            note = None
            if img.size != (width, height):
                note = f"result {img.width}x{img.height} resized to the source's {width}x{height} (bilinear)"
                img = img.resize((width, height), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8), note
    except OSError as err:
        raise DragInputError(f"cannot read {path}: {err}") from None


# ----------------------------------------------------------------------------------------------
# Metric models


@dataclass
class MetricModels:
    """The weighted metrics available for this run; ``skipped`` maps a metric to why it is not."""

    dift: object | None = None
    lpips: object | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def load_metric_models(dift: Path | None, dift_prompt_embeds: Path | None, lpips: Path | None, device: str) -> MetricModels:
    """Load what the user supplied; a missing or unusable model becomes a skip reason."""
    models = MetricModels()
    if dift is None:
        models.skipped["MD"] = (
            "no DIFT model given: pass --dift <diffusers folder of stabilityai/stable-diffusion-2-1> "
            "(the published protocol's model)"
        )
    else:
        from dragkit.metrics.dift import load_dift

        try:
            models.dift = load_dift(dift, device, prompt_embeds=dift_prompt_embeds)
            if models.dift.prompt_note:
                models.notes["MD"] = models.dift.prompt_note
        except MetricUnavailable as err:
            models.skipped["MD"] = str(err)
    if lpips is None:
        models.skipped["IF"] = (
            "no LPIPS weights given: pass --lpips <file or folder> (the lpips package's alex.pth plus "
            "torchvision's alexnet-owt-7be5be79.pth, or one LPIPS state dict)"
        )
    else:
        from dragkit.metrics.lpips import load_lpips

        try:
            models.lpips = load_lpips(lpips, device)
        except MetricUnavailable as err:
            models.skipped["IF"] = str(err)
    return models


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluate_sample(sample: DragSample, result: np.ndarray, models: MetricModels, source_features=None) -> dict:
    """Metrics of one result (same size as the source). ``source_features``: cached DIFT features or None."""
    handles, targets = list(sample.points.handles), list(sample.points.targets)
    entry: dict = {"pairs": len(handles)}
    for label, values in dai(sample.image, result, handles, targets, DAI_GAMMAS).items():
        entry[label] = {str(gamma): value for gamma, value in values.items()}
    if models.dift is not None:
        result_features = models.dift.features(result, sample.prompt)
        distances, matched = mean_distance(source_features, result_features, handles, targets, (sample.height, sample.width))
        entry["MD distances"] = [float(d) for d in distances]
        entry["MD matched"] = matched.tolist()
    if models.lpips is not None:
        from dragkit.metrics.lpips import image_fidelity

        entry["IF"] = image_fidelity(models.lpips, sample.image, result)
    return entry


def _mean(values: list[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def summarise(per_sample: dict[str, dict], models: MetricModels) -> dict:
    """Means over the evaluated samples (MD: over all their pairs) and the counts."""
    done = {name: s for name, s in per_sample.items() if s["status"] == "ok"}
    summary: dict = {
        "evaluated": len(done),
        "missing": sorted(n for n, s in per_sample.items() if s["status"] == "missing"),
        "failed": sorted(n for n, s in per_sample.items() if s["status"] == "error"),
    }
    for label in (DAI_PAPER, DAI_RELEASED):
        summary[label] = {str(g): _mean([s[label][str(g)] for s in done.values()]) for g in DAI_GAMMAS}
    distances = [d for s in done.values() for d in s.get("MD distances", [])]
    summary["MD"] = None if models.dift is None else _mean(distances)
    summary["MD pairs"] = len(distances) if models.dift is not None else 0
    summary["IF"] = None if models.lpips is None else _mean([s["IF"] for s in done.values()])
    seconds = [s["seconds"] for s in done.values() if isinstance(s.get("seconds"), (int, float))]
    summary["median seconds"] = statistics.median(seconds) if seconds else None
    return summary


def evaluate(data: Path, methods: list[Method], models: MetricModels, limit: int | None = None,
             log=print) -> tuple[list[tuple[str, DragSample]], dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    """Evaluate every method on every sample under ``data``.

    Returns the samples ``(name, sample)``, each method's per-sample entries
    ``{method: {sample: entry}}`` and the loaded results ``{method: {sample:
    image}}`` (for the grid). An entry has ``status`` ``ok`` / ``missing`` /
    ``error``, the metrics when ok, ``seconds`` from ``timings.json``, and
    ``note`` / ``error`` text.
    """
    folders = sample_folders(data)
    if not folders:
        raise DragInputError(f"no Drag100 or DragBench sample folders under {data}")
    folders = folders[:limit] if limit else folders
    names = [folder.name for folder in folders]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DragInputError(f"sample folder names must be unique (the runner's layout uses them): {duplicates}")
    for method in methods:
        if not method.folder.is_dir():
            raise DragInputError(f"--edited folder {method.folder} of method {method.name!r} does not exist")
    timings = {m.name: read_timings(m.folder) for m in methods}
    samples, per_method = [], {m.name: {} for m in methods}
    results: dict[str, dict[str, np.ndarray]] = {m.name: {} for m in methods}
    for folder in folders:
        name, sample = folder.name, load_sample(folder)
        samples.append((name, sample))
        source_features = models.dift.features(sample.image, sample.prompt) if models.dift is not None else None
        for method in methods:
            recorded = timings[method.name].get(name, {})
            entry = {"seconds": recorded.get("seconds")}
            edited = method.folder / name / EDITED_NAME
            if recorded.get("status") == "error":
                entry.update(status="error", error=str(recorded.get("error", "the runner recorded an error")))
            elif not edited.is_file():
                entry.update(status="missing", error=f"no {edited}")
            else:
                image, note = read_result(edited, sample.width, sample.height)
                results[method.name][name] = image
                entry.update(status="ok", **evaluate_sample(sample, image, models, source_features))
                if note:
                    entry["note"] = note
            per_method[method.name][name] = entry
            log(f"{method.name} / {name}: {entry['status']}")
    return samples, per_method, results


def build_report(data: Path, methods: list[Method], models: MetricModels, per_method: dict[str, dict]) -> dict:
    """The report JSON.

    ``{"data", "protocol": {metric: description}, "skipped": {metric: reason},
    "notes": {metric: text}, "methods": {name: {"edited", "summary", "samples"}}}``;
    a summary holds ``evaluated``, ``missing``, ``failed``, ``DAI (paper)`` and
    ``DAI (as released)`` (``{"1": v, "5": v, "10": v, "20": v}``), ``MD``,
    ``MD pairs``, ``IF`` (null when skipped) and ``median seconds``.
    """
    return {
        "data": str(data),
        "protocol": {
            DAI_PAPER: "Σ_pairs ‖Ω_src(handle) − Ω_result(target)‖² / (2γ+1)² / N, RGB in [0, 1], mean over samples",
            DAI_RELEASED: "the same divided by N again (GoodDrag's compute_DAI.py)",
            "MD": "DIFT (t=261, up_blocks[1], ensemble 8, the sample's prompt), cosine argmax over the whole "
                  "result, pixel L2 to the target, mean over all pairs",
            "IF": "1 − LPIPS(AlexNet) at 224x224, mean over samples",
        },
        "skipped": dict(models.skipped),
        "notes": dict(models.notes),
        "methods": {
            m.name: {"edited": str(m.folder), "summary": summarise(per_method[m.name], models), "samples": per_method[m.name]}
            for m in methods
        },
    }


# ----------------------------------------------------------------------------------------------
# Command line


def run_workflow_batch(workflow: Path, data: Path, out: Path, checkpoint: Path | None, limit: int | None) -> int:
    """The headless runner's batch mode (imported here: only this needs ComfyUI)."""
    from . import run_workflow

    argv = [str(workflow), "--batch", str(data), "--out", str(out)]
    argv += ["--checkpoint", str(checkpoint)] if checkpoint else []
    argv += ["--limit", str(limit)] if limit else []
    return run_workflow.main(argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of Drag100 / DragBench sample folders")
    parser.add_argument("--edited", action="append", required=True, metavar="[NAME=]DIR",
                        help="the runner's batch output of one method (repeat for several)")
    parser.add_argument("--method", help="name of the method of a single --edited DIR (default: the folder's name)")
    parser.add_argument("--run", type=Path, metavar="WORKFLOW", help="first run this workflow over --data into --edited")
    parser.add_argument("--checkpoint", type=Path, help="with --run: the SD1.x checkpoint (default: the tiny test one)")
    parser.add_argument("--dift", type=Path, help="diffusers folder of the DIFT model (SD2.1) for MD")
    parser.add_argument("--dift-prompt-embeds", type=Path,
                        help="safetensors file with 'prompt_embeds' (1, 77, dim) used instead of encoding the prompts")
    parser.add_argument("--lpips", type=Path, help="LPIPS AlexNet weights (file or folder) for IF")
    parser.add_argument("--report", type=Path, help="write the report JSON here")
    parser.add_argument("--grid", type=Path, help="write the before/after grid PNG here")
    parser.add_argument("--cell-width", type=int, default=256, help="grid cell width in pixels (default 256)")
    parser.add_argument("--limit", type=int, help="only the first N samples (sorted by path)")
    parser.add_argument("--device", default=None, help="device for DIFT and LPIPS (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.run is not None and len(args.edited) != 1:
        parser.error("--run writes into one --edited folder")
    if args.checkpoint is not None and args.run is None:
        parser.error("--checkpoint only applies with --run")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        methods = parse_methods(args.edited, args.method or (args.run.stem if args.run else None))
        if args.run is not None:
            code = run_workflow_batch(args.run, args.data, methods[0].folder, args.checkpoint, args.limit)
            if code != 0:
                print(f"warning: the runner exited with code {code}; evaluating what it wrote", file=sys.stderr)
        models = load_metric_models(args.dift, args.dift_prompt_embeds, args.lpips, device)
        for metric, reason in models.skipped.items():
            print(f"{metric} skipped: {reason}", file=sys.stderr)
        samples, per_method, results = evaluate(args.data, methods, models, args.limit,
                                                log=lambda text: print(text, file=sys.stderr))
    except DragInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = build_report(args.data, methods, models, per_method)
    for method in methods:
        print(markdown_table(method.name, report["methods"][method.name]["summary"], report["skipped"], len(samples)))
    if args.report:
        write_bytes_atomic(args.report, (json.dumps(report, indent=2) + "\n").encode())
        print(f"wrote {args.report}", file=sys.stderr)
    if args.grid:
        grid = grid_image(samples, [m.name for m in methods], results, args.cell_width)
        write_bytes_atomic(args.grid, encode_png(grid))
        print(f"wrote {args.grid}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
