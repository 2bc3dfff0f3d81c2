"""Batch mode beyond one server: the driver's own time per sample, and samples per minute for N Ray actors.

    OMP_NUM_THREADS=1 python -m benchmarks.batch --data ../shared/data/Drag100 --limit 20
    COMFYUI_PATH=... python -m benchmarks.batch --data ../shared/data/Drag100 --limit 8 --actors 1,2,4

**Driver overhead** (always): the runner's batch driver
(:class:`dragrun.run_workflow.BatchDriver`) over ``--limit`` samples with a
worker that answers at once (a fixed 512 px edit and side-by-side), so what
is timed is the driver alone: reading each sample and its files, writing
``edited.png``, ``side_by_side.png`` and ``timings.json``. (The workers
encode the inputs and compose the side-by-side: that scales with them.) Goal: under 50 ms per sample, so that a cluster's
throughput grows with its actors (at least 0.9 x N for N actors).

**Actors** (``--actors 1,2,4``, needs Ray and ``COMFYUI_PATH``): the
runner's ``--ray --device cpu`` on a local cluster of ``--cpus-per-actor``
x N CPUs, the tiny SD1.5 checkpoint and FastDrag, samples downscaled to
``--side`` px; samples per minute from the first result to the last (the
actors' start-up left out), and the ratio to one actor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dragrun.batch_layout import batch_sample_folders

ROOT = Path(__file__).resolve().parents[1]
DRIVER_GOAL_MS = 50.0
"""The driver's time per sample must stay under this (issue 30)."""


class EchoWorker:
    """A worker that answers at once with a fixed 512 px edit and side-by-side (PNG)."""

    label = "echo"

    def __init__(self) -> None:
        from dragrun.run_workflow import png_bytes

        rng = np.random.default_rng(0)
        self.edited = png_bytes(Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)))
        self.side_by_side = png_bytes(Image.fromarray(rng.integers(0, 255, (512, 1024, 3), dtype=np.uint8)))

    def run(self, recipe, job):
        from dragrun.distribute import Result

        return Result(job.name, self.edited, self.side_by_side, 0.0)

    def stop(self) -> None:
        pass


def driver_ms_per_sample(data: Path, limit: int, repeats: int) -> list[float]:
    """The driver's wall time per sample (ms), once per repeat, over the first ``limit`` samples of ``data``."""
    from dragrun.run_workflow import BatchDriver

    folders = batch_sample_folders(data, limit)
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="dragrun-bench-") as work:
            out = Path(work) / "out"
            out.mkdir()
            args = argparse.Namespace(out=out, prompt=None)
            timings = {"run": {}, "samples": {}, "summary": {}}
            driver = BatchDriver(args, timings, out / "timings.json", 0, [EchoWorker()])
            start = time.perf_counter()
            assert driver.run(None, folders) == 0
            times.append((time.perf_counter() - start) * 1000 / len(folders))
    return times


def actors_rate(data: Path, limit: int, actors: int, cpus_per_actor: int, side: int) -> dict:
    """Samples per minute of ``--ray --device cpu`` with ``actors`` actors on a local cluster (start-up left out)."""
    import ray

    from dragkit.datasets import DragSample, load_sample, save_drag100
    from dragkit.points import DragPoints
    from dragrun.run_workflow import main

    with tempfile.TemporaryDirectory(prefix="dragrun-bench-") as work:
        small = Path(work) / "data"
        for folder in batch_sample_folders(data, limit):
            sample = load_sample(folder)
            scale = side / max(sample.width, sample.height)
            width, height = round(sample.width * scale), round(sample.height * scale)
            image = Image.fromarray(sample.image).resize((width, height), Image.BICUBIC)
            mask = Image.fromarray(sample.mask).resize((width, height), Image.NEAREST)
            points = [[tuple(c * scale for c in p) for p in ps] for ps in (sample.points.handles, sample.points.targets)]
            save_drag100(DragSample(np.asarray(image), DragPoints(*points, width, height), np.asarray(mask)),
                         small / folder.name)
        ray.init(num_cpus=actors * cpus_per_actor, include_dashboard=False, log_to_driver=False)
        try:
            out = Path(work) / "out"
            code = main([str(ROOT / "workflows" / "fastdrag.json"), "--batch", str(small), "--out", str(out),
                         "--ray", "--device", "cpu", "--cpus-per-actor", str(cpus_per_actor)])
        finally:
            ray.shutdown()
        stamps = sorted(p.stat().st_mtime for p in out.glob("*/edited.png"))
        seconds = [e["seconds"] for e in json.loads((out / "timings.json").read_text())["samples"].values()]
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else None
    return {"actors": actors, "exit_code": code, "samples": len(stamps),
            "per_minute": (len(stamps) - 1) * 60 / span if span else None,
            "median_seconds": statistics.median(seconds) if seconds else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "Drag100",
                        help="a folder of Drag100 / DragBench sample folders")
    parser.add_argument("--limit", type=int, default=20, help="samples (the first N, sorted)")
    parser.add_argument("--repeats", type=int, default=5, help="driver overhead: repeats (median reported)")
    parser.add_argument("--actors", default="", help="comma-separated actor counts to time with Ray, e.g. 1,2,4")
    parser.add_argument("--cpus-per-actor", type=int, default=1, help="--actors: CPUs per actor")
    parser.add_argument("--side", type=int, default=128, help="--actors: the samples' longer side in px")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    times = driver_ms_per_sample(args.data, args.limit, args.repeats)
    median = statistics.median(times)
    result = {"driver_ms_per_sample": {"median": median, "all": times, "samples": args.limit,
                                       "goal": DRIVER_GOAL_MS, "met": median < DRIVER_GOAL_MS}}
    print(f"driver: {median:.1f} ms per sample (median of {len(times)} x {args.limit} samples; goal < "
          f"{DRIVER_GOAL_MS:.0f} ms: {'met' if median < DRIVER_GOAL_MS else 'NOT met'})")
    rates = [actors_rate(args.data, args.limit, int(n), args.cpus_per_actor, args.side)
             for n in args.actors.split(",") if n.strip()]
    for rate in rates:
        base = rates[0]["per_minute"]
        rate["ratio_to_first"] = rate["per_minute"] / base if base and rate["per_minute"] else None
        print(f"{rate['actors']} actors: {rate['per_minute'] or 0:.1f} samples/min "
              f"(x{rate['ratio_to_first'] or 0:.2f} of {rates[0]['actors']}), median {rate['median_seconds'] or 0:.2f} s per sample")
    result["actors"] = rates
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
