"""CI's verdict on one pytest run: its counts, and every skip whose reason is not allowed for that run.

``.ci/run`` runs the suite several times (per ComfyUI host, per frontend) and
passes, for each run, the skip reasons that run may show (regular
expressions, searched in the reason): a machine without CUDA, and what a
host or frontend lacks by its version. Any other skip fails the run, so a
whole group of tests cannot vanish while CI stays green (a missing Node.js,
Drag100 not found, a renamed host capability). A run that executed no test,
or whose JUnit file is missing or unreadable, fails too.

    python -m tools.ci_junit RESULT.xml [--allow REGEX ...] [--min-tests N]

prints ``passed failed skipped`` on its first line, then one line per
unexpected skip (``UNEXPECTED SKIP test-id: reason``), and exits 0 when the
run may pass, 1 when it may not (unexpected skips, no test, no file).
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunReport:
    """What one JUnit file says: counts, and the (test id, reason) of each skip."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0
    skips: list[tuple[str, str]] = field(default_factory=list)
    problem: str | None = None   # the file is missing or unreadable


def read_junit(path: Path) -> RunReport:
    """Counts and skip reasons of a pytest ``--junitxml`` file (``problem`` set when it cannot be read)."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        return RunReport(problem=f"no JUnit file at {path} (pytest did not start, or the set-up failed)")
    except (OSError, ET.ParseError) as exc:
        return RunReport(problem=f"unreadable JUnit file {path}: {exc}")
    report = RunReport()
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
                report.skips.append((test_id, _skip_reason(child)))
        setattr(report, outcome, getattr(report, outcome) + 1)
    return report


def _skip_reason(element: ET.Element) -> str:
    """pytest writes ``message="<reason>"`` and ``file:line: <reason>`` as the text; the message is the reason."""
    message = element.get("message") or ""
    if message:
        return message
    text = (element.text or "").strip()
    return text.split(": ", 1)[1] if ": " in text else text


def unexpected_skips(report: RunReport, allowed: list[str]) -> list[tuple[str, str]]:
    """The skips whose reason matches none of the ``allowed`` regular expressions."""
    patterns = [re.compile(a) for a in allowed]
    return [(test, reason) for test, reason in report.skips if not any(p.search(reason) for p in patterns)]


def verdict(report: RunReport, allowed: list[str], min_tests: int = 1) -> list[str]:
    """The reasons this run must fail CI (empty: it may pass, as far as skips and counts go)."""
    if report.problem:
        return [report.problem]
    reasons = [f"UNEXPECTED SKIP {test}: {reason}" for test, reason in unexpected_skips(report, allowed)]
    ran = report.passed + report.failed
    if ran < min_tests:
        reasons.append(f"only {ran} test(s) ran (at least {min_tests} expected): the selection is empty or all skipped")
    return reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.ci_junit", description=__doc__.split("\n\n")[0])
    parser.add_argument("junit", type=Path)
    parser.add_argument("--allow", action="append", default=[], metavar="REGEX",
                        help="a skip reason this run may show (searched in the reason; repeatable)")
    parser.add_argument("--min-tests", type=int, default=1, help="fewest tests that must run (not skip)")
    args = parser.parse_args(argv)
    report = read_junit(args.junit)
    print(report.passed, report.failed, report.skipped)
    reasons = verdict(report, args.allow, args.min_tests)
    for line in reasons:
        print(line)
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
