"""Drag100 and DragBench folders: the shipped Drag100 data, a constructed DragBench sample, safe unpickling."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dragkit import datasets
from dragkit.datasets import DragSample, load_dragbench, load_drag100, read_meta_data_pkl, save_dragbench, save_drag100
from dragkit.editor_state import parse_editor_state
from dragkit.errors import DragInputError
from dragkit.points import DragPoints

DRAG100 = Path(__file__).resolve().parents[2] / "shared" / "data" / "Drag100"
needs_drag100 = pytest.mark.skipif(not DRAG100.is_dir(), reason=f"the shipped Drag100 data is not at {DRAG100}")


def _sample(width=48, height=32, prompt="a photo of a cat") -> DragSample:
    rng = np.random.default_rng(width * height)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[4:20, 10:40] = True
    points = DragPoints(((12.0, 8.0), (30.0, 15.0)), ((20.0, 9.0), (47.0, 31.0)), width, height)
    return DragSample(image, points, mask, prompt)


def _write_dragbench_pickle(folder: Path, meta, image: np.ndarray, protocol: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "original_image.png")
    (folder / "meta_data.pkl").write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder


@needs_drag100
def test_every_shipped_drag100_sample_loads():
    folders = datasets.sample_folders(DRAG100)
    assert len(folders) == 100
    for folder in folders:
        raw = json.loads((folder / "points.json").read_text())["points"]
        assert len(raw) % 2 == 0 and raw, folder
        sample = load_drag100(folder)
        assert sample.points.num_pairs == len(raw) // 2
        assert [list(p) for p in sample.points.handles] == [list(map(float, p)) for p in raw[0::2]]
        with Image.open(folder / "original.jpg") as img:
            assert (sample.width, sample.height) == img.size
        for x, y in sample.points.handles + sample.points.targets:
            assert 0 <= x <= sample.width - 1 and 0 <= y <= sample.height - 1, folder
        assert sample.mask.shape == (sample.height, sample.width) and sample.mask.any(), folder
        assert parse_editor_state(sample.editor_state(), sample.width, sample.height).points == sample.points


@needs_drag100
def test_drag100_export_round_trip(tmp_path):
    sample = load_drag100(DRAG100 / "art_0")
    out = save_drag100(sample, tmp_path / "art_0")
    again = load_drag100(out)
    assert again.points == sample.points
    assert np.array_equal(again.mask, sample.mask)
    assert np.abs(again.image.astype(int) - sample.image.astype(int)).mean() < 3  # JPEG is lossy
    assert json.loads((out / "points.json").read_text()) == json.loads((DRAG100 / "art_0" / "points.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["mask.png", "original.jpg", "points.json"]
    assert datasets.load_sample(out).points == sample.points
    with pytest.raises(DragInputError, match="neither a Drag100 nor a DragBench"):
        datasets.load_sample(tmp_path)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_dragbench_pickle_with_numpy_arrays_loads_through_the_restricted_unpickler(tmp_path, protocol):
    sample = _sample()
    meta = {"prompt": sample.prompt, "points": [[12, 8], [20, 9], [30, 15], [47, 31]],
            "mask": sample.mask.astype(np.uint8)}
    folder = _write_dragbench_pickle(tmp_path / "art_work" / "user_2023-09-01-1200-00", meta, sample.image, protocol)
    loaded = load_dragbench(folder)
    assert loaded.points == sample.points
    assert np.array_equal(loaded.mask, sample.mask)
    assert np.array_equal(loaded.image, sample.image)
    assert loaded.prompt == sample.prompt
    assert datasets.sample_folders(tmp_path) == [folder]
    assert datasets.load_sample(folder).points == sample.points


def test_pickles_from_numpy_1_module_names_load(tmp_path):
    mask = np.eye(4, dtype=np.uint8)
    # protocol 3 names globals as plain text lines, so the module can be renamed in place
    raw = pickle.dumps({"mask": mask}, protocol=3).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in raw
    (tmp_path / "meta_data.pkl").write_bytes(raw)
    assert np.array_equal(read_meta_data_pkl(tmp_path / "meta_data.pkl")["mask"], mask)


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _CallsEval:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("payload", ["system", "eval", "nested", "numpy-load"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    meta = {
        "system": lambda: {"prompt": "x", "points": [[1, 1], [2, 2]], "mask": _RunsShell(marker)},
        "eval": lambda: _CallsEval(),
        "nested": lambda: {"points": [[1, 1], [2, [_RunsShell(marker)]]]},
        "numpy-load": lambda: {"mask": np.load},
    }[payload]()
    folder = tmp_path / "sample"
    folder.mkdir()
    (folder / "meta_data.pkl").write_bytes(pickle.dumps(meta, protocol=4))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "original_image.png")
    with pytest.raises(DragInputError, match="refusing to unpickle"):
        load_dragbench(folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    "meta, message",
    [
        (["not", "a", "dict"], "must hold a dict"),
        ({"points": [[1, 1]], "mask": np.ones((32, 48), np.uint8)}, "even count"),
        ({"points": [[1, 1], [48, 2]], "mask": np.ones((32, 48), np.uint8)}, "outside the 48x32 image"),
        ({"points": [[1, 1], [2, 2]], "mask": np.ones((48, 32), np.uint8)}, r"shape \(48, 32\)"),
        ({"points": [[1, 1], [2, 2]], "mask": [[1]]}, "must be a numpy array"),
        ({"points": [[1, 1], [2, 2]], "mask": np.array([["a"] * 48] * 32)}, "must hold numbers"),
        ({"points": [[1, 1], [2, 2]], "mask": np.full((32, 48), np.nan)}, "NaN"),
        ({"points": [[1, 1], [2, 2]], "mask": np.ones((32, 48), np.uint8), "prompt": 3}, '"prompt" must be a string'),
    ],
)
def test_malformed_dragbench_metadata_is_refused(tmp_path, meta, message):
    _write_dragbench_pickle(tmp_path, meta, np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(DragInputError, match=message):
        load_dragbench(tmp_path)


def test_corrupt_pickle_is_a_clear_error(tmp_path):
    _write_dragbench_pickle(tmp_path, {}, np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "meta_data.pkl").write_bytes(pickle.dumps({"a": 1})[:-3])
    with pytest.raises(DragInputError, match="not a readable pickle"):
        load_dragbench(tmp_path)


def test_dragbench_export_writes_pickle_and_sidecar(tmp_path):
    sample = _sample()
    folder = save_dragbench(sample, tmp_path / "s")
    assert sorted(p.name for p in folder.iterdir()) == ["meta_data.json", "meta_data.pkl", "original_image.png"]
    from_sidecar = load_dragbench(folder, allow_pickle=False)
    (folder / "meta_data.json").unlink()
    from_pickle = load_dragbench(folder)
    for loaded in (from_sidecar, from_pickle):
        assert loaded.points == sample.points
        assert np.array_equal(loaded.mask, sample.mask)
        assert np.array_equal(loaded.image, sample.image)
        assert loaded.prompt == sample.prompt
    meta = pickle.loads((folder / "meta_data.pkl").read_bytes())
    assert meta["points"] == [[12, 8], [20, 9], [30, 15], [47, 31]]
    assert meta["mask"].dtype == np.uint8 and set(np.unique(meta["mask"])) == {0, 1}
    with pytest.raises(DragInputError, match="pickles are not allowed"):
        load_dragbench(folder, allow_pickle=False)


def test_sidecar_is_preferred_and_validated(tmp_path):
    folder = save_dragbench(_sample(), tmp_path / "s", pickle_meta=False)
    assert not (folder / "meta_data.pkl").exists()
    meta = json.loads((folder / "meta_data.json").read_text())
    assert set(meta) == {"prompt", "width", "height", "points", "mask"}
    assert len((folder / "meta_data.json").read_text()) < 500
    (folder / "meta_data.json").write_text(json.dumps({**meta, "width": 64}))
    with pytest.raises(DragInputError, match="meta_data.json: .*placed on a 64x32 image"):
        load_dragbench(folder)
    (folder / "meta_data.json").write_text(json.dumps({**meta, "mask": {"rle": "AQ=="}}))
    with pytest.raises(DragInputError, match="covers 1 pixels"):
        load_dragbench(folder)
    (folder / "meta_data.json").write_text(json.dumps({**meta, "code": "import os"}))
    with pytest.raises(DragInputError, match="unknown fields"):
        load_dragbench(folder)


def test_a_sample_without_mask_exports_the_whole_image_as_editable(tmp_path):
    sample = DragSample(np.zeros((8, 8, 3), np.uint8), DragPoints(((1.0, 1.0),), ((2.0, 2.0),), 8, 8))
    assert load_drag100(save_drag100(sample, tmp_path / "a")).mask.all()
    assert load_dragbench(save_dragbench(sample, tmp_path / "b")).mask.all()


def test_malformed_drag100_folders_name_the_file(tmp_path):
    save_drag100(_sample(), tmp_path)
    (tmp_path / "points.json").write_text('{"points": [[1, 1], [2, 2], [3, 3]]}')
    with pytest.raises(DragInputError, match="points.json: .*even count"):
        load_drag100(tmp_path)
    (tmp_path / "points.json").write_text('{"points": [[1, 1], [2, NaN]]}')
    with pytest.raises(DragInputError, match="not a finite number"):
        load_drag100(tmp_path)
    (tmp_path / "points.json").write_text('{"points": [[1, 1], [2, 2]]}')
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(DragInputError, match="mask.png is 10x10 but the image is 48x32"):
        load_drag100(tmp_path)
    (tmp_path / "original.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DragInputError, match="cannot read the image"):
        load_drag100(tmp_path)


def test_writes_are_atomic(tmp_path, monkeypatch):
    folder = save_drag100(_sample(), tmp_path)
    before = (folder / "points.json").read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(datasets.os, "replace", fail)
    moved = DragSample(_sample().image, DragPoints(((1.0, 1.0),), ((2.0, 2.0),), 48, 32))
    with pytest.raises(OSError, match="disk full"):
        save_drag100(moved, folder)
    assert (folder / "points.json").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["mask.png", "original.jpg", "points.json"]


def test_sample_checks_its_parts():
    with pytest.raises(DragInputError, match="placed on a 48x32 image"):
        DragSample(np.zeros((10, 10, 3), np.uint8), _sample().points)
    with pytest.raises(DragInputError, match="mask must be"):
        DragSample(_sample().image, _sample().points, np.zeros((32, 48), np.uint8))
