"""The root typer application; command modules register on it."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="featurestream",
    help="featurestream: streaming-first real-time feature store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
