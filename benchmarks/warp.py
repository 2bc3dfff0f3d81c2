"""Benchmarks of the warps: FastDrag's warp + BNNI (``dragkit.fastdrag.fastdrag_edit``, mode "drag") and,
with ``--pixel``, Inpaint4Drag's pixel warp (``dragkit.pixel_warp.pixel_warp``).

Cases: a 1x4x64x96 latent with a blob mask over about 30% of the cells and 1, 5 and 20 pairs, and a
1x4x64x64 latent with 1 pair; fills "bnni" and "bnni_as_released"; on the CPU and, when there is one,
on CUDA. Each case is timed after warm-up (median and the 10th-90th percentile spread over repeats),
and the same input is run through the per-cell loops of :mod:`benchmarks.reference_loops` (a re-creation
of the released code's loops) for the speed-up ratio and a check that both give the same latent.

    python -m benchmarks.warp [--json PATH] [--repeats N] [--loop-repeats N] [--threads N] [--no-loops]

:func:`run_benchmark` returns the same results as a dict.

Pixel warp (``--pixel``): a blob mask over about 30% of a square image of 512, 1024 and 2048 pixels
a side, 3 pairs on whole pixels, band 5, and the Drag100 samples named by ``--samples`` (their own mask
and points; default ``art_0``, 512 x 512, 3 pairs, when ``--drag100`` holds it), both ``neighbours``
options; medians of ``--repeats`` runs after one warm-up, in CPU time of this process (with one thread:
the work itself, whatever else shares the cores). ``--released DIR`` (a checkout of
Visual-AI/Inpaint4Drag, with OpenCV importable; nothing of it is in this repository) times its
``utils/drag.py::bi_warp`` on the same mask and points, each run interleaved with ours, and prints the
ratios:

    python -m benchmarks.warp --pixel --threads 1 [--released DIR] [--sizes 512 1024 2048] [--samples art_0]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from benchmarks.reference_loops import fastdrag_loops
from dragkit.datasets import load_sample
from dragkit.fastdrag import fastdrag_edit, latent_warp
from dragkit.pixel_warp import NEIGHBOURS, pixel_warp

PIXEL_SIZES = (512, 1024, 2048)
"""Sides of the square blob images of the pixel-warp benchmark."""

PIXEL_SAMPLES = ("art_0",)
"""Drag100 samples of the pixel-warp benchmark (art_0: 512 x 512, two regions, 3 pairs)."""

DRAG100 = Path(__file__).resolve().parents[2] / "shared" / "data" / "Drag100"
"""Where the shared Drag100 samples are (beside the repository)."""

CASES = ((64, 96, 1), (64, 96, 5), (64, 96, 20), (64, 64, 1))
"""(latent height, latent width, pairs)."""

BENCH_FILLS = ("bnni", "bnni_as_released")


def blob_mask(height: int, width: int) -> torch.Tensor:
    """An ``(h, w)`` bool blob over about 30% of the cells: two overlapping ellipses."""
    rows = torch.arange(height, dtype=torch.float64)[:, None] / height
    cols = torch.arange(width, dtype=torch.float64)[None, :] / width
    body = ((rows - 0.5) / 0.30) ** 2 + ((cols - 0.45) / 0.26) ** 2 < 1
    head = ((rows - 0.38) / 0.18) ** 2 + ((cols - 0.70) / 0.14) ** 2 < 1
    return body | head


def drag_points(mask: torch.Tensor, pairs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``pairs`` handles on masked cells (quarter-cell offsets) and targets 3-8 cells away, clamped inside."""
    height, width = mask.shape
    gen = torch.Generator().manual_seed(seed)
    cells = torch.nonzero(mask)
    picks = cells[torch.randperm(len(cells), generator=gen)[:pairs]].flip(1).to(torch.float32)
    handles = picks + torch.randint(0, 4, (pairs, 2), generator=gen) / 4
    angle = torch.rand(pairs, generator=gen) * 2 * torch.pi
    length = 3 + 5 * torch.rand(pairs, generator=gen)
    step = torch.stack([angle.cos(), angle.sin()], dim=1) * length[:, None]
    targets = torch.round((handles + step) * 4) / 4
    targets[:, 0].clamp_(0, width - 0.25)
    targets[:, 1].clamp_(0, height - 0.25)
    return handles, targets


