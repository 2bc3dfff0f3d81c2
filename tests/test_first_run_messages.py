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

from dragrun import run_workflow
from dragrun.comfy_host import ComfyServerError

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
    assert "  bash scripts/test.sh\n" in result.stderr and "--setup-only" in result.stderr


def test_no_comfyui_path(monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert run_workflow.main(["workflows/fastdrag.json", "--sample", str(ROOT / "samples" / "art_0")]) == 2
    error = capsys.readouterr().err
    assert "COMFYUI_PATH is not set" in error
    assert "bash scripts/test.sh" in error and "bash scripts/run_workflow.sh" in error


def test_not_a_checkout(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    assert run_workflow.main(["workflows/fastdrag.json", "--sample", str(ROOT / "samples" / "art_0")]) == 2
    error = capsys.readouterr().err
    assert "is not a ComfyUI checkout" in error and "Leave COMFYUI_PATH unset" in error


def _fake_shared_host(folder: Path, version: str) -> Path:
    """A tarball shaped like ../shared/hosts' (one top folder ComfyUI-<version>) beside a copy of the scripts."""
    import tarfile

    repo = folder / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("comfyui.sh", "run_workflow.sh"):
        (repo / "scripts" / name).write_text((ROOT / "scripts" / name).read_text())
    tree = folder / f"ComfyUI-{version}"
    tree.mkdir()
    fake_comfyui(tree, "")
    (folder / "shared" / "hosts").mkdir(parents=True)
    with tarfile.open(folder / "shared" / "hosts" / f"ComfyUI-{version}.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname=f"ComfyUI-{version}")
    return repo


def test_without_comfyui_path_the_tested_comfyui_is_got_once_and_reused(tmp_path):
    """scripts/comfyui.sh: unset COMFYUI_PATH gets the newest tested ComfyUI from ../shared/hosts into DRAGKIT_HOME
    (atomically: no partial folder is left), says so, and reuses it on the next call; COMFYUI_PATH=none means none."""
    version = next(line.split('"')[1] for line in (ROOT / "scripts" / "comfyui.sh").read_text().splitlines()
                   if line.startswith("DRAGKIT_TESTED_COMFYUI="))
    repo = _fake_shared_host(tmp_path / "world", version)
    home = tmp_path / "home"
    script = '. scripts/comfyui.sh && use_comfyui "$(pwd)" "$(pwd)" && echo "PATH=$COMFYUI_PATH"'
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env["DRAGKIT_HOME"] = str(home)
    first = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"[comfyui] unpacking ComfyUI {version} from" in first.stdout
    assert first.stdout.splitlines()[-1] == f"PATH={home / f'ComfyUI-{version}'}"
    assert sorted(p.name for p in home.iterdir()) == [f"ComfyUI-{version}"]
    assert (home / f"ComfyUI-{version}" / "main.py").is_file()
    second = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True)
    assert second.returncode == 0 and "unpacking" not in second.stdout
    assert f"[comfyui] ComfyUI {version} at {home / f'ComfyUI-{version}'}" in second.stdout
    none = subprocess.run(["bash", "-c", script], cwd=repo, env={**env, "COMFYUI_PATH": "none"},
                          capture_output=True, text=True)
    assert none.returncode == 0 and none.stdout.splitlines()[-1] == "PATH="
    wrong = subprocess.run(["bash", "-c", script], cwd=repo, env={**env, "COMFYUI_PATH": str(tmp_path)},
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and "is not a ComfyUI checkout" in wrong.stderr


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

    from dragrun import run_progress

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
    """``--setup-only`` installs and runs no test; a second set-up from the same requirements asks pip nothing."""
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTEST_ADDOPTS")}
    env["VENV"] = sys.prefix
    env["COMFYUI_PATH"] = "none"   # this Python may belong to another host: install no ComfyUI requirements into it
    (Path(sys.prefix) / ".dragkit-set-up").unlink(missing_ok=True)
    runs = [subprocess.run(["bash", str(ROOT / "scripts" / "test.sh"), "--setup-only"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600) for _ in range(2)]
    for result in runs:
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"[set-up] ready: {sys.prefix}" in result.stdout
        assert "test session starts" not in result.stdout
        assert "ComfyUI's requirements were not installed" in result.stderr
    assert "[set-up] installing this pack's and the tests' requirements" in runs[0].stdout
    assert "[set-up] requirements unchanged since this environment's last set-up" in runs[1].stdout
    assert "installing" not in runs[1].stdout
    assert "--setup-only" in (ROOT / "README.md").read_text()


def test_workflows_the_runner_cannot_run_are_refused_up_front(monkeypatch, tmp_path, capsys):
    from dragrun.refusals import NOT_FOR_THE_RUNNER

    monkeypatch.setenv("COMFYUI_PATH", str(fake_comfyui(tmp_path, "")))
    assert NOT_FOR_THE_RUNNER
    for name, reason in NOT_FOR_THE_RUNNER.items():
        assert (ROOT / "workflows" / name).is_file(), name
        assert run_workflow.main([str(ROOT / "workflows" / name), "--sample", str(ROOT / "samples" / "art_0")]) == 2
        assert f"{name} does not run headless yet: {reason}" in capsys.readouterr().err
