"""The evaluator (tools/evaluate.py) on constructed Drag100 / DragBench folders and runner-layout results."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dragkit.datasets import DragSample, save_drag100, save_dragbench
from dragkit.metrics import DAI_PAPER, DAI_RELEASED, dai
from dragkit.points import parse_drag_points
from tools import evaluate
from tools.eval_report import HEADER_HEIGHT


def sample(seed: int, width: int, height: int, pairs, prompt: str = "") -> DragSample:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    points = parse_drag_points({"points": [p for pair in pairs for p in pair]}, width, height)
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = True
    return DragSample(image, points, mask, prompt)


@pytest.fixture
def dataset(tmp_path):
    """Two Drag100 samples and one DragBench sample (nested in a category folder, as DragBench is)."""
    data = tmp_path / "data"
    samples = {
        "cat_0": sample(0, 64, 48, [[(10, 10), (20, 12)]]),
        "dog_1": sample(1, 48, 64, [[(5, 6), (30, 40)], [(40, 50), (40, 50)]]),
        "JH_2023": sample(2, 56, 40, [[(8, 30), (16, 30)]], prompt="a photo of a cat"),
    }
    save_drag100(samples["cat_0"], data / "cat_0")
    save_drag100(samples["dog_1"], data / "dog_1")
    save_dragbench(samples["JH_2023"], data / "animals" / "JH_2023", sidecar=False)
    return data, samples


def runner_output(folder, results: dict, timings: dict) -> None:
    """Write results in the headless runner's batch layout."""
    for name, image in results.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name / "edited.png")
    (folder / "timings.json").write_text(json.dumps({"samples": timings}))


def loaded(data, name):
    from dragkit.datasets import load_sample

    matches = [p for p in data.rglob(name) if p.is_dir()]
    return load_sample(matches[0])


def test_report_table_and_grid(dataset, tmp_path, capsys):
    data, samples = dataset
    cat, dog = loaded(data, "cat_0"), loaded(data, "dog_1")
    bench = loaded(data, "JH_2023")
    assert bench.prompt == "a photo of a cat"
    shifted = np.roll(cat.image, 3, axis=1)
    copy = tmp_path / "copy"
    runner_output(copy, {"cat_0": shifted, "dog_1": dog.image, "JH_2023": bench.image},
                  {"cat_0": {"status": "ok", "seconds": 2.0}, "dog_1": {"status": "ok", "seconds": 4.0},
                   "JH_2023": {"status": "ok", "seconds": 3.0}})
    other = tmp_path / "other"
    small = np.asarray(Image.fromarray(cat.image).resize((32, 24), Image.BILINEAR))
    runner_output(other, {"cat_0": small}, {"dog_1": {"status": "error", "seconds": 1.0, "error": "out of memory"}})
    report_path, grid_path = tmp_path / "out" / "report.json", tmp_path / "out" / "grid.png"

    code = evaluate.main(["--data", str(data), "--edited", f"copy={copy}", "--edited", f"other={other}",
                          "--report", str(report_path), "--grid", str(grid_path), "--cell-width", "100"])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert set(report) == {"data", "protocol", "skipped", "notes", "methods"}
    assert set(report["skipped"]) == {"MD", "IF"} and "--dift" in report["skipped"]["MD"] and "--lpips" in report["skipped"]["IF"]

    first = report["methods"]["copy"]
    summary = first["summary"]
    assert summary["evaluated"] == 3 and summary["missing"] == [] and summary["failed"] == []
    assert summary["MD"] is None and summary["IF"] is None and summary["median seconds"] == 3.0
    expected = dai(cat.image, shifted, cat.points.handles, cat.points.targets)
    entry = first["samples"]["cat_0"]
    assert entry["status"] == "ok" and entry["pairs"] == 1 and entry["seconds"] == 2.0
    for label in (DAI_PAPER, DAI_RELEASED):
        assert entry[label] == {str(g): pytest.approx(v) for g, v in expected[label].items()}
    dog_entry = first["samples"]["dog_1"]
    dog_expected = dai(dog.image, dog.image, dog.points.handles, dog.points.targets)
    assert dog_entry[DAI_PAPER]["1"] == pytest.approx(dog_expected[DAI_PAPER][1])
    assert dog_entry[DAI_RELEASED]["1"] == pytest.approx(dog_expected[DAI_PAPER][1] / 2)
    assert summary[DAI_PAPER]["5"] == pytest.approx(
        np.mean([first["samples"][n][DAI_PAPER]["5"] for n in ("cat_0", "dog_1", "JH_2023")]))

    second = report["methods"]["other"]
    assert second["summary"]["evaluated"] == 1
    assert second["summary"]["failed"] == ["dog_1"] and second["summary"]["missing"] == ["JH_2023"]
    assert second["samples"]["dog_1"] == {"seconds": 1.0, "status": "error", "error": "out of memory"}
    assert "resized to the source's 64x48" in second["samples"]["cat_0"]["note"]

    out = capsys.readouterr().out
    assert "### copy" in out and "### other" in out and "DAI (as released), γ=20" in out
    assert "1 of 3 samples evaluated; missing: JH_2023; failed: dog_1" in out
    assert "skipped: no DIFT model given" in out

    grid = Image.open(grid_path)
    heights = [round(h * 100 / w) for w, h in ((56, 40), (64, 48), (48, 64))]  # rows sorted by path: animals/, cat_0, dog_1
    assert grid.size == (300, HEADER_HEIGHT + sum(heights))
    missing_cell = np.asarray(grid)[HEADER_HEIGHT + 30, 250]
    assert tuple(missing_cell) == (90, 90, 90)  # "other" has no JH_2023 result


