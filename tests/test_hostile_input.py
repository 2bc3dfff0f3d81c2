"""Hostile input for the engine's parsers: random JSON (depth, size, types) may only raise DragInputError.

Issue 15: deeply nested JSON in Drag Points (JSON) escaped as a raw RecursionError.
"""

from __future__ import annotations

import json
import random

import pytest

from dragkit.editor_state import parse_editor_state
from dragkit.errors import DragInputError
from dragkit.points import parse_drag_points

KEYS = ["pairs", "points", "handles", "targets", "width", "height", "handle", "target", "x", "y",
        "version", "pending", "mask", "rle", "", "\u0000", "pairs\n"]


def _scalar(rng: random.Random):
    return rng.choice([
        None, True, False, 0, 1, -1, 7, 63, 64, 512, 10**30, -(10**30), 0.5, -0.0, 1e308, float("nan"),
        float("inf"), "", "a", "\u0000", "64", "AAAA", "\ud800x", rng.randint(-5, 600), rng.uniform(-10, 600),
    ])


def _value(rng: random.Random, depth: int):
    """A random JSON-like value; near the top it leans toward the shapes the parsers expect."""
    if depth <= 0 or rng.random() < 0.25:
        return _scalar(rng)
    kind = rng.random()
    if kind < 0.4:
        return {rng.choice(KEYS): _value(rng, depth - 1) for _ in range(rng.randint(0, 6))}
    if kind < 0.8:
        return [_value(rng, depth - 1) for _ in range(rng.randint(0, 5))]
    return [rng.uniform(-5, 600), rng.uniform(-5, 600)]


def _near_valid(rng: random.Random):
    """A points or editor-state object with one or two random corruptions."""
    pairs = [{"handle": [rng.randint(0, 63), rng.randint(0, 63)], "target": [rng.randint(0, 63), rng.randint(0, 63)]}
             for _ in range(rng.randint(0, 4))]
    value = {"version": 1, "width": 64, "height": 64, "pairs": pairs, "pending": None, "mask": None}
    for _ in range(rng.randint(1, 2)):
        value[rng.choice(KEYS)] = _value(rng, rng.randint(0, 4))
    return value


def _deep(rng: random.Random) -> str:
    depth = rng.choice([50, 900, 5000, 100_000])
    opener, closer = rng.choice([("[", "]"), ('{"pairs":', "}"), ('{"a":[', "]}")])
    return opener * depth + closer * depth * rng.randint(0, 1)


def _texts(seed: int, count: int):
    rng = random.Random(seed)
    for i in range(count):
        roll = rng.random()
        if roll < 0.1:
            yield _deep(rng)
        elif roll < 0.15:
            yield "1" * rng.choice([4301, 20_000]) if rng.random() < 0.5 else "[" + "9" * 5000 + "]"
        elif roll < 0.2:
            yield rng.choice(["", " ", "\u0000", "NaN", "{", "[1,]", '{"pairs": [}', "\ud800"]) * rng.randint(1, 3)
        else:
            value = _near_valid(rng) if roll < 0.6 else _value(rng, rng.randint(1, 8))
            text = json.dumps(value, allow_nan=True)
            if rng.random() < 0.1:  # truncated or with a stray byte
                cut = rng.randint(0, len(text))
                text = text[:cut] + rng.choice(["", "\u0000", "}", "]]", "\\"]) + text[cut:]
            yield text


def _accepts_only_input_errors(parse, value, **size):
    try:
        parse(value, **size)
    except DragInputError as err:
        assert str(err), "a DragInputError must say what is wrong"
        assert len(str(err)) < 2000, "the message must not echo the whole hostile input"


PARSERS = [
    pytest.param(parse_drag_points, id="drag_points"),
    pytest.param(parse_editor_state, id="editor_state"),
]


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize("size", [{}, {"width": 64, "height": 64}], ids=["no-size", "64x64"])
def test_random_json_text_raises_only_drag_input_error(parse, size):
    for text in _texts(seed=15, count=600):
        _accepts_only_input_errors(parse, text, **size)


@pytest.mark.parametrize("parse", PARSERS)
def test_random_decoded_values_raise_only_drag_input_error(parse):
    rng = random.Random(1515)
    for _ in range(600):
        value = _near_valid(rng) if rng.random() < 0.5 else _value(rng, rng.randint(0, 10))
        _accepts_only_input_errors(parse, value, width=64, height=64)


@pytest.mark.parametrize("parse, what", [(parse_drag_points, "points"), (parse_editor_state, "editor state")])
@pytest.mark.parametrize("depth", [5000, 100_000])
def test_deeply_nested_json_says_it_is_nested_too_deeply(parse, what, depth):
    with pytest.raises(DragInputError, match=f"the {what} (JSON )?is nested too deeply"):
        parse("[" * depth + "]" * depth)


def test_integer_beyond_pythons_digit_limit_is_an_input_error():
    with pytest.raises(DragInputError, match="cannot be read"):
        parse_drag_points('{"points": [[' + "9" * 5000 + ", 1], [1, 1]]}", width=64, height=64)