def time_ms(fn: Callable[[], object], repeats: int, warmup: int, cuda: bool) -> list[float]:
    """Wall times of ``fn()`` in milliseconds (CUDA synchronised), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summary(times: list[float]) -> dict:
    """Median, 10th/90th percentile and minimum of a list of times (ms)."""
    ordered = sorted(times)
    last = len(ordered) - 1
    return {
        "median_ms": statistics.median(ordered),
        "p10_ms": ordered[min(int(0.1 * len(ordered)), last)],
        "p90_ms": ordered[min(int(0.9 * len(ordered)), last)],
        "min_ms": ordered[0],
        "repeats": len(ordered),
    }


def run_benchmark(repeats: int = 30, loop_repeats: int = 3, loops: bool = True, threads: int | None = None) -> dict:
    """Time every case, fill and device; returns ``{"environment": ..., "rows": [...]}``.

    Each row: size, pairs, masked and null cell counts, fill, device, the timing summary of
    :func:`summary`, and (CPU rows, when ``loops``) the per-cell loops' median, the speed-up and the
    largest difference between the two results.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for height, width, pairs in CASES:
        mask = blob_mask(height, width)
        handles, targets = drag_points(mask, pairs)
        z = torch.randn(1, 4, height, width, generator=torch.Generator().manual_seed(height * width + pairs))
        null_cells = int(latent_warp(z, handles, targets, mask)[1].sum())
        for fill in BENCH_FILLS:
            reference = None
            loop_times = None
            if loops:
                loop = partial(fastdrag_loops, z, handles, targets, mask, fill)
                loop_times = time_ms(loop, loop_repeats, 1, False)
                reference = loop()
            for device in devices:
                zd, hd, td, md = (t.to(device) for t in (z, handles, targets, mask))
                run = partial(fastdrag_edit, zd, hd, td, md, fill=fill)
                row = {
                    "size": f"{height}x{width}",
                    "pairs": pairs,
                    "masked_cells": int(mask.sum()),
                    "null_cells": null_cells,
                    "fill": fill,
                    "device": device,
                    **summary(time_ms(run, repeats, 3, device == "cuda")),
                }
                if reference is not None:
                    row["max_abs_diff_vs_loops"] = float((run().cpu() - reference).abs().max())
                    if device == "cpu":
                        row["loops_median_ms"] = statistics.median(loop_times)
                        row["speedup_vs_loops"] = row["loops_median_ms"] / row["median_ms"]
                rows.append(row)
    return {"environment": environment(), "rows": rows}


def pixel_case(side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image (1, side, side, 3) uint8, mask (side, side) bool, handles, targets (3, 2))`` on whole pixels."""
    mask = blob_mask(side, side)
    handles, targets = drag_points(mask, 3)
    handles = torch.floor(handles)  # the masked pixel drag_points picked (its offsets are below one pixel)
    targets = torch.round(handles + (targets - handles) * side / 64).clamp(0, side - 1)
    image = torch.randint(0, 256, (1, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(side))
    return image, mask, handles, targets


def drag100_case(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Drag100 sample as :func:`pixel_case` gives a blob: ``(image (1, H, W, 3) uint8, mask (H, W) bool, handles, targets)``."""
    sample = load_sample(folder)
    mask = torch.ones(sample.height, sample.width, dtype=torch.bool) if sample.mask is None else torch.from_numpy(sample.mask > 0)
    image = torch.from_numpy(sample.image.copy())[None]
    return image, mask, torch.tensor(sample.points.handles, dtype=torch.float32), torch.tensor(sample.points.targets, dtype=torch.float32)


