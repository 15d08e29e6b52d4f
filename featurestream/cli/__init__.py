"""The ``featurestream`` command line. Each module below registers its commands on ``app``."""

from __future__ import annotations

from featurestream.cli.app import app

# Importing a module registers its commands.
from featurestream.cli import dev_cmds  # noqa: F401,E402  (registers 'dev')


def main() -> None:
    app()
