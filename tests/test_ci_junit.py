"""CI's skip check (``tools/ci_junit.py``): an unexpected skip, an empty run or a missing file fails the run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tools import ci_junit

FAKE = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="3" tests="6">
<testcase classname="test_a" name="test_ok" time="0.1"/>
<testcase classname="test_a" name="test_ok_too" time="0.1"/>
<testcase classname="test_a" name="test_broken" time="0.1"><failure message="assert 0">boom</failure></testcase>
<testcase classname="test_cuda" name="test_fp16" time="0"><skipped type="pytest.skip" message="needs CUDA">test_cuda.py:25: needs CUDA</skipped></testcase>
<testcase classname="test_js" name="test_model" time="0"><skipped type="pytest.skip" message="Node.js is not installed (apt-get install nodejs)">test_js.py:31: Node.js is not installed (apt-get install nodejs)</skipped></testcase>
<testcase classname="test_vram" name="test_wrap" time="0"><skipped type="pytest.skip">test_vram.py:53: ComfyUI &lt; 0.33 has no Dynamic VRAM</skipped></testcase>
</testsuite></testsuites>
"""


def _fake(tmp_path):
    path = tmp_path / "run.xml"
    path.write_text(FAKE)
    return path


def test_counts_and_reasons_are_read(tmp_path):
    report = ci_junit.read_junit(_fake(tmp_path))
    assert (report.passed, report.failed, report.skipped) == (2, 1, 3)
    assert [reason for _, reason in report.skips] == [
        "needs CUDA", "Node.js is not installed (apt-get install nodejs)", "ComfyUI < 0.33 has no Dynamic VRAM"]


def test_an_unexpected_skip_fails_the_run(tmp_path):
    report = ci_junit.read_junit(_fake(tmp_path))
    reasons = ci_junit.verdict(report, allowed=[r"needs CUDA", r"^ComfyUI < 0\.33 "])
    assert reasons == ["UNEXPECTED SKIP test_js::test_model: Node.js is not installed (apt-get install nodejs)"]


def test_allowed_skips_pass(tmp_path):
    report = ci_junit.read_junit(_fake(tmp_path))
    assert ci_junit.verdict(report, allowed=[r"needs CUDA", r"^ComfyUI < 0\.33 ", r"Node\.js"]) == []


def test_a_run_of_no_test_and_a_missing_file_fail(tmp_path):
    empty = tmp_path / "empty.xml"
    empty.write_text('<testsuites><testsuite name="pytest" tests="0"/></testsuites>')
    assert "only 0 test(s) ran" in ci_junit.verdict(ci_junit.read_junit(empty), allowed=[])[0]
    assert "no JUnit file" in ci_junit.verdict(ci_junit.read_junit(tmp_path / "absent.xml"), allowed=[])[0]
    broken = tmp_path / "broken.xml"
    broken.write_text("<testsuites>")
    assert "unreadable JUnit file" in ci_junit.verdict(ci_junit.read_junit(broken), allowed=[])[0]


def test_a_real_pytest_run_through_the_command_line(tmp_path):
    """pytest's own JUnit output, judged by the command ``.ci/run`` calls: exit 1 and the skip named."""
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest

        def test_runs():
            pass

        @pytest.mark.skipif(True, reason="needs CUDA")
        def test_on_cuda():
            pass

        def test_data():
            pytest.skip("the shipped Drag100 data is not at /nowhere")
    """))
    xml = tmp_path / "out.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    str(tmp_path / "test_sample.py")], cwd=tmp_path, capture_output=True, check=True)
    done = subprocess.run([sys.executable, "-m", "tools.ci_junit", str(xml), "--allow", "needs CUDA"],
                          capture_output=True, text=True, cwd=ci_junit.Path(ci_junit.__file__).parents[1])
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "1 0 2"
    assert lines[1:] == ["UNEXPECTED SKIP test_sample::test_data: the shipped Drag100 data is not at /nowhere"]
    allowed = subprocess.run([sys.executable, "-m", "tools.ci_junit", str(xml), "--allow", "needs CUDA",
                              "--allow", "Drag100"], capture_output=True, text=True,
                             cwd=ci_junit.Path(ci_junit.__file__).parents[1])
    assert allowed.returncode == 0, allowed.stdout
