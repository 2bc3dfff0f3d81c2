"""The evaluator (dragrun/evaluate.py) on constructed Drag100 / DragBench folders and runner-layout results.

Also the parts of the runner's batch mode that need no ComfyUI: the shared
layout (dragrun/batch_layout.py), the side-by-side image and the resume record.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dragkit.datasets import DragSample, save_drag100, save_dragbench
from dragkit.metrics import DAI_PAPER, DAI_RELEASED, dai
from dragkit.points import parse_drag_points
from dragrun import evaluate, run_workflow
from dragrun.batch_layout import HANDLE_COLOUR, batch_sample_folders
from dragrun.eval_report import HEADER_HEIGHT, TINY_MARK


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


def runner_output(folder, results: dict, timings: dict, **run) -> None:
    """Write results in the headless runner's batch layout; ``run``: timings.json's top-level fields."""
    for name, image in results.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name / "edited.png")
    (folder / "timings.json").write_text(json.dumps({**run, "samples": timings}))


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
                   "JH_2023": {"status": "ok", "seconds": 3.0}},
                  workflow="workflows/fastdrag.json", checkpoint="/models/sd15.safetensors", tiny_checkpoint=False)
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

    assert (first["workflow"], first["checkpoint"], first["tiny_checkpoint"]) == (
        "workflows/fastdrag.json", "/models/sd15.safetensors", False)
    second = report["methods"]["other"]
    assert (second["workflow"], second["checkpoint"], second["tiny_checkpoint"]) == (None, None, None)
    assert second["summary"]["evaluated"] == 1
    assert second["summary"]["failed"] == ["dog_1"] and second["summary"]["missing"] == ["JH_2023"]
    assert second["samples"]["dog_1"] == {"seconds": 1.0, "status": "error", "error": "out of memory"}
    assert "resized to the source's 64x48" in second["samples"]["cat_0"]["note"]

    captured = capsys.readouterr()
    out = captured.out
    assert "### copy" in out and "### other" in out and "DAI (as released), γ=20" in out
    assert "| workflow | workflows/fastdrag.json |" in out and "| checkpoint | /models/sd15.safetensors |" in out
    assert "1 of 3 samples evaluated; missing: JH_2023; failed: dog_1" in out
    assert "skipped: no DIFT model given" in out
    assert TINY_MARK not in out + captured.err

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
    methods = [evaluate.Method("same", edited)]
    runs = {"same": evaluate.read_run(methods[0])}
    samples, per_method, results = evaluate.evaluate(batch_sample_folders(data), methods, runs, models,
                                                     keep_images=True, log=lambda _: None)
    report = evaluate.build_report(data, methods, runs, models, per_method)
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


def test_corrupt_weights_are_skipped_with_the_file_named(dataset, tmp_path, capsys):
    from tools.tiny_models import micro_unet, micro_vae

    data, _ = dataset
    dift = tmp_path / "dift"
    micro_unet(3).save_pretrained(dift / "unet")
    micro_vae(4).save_pretrained(dift / "vae")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"garbage garbage")
    edited = tmp_path / "edited"
    runner_output(edited, {"cat_0": loaded(data, "cat_0").image}, {})
    code = evaluate.main(["--data", str(data), "--edited", str(edited), "--dift", str(dift),
                          "--dift-prompt-embeds", str(junk), "--lpips", str(junk)])
    assert code == 0
    captured = capsys.readouterr()
    assert f"MD skipped: MD: cannot load the prompt embedding file {junk}" in captured.err
    assert f"IF skipped: IF: cannot read LPIPS weights from {junk}" in captured.err
    assert "| MD (px, lower is better) | skipped: MD: cannot load" in captured.out


def test_method_arguments():
    assert evaluate.parse_methods(["runs/fd"], None) == [evaluate.Method("fd", evaluate.Path("runs/fd"))]
    assert evaluate.parse_methods(["runs/fd"], "fastdrag")[0].name == "fastdrag"
    assert [m.name for m in evaluate.parse_methods(["a=x", "b=y"], None)] == ["a", "b"]
    with pytest.raises(evaluate.DragInputError, match="unique"):
        evaluate.parse_methods(["a=x", "a=y"], None)
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--data", "d", "--edited", "a=x", "--edited", "b=y", "--run", "w.json"])


class FakeRunner:
    """Stands in for ``dragrun.run_workflow.main``: records its argv, writes cat_0's result, returns ``code``."""

    def __init__(self, data, code: int = 0) -> None:
        self.data, self.code, self.calls = data, code, []

    def __call__(self, argv):
        self.calls.append(argv)
        out = evaluate.Path(argv[argv.index("--out") + 1])
        runner_output(out, {"cat_0": loaded(self.data, "cat_0").image}, {"cat_0": {"status": "ok", "seconds": 1.5}},
                      workflow=argv[0], checkpoint="/models/sd15.safetensors", tiny_checkpoint=False)
        return self.code


