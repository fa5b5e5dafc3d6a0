"""The package's own names: none hides a submodule (`import fastppo.train as t` gives the module)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import types

import fastppo


def test_import_as_gives_the_module():
    import fastppo.train as t

    assert isinstance(t, types.ModuleType) and t is sys.modules["fastppo.train"]
    assert callable(t.train)


def test_no_package_attribute_shadows_a_submodule():
    for info in pkgutil.iter_modules(fastppo.__path__):
        module = importlib.import_module(f"fastppo.{info.name}")
        assert getattr(fastppo, info.name) is module, info.name
