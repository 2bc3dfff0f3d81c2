"""The editor's browser-free JavaScript layers under Node: the state model and the pixel warp.

``js/editor_model.js`` (the Drag Points Editor's state: pairs, mask layers, the widget string) and
``js/pixel_warp.js`` (the warp the editor previews live) need no DOM and no ComfyUI frontend, so
they run here with Node (``node`` on PATH; skipped without it), checked against the Python side:
the widget string the model writes parses in ``dragkit/editor_state.py`` (and its RLE is the same
bytes as ``encode_mask``), and the JS warp matches ``dragkit/pixel_warp.py`` on the same input.

The warp comparison: the inpaint masks must be equal, and the warped images differ in exactly the
pinned number of pixels per case (:data:`CASES`). The JS port computes the geometry in float64,
Python in float32, and a pixel may differ only where a value sits on a ``.5`` rounding: with two
handles, every pixel on the perpendicular bisector between them has a forward IDW of exactly
``h + (d1 + d2) / 2`` in exact arithmetic, which float32 and float64 round to different sides (in
"two regions, several handles" 25 region pixels sit within 1e-5 of ``.5``; 4 target pixels of 3,744
take another source because of them).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dragkit.editor_state import encode_mask, parse_editor_state

JS = Path(__file__).resolve().parent.parent / "js"
NODE = shutil.which("node") or shutil.which("nodejs")

pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not installed (apt-get install nodejs)")

def _node(script: str, payload: dict) -> dict:
    """Run an ES-module ``script`` with ``payload`` as JSON on stdin; return its stdout as JSON."""
    run = subprocess.run([NODE, "--input-type=module", "-e", script], input=json.dumps(payload),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


READ_STDIN = 'import { readFileSync } from "node:fs"; const input = JSON.parse(readFileSync(0, "utf8"));'


def test_the_js_model_writes_what_python_reads():
    """Clicks, a brush stroke and an erased disc in the JS model: Python parses the same pairs and mask."""
    script = READ_STDIN + f"""
    import {{ EditorModel }} from {json.dumps(str(JS / "editor_model.js"))};
    const m = new EditorModel();
    m.setSize(input.width, input.height);
    for (const [x, y] of input.clicks) m.click(x, y);
    m.paintLine(5.5, 10.5, 30.5, 12.5, 4, 1);
    m.paintDisc(20.5, 11.5, 2, 0);
    const again = new EditorModel();
    again.load(m.serialize());
    process.stdout.write(JSON.stringify({{ state: m.serialize(), again: again.serialize(), count: m.maskCount,
                                          editable: Array.from(m.mask) }}));
    """
    out = _node(script, {"width": 40, "height": 24, "clicks": [[3, 4], [10, 20], [39, 23], [0, 0]]})
    state = parse_editor_state(out["state"], width=40, height=24)
    assert state.points.handles == ((3.0, 4.0), (39.0, 23.0)) and state.points.targets == ((10.0, 20.0), (0.0, 0.0))
    mask = np.array(out["editable"], dtype=bool).reshape(24, 40)
    assert np.array_equal(state.mask, mask) and int(mask.sum()) == out["count"] > 0
    assert not mask[11, 20]  # erased
    assert json.loads(out["state"])["mask"]["rle"] == encode_mask(mask)
    assert out["again"] == out["state"]


WARP_SCRIPT = READ_STDIN + f"""
import {{ pixelWarp }} from {json.dumps(str(JS / "pixel_warp.js"))};
const rgba = Uint8Array.from(Buffer.from(input.rgba, "base64"));
const mask = input.mask ? Uint8Array.from(Buffer.from(input.mask, "base64")) : null;
const r = pixelWarp({{ ...input, rgba, mask }});
process.stdout.write(JSON.stringify({{ rgba: Buffer.from(r.rgba).toString("base64"),
                                       inpaint: Buffer.from(r.inpaint).toString("base64"),
                                       moved: r.movedPairs, ignored: r.ignoredPairs, still: r.stillRegions }}));
