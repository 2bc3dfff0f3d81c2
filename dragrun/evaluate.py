"""Evaluate drag edits of a benchmark folder: DAI, MD and IF per method, a table and a grid image.

    python -m dragrun.evaluate --data ../shared/data/Drag100 --edited runs/fastdrag --method fastdrag \\
        [--edited gooddrag=runs/gooddrag ...] [--dift models/sd21] [--lpips models/lpips] \\
        [--report report.json] [--grid grid.png]

    COMFYUI_PATH=... python -m dragrun.evaluate --data ../shared/data/Drag100 --run workflows/fastdrag.json \\
        --checkpoint sd15.safetensors --edited runs/fastdrag

``--data`` holds sample folders in the Drag100 or DragBench layout
(:func:`dragrun.batch_layout.batch_sample_folders`). Each ``--edited`` folder
is the headless runner's batch output: ``<sample folder name>/edited.png``
per sample and ``timings.json`` (``{"workflow", "checkpoint",
"tiny_checkpoint", "samples": {name: {"status": "ok"|"error", "seconds",
...}}}``); ``NAME=DIR`` names the method (several give one table each), a
bare ``DIR`` takes ``--method`` or the folder's name. ``--run WORKFLOW``
first runs the workflow over the data with the runner's batch mode into the
(single) ``--edited`` folder, passing on ``--checkpoint``, ``--controlnet``,
``--upscale-model``, ``--prompt``, ``--timeout`` and ``--limit``; only that
needs ComfyUI. The evaluation goes on when the runner finished (exit code 0)
or only some samples failed (1); otherwise it stops with the runner's code.

Metrics (METHODS.md, "Metrics (the evaluator)"; :mod:`dragkit.metrics`):

- DAI for γ = 1, 5, 10, 20 in both normalisations, labelled ``DAI (paper)``
  and ``DAI (as released)``; mean over the evaluated samples.
- MD with DIFT features (``--dift``: a diffusers SD2.1 folder you supply);
  mean over all pairs of the evaluated samples.
- IF = 1 − LPIPS (``--lpips``: AlexNet LPIPS weights you supply); mean over samples.

MD and IF without their weights (or with unreadable ones) are reported as
skipped with the reason; no value is made up. A result whose size differs
from its source is resized to it (bilinear, as the reference scripts do) and
the sample says so. Samples without ``edited.png``, recorded as failed, whose
sample folder or ``edited.png`` cannot be read, or that the metrics refuse,
are listed with the reason, not averaged; the others are still evaluated.
Results of the runner's tiny random test checkpoint are flagged loudly (a
pipeline check, not an edit).

Exit codes: 0 done; 2 bad input (a message says which); with ``--run``, the
runner's code when it failed outright.

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
from dragkit.datasets import DragSample, load_sample
from dragkit.errors import DragInputError
from dragkit.metrics import (
    DAI_GAMMAS, DAI_PAPER, DAI_RELEASED, MetricUnavailable, dai, image_fidelity, load_dift, load_lpips, mean_distance,
)

from . import run_workflow
from .batch_layout import EDITED, TIMINGS, batch_sample_folders, read_timings, write_png
from .eval_report import TINY_MARK, grid_image, markdown_table

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


@dataclass(frozen=True)
class RunRecord:
    """What a method's ``timings.json`` says: the run (None where unrecorded) and the per-sample entries."""

    samples: dict[str, dict] = field(default_factory=dict)
    workflow: str | None = None
    checkpoint: str | None = None
    tiny_checkpoint: bool | None = None
    """True when the runner used its tiny random test checkpoint: the results are a pipeline check, not edits."""

    def run_fields(self) -> dict:
        """The run as the report records it per method."""
        return {"workflow": self.workflow, "checkpoint": self.checkpoint, "tiny_checkpoint": self.tiny_checkpoint}


def read_run(method: Method) -> RunRecord:
    """The method's ``timings.json`` (an empty record without one); a sample entry that is not an object is ignored.

    Raises :class:`DragInputError` when the folder does not exist or the file is not a JSON object.
    """
    if not method.folder.is_dir():
        raise DragInputError(f"--edited folder {method.folder} of method {method.name!r} does not exist")
    path = method.folder / TIMINGS
    if not path.is_file():
        return RunRecord()
    record = read_timings(path)
    samples = _field(record, "samples", dict) or {}
    return RunRecord(samples={name: entry for name, entry in samples.items() if isinstance(entry, dict)},
                     workflow=_field(record, "workflow", str), checkpoint=_field(record, "checkpoint", str),
                     tiny_checkpoint=_field(record, "tiny_checkpoint", bool))


def _field(record: dict, key: str, kind: type):
    """``record[key]`` when it is a ``kind``, else None."""
    value = record.get(key)
    return value if isinstance(value, kind) else None


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


