"""`featurestream dev up|down|status`: the embedded stack (placeholder, being written)."""

from __future__ import annotations

import typer

from featurestream.cli.app import app

dev_app = typer.Typer(help="Start, stop and inspect the embedded dev stack.", no_args_is_help=True)
app.add_typer(dev_app, name="dev")
