"""Fixtures shared by the trainer tests: tiny model setups built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .tiny_models import make_tiny_setup


@pytest.fixture(scope="session")
def tiny_setups(tmp_path_factory):
    """arch -> TinySetup, built lazily and cached for the session."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = make_tiny_setup(tmp_path_factory.mktemp(f"tiny_{arch}"), arch)
        return cache[arch]

    return get


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
