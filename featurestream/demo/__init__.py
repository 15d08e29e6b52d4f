"""Demo data for the demo project in ``definitions/``: a seeded transaction generator and a producer."""

from __future__ import annotations

from featurestream.demo.generator import (
    KIND_LATE,
    KIND_OUT_OF_ORDER,
    KIND_VALID,
    MALFORMED_REASONS,
    DemoEvent,
    generate_transactions,
)

__all__ = [
    "KIND_LATE",
    "KIND_OUT_OF_ORDER",
    "KIND_VALID",
    "MALFORMED_REASONS",
    "DemoEvent",
    "generate_transactions",
]
