"""The checked-in gRPC code matches what proto/ generates now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = gen.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        checked_in = ROOT / relative
        assert checked_in.exists(), f"{relative} is not checked in: run python scripts/gen_proto.py"
        assert checked_in.read_bytes() == path.read_bytes(), f"{relative} is stale: run python scripts/gen_proto.py"
