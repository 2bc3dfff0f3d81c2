"""The order scripts/test.sh hands test files to its workers in (tests/conftest.py's HEAVY_FIRST)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from conftest import HEAVY_FIRST, _schedule_heavy_first

TESTS = Path(__file__).resolve().parent


def test_every_heavy_file_exists():
    missing = [name for name in HEAVY_FIRST if not (TESTS / name).is_file()]
    assert not missing, f"HEAVY_FIRST names files that are gone: {missing}"


def test_heavy_files_come_first_in_their_order_then_the_largest_files():
    def items(name: str, count: int) -> list:
        return [SimpleNamespace(path=TESTS / name, name=f"{name}::{i}") for i in range(count)]

    small, large = items("test_points.py", 2), items("test_ddim.py", 5)
    first, second = items(HEAVY_FIRST[0], 3), items(HEAVY_FIRST[1], 1)
    collected = small + second + large + first
    _schedule_heavy_first(collected)
    assert [item.name for item in collected] == [item.name for item in first + second + large + small]