def run_pixel_benchmark(repeats: int = 7, released: str | None = None, sizes=PIXEL_SIZES, threads: int | None = None,
                        samples: tuple[str, ...] = PIXEL_SAMPLES, drag100: Path = DRAG100) -> dict:
    """Median CPU times of :func:`pixel_warp` (both ``neighbours``) and, given ``released``, of the released ``bi_warp``.

    Cases: the Drag100 ``samples`` found under ``drag100``, then a blob at each of ``sizes``.
    Returns ``{"environment": ..., "rows": [{"size", "case", "region_px", "variant", "median_ms", ...}]}``;
    every run of every variant is interleaved, so load from other processes hits them alike.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    bi_warp = None
    if released:
        import sys

        import numpy as np

        sys.path.insert(0, released)
        from utils.drag import bi_warp  # the released code, from the checkout given

    cases = [(name, drag100_case(drag100 / name)) for name in samples if (drag100 / name).is_dir()]
    cases += [("blob", pixel_case(side)) for side in sizes]
    rows = []
    for case, (image, mask, handles, targets) in cases:
        height, width = mask.shape
        runs = {name: partial(pixel_warp, image, mask, handles, targets, neighbours=name) for name in NEIGHBOURS}
        if bi_warp is not None:
            alternating = torch.stack([handles, targets], 1).reshape(-1, 2).numpy().astype(np.float32)
            runs["released bi_warp"] = partial(bi_warp, mask.numpy().astype(np.uint8), alternating, 5)
        times = {name: [] for name in runs}
        for name, run in runs.items():
            run()  # warm-up
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.process_time()
                run()
                times[name].append((time.process_time() - start) * 1e3)
        for name, values in times.items():
            rows.append({"size": f"{width}x{height}", "case": case, "region_px": int(mask.sum()), "variant": name,
                         "median_ms": statistics.median(values), "repeats": repeats})
    return {"environment": environment(), "rows": rows}


def format_pixel_table(result: dict) -> str:
    """The pixel-warp rows as a table, with each variant's speed relative to the released code when timed."""
    lines = [f"{'case':>7} {'size':>9} {'region px':>9} {'variant':>17} {'median ms':>10} {'vs released':>11}"]
    released = {(row["case"], row["size"]): row["median_ms"] for row in result["rows"] if row["variant"] == "released bi_warp"}
    for row in result["rows"]:
        key = (row["case"], row["size"])
        ratio = f"{released[key] / row['median_ms']:.2f}x" if key in released else "-"
        lines.append(f"{row['case']:>7} {row['size']:>9} {row['region_px']:>9} {row['variant']:>17} {row['median_ms']:>10.1f} {ratio:>11}")
    env = result["environment"]
    lines.append(f"torch {env['torch']}, {env['threads']} CPU threads, {env['cpu']}")
    return "\n".join(lines)


def environment() -> dict:
    """Versions, threads and devices the numbers were taken with."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def format_table(result: dict) -> str:
    """The rows as a fixed-width text table."""
    head = f"{'size':>6} {'pairs':>5} {'masked':>6} {'null':>5} {'fill':>16} {'device':>6} "
    head += f"{'median ms':>10} {'p10-p90 ms':>15} {'loops ms':>9} {'speed-up':>9} {'max diff':>9}"
    lines = [head]
    for row in result["rows"]:
        spread = f"{row['p10_ms']:.3f}-{row['p90_ms']:.3f}"
        loops_ms = f"{row['loops_median_ms']:.1f}" if "loops_median_ms" in row else "-"
        speedup = f"{row['speedup_vs_loops']:.0f}x" if "speedup_vs_loops" in row else "-"
        diff = f"{row['max_abs_diff_vs_loops']:.1e}" if "max_abs_diff_vs_loops" in row else "-"
        lines.append(
            f"{row['size']:>6} {row['pairs']:>5} {row['masked_cells']:>6} {row['null_cells']:>5} {row['fill']:>16} "
            f"{row['device']:>6} {row['median_ms']:>10.3f} {spread:>15} {loops_ms:>9} {speedup:>9} {diff:>9}"
        )
    env = result["environment"]
    gpu = f", {env['cuda_device']}" if "cuda_device" in env else ""
    lines.append(f"torch {env['torch']}, {env['threads']} CPU threads, {env['cpu']}{gpu}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per case after warm-up (default 30)")
    parser.add_argument("--loop-repeats", type=int, default=3, help="timed runs of the per-cell loops (default 3)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-loops", action="store_true", help="skip the per-cell loops baseline")
    parser.add_argument("--pixel", action="store_true", help="benchmark the pixel warp instead (Drag Warp (pixels))")
    parser.add_argument("--released", metavar="DIR", help="with --pixel: a checkout of Visual-AI/Inpaint4Drag to time beside ours")
    parser.add_argument("--sizes", type=int, nargs="*", default=list(PIXEL_SIZES), help="with --pixel: blob image sides")
    parser.add_argument("--samples", nargs="*", default=list(PIXEL_SAMPLES), help="with --pixel: Drag100 samples to time")
    parser.add_argument("--drag100", type=Path, default=DRAG100, help="with --pixel: the Drag100 folder")
    args = parser.parse_args(argv)
    if args.pixel:
        result = run_pixel_benchmark(min(args.repeats, 7) if args.repeats == 30 else args.repeats, args.released,
                                     args.sizes, args.threads, tuple(args.samples), args.drag100)
        print(format_pixel_table(result))
    else:
        result = run_benchmark(args.repeats, args.loop_repeats, not args.no_loops, args.threads)
        print(format_table(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
