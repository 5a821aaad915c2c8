"""Fixtures of the engine tests (the bench itself is in enginebench.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from enginebench import KINDS, Bench, require_kind


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    require_kind(request.param)
    return str(request.param)


@pytest.fixture
def bench(kind: str) -> Iterator[Bench]:
    b = Bench(kind)
    try:
        yield b
    finally:
        b.close()
