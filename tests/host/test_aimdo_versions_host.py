"""The Dynamic VRAM tests and :mod:`tools.comfy_vram` against comfy-aimdo 0.5.5 (ComfyUI 0.36.0's pin) as well as
the host's own (ComfyUI 0.33.0 pins 0.4.13).

comfy-aimdo 0.5.5 is installed once, without its dependencies, into
``<test cache>/comfy-aimdo-0.5.5`` (``pip install --no-deps --target``; the
test cache is ``$DRAGKIT_TEST_CACHE`` or ``~/.cache/dragkit-tests``) and put
first on ``PYTHONPATH`` of a subprocess: ``comfy_aimdo`` has no
``__init__.py``, so its modules come from the first folder on the path that
holds them. ComfyUI 0.3.64 has no Dynamic VRAM and uses no comfy-aimdo: these
tests skip there (``ComfyUI < 0.33 has no Dynamic VRAM``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dragrun.comfy_host import comfyui_version
from tools.comfy_vram import NO_DYNAMIC_VRAM, version_has_dynamic_vram
from tools.tiny_models import cache_dir

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]

NEWER = "0.5.5"
"""The comfy-aimdo ComfyUI 0.36.0 pins."""


def newer_aimdo() -> Path:
    """The folder holding comfy-aimdo :data:`NEWER`, installed there from PyPI the first time (atomically)."""
    target = cache_dir() / f"comfy-aimdo-{NEWER}"
    if (target / "comfy_aimdo" / "_version.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".comfy-aimdo-{NEWER}-", dir=target.parent))
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                               "--target", str(scratch), f"comfy-aimdo=={NEWER}"], capture_output=True, text=True)
        assert done.returncode == 0, f"could not install comfy-aimdo {NEWER} from PyPI:\n{done.stdout}{done.stderr}"
        try:
            os.replace(scratch, target)
        except OSError:  # another run installed it first
            assert (target / "comfy_aimdo" / "_version.py").is_file()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


@pytest.fixture(scope="module")
def aimdo_paths(comfyui) -> dict:
    """``{version: PYTHONPATH prefix}``: the host's own comfy-aimdo (no prefix) and :data:`NEWER`."""
    if not version_has_dynamic_vram(comfyui_version(comfyui)):
        pytest.skip(NO_DYNAMIC_VRAM)
    import importlib.metadata

    return {importlib.metadata.version("comfy-aimdo"): "", NEWER: str(newer_aimdo())}


def _env(prefix: str, **extra: str) -> dict:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (prefix, str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def test_comfy_vram_starts_comfy_aimdo_with_either_version(aimdo_paths):
    """:func:`tools.comfy_vram.init_aimdo` and :func:`~tools.comfy_vram.init_aimdo_devices` with ``main.py``'s
    arguments: the library loads on a CPU machine; with no CUDA no device starts (False, not a TypeError)."""
    script = ("import argparse, json; from tools import comfy_vram as v; "
              "a = argparse.Namespace(reserve_vram=1.5, vram_headroom=0.5, disable_nvml_pressure=False); "
              "print(json.dumps([v.aimdo_version(), v.init_aimdo(a), v.init_aimdo_devices(a, [0])]))")
    assert len(aimdo_paths) == 2, f"the host's comfy-aimdo is already {NEWER}: nothing to compare"
    for version, prefix in aimdo_paths.items():
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(prefix), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1]) == [version, True, False], done.stderr


WITHOUT_AIMDO = ("test_gradient_passes_run_in_the_host_training_mode",
                 "test_only_weights_on_the_compute_device_are_made_autograd_safe")
"""Tests of ``test_dynamic_vram_host.py`` that neither make a dynamic patcher nor ask comfy-aimdo anything (the
slowest runs real motion supervision and a LoRA step): not run again."""


def test_the_dynamic_vram_tests_pass_with_comfy_aimdo_0_5_5(aimdo_paths):
    """``tests/host/test_dynamic_vram_host.py`` again (less :data:`WITHOUT_AIMDO`), with comfy-aimdo :data:`NEWER`
    first on the path (its ``test_the_comfy_aimdo_the_tests_imported`` checks that it was the one imported): every
    test passes, none skips."""
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/host/test_dynamic_vram_host.py", "-q", "-rs",
                           "-p", "no:cacheprovider", "-k", " and ".join(f"not {name}" for name in WITHOUT_AIMDO)],
                          cwd=REPO,
                          env=_env(aimdo_paths[NEWER], DRAGKIT_EXPECT_AIMDO=NEWER), capture_output=True, text=True,
                          timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0 and " passed" in summary and "skipped" not in summary and "failed" not in summary, \
        done.stdout[-4000:] + done.stderr[-2000:]
