"""Shared fixtures: the anyio backend and the golden TensorFlow fixtures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"
TF_FIXTURES = DATA / "tf"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def load_manifest() -> dict[str, Any]:
    with open(TF_FIXTURES / "manifest.json") as f:
        manifest: dict[str, Any] = json.load(f)
    return manifest
