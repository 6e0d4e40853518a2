"""Public names that load their module on first use, so importing a package stays cheap
(`import artaug_ext` and `artaug_ext.train.settings` import neither torch nor DiffSynth)."""

from __future__ import annotations

import importlib
import sys


def lazy_names(package: str, table: dict[str, str], eager: tuple[str, ...] = ()):
    """(`__getattr__`, `__dir__`, `__all__`) for `package`: each name of `table` is looked up in
    the submodule it maps to on first access and then kept in the package's namespace."""
    names = sorted([*table, *eager])

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(f".{table[name]}", package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return names

    return __getattr__, __dir__, names