def result_entry(method: Method, name: str, sample: DragSample, recorded: dict) -> tuple[dict, np.ndarray | None]:
    """One method's entry for a sample before scoring, and its result image when there is one to score.

    Without an image the entry is final: status ``error`` (the runner recorded
    one, or ``edited.png`` cannot be read) or ``missing``, with the ``error`` text.
    """
    entry = {"seconds": recorded.get("seconds")}
    edited = method.folder / name / EDITED
    if recorded.get("status") == "error":
        entry.update(status="error", error=str(recorded.get("error", "the runner recorded an error")))
    elif not edited.is_file():
        entry.update(status="missing", error=f"no {edited}")
    else:
        try:
            image, note = read_result(edited, sample.width, sample.height)
        except DragInputError as err:
            entry.update(status="error", error=str(err))
        else:
            if note:
                entry["note"] = note
            return entry, image
    return entry, None


def evaluate_folder(folder: Path, methods: list[Method], runs: dict[str, RunRecord], models: MetricModels
                    ) -> tuple[DragSample | None, dict[str, dict], dict[str, np.ndarray]]:
    """Every method's entry for one sample folder: ``(sample or None, {method: entry}, {method: scored image})``.

    A sample that cannot be loaded gives every method an ``error`` entry; a
    result the metrics refuse gives that method one. The source's DIFT
    features are computed only when some method has a result to score.
    """
    name = folder.name
    recorded = {m.name: runs[m.name].samples.get(name, {}) for m in methods}
    try:
        sample = load_sample(folder)
    except DragInputError as err:
        return None, {m.name: {"seconds": recorded[m.name].get("seconds"), "status": "error",
                               "error": f"cannot load the sample: {err}"} for m in methods}, {}
    entries, images = {}, {}
    for method in methods:
        entries[method.name], image = result_entry(method, name, sample, recorded[method.name])
        if image is not None:
            images[method.name] = image
    source_features = None
    if images and models.dift is not None:
        source_features = models.dift.features(sample.image, sample.prompt)
    for method_name, image in images.items():
        try:
            entries[method_name].update(status="ok", **evaluate_sample(sample, image, models, source_features))
        except DragInputError as err:
            entries[method_name].update(status="error", error=str(err))
    return sample, entries, images


