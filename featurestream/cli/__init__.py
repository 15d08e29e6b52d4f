"""The ``featurestream`` command line. Each module below registers its commands on ``app``."""

from __future__ import annotations

# Importing a module registers its commands.
from featurestream.cli import (
    catalog_cmds,  # noqa: F401  (list, describe, search, lineage, impact, docs-coverage)
    demo_cmds,  # noqa: F401  (registers 'produce-demo')
    dev_cmds,  # noqa: F401  (registers 'dev')
    offline_cmds,  # noqa: F401  (materialize, backfill, export, import, consistency)
    registry_cmds,  # noqa: F401  (plan, apply, retire, history, export-definitions)
    serve_cmds,  # noqa: F401  (serve, get)
    token_cmds,  # noqa: F401  (token create, token list)
    training_cmds,  # noqa: F401  (training-set)
    worker_cmds,  # noqa: F401  (worker)
)
from featurestream.cli.app import app


def main() -> None:
    app()