"""


def _js_warp(image: np.ndarray, mask: np.ndarray | None, handles, targets, band: int) -> dict:
    height, width = image.shape[:2]
    rgba = np.dstack([image, np.full((height, width), 255, np.uint8)])
    out = _node(WARP_SCRIPT, {
        "width": width, "height": height, "rgba": base64.b64encode(rgba.tobytes()).decode(),
        "mask": None if mask is None else base64.b64encode(mask.astype(np.uint8).tobytes()).decode(),
        "handles": handles, "targets": targets, "band": band,
    })
    out["image"] = np.frombuffer(base64.b64decode(out["rgba"]), np.uint8).reshape(height, width, 4)[..., :3]
    out["inpaint"] = np.frombuffer(base64.b64decode(out["inpaint"]), np.uint8).reshape(height, width).astype(bool)
    return out


def _textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_the_js_warp_moves_a_patch_to_its_target():
    """Known answer: a textured patch in its own region moved by (dx, dy) lands at the target, the
    uncovered area is in the inpaint mask, nothing outside the mask and band changes."""
    image = _textured(48, 64)
    mask = np.zeros((48, 64), bool)
    mask[10:22, 12:24] = True
    dx, dy = 20, 9
    out = _js_warp(image, mask, [[17, 15]], [[17 + dx, 15 + dy]], band=3)
    assert np.array_equal(out["image"][10 + dy:22 + dy, 12 + dx:24 + dx], image[10:22, 12:24])
    uncovered = mask & ~np.roll(np.roll(mask, dy, 0), dx, 1)
    assert out["inpaint"][uncovered].all()
    grown = np.zeros_like(mask)
    grown[10 - 2:22 + dy + 2, 12 - 2:24 + dx + 2] = True  # band 3 reaches 2 px past the target's edge pixels
    assert not out["inpaint"][~grown].any()
    assert np.array_equal(out["image"][~grown], image[~grown])
    assert out["moved"] == [0] and out["ignored"] == [] and out["still"] == 0


CASES = {
    "one region, one handle": (None, [[20, 20]], [[27, 16]], 5, 0),
    "two regions, several handles": ("two", [[20, 16], [26, 22], [48, 40]], [[30, 20], [33, 28], [44, 32]], 5, 4),
    "a region with a hole, a handle outside, no band": ("ring", [[20, 12], [60, 44]], [[26, 18], [58, 40]], 0, 0),
    "a move past the image's edge": ("two", [[20, 16]], [[70, 20]], 4, 0),
    "overlapping targets: the upper region wins": ("two", [[20, 16], [48, 40]], [[40, 30], [40, 30]], 5, 0),
    "a region on the border, band 1": ("border", [[30, 4]], [[38, 4]], 1, 0),
    "a region on the border, band 3": ("border", [[30, 4]], [[38, 4]], 3, 0),
    "a region leaving past the border, band 7": ("border", [[30, 4]], [[30, -3]], 7, 0),
    "sources outside the image, no band": ("left", [[2, 15], [6, 12]], [[4, 15], [6, 12]], 0, 0),
    "a region stretched past the border: band from its part outside the image, band 5": ("left", [[2, 10], [4, 19]], [[-12, 4], [4, 19]], 5, 0),
}
"""name: (mask kind, handles, targets, band, image pixels that may differ from Python's (see the module docstring))."""


def _case_mask(kind: str | None) -> np.ndarray | None:
    mask = np.zeros((52, 72), bool)
    if kind is None:
        return None
    if kind == "two":
        mask[10:28, 14:32] = True
        mask[34:46, 40:56] = True
    if kind == "ring":
        mask[6:30, 10:34] = True
        mask[12:20, 18:26] = False
    if kind == "border":
        mask[0:12, 20:44] = True
    if kind == "left":
        mask[10:20, 0:8] = True
    return mask


@pytest.mark.parametrize("case", list(CASES))
def test_the_js_warp_matches_the_python_warp(case):
    torch = pytest.importorskip("torch")
    from dragkit.pixel_warp import pixel_warp

    kind, handles, targets, band, differing = CASES[case]
    image = _textured(52, 72, seed=1)
    mask = _case_mask(kind)
    js = _js_warp(image, mask, handles, targets, band)
    py = pixel_warp(torch.from_numpy(image)[None], None if mask is None else torch.from_numpy(mask),
                    torch.tensor(handles, dtype=torch.float32), torch.tensor(targets, dtype=torch.float32), band=band)
    differ = (py.image[0].numpy() != js["image"]).any(-1)
    assert int(differ.sum()) == differing
    assert np.array_equal(py.inpaint_mask.numpy(), js["inpaint"])
    assert (py.image[0].numpy() != image).any()  # something moved
    assert js["moved"] == list(py.moved_pairs) and js["ignored"] == list(py.ignored_pairs)
    assert js["still"] == py.still_regions
