"""The README's first run in a fresh clone: the set-up command, then the main job, exactly as the README gives them.

The commands are parsed from the README's "First run" section (its two
``bash`` blocks, in order), so this test fails when the README drifts. The
repository (its committed ``HEAD``) is cloned with ``git clone`` into a
temporary folder, and both commands run with ``bash -c`` in the clone,
unchanged, without ``COMFYUI_PATH`` in the environment: the scripts then use
the newest tested ComfyUI in ``$DRAGKIT_HOME`` (``scripts/comfyui.sh``),
which the test points at a folder holding this run's host under that name
(so it runs on that host only; on another host it skips, saying why). How
the scripts get that ComfyUI the first time is tested in
``tests/test_first_run_messages.py``.

- ``VENV``: the set-up and the runner scripts honour it; the test points it
  at this interpreter's virtual environment (unless ``DRAGKIT_FRESH_VENV=1``,
  which lets the set-up make ``.venv`` in the clone and download torch), so
  the same scripts run without downloading torch again.
- The set-up command runs the whole suite (see the README for how long, and
  it contains this test): ``PYTEST_ADDOPTS`` narrows it to one quick test
  of the first-run sample, on one pytest worker (``DRAGKIT_TEST_WORKERS=1``),
  unless ``DRAGKIT_FRESH_CLONE_FULL=1``; inside the clone this test skips
  itself (``DRAGKIT_IN_FRESH_CLONE``).
- Both commands must print their progress: the set-up names each install
  step (``[set-up]``), the main job ComfyUI's start and every node it runs
  (``[run]``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from PIL import Image

from dragrun.comfy_host import comfyui_path, comfyui_version, repo_root

pytestmark = pytest.mark.slow


def newest_tested_comfyui() -> str:
    """The ComfyUI version the scripts get when ``COMFYUI_PATH`` is unset (``scripts/comfyui.sh``)."""
    text = (repo_root() / "scripts" / "comfyui.sh").read_text()
    return re.search(r'^DRAGKIT_TESTED_COMFYUI="([^"]+)"', text, flags=re.M).group(1)


def first_run_commands(readme: str) -> list[str]:
    """The ``bash`` blocks of the README's "## First run" section, in order (leading indentation removed)."""
    match = re.search(r"^## First run\n(.*?)^## ", readme, flags=re.S | re.M)
    assert match, "the README has no '## First run' section"
    blocks = re.findall(r"^( *)```bash\n(.*?)^\1```", match.group(1), flags=re.S | re.M)
    return ["\n".join(line[len(indent):] for line in body.strip("\n").splitlines()) for indent, body in blocks]


def test_readme_first_run_commands_in_a_fresh_clone(tmp_path, comfyui):
    if os.environ.get("DRAGKIT_IN_FRESH_CLONE"):
        pytest.skip("already inside the fresh-clone test")
    version = newest_tested_comfyui()
    if comfyui_version(comfyui) != version:
        pytest.skip(f"the README's commands use ComfyUI {version} (the newest tested), not this run's "
                    f"{comfyui_version(comfyui)}")
    readme = (repo_root() / "README.md").read_text()
    set_up, main_job = first_run_commands(readme)
    assert set_up == "bash scripts/test.sh"
    assert main_job.startswith("bash scripts/run_workflow.sh ") and "--out out/" in main_job

    work = tmp_path / "work"
    work.mkdir()
    subprocess.run(["git", "clone", "--quiet", str(repo_root()), str(work / "dragkit")], check=True)
    home = tmp_path / "dragkit-home"   # where the scripts look for (or get) the tested ComfyUI
    home.mkdir()
    (home / f"ComfyUI-{version}").symlink_to(comfyui_path(), target_is_directory=True)
    clone = work / "dragkit"
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTEST_ADDOPTS", "VIRTUAL_ENV")}
    env["DRAGKIT_HOME"] = str(home)
    env["DRAGKIT_IN_FRESH_CLONE"] = "1"
    if not os.environ.get("DRAGKIT_FRESH_VENV"):
        env["VENV"] = sys.prefix
    if not os.environ.get("DRAGKIT_FRESH_CLONE_FULL"):
        env["PYTEST_ADDOPTS"] = "-k test_the_first_run_sample_is_in_the_repository"
        env["DRAGKIT_TEST_WORKERS"] = "1"

    timings, outputs = {}, {}
    for label, command in (("set-up", set_up), ("main job", main_job)):
        start = time.monotonic()
        result = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                                timeout=3600)
        timings[label] = time.monotonic() - start
        assert result.returncode == 0, f"{label}: {command}\nexit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        outputs[label] = result.stdout + result.stderr
    assert f"[comfyui] ComfyUI {version} at {home / f'ComfyUI-{version}'}" in outputs["set-up"]
    assert ("[set-up] installing this pack's and the tests' requirements" in outputs["set-up"]
            or "[set-up] requirements unchanged since this environment's last set-up" in outputs["set-up"])
    assert "1 passed" in outputs["set-up"] or os.environ.get("DRAGKIT_FRESH_CLONE_FULL")
    assert "[run] ComfyUI is up after" in outputs["main job"]
    assert "[run]   [1/" in outputs["main job"] and "DDIM Invert (DragKit)" in outputs["main job"]
    print(f"fresh clone: set-up {timings['set-up']:.0f} s, main job {timings['main job']:.0f} s")

    written = sorted(p.name for p in (clone / "out").iterdir())
    assert "original_side_by_side.png" in written and len(written) == 2, written
    with Image.open(clone / "out" / "original_side_by_side.png") as combined:
        assert combined.size == (1024, 512)