def test_run_calls_the_runner_batch_mode_then_evaluates(dataset, tmp_path, monkeypatch, capsys):
    data, _ = dataset
    runner = FakeRunner(data, code=run_workflow.EXIT_SAMPLES_FAILED)  # some samples failed: still evaluated
    monkeypatch.setattr(run_workflow, "main", runner)
    report_path = tmp_path / "r.json"
    code = evaluate.main(["--data", str(data), "--run", "workflows/fastdrag.json", "--checkpoint", "sd15.safetensors",
                          "--controlnet", "cn.safetensors", "--upscale-model", "up.pth", "--prompt", "a cat",
                          "--timeout", "60", "--edited", str(tmp_path / "fd"), "--limit", "2", "--report", str(report_path)])
    assert code == 0
    assert runner.calls == [["workflows/fastdrag.json", "--batch", str(data), "--out", str(tmp_path / "fd"),
                             "--checkpoint", "sd15.safetensors", "--controlnet", "cn.safetensors",
                             "--upscale-model", "up.pth", "--prompt", "a cat", "--timeout", "60.0", "--limit", "2"]]
    method = json.loads(report_path.read_text())["methods"]["fastdrag"]
    assert method["summary"]["evaluated"] == 1 and method["summary"]["missing"] == ["JH_2023"]  # --limit 2: JH_2023, cat_0
    assert method["workflow"] == "workflows/fastdrag.json" and method["tiny_checkpoint"] is False
    assert "some samples failed" in capsys.readouterr().err


@pytest.mark.parametrize("runner_code", [run_workflow.EXIT_BAD_INPUT, run_workflow.EXIT_COMFYUI])
def test_run_stops_when_the_runner_fails_outright(dataset, tmp_path, monkeypatch, capsys, runner_code):
    data, _ = dataset
    monkeypatch.setattr(run_workflow, "main", FakeRunner(data, code=runner_code))
    monkeypatch.setattr(evaluate, "load_metric_models", _must_not_load)
    report_path = tmp_path / "r.json"
    code = evaluate.main(["--data", str(data), "--run", "w.json", "--edited", str(tmp_path / "fd"),
                          "--report", str(report_path)])
    assert code == runner_code and not report_path.exists()
    captured = capsys.readouterr()
    assert f"the runner exited with code {runner_code}" in captured.err and "nothing was evaluated" in captured.err
    assert "###" not in captured.out


def test_run_turns_a_runner_usage_error_into_its_exit_code(dataset, tmp_path, monkeypatch):
    def usage_error(argv):
        raise SystemExit(2)

    data, _ = dataset
    monkeypatch.setattr(run_workflow, "main", usage_error)
    assert evaluate.main(["--data", str(data), "--run", "w.json", "--edited", str(tmp_path / "fd")]) == 2


def _must_not_load(*args):
    raise AssertionError("the metric models were loaded although the inputs are bad")


def test_bad_inputs_exit_with_a_message_before_loading_the_models(dataset, tmp_path, monkeypatch, capsys):
    data, _ = dataset
    monkeypatch.setattr(evaluate, "load_metric_models", _must_not_load)
    edited = tmp_path / "edited"
    edited.mkdir()
    monkeypatch.setattr(run_workflow, "main", _must_not_load)
    for argv, message in (
        (["--data", str(tmp_path / "nowhere"), "--edited", str(edited)], "does not exist"),
        (["--data", str(edited), "--edited", str(edited)], "no Drag100 or DragBench sample folders"),
        (["--data", str(data), "--edited", str(tmp_path / "absent")], "does not exist"),
        (["--data", str(tmp_path / "nowhere"), "--edited", str(edited), "--run", "w.json"], "does not exist"),
    ):
        assert evaluate.main(argv + ["--dift", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err
    (edited / "timings.json").write_text("[1, 2]")
    assert evaluate.main(["--data", str(data), "--edited", str(edited)]) == 2
    assert "not the runner's timings JSON" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--cell-width", "0"], ["--cell-width", "-5"], ["--limit", "0"],
                                   ["--prompt", "x"], ["--timeout", "5"], ["--run", "w.json", "--timeout", "0"]])
