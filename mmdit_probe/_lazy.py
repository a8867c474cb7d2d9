"""Names of a package that import their module on first use (so `mmdit-probe --help` imports no torch)."""

from __future__ import annotations

import importlib
import sys


def lazy(package: str, names: dict[str, str]):
    """`__getattr__` and `__dir__` for `package`, whose `names` map to the (relative) module defining them."""

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted([*vars(sys.modules[package]), *names])

    return __getattr__, __dir__


def resolve(target: str):
    """The object `target` names as "package.module:name", its module imported now: how a feature offered by
    name (the toy's prompts, masks and measures) is found without an import that `lint-imports` would see."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