def evaluate(folders: list[Path], methods: list[Method], runs: dict[str, RunRecord], models: MetricModels,
             keep_images: bool = False, log=print
             ) -> tuple[list[tuple[str, DragSample]], dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    """Evaluate every method on every sample folder (:func:`~dragrun.batch_layout.batch_sample_folders`).

    Returns the loaded samples ``(name, sample)`` (one that cannot be loaded
    is left out), each method's per-sample entries ``{method: {sample:
    entry}}`` for every folder, and with ``keep_images`` the scored results
    ``{method: {sample: image}}`` for the grid (else empty dicts). An entry
    has ``status`` ``ok`` / ``missing`` / ``error``, the metrics when ok,
    ``seconds`` from ``timings.json``, and ``note`` / ``error`` text.
    """
    samples, per_method = [], {m.name: {} for m in methods}
    results: dict[str, dict[str, np.ndarray]] = {m.name: {} for m in methods}
    for folder in folders:
        sample, entries, images = evaluate_folder(folder, methods, runs, models)
        if sample is not None:
            samples.append((folder.name, sample))
        for method_name, entry in entries.items():
            per_method[method_name][folder.name] = entry
            reason = f": {entry['error']}" if entry["status"] == "error" else ""
            log(f"{method_name} / {folder.name}: {entry['status']}{reason}")
        if keep_images:
            for method_name, image in images.items():
                results[method_name][folder.name] = image
    return samples, per_method, results


def build_report(data: Path, methods: list[Method], runs: dict[str, RunRecord], models: MetricModels,
                 per_method: dict[str, dict]) -> dict:
    """The report JSON.

    ``{"data", "protocol": {metric: description}, "skipped": {metric: reason},
    "notes": {metric: text}, "methods": {name: {"edited", "workflow",
    "checkpoint", "tiny_checkpoint", "summary", "samples"}}}``; ``workflow``,
    ``checkpoint`` and ``tiny_checkpoint`` are copied from the method's
    ``timings.json`` (null when it does not record them). A summary holds
    ``evaluated``, ``missing``, ``failed``, ``DAI (paper)`` and ``DAI (as
    released)`` (``{"1": v, "5": v, "10": v, "20": v}``), ``MD``, ``MD pairs``,
    ``IF`` (null when skipped) and ``median seconds``.
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
            m.name: {"edited": str(m.folder), **runs[m.name].run_fields(),
                     "summary": summarise(per_method[m.name], models), "samples": per_method[m.name]}
            for m in methods
        },
    }


# ----------------------------------------------------------------------------------------------
# Command line

RUN_OPTIONS = ("checkpoint", "controlnet", "upscale_model", "prompt", "timeout", "limit")
"""Options passed on to the runner with ``--run`` (``--limit`` also limits the evaluation)."""

RUNNER_CARRY_ON = (0, run_workflow.EXIT_SAMPLES_FAILED)
"""Runner exit codes after which ``--run`` evaluates: all samples ok, or some failed (they are listed)."""


def runner_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """The runner's batch-mode command line for ``--run``: the workflow over ``--data`` into ``out``."""
    argv = [str(args.run), "--batch", str(args.data), "--out", str(out)]
    for option in RUN_OPTIONS:
        value = getattr(args, option)
        if value is not None:
            argv += [f"--{option.replace('_', '-')}", str(value)]
    return argv


def run_workflow_batch(argv: list[str]) -> int:
    """The headless runner's exit code for ``argv`` (a usage error it raises included)."""
    try:
        return run_workflow.main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else run_workflow.EXIT_BAD_INPUT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of Drag100 / DragBench sample folders")
    parser.add_argument("--edited", action="append", required=True, metavar="[NAME=]DIR",
                        help="the runner's batch output of one method (repeat for several)")
    parser.add_argument("--method", help="name of the method of a single --edited DIR (default: the folder's name)")
    parser.add_argument("--run", type=Path, metavar="WORKFLOW", help="first run this workflow over --data into --edited")
    parser.add_argument("--checkpoint", type=Path, help="with --run: the SD1.x checkpoint (default: the tiny test one)")
    parser.add_argument("--controlnet", type=Path, help="with --run: ControlNet file for a workflow that loads one")
    parser.add_argument("--upscale-model", type=Path, help="with --run: upscale model file for a workflow that loads one")
    parser.add_argument("--prompt", help="with --run: text for every CLIP Text Encode node (MD still uses each sample's)")
    parser.add_argument("--timeout", type=float, help="with --run: seconds to wait per sample (default: the runner's)")
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
    given = [option for option in RUN_OPTIONS if option != "limit" and getattr(args, option) is not None]
    if given and args.run is None:
        parser.error(f"--{', --'.join(o.replace('_', '-') for o in given)} only apply with --run")
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.cell_width < 1:
        parser.error("--cell-width must be at least 1")
    return args


def run_first(args: argparse.Namespace, out: Path) -> int | None:
    """``--run``: the runner's batch mode into ``out``; None to go on evaluating, else the exit code to stop with."""
    code = run_workflow_batch(runner_argv(args, out))
    if code == run_workflow.EXIT_SAMPLES_FAILED:
        print("warning: some samples failed in the runner; they are listed as failed", file=sys.stderr)
    if code in RUNNER_CARRY_ON:
        return None
    print(f"error: the runner exited with code {code} (see its message above); nothing was evaluated", file=sys.stderr)
    return code


def warn_tiny(methods: list[Method], runs: dict[str, RunRecord]) -> None:
    """A loud warning on stderr for every method whose results came from the runner's tiny test checkpoint."""
    tiny = [m.name for m in methods if runs[m.name].tiny_checkpoint]
    if tiny:
        bar = "!" * 78
        print(f"\n{bar}\n!! {', '.join(tiny)}: {TINY_MARK}.\n"
              f"!! These numbers score random-weight output; rerun with --checkpoint <SD1.5 file>.\n{bar}\n",
              file=sys.stderr)


def write_outputs(args: argparse.Namespace, report: dict, samples: list, results: dict) -> None:
    """The markdown tables on stdout, and the ``--report`` JSON and ``--grid`` PNG when asked (atomically)."""
    for name, method in report["methods"].items():
        print(markdown_table(name, method, report["skipped"]))
    if args.report:
        write_bytes_atomic(args.report, (json.dumps(report, indent=2) + "\n").encode())
        print(f"wrote {args.report}", file=sys.stderr)
    if args.grid:
        write_png(args.grid, grid_image(samples, list(report["methods"]), results, args.cell_width))
        print(f"wrote {args.grid}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        methods = parse_methods(args.edited, args.method or (args.run.stem if args.run else None))
        folders = batch_sample_folders(args.data, args.limit)
        if args.run is not None:
            stop = run_first(args, methods[0].folder)
            if stop is not None:
                return stop
        runs = {m.name: read_run(m) for m in methods}
        models = load_metric_models(args.dift, args.dift_prompt_embeds, args.lpips, device)
        for metric, reason in models.skipped.items():
            print(f"{metric} skipped: {reason}", file=sys.stderr)
        samples, per_method, results = evaluate(folders, methods, runs, models, keep_images=args.grid is not None,
                                                log=lambda text: print(text, file=sys.stderr))
    except DragInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_outputs(args, build_report(args.data, methods, runs, models, per_method), samples, results)
    warn_tiny(methods, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