def test_weighted_metrics_with_user_supplied_weights(dataset, tmp_path):
    from test_metrics import random_lpips_state
    from tools.tiny_models import micro_unet, micro_vae

    data, _ = dataset
    dift = tmp_path / "dift"
    micro_unet(3).save_pretrained(dift / "unet")
    micro_vae(4).save_pretrained(dift / "vae")
    import safetensors.torch

    safetensors.torch.save_file({"prompt_embeds": torch.randn(1, 5, 32)}, tmp_path / "embeds.safetensors")
    torch.save(random_lpips_state(), tmp_path / "lpips.pth")
    edited = tmp_path / "same"
    runner_output(edited, {name: loaded(data, name).image for name in ("cat_0", "dog_1", "JH_2023")}, {})
    models = evaluate.load_metric_models(dift, tmp_path / "embeds.safetensors", tmp_path / "lpips.pth", "cpu")
    assert models.skipped == {} and "fixed prompt embedding" in models.notes["MD"]
    samples, per_method, results = evaluate.evaluate(data, [evaluate.Method("same", edited)], models, log=lambda _: None)
    report = evaluate.build_report(data, [evaluate.Method("same", edited)], models, per_method)
    summary = report["methods"]["same"]["summary"]
    assert summary["IF"] == 1.0  # unchanged images
    # Unchanged images: each handle matches itself, so MD is the mean handle-target distance (4 pairs in all).
    distances = [np.hypot(20 - 10, 12 - 10), np.hypot(25, 34), 0.0, 8.0]
    assert summary["MD pairs"] == 4 and summary["MD"] == pytest.approx(np.mean(distances), abs=1e-6)
    assert [name for name, _ in samples] == ["JH_2023", "cat_0", "dog_1"] and set(results["same"]) == {"JH_2023", "cat_0", "dog_1"}


def test_missing_weights_are_skipped_with_their_reason(tmp_path):
    models = evaluate.load_metric_models(tmp_path / "no_sd21", None, tmp_path / "no_lpips", "cpu")
    assert models.dift is None and models.lpips is None
    assert "does not exist" in models.skipped["MD"] and "does not exist" in models.skipped["IF"]


def test_method_arguments():
    assert evaluate.parse_methods(["runs/fd"], None) == [evaluate.Method("fd", evaluate.Path("runs/fd"))]
    assert evaluate.parse_methods(["runs/fd"], "fastdrag")[0].name == "fastdrag"
    assert [m.name for m in evaluate.parse_methods(["a=x", "b=y"], None)] == ["a", "b"]
    with pytest.raises(evaluate.DragInputError, match="unique"):
        evaluate.parse_methods(["a=x", "a=y"], None)
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--data", "d", "--edited", "a=x", "--edited", "b=y", "--run", "w.json"])


def test_run_calls_the_runner_batch_mode_then_evaluates(dataset, tmp_path, monkeypatch):
    data, _ = dataset
    calls = []

    def fake_runner(argv):
        calls.append(argv)
        out = evaluate.Path(argv[argv.index("--out") + 1])
        runner_output(out, {"cat_0": loaded(data, "cat_0").image}, {"cat_0": {"status": "ok", "seconds": 1.5}})
        return 1  # some samples failed

    import tools.run_workflow

    monkeypatch.setattr(tools.run_workflow, "main", fake_runner)
    report_path = tmp_path / "r.json"
    code = evaluate.main(["--data", str(data), "--run", "workflows/fastdrag.json", "--checkpoint", "sd15.safetensors",
                          "--edited", str(tmp_path / "fd"), "--limit", "2", "--report", str(report_path)])
    assert code == 0
    assert calls == [["workflows/fastdrag.json", "--batch", str(data), "--out", str(tmp_path / "fd"),
                      "--checkpoint", "sd15.safetensors", "--limit", "2"]]
    summary = json.loads(report_path.read_text())["methods"]["fastdrag"]["summary"]
    assert summary["evaluated"] == 1 and summary["missing"] == ["JH_2023"]  # --limit 2: JH_2023 and cat_0


def test_bad_inputs_exit_with_a_message(tmp_path, capsys):
    assert evaluate.main(["--data", str(tmp_path), "--edited", str(tmp_path)]) == 2
    assert "no Drag100 or DragBench sample folders" in capsys.readouterr().err
