"""The first run: the main job says exactly what to run when something is missing, prints its progress, and the
set-up has a route that installs without testing.

No venv (``scripts/run_workflow.sh``), no ``COMFYUI_PATH``, a path that is
not a ComfyUI checkout, ComfyUI's requirements missing from the Python
(checked before starting, and recognised in a start-up failure).
"""

import os
import subprocess
import sys
from pathlib import Path

from tools import run_workflow
from tools.comfy_host import ComfyServerError

ROOT = Path(__file__).resolve().parents[1]


def fake_comfyui(folder: Path, requirements: str) -> Path:
    for name in ("main.py", "nodes.py", "folder_paths.py"):
        (folder / name).write_text("")
    (folder / "comfy").mkdir()
    (folder / "requirements.txt").write_text(requirements)
    return folder


def test_no_venv_names_the_set_up_command(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "scripts" / "run_workflow.sh"), "workflows/fastdrag.json"],
                            env={**os.environ, "VENV": str(tmp_path / "none"), "COMFYUI_PATH": ""},
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "no virtual environment" in result.stderr
    assert "COMFYUI_PATH=../ComfyUI bash scripts/test.sh" in result.stderr
    assert "git clone https://github.com/Comfy-Org/ComfyUI ../ComfyUI" in result.stderr


def test_no_comfyui_path(monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert run_workflow.main(["workflows/fastdrag.json", "--sample", str(ROOT / "samples" / "art_0")]) == 2
    error = capsys.readouterr().err
    assert "COMFYUI_PATH is not set" in error
    assert "git clone https://github.com/Comfy-Org/ComfyUI ../ComfyUI" in error
    assert "COMFYUI_PATH=../ComfyUI bash scripts/test.sh" in error


def test_not_a_checkout(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    assert run_workflow.main(["workflows/fastdrag.json", "--sample", str(ROOT / "samples" / "art_0")]) == 2
    error = capsys.readouterr().err
    assert "is not a ComfyUI checkout" in error and "git clone https://github.com/Comfy-Org/ComfyUI" in error


def test_missing_comfyui_requirements_are_named_with_the_command(monkeypatch, tmp_path, capsys):
    comfyui = fake_comfyui(tmp_path, "numpy>=1.25.0\nno-such-module-xyz\npyyaml\n\n#non essential dependencies:\nkornia-zzz\n")
    monkeypatch.setenv("COMFYUI_PATH", str(comfyui))
    assert run_workflow.comfyui_requirements_missing(comfyui) == ["no-such-module-xyz"]
    assert run_workflow.main(["workflows/fastdrag.json", "--sample", str(ROOT / "samples" / "art_0")]) == 2
    error = capsys.readouterr().err
    assert "ComfyUI's requirements are not installed in this Python" in error and "no-such-module-xyz" in error
    assert f"COMFYUI_PATH={comfyui} bash scripts/test.sh" in error
    assert f"{sys.executable} -m pip install -r {comfyui / 'requirements.txt'}" in error


def test_a_start_up_failure_for_a_missing_module_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    error = ComfyServerError("ComfyUI exited with code 1 during start-up\n--- server log (tail) ---\n"
                             "ModuleNotFoundError: No module named 'einops'")
    hint = run_workflow.startup_hint(error)
    assert "could not import 'einops'" in hint and f"COMFYUI_PATH={tmp_path} bash scripts/test.sh" in hint
    assert run_workflow.startup_hint(ComfyServerError("port in use")) == ""


def test_the_first_run_sample_is_in_the_repository():
    from dragkit.datasets import load_drag100

    sample = load_drag100(ROOT / "samples" / "art_0")
    assert sample.points.num_pairs == 3 and sample.mask is not None
    assert sum(p.stat().st_size for p in (ROOT / "samples" / "art_0").iterdir()) < 100_000


def test_the_runner_prints_each_node_and_its_progress(monkeypatch):
    import io

    from tools import run_progress

    clock = iter([0.0, 0.1, 0.2, 1.0, 2.0, 7.5, 8.0, 9.0, 9.5, 9.6])
    monkeypatch.setattr(run_progress.time, "monotonic", lambda: next(clock))
    prompt = {"1": {"class_type": "CheckpointLoaderSimple"}, "6": {"class_type": "DragKitDDIMInvert"},
              "9": {"class_type": "SaveImage"}}
    info = {"DragKitDDIMInvert": {"display_name": "DDIM Invert (DragKit)"}, "SaveImage": {"display_name": "Save Image"}}
    out = io.StringIO()
    progress = run_progress.NodeProgress(server=None, names=run_progress.node_names(prompt, info), stream=out)
    for kind, data in [("execution_start", {}), ("execution_cached", {"nodes": ["1"]}),
                       ("executing", {"node": "6"}), ("progress", {"value": 1, "max": 7}),
                       ("progress", {"value": 1, "max": 7}), ("progress", {"value": 4, "max": 7}),
                       ("progress", {"value": 5, "max": 7}), ("progress", {"value": 7, "max": 7}),
                       ("executing", {"node": "9"}), ("executing", {"node": None})]:
        progress.handle(kind, data)
    assert out.getvalue().splitlines() == [
        "[run] executing the workflow (3 nodes)",
        "[run]   from ComfyUI's cache: CheckpointLoaderSimple (#1)",
        "[run]   [1/3] DDIM Invert (DragKit) (#6) ...",
        "[run]       step 1/7 (1 s)",
        "[run]       step 4/7 (7 s)",
        "[run]       step 7/7 (9 s)",
        "[run]       done in 9.3 s",
        "[run]   [2/3] Save Image (#9) ...",
        "[run]       done in 0.1 s",
    ]


def test_set_up_only_installs_and_runs_no_test():
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTEST_ADDOPTS")}
    env["VENV"] = sys.prefix
    result = subprocess.run(["bash", str(ROOT / "scripts" / "test.sh"), "--setup-only"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[set-up] installing this pack's and the tests' requirements" in result.stdout
    assert f"[set-up] ready: {sys.prefix}" in result.stdout
    assert "test session starts" not in result.stdout
    assert "ComfyUI's requirements were not installed" in result.stderr
    assert "--setup-only" in (ROOT / "README.md").read_text()
