"""The evaluator's outputs: a markdown table per method and the before/after grid image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from dragkit.datasets import DragSample
from dragkit.metrics import DAI_GAMMAS, DAI_PAPER, DAI_RELEASED

from .batch_layout import draw_points

HEADER_HEIGHT = 24
"""Height in pixels of the grid's title row."""

MISSING_COLOUR = (90, 90, 90)

TINY_MARK = "pipeline check: tiny random checkpoint, not an edit"
"""How a method run on the runner's tiny test checkpoint is marked (its numbers score no edit)."""


def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(method: str, report: dict, skipped: dict[str, str]) -> str:
    """One method's report (:func:`dragrun.evaluate.build_report`'s entry) as a markdown table (metric | value).

    Above the table the sample counts; the table starts with the run as
    ``timings.json`` recorded it (:data:`TINY_MARK` in bold for the tiny test
    checkpoint) and gives a skipped metric's reason in place of its value.
    """
    summary = report["summary"]
    lines = [f"### {method}", "", f"{summary['evaluated']} of {len(report['samples'])} samples evaluated"]
    for key in ("missing", "failed"):
        if summary[key]:
            lines[-1] += f"; {key}: {', '.join(summary[key])}"
    lines += ["", "| metric | value |", "|---|---|"]
    if report.get("tiny_checkpoint"):
        lines.append(f"| **warning** | **{TINY_MARK}** |")
    lines += [f"| {key} | {report[key]} |" for key in ("workflow", "checkpoint") if report.get(key)]
    for label in (DAI_PAPER, DAI_RELEASED):
        for gamma in DAI_GAMMAS:
            lines.append(f"| {label}, γ={gamma} (lower is better) | {_number(summary[label][str(gamma)], 5)} |")
    if "MD" in skipped:
        lines.append(f"| MD (px, lower is better) | skipped: {skipped['MD']} |")
    else:
        lines.append(f"| MD (px, lower is better) | {_number(summary['MD'], 2)} over {summary['MD pairs']} pairs |")
    if "IF" in skipped:
        lines.append(f"| IF = 1 − LPIPS (higher is better) | skipped: {skipped['IF']} |")
    else:
        lines.append(f"| IF = 1 − LPIPS (higher is better) | {_number(summary['IF'])} |")
    lines.append(f"| median seconds per edit (runner) | {_number(summary['median seconds'], 2)} |")
    return "\n".join(lines) + "\n"


def _cell(image: np.ndarray, width: int) -> tuple[Image.Image, float]:
    img = Image.fromarray(image)
    scale = width / img.width
    return img.resize((width, max(1, round(img.height * scale))), Image.BILINEAR), scale


def _label(img: Image.Image, text: str) -> None:
    """White ``text`` on a black box in the top-left corner."""
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((4, 3), text)
    draw.rectangle([0, 0, right + 3, bottom + 3], fill="black")
    draw.text((4, 3), text, fill="white")


def grid_height(samples: list[tuple[str, DragSample]], cell_width: int) -> int:
    """Height of :func:`grid_image`'s image: the title row plus one row per sample at ``cell_width``."""
    return HEADER_HEIGHT + sum(max(1, round(s.height * cell_width / s.width)) for _, s in samples)


def grid_image(
    samples: list[tuple[str, DragSample]], methods: list[str], results: dict[str, dict[str, np.ndarray]],
    cell_width: int = 256,
) -> Image.Image:
    """Rows = samples; columns = the source with handles (red), targets (blue) and arrows, then each method's result with the targets.

    Every cell is ``cell_width`` wide at the sample's aspect ratio; a missing
    result is a grey cell. Size: ``(1 + len(methods)) * cell_width`` by
    :func:`grid_height`.
    """
    width = (1 + len(methods)) * cell_width
    canvas = Image.new("RGB", (width, grid_height(samples, cell_width)), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(["source"] + list(methods)):
        draw.text((column * cell_width + 6, 6), title, fill="black")
    top = HEADER_HEIGHT
    for name, sample in samples:
        source, scale = _cell(sample.image, cell_width)
        draw_points(source, sample.points.handles, sample.points.targets, scale)
        _label(source, name)
        canvas.paste(source, (0, top))
        for column, method in enumerate(methods, start=1):
            result = results.get(method, {}).get(name)
            if result is None:
                cell = Image.new("RGB", source.size, MISSING_COLOUR)
                ImageDraw.Draw(cell).text((6, 6), "no result", fill="white")
            else:
                cell, scale = _cell(result, cell_width)
                draw_points(cell, sample.points.handles, sample.points.targets, scale, with_handles=False)
            canvas.paste(cell, (column * cell_width, top))
        top += source.height
    return canvas
