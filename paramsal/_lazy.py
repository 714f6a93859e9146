"""Public names that a package imports on first use, so that importing it stays cheap.

``paramsal``, ``paramsal.analyses`` and ``paramsal.reference`` list their
public names without importing the modules that define them (torch among
them); :func:`lazy_getattr` is the module ``__getattr__`` (PEP 562) that
imports a name's module when the name is first read, and keeps the value.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, modules: Mapping[str, str]) -> Callable[[str], Any]:
    """A ``__getattr__`` for ``package`` that imports ``package.<modules[name]>`` to give ``name``.

    Args:
        package: the package's ``__name__``.
        modules: public name -> the submodule that defines it, relative to ``package``.
    """
    def __getattr__(name: str) -> Any:
        if name not in modules:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{modules[name]}"), name)
        setattr(sys.modules[package], name, value)  # later reads find it without this hook
        return value

    return __getattr__