def test_bad_arguments_are_usage_errors(extra, capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.parse_args(["--data", "d", "--edited", "e"] + extra)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


def test_one_bad_sample_does_not_stop_the_evaluation(dataset, tmp_path, capsys):
    """An unloadable sample, an unreadable result and a malformed timings entry: the rest is evaluated."""
    data, _ = dataset
    (data / "dog_1" / "points.json").write_text("{not json")
    edited = tmp_path / "edited"
    images = {name: loaded(data, name).image for name in ("cat_0", "JH_2023")}
    runner_output(edited, {**images, "dog_1": images["cat_0"]}, {"cat_0": "ok", "JH_2023": {"status": "ok", "seconds": 2}})
    good = (edited / "JH_2023" / "edited.png").read_bytes()
    (edited / "JH_2023" / "edited.png").write_bytes(good[:100])  # truncated
    report_path = tmp_path / "report.json"
    code = evaluate.main(["--data", str(data), "--edited", f"m={edited}", "--report", str(report_path),
                          "--grid", str(tmp_path / "grid.png"), "--cell-width", "50"])
    assert code == 0
    method = json.loads(report_path.read_text())["methods"]["m"]
    samples, summary = method["samples"], method["summary"]
    assert samples["cat_0"]["status"] == "ok" and samples["cat_0"]["seconds"] is None
    assert samples["dog_1"]["status"] == "error" and "cannot load the sample" in samples["dog_1"]["error"]
    assert "points.json" in samples["dog_1"]["error"]
    assert samples["JH_2023"]["status"] == "error" and "cannot read" in samples["JH_2023"]["error"]
    assert samples["JH_2023"]["seconds"] == 2
    assert summary["evaluated"] == 1 and summary["failed"] == ["JH_2023", "dog_1"]
    assert summary[DAI_PAPER]["1"] == samples["cat_0"][DAI_PAPER]["1"]  # the errors are not averaged
    captured = capsys.readouterr()
    assert "1 of 3 samples evaluated; failed: JH_2023, dog_1" in captured.out
    assert "m / dog_1: error: cannot load the sample" in captured.err
    # The grid has the two loadable samples; JH_2023's unreadable result is a grey cell.
    assert Image.open(tmp_path / "grid.png").size == (100, HEADER_HEIGHT + round(40 * 50 / 56) + round(48 * 50 / 64))


class CountingDIFT:
    """A stand-in DIFT featurizer: the image's own pixels as features, calls counted."""

    prompt_note = None

    def __init__(self) -> None:
        self.calls = 0

    def features(self, image, prompt=""):
        self.calls += 1
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def test_source_features_only_for_samples_with_a_result_and_images_only_for_the_grid(dataset, tmp_path):
    data, _ = dataset
    edited = tmp_path / "edited"
    runner_output(edited, {"cat_0": loaded(data, "cat_0").image}, {"dog_1": {"status": "error", "error": "oom"}})
    dift = CountingDIFT()
    models = evaluate.MetricModels(dift=dift)
    methods = [evaluate.Method("m", edited)]
    runs = {"m": evaluate.read_run(methods[0])}
    folders = batch_sample_folders(data)
    _, per_method, results = evaluate.evaluate(folders, methods, runs, models, log=lambda _: None)
    assert dift.calls == 2  # cat_0's source and result; nothing for dog_1 (failed) and JH_2023 (missing)
    assert per_method["m"]["cat_0"]["MD distances"] == [pytest.approx(np.hypot(10, 2))]
    assert results == {"m": {}}
    _, _, results = evaluate.evaluate(folders, methods, runs, models, keep_images=True, log=lambda _: None)
    assert list(results["m"]) == ["cat_0"]


def test_a_tiny_checkpoint_run_is_flagged_loudly(dataset, tmp_path, capsys):
    data, _ = dataset
    edited = tmp_path / "edited"
    runner_output(edited, {"cat_0": loaded(data, "cat_0").image}, {"cat_0": {"status": "ok", "seconds": 1.0}},
                  workflow="workflows/fastdrag.json", checkpoint="/cache/tiny_sd15.safetensors", tiny_checkpoint=True)
    report_path = tmp_path / "r.json"
    assert evaluate.main(["--data", str(data), "--edited", f"fd={edited}", "--report", str(report_path)]) == 0
    method = json.loads(report_path.read_text())["methods"]["fd"]
    assert method["tiny_checkpoint"] is True and method["checkpoint"] == "/cache/tiny_sd15.safetensors"
    captured = capsys.readouterr()
    assert f"| **warning** | **{TINY_MARK}** |" in captured.out
    assert f"!! fd: {TINY_MARK}" in captured.err


# ----------------------------------------------------------------------------------------------
# The runner's batch layout and resume record (no ComfyUI needed)


def test_batch_sample_folders_limit_unique_names_and_a_missing_root(dataset, tmp_path):
    data, _ = dataset
    assert [f.name for f in batch_sample_folders(data)] == ["JH_2023", "cat_0", "dog_1"]
    assert [f.name for f in batch_sample_folders(data, 2)] == ["JH_2023", "cat_0"]
    with pytest.raises(evaluate.DragInputError, match="does not exist"):
        batch_sample_folders(tmp_path / "nowhere")
    save_drag100(loaded(data, "cat_0"), data / "more" / "cat_0")
    with pytest.raises(evaluate.DragInputError, match=r"must be unique.*cat_0"):
        batch_sample_folders(data)


def test_side_by_side_draws_the_points_on_both_halves_and_writes_atomically(dataset, tmp_path):
    data, _ = dataset
    cat = loaded(data, "cat_0")
    Image.fromarray(cat.image).save(tmp_path / "source.png")
    Image.fromarray(cat.image[::2, ::2]).save(tmp_path / "result.png")  # resized to the source's size
    target = tmp_path / "out" / "side_by_side.png"
    run_workflow.side_by_side(tmp_path / "source.png", tmp_path / "result.png", cat.points, target)
    combined = np.asarray(Image.open(target))
    assert combined.shape == (48, 128, 3)
    hx, hy = (int(c) for c in cat.points.handles[0])
    assert tuple(combined[hy, hx]) == HANDLE_COLOUR and tuple(combined[hy, hx + 64]) == HANDLE_COLOUR
    assert sorted(p.name for p in target.parent.iterdir()) == ["side_by_side.png"]  # no temporary file left


def resume_args(tmp_path, **overrides):
    """The runner's batch-mode arguments (parsed) for a workflow file written under ``tmp_path``."""
    workflow = tmp_path / "fastdrag.json"
    if not workflow.exists():
        workflow.write_text(json.dumps({"nodes": [], "links": []}))
    argv = [str(workflow), "--batch", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    for option, value in overrides.items():
        argv += [f"--{option}", value]
    return run_workflow.parse_args(argv)


def fresh_record(args, checkpoint="sd15.safetensors") -> dict:
    models = run_workflow.Models(checkpoint=evaluate.Path("/models") / checkpoint, tiny=False)
    _, digest = run_workflow.read_workflow(args.workflow)
    return {"workflow": str(args.workflow), "checkpoint": str(models.checkpoint), "tiny_checkpoint": False,
            "run": run_workflow.run_identity(args, digest, models), "samples": {}, "summary": {}}


def test_resume_needs_the_same_workflow_content_prompt_models_and_batch_folder(tmp_path):
    args = resume_args(tmp_path)
    path = tmp_path / "timings.json"
    record = fresh_record(args)
    assert run_workflow.load_timings(path, record) is record  # no file yet
    assert set(record["run"]) == {"workflow_sha256", "prompt", "checkpoint", "controlnet", "upscale_model", "batch",
                                  "overrides"}
    run_workflow.write_timings(path, {**record, "samples": {"a": {"status": "ok", "seconds": 1.0}}}, 0)
    written = json.loads(path.read_text())
    path.write_text(json.dumps({**written, "samples": {**written["samples"], "b": "junk"}}))
    again = run_workflow.load_timings(path, fresh_record(resume_args(tmp_path)))
    assert again["samples"] == {"a": {"status": "ok", "seconds": 1.0}}  # same run: resumed (a malformed entry dropped)

    for args, checkpoint, expected in (
        (resume_args(tmp_path, prompt="a cat"), "sd15.safetensors", ["--prompt: None before, 'a cat' now"]),
        (resume_args(tmp_path), "other.safetensors", ["checkpoint file: 'sd15.safetensors' before, 'other.safetensors' now"]),
        (resume_args(tmp_path, batch=str(tmp_path / "other")), "sd15.safetensors", ["--batch folder"]),
        (resume_args(tmp_path, set="DragKitLoRAFineTune.steps=10"), "sd15.safetensors",
         ["--set values: [] before, [['DragKitLoRAFineTune', 'steps', 10]] now"]),
    ):
        with pytest.raises(evaluate.DragInputError, match="another run") as error:
            run_workflow.load_timings(path, fresh_record(args, checkpoint))
        assert all(text in str(error.value) for text in expected) and "use another --out" in str(error.value)
    args.workflow.write_text(json.dumps({"nodes": [], "links": [], "extra": 1}))  # same file name, other content
    with pytest.raises(evaluate.DragInputError, match=r"workflow content \(sha256\)"):
        run_workflow.load_timings(path, fresh_record(resume_args(tmp_path)))
    path.write_text(json.dumps({"workflow": "fastdrag.json", "checkpoint": "sd15.safetensors", "samples": {}}))
    with pytest.raises(evaluate.DragInputError, match="not recorded before"):  # written before the run record existed
        run_workflow.load_timings(path, fresh_record(resume_args(tmp_path)))
