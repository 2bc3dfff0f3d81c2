"""The issues' speed and memory goals, judged beside the benchmark's results.

Every goal is for fp16 on one H100 at one model family and image side, so it
is judged only on a CUDA run of that family at that side; elsewhere its row
says "n/a" (a CPU or another side measures something else). The benchmark
judges each goal twice (:func:`judge_capture`): with captured UNet passes off
(the stages as named) and on (their ``_captured`` twins).
"""

from __future__ import annotations

CAPTURED = "_captured"
"""Suffix of a stage's twin timed with captured UNet passes on (:data:`benchmarks.measure.CAPTURED`)."""

GOALS = {
    ("sd15", 512): {
        "fastdrag_first_edit": {"peak_gib": 3.0, "median_ms": 250.0},
        "fastdrag_re_edit": {"peak_gib": 3.0, "median_ms": 120.0},
        "vae_decode": {"median_ms": 30.0},
        "lora": {"peak_gib": 6.0, "median_ms": 6000.0},
        "dragdiffusion_edit": {"peak_gib": 5.0, "median_ms": 3000.0},
        "gooddrag_edit": {"peak_gib": 5.0, "median_ms": 5000.0},
    },
    ("sdxl", 1024): {
        "fastdrag_first_edit": {"peak_gib": 16.0},
        "fastdrag_re_edit": {"peak_gib": 16.0, "median_ms": 400.0},
        "lora": {"peak_gib": 16.0},
        "dragdiffusion_edit": {"peak_gib": 16.0, "median_ms": 10000.0},
    },
}
"""``{(family, side): {stage: {measure: at most}}}``. SD1.5 at 512²: memory from the GPU-path issue, time from the
interactive-speed issue (16); SDXL at 1024²: issue 17 (FastDrag re-edit ≤ 0.4 s, DragDiffusion edit without LoRA
≤ 10 s, every peak ≤ 16 GiB)."""


def judge(family: str, side: int, stages: dict[str, dict], cuda: bool) -> list[dict]:
    """One row per goal of ``(family, side)``: ``stage``, ``measure``, ``value`` (None when the stage did not run),
    ``goal`` and ``met`` (True / False; None when not judged: not a CUDA run, or no value).

    ``stages``: ``{name: {"median_ms", "peak_gib"}}``.
    """
    rows = []
    for stage, goals in GOALS.get((family, side), {}).items():
        for measure, goal in goals.items():
            value = stages.get(stage, {}).get(measure)
            met = None if not cuda or value is None else value <= goal
            rows.append({"stage": stage, "measure": measure, "value": value, "goal": goal, "met": met})
    return rows


def with_capture(stages: dict[str, dict], on: bool) -> dict[str, dict]:
    """``stages`` as measured with captured UNet passes ``on`` or off, under the plain stage names.

    Off: the stages without the ``_captured`` suffix. On: each stage's
    ``_captured`` twin where it has one, and a stage that runs no UNet pass
    (``unet_passes`` 0: VAE decode, the warp) as it is; a stage with UNet
    passes but no twin was not measured with capture on and is left out.
    """
    plain = {name: stage for name, stage in stages.items() if not name.endswith(CAPTURED)}
    if not on:
        return plain
    out = {}
    for name, stage in plain.items():
        if name + CAPTURED in stages:
            out[name] = stages[name + CAPTURED]
        elif stage.get("unet_passes") == 0:
            out[name] = stage
    return out


def judge_capture(family: str, side: int, stages: dict[str, dict], cuda: bool) -> list[dict]:
    """:func:`judge` with captured UNet passes off, then on (:func:`with_capture`); each row gets ``capture``
    (``"off"`` / ``"on"``). ``stages``: ``{name: {"median_ms", "peak_gib", "unet_passes"}}``."""
    return [dict(row, capture=label) for label, on in (("off", False), ("on", True))
            for row in judge(family, side, with_capture(stages, on), cuda)]


def markdown(rows: list[dict], family: str, side: int) -> list[str]:
    """The rows of :func:`judge` / :func:`judge_capture` as a table: ``| stage | capture | measure | value | goal | met |``
    (the capture column only for rows that carry it)."""
    captured = any("capture" in row for row in rows)
    lines = (["| goal stage | capture | measure | value | goal | met |", "|---|---|---|---|---|---|"] if captured else
             ["| goal stage | measure | value | goal | met |", "|---|---|---|---|---|"])
    for row in rows:
        shown = "–" if row["value"] is None else f"{row['value']:.2f}"
        if row["met"] is None:
            met = "n/a (not measured)" if row["value"] is None else f"n/a (not a CUDA run of {family} at {side}²)"
        else:
            met = "yes" if row["met"] else "NO"
        capture = f" {row.get('capture', '')} |" if captured else ""
        lines.append(f"| {row['stage']} |{capture} {row['measure']} | {shown} | ≤ {row['goal']:g} | {met} |")
    return lines
