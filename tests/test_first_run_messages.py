"""The main job says exactly what to run when something is missing, instead of a bare exit code.

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
