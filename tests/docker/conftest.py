"""Fixtures for the Docker tests: one dockerd per host namespace (lab/docker.py).

The module-scoped worlds are built before the root conftest's per-test requirement check runs, so
``docker_ok`` checks the requirements itself (skip, or fail under FLANNELD_TEST_REQUIRE_ALL=1).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.docker import build_image_tarball, docker_unavailable_reason
from lab.netns import Lab

REQUIRE_ALL = os.environ.get("FLANNELD_TEST_REQUIRE_ALL") == "1"


def skip_or_fail(why: str) -> None:
    if REQUIRE_ALL:
        pytest.fail(f"FLANNELD_TEST_REQUIRE_ALL=1 but {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def docker_ok() -> None:
    why = docker_unavailable_reason()
    if why is not None:
        skip_or_fail(why)


@pytest.fixture(scope="session")
def image_tar(docker_ok: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline test image, built once per session (imported into each engine)."""
    return build_image_tarball(tmp_path_factory.mktemp("image"))


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab
