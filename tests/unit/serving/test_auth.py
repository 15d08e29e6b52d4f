"""Tokens, the tokens file, scope rules, PII hashing, the audit log and usage counting, in memory."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from featurestream.definitions.models import ProjectDefinition
from featurestream.registry.records import ProjectSnapshot, ViewVersion
from featurestream.registry.usage import UsageIncrement
from featurestream.serving.access import ANONYMOUS, OpenAccess, Principal
from featurestream.serving.audit import AuditLog, UsageCounter
from featurestream.serving.auth import (
    TokenConfigError,
    TokenPolicy,
    TokensFile,
    close_policy,
    hash_token,
    hash_value,
    load_policy,
    new_token,
    read_tokens_file,
    scope_allows,
)
from featurestream.serving.refs import Catalog, FeatureRef, ServingError
from featurestream.serving.service import MISSING, PRESENT, ServedRow, ServedRows, ServedValue

NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
SALT = b"0123456789abcdef-test-salt"

DEFINITION = ProjectDefinition.model_validate(
    {
        "project": {"name": "shop"},
        "entities": [{"name": "user", "join_keys": ["user_id"]}],
        "sources": [
            {
                "name": "orders",
                "topic": "orders",
                "event_time_field": "ts",
                "fields": [
                    {"name": "user_id", "type": "string"},
                    {"name": "country", "type": "string", "pii": "personal"},
                    {"name": "card", "type": "string", "pii": "sensitive"},
                    {"name": "ts", "type": "timestamp"},
                ],
            }
        ],
        "feature_views": [
            {
                "name": "user_orders",
                "entity": "user",
                "source": "orders",
                "features": [
                    {"name": "count_1h", "aggregation": "count", "window": "1h"},
                    {"name": "last_country", "aggregation": "last", "field": "country", "pii": "personal"},
                    {"name": "last_card", "aggregation": "last", "field": "card", "pii": "sensitive"},
                ],
            }
        ],
    }
)
CATALOG = Catalog(
    ProjectSnapshot("shop", 1, DEFINITION, tuple(ViewVersion(v.name, 1, "live", v, 1) for v in DEFINITION.feature_views))
)
TOKENS = {name: f"fst_test-token-{name}" for name in ("reader", "personal", "hasher", "sensitive", "all", "pusher")}


def entry(name: str, team: str, scopes: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "team": team, "scopes": scopes, "hash": hash_token(TOKENS[name]), **extra}


def config(**extra: Any) -> TokensFile:
    return TokensFile.model_validate(
        {
            "tokens": [
                entry("reader", "growth", ["read"]),
                entry("personal", "risk", ["read", "pii:personal"]),
                entry("hasher", "marketing", ["read", "pii:personal"]),
                entry("sensitive", "risk", ["read", "pii:sensitive"], hash_personal=True),
                entry("all", "platform", ["*"]),
                entry("pusher", "ingest", ["push"]),
            ],
            "hash_personal": ["marketing"],
            "salt": SALT.decode(),
            **extra,
        }
    )


class Recorder:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


def policy(**kwargs: Any) -> TokenPolicy:
    return TokenPolicy(config(), salt=SALT, clock=lambda: NOW, **kwargs)


def refs(*features: str) -> list[FeatureRef]:
    return CATALOG.resolve(list(features))


def served(feature_refs: list[FeatureRef], *users: str) -> ServedRows:
    sample = {"count_1h": 2, "last_country": "DE", "last_card": "4111-1111"}
    rows = [
        ServedRow({"user_id": user, "extra": "x"}, 1000,
                  [ServedValue(sample[r.feature.name], PRESENT, 900) for r in feature_refs])
        for user in users
    ]
    return ServedRows([r.name for r in feature_refs], feature_refs, rows)


# ---------------------------------------------------------------- tokens


def test_new_tokens_are_random_and_prefixed() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(t.startswith("fst_") and len(t) >= 40 for t in tokens)


def test_token_hash_is_sha256_hex() -> None:
    assert hash_token("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_authenticate_maps_a_token_to_its_principal() -> None:
    principal = policy().authenticate(TOKENS["personal"])
    assert principal == Principal("personal", "risk", frozenset({"read", "pii:personal"}))


@pytest.mark.parametrize("token", [None, "", "fst_unknown", TOKENS["reader"] + "x", hash_token(TOKENS["reader"])])
def test_missing_or_unknown_tokens_are_unauthenticated(token: str | None) -> None:
    with pytest.raises(ServingError) as info:
        policy().authenticate(token)
    assert info.value.code == "UNAUTHENTICATED"
    assert "fst_" not in info.value.message  # the presented token is never echoed


def test_principals_not_issued_by_the_policy_are_refused() -> None:
    # The service's default principal has every scope: it must not pass a token policy.
    for principal in (ANONYMOUS, Principal("reader", "growth", frozenset({"*"}))):
        with pytest.raises(ServingError) as info:
            policy().authorize(principal, refs("user_orders:count_1h"), "online")
        assert info.value.code == "UNAUTHENTICATED"


# ---------------------------------------------------------------- scope rules


def test_scope_allows() -> None:
    assert scope_allows(frozenset({"read"}), "read")
    assert scope_allows(frozenset({"*"}), "pii:sensitive")
    assert not scope_allows(frozenset({"pii:sensitive"}), "pii:personal")  # no implied levels
    assert not scope_allows(frozenset(), "read")


@pytest.mark.parametrize(
    ("token", "method", "features", "denied"),
    [
        ("reader", "online", ["user_orders:count_1h"], None),
        ("reader", "as_of", ["user_orders:count_1h"], None),
        ("pusher", "online", ["user_orders:count_1h"], "lacks scope 'read', needed for online requests"),
        ("reader", "push", [], "lacks scope 'push'"),
        ("pusher", "push", [], None),
        ("reader", "catalog", [], "lacks scope 'catalog'"),
        ("all", "catalog", [], None),
        ("reader", "online", ["user_orders:last_country"], "may not read 'user_orders:last_country' (pii: personal): it needs scope 'pii:personal'"),
        ("reader", "online", ["user_orders:last_card"], "may not read 'user_orders:last_card' (pii: sensitive): it needs scope 'pii:sensitive'"),
        ("personal", "online", ["user_orders:last_country"], None),
        ("personal", "as_of", ["user_orders:last_card"], "needs scope 'pii:sensitive'"),
        ("hasher", "online", ["user_orders:last_country"], None),
        ("sensitive", "online", ["user_orders"], None),  # personal allowed because hashed
        ("all", "online", ["user_orders"], None),
        ("reader", "online", ["user_orders"], "may not read 'user_orders:last_country'"),  # the first one
        ("all", "something_new", [], None),
        ("reader", "something_new", [], "lacks scope 'something_new'"),
    ],
)
def test_scope_rules(token: str, method: str, features: list[str], denied: str | None) -> None:
    p = policy()
    principal = p.authenticate(TOKENS[token])
    if denied is None:
        p.authorize(principal, refs(*features) if features else [], method)
        return
    with pytest.raises(ServingError) as info:
        p.authorize(principal, refs(*features) if features else [], method)
    assert info.value.code == "PERMISSION_DENIED"
    assert denied in info.value.message
    assert f"token '{token}'" in info.value.message


# ---------------------------------------------------------------- hashing


def test_hash_value_is_deterministic_keyed_and_typed() -> None:
    assert hash_value(SALT, "DE") == hash_value(SALT, "DE")
    assert hash_value(SALT, "DE") != hash_value(SALT, "FR")
    assert hash_value(SALT, "DE") != hash_value(b"another-salt-of-16+", "DE")
    assert len(hash_value(SALT, "DE")) == 64 and int(hash_value(SALT, "DE"), 16) >= 0
    assert hash_value(SALT, 42) == hash_value(SALT, 42) != hash_value(SALT, "42 ")
    assert hash_value(SALT, True) == hash_value(SALT, "true")  # JSON text of non-strings


def test_personal_values_hashed_for_hashing_principals_only() -> None:
    p = policy()
    features = refs("user_orders")
    raw = p.present(p.authenticate(TOKENS["all"]), served(features, "u1"), "online")
    assert [v.value for v in raw.rows[0].values] == [2, "DE", "4111-1111"]
    for name in ("hasher", "sensitive"):
        hashed = p.present(p.authenticate(TOKENS[name]), served(features, "u1"), "online")
        values = hashed.rows[0].values
        assert values[0].value == 2 and values[2].value == "4111-1111"  # only personal features
        assert values[1].value == hash_value(SALT, "DE") and values[1].status == PRESENT
        assert values[1].event_time_ms == 900


def test_hashing_keeps_missing_values_missing() -> None:
    p = policy()
    feature_refs = refs("user_orders:last_country")
    rows = ServedRows([feature_refs[0].name], feature_refs, [ServedRow({"user_id": "u"}, 1, [ServedValue(None, MISSING, None)])])
    out = p.present(p.authenticate(TOKENS["hasher"]), rows, "online")
    assert out.rows[0].values[0] == ServedValue(None, MISSING, None)


def test_a_token_override_beats_the_team_list() -> None:
    cfg = config()
    by_name = {t.name: t for t in cfg.tokens}
    assert cfg.hashes_personal(by_name["hasher"])  # team marketing is listed
    assert cfg.hashes_personal(by_name["sensitive"])  # per token
    assert not cfg.hashes_personal(by_name["personal"])
    raw = TokensFile.model_validate({**cfg.model_dump(), "tokens": [
        {**by_name["hasher"].model_dump(), "hash_personal": False}]})
    assert not raw.hashes_personal(raw.tokens[0])


# ---------------------------------------------------------------- audit and usage


def test_one_audit_record_per_request_touching_pii() -> None:
    audit = Recorder()
    p = policy(audit=audit)
    principal = p.authenticate(TOKENS["sensitive"])
    p.present(principal, served(refs("user_orders:count_1h"), "u1"), "online")
    assert audit.records == []  # no PII, no record
    p.present(principal, served(refs("user_orders"), "u1", "u2"), "online")
    assert audit.records == [
        {
            "time": NOW.isoformat(),
            "principal": "sensitive",
            "team": "risk",
            "method": "online",
            "features": {"user_orders:last_country": "personal", "user_orders:last_card": "sensitive"},
            "hashed": ["user_orders:last_country"],
            "entities": [{"user_id": "u1"}, {"user_id": "u2"}],
        }
    ]
    p.present(principal, served(refs("user_orders:last_card"), "u3"), "as_of")
    assert audit.records[-1]["at_ms"] == [1000] and audit.records[-1]["method"] == "as_of"


def test_an_unwritable_audit_log_withholds_the_values(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.close()
    p = policy(audit=log)
    with pytest.raises(ServingError) as info:
        p.present(p.authenticate(TOKENS["all"]), served(refs("user_orders:last_card"), "u1"), "online")
    assert info.value.code == "UNAVAILABLE"


def test_audit_log_appends_whole_lines_from_many_threads(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    log = AuditLog(path)

    def work(n: int) -> None:
        for i in range(200):
            log.write({"thread": n, "i": i, "pad": "x" * 500})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1600
    assert sorted((r["thread"], r["i"]) for r in map(json.loads, lines)) == [(n, i) for n in range(8) for i in range(200)]
    assert path.stat().st_mode & 0o777 == 0o600
    AuditLog(path).write({"more": 1})  # reopening appends
    assert len(path.read_text().splitlines()) == 1601


def test_usage_counts_per_feature_and_token_and_flushes_in_batches() -> None:
    batches: list[list[UsageIncrement]] = []
    usage = UsageCounter("shop", batches.append, start=False)
    p = policy(usage=usage)
    for name in ("all", "all", "hasher"):
        p.present(p.authenticate(TOKENS[name]), served(refs("user_orders:count_1h", "user_orders:last_country"), "u1", "u2"), "online")
    p.present(p.authenticate(TOKENS["pusher"]), served([], "u1"), "push")  # not a read
    assert usage.pending() == {
        ("user_orders", 1, "count_1h", "all"): 4,
        ("user_orders", 1, "last_country", "all"): 4,
        ("user_orders", 1, "count_1h", "hasher"): 2,
        ("user_orders", 1, "last_country", "hasher"): 2,
    }
    assert usage.flush() == 4
    assert usage.pending() == {} and usage.flush() == 0
    assert {(i.feature, i.client, i.reads) for i in batches[0]} == {
        ("count_1h", "all", 4), ("last_country", "all", 4), ("count_1h", "hasher", 2), ("last_country", "hasher", 2)
    }
    assert all(i.project == "shop" and i.last_read_at == NOW for i in batches[0])


def test_a_failed_flush_keeps_the_counts() -> None:
    calls: list[int] = []

    def flaky(increments: list[UsageIncrement]) -> None:
        calls.append(len(increments))
        if len(calls) == 1:
            raise OSError("registry down")

    usage = UsageCounter("shop", flaky, start=False)
    usage.add("v", 1, "f", "c", 3, NOW)
    assert usage.flush() == 0
    usage.add("v", 1, "f", "c", 2, NOW)
    assert usage.pending() == {("v", 1, "f", "c"): 5}
    assert usage.flush() == 1 and calls == [1, 1]


def test_the_background_thread_flushes_and_close_flushes_the_rest() -> None:
    flushed = threading.Event()
    got: list[UsageIncrement] = []

    def sink(increments: list[UsageIncrement]) -> None:
        got.extend(increments)
        flushed.set()

    usage = UsageCounter("shop", sink, interval_s=0.05)
    usage.add("v", 1, "f", "c", 1, NOW)
    assert flushed.wait(5)
    usage.add("v", 1, "f", "c", 1, NOW)
    usage.close()
    assert sum(i.reads for i in got) == 2


# ---------------------------------------------------------------- the tokens file


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(TokenConfigError) as info:
        read_tokens_file(path)
    return [str(p).removeprefix(f"{path}:") for p in info.value.problems]


HASH = "sha256:" + "a" * 64


def test_config_errors_name_line_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, f"""\
tokens:
  - name: good
    team: risk
    scopes: [read]
    hash: {HASH}
  - name: typo
    team: risk
    scopes: [read, pii:secret]
    hash: sha256:abc
    colour: red
hash_personal: [growth]
""")
    assert problems(path) == [
        "8: tokens[typo].scopes[1]: Input should be 'read', 'push', 'catalog', 'pii:personal', 'pii:sensitive' or '*'",
        "9: tokens[typo].hash: must be 'sha256:' and 64 lower-case hex digits (see 'featurestream token create')",
        "10: tokens[typo].colour: unknown key",
    ]


def test_cross_checks_name_their_line(tmp_path: Path) -> None:
    path = write(tmp_path, f"""\
tokens:
  - {{name: a, team: t, scopes: [read], hash: "{HASH}"}}
  - {{name: a, team: t, scopes: [read], hash: "{HASH}"}}
hash_personal: [t]
""")
    assert problems(path) == [
        "3: tokens[a].hash: the same token hash as tokens[0]",
        "3: tokens[a].name: token name 'a' is already used by tokens[0]",
        "4: hash_personal: hashing personal values needs a salt: set salt_env (or salt)",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tokens: [\n", "invalid YAML"),
        ("- a\n", "1: expected a mapping"),
        ("salt: short\n", "1: salt: String should have at least 16 characters"),
        ("salt: 0123456789abcdef\nsalt_env: FS_SALT\n", "2: salt_env: give salt or salt_env, not both"),
        ("tokens:\n  - {name: a, team: t, scopes: [], hash: x}\n", "2: tokens[a].scopes: must not be empty"),
        ("usage_flush_seconds: 0\n", "usage_flush_seconds: Input should be greater than 0"),
        ("tokens:\n  - {name: 'a b', team: t, scopes: [read], hash: x}\n", "tokens[a b].name: letters, digits"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(write(tmp_path, text))
    assert any(expected in p for p in found), found


def test_missing_tokens_file(tmp_path: Path) -> None:
    assert problems(tmp_path / "tokens.yaml") == [" no such tokens file"]


def test_load_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(load_policy(None), OpenAccess)
    path = write(tmp_path, yaml.safe_dump({
        "tokens": [entry("hasher", "marketing", ["read"])], "hash_personal": ["marketing"],
        "salt_env": "FS_TEST_SALT", "audit_log": "logs/pii.jsonl",
    }))
    with pytest.raises(TokenConfigError, match="FS_TEST_SALT is not set"):
        load_policy(path)
    monkeypatch.setenv("FS_TEST_SALT", SALT.decode())
    p = load_policy(path, clock=lambda: NOW)
    assert isinstance(p, TokenPolicy)
    principal = p.authenticate(TOKENS["hasher"])
    out = p.present(principal, served(refs("user_orders:last_country"), "u1"), "online")
    assert out.rows[0].values[0].value == hash_value(SALT, "DE")
    close_policy(p)
    record = json.loads((tmp_path / "logs" / "pii.jsonl").read_text())
    assert record["principal"] == "hasher" and record["hashed"] == ["user_orders:last_country"]
    with pytest.raises(ValueError, match="both registry and project"):
        load_policy(path, project="shop")


# ---------------------------------------------------------------- token create / list


def test_token_create_appends_a_hash_and_the_token_authenticates(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from featurestream.cli.app import app

    path = write(tmp_path, f"""\
# Tokens of the shop project.
tokens:
  - name: old
    team: risk
    scopes: [read]
    hash: {HASH}

# Teams that see personal values hashed.
hash_personal: [growth]
salt: {SALT.decode()}
""")
    runner = CliRunner()
    result = runner.invoke(app, ["token", "create", "--name", "dash", "--team", "growth", "--scope", "read",
                                 "--scope", "pii:personal", "--tokens", str(path)])
    assert result.exit_code == 0, result.output
    new = result.stdout.strip()
    assert new.startswith("fst_") and "\n" not in new
    text = path.read_text()
    assert new not in text and hash_token(new) in text
    assert "# Tokens of the shop project." in text and "# Teams that see personal values hashed." in text
    p = load_policy(path)
    assert p.authenticate(new) == Principal("dash", "growth", frozenset({"read", "pii:personal"}))
    close_policy(p)

    listed = json.loads(runner.invoke(app, ["token", "list", "--tokens", str(path), "--json"]).stdout)
    assert [(t["name"], t["team"], t["hash_personal"]) for t in listed["tokens"]] == [
        ("old", "risk", False), ("dash", "growth", True)]
    assert "dash" in runner.invoke(app, ["token", "list", "--tokens", str(path)]).stdout

    again = runner.invoke(app, ["token", "create", "--name", "dash", "--team", "t", "--scope", "read", "--tokens", str(path)])
    assert again.exit_code == 1 and "already has a token named 'dash'" in again.output
    bad = runner.invoke(app, ["token", "create", "--name", "x", "--team", "t", "--scope", "reed", "--tokens", str(path)])
    assert bad.exit_code == 1 and "unknown scope 'reed'" in bad.output


def test_token_create_starts_a_private_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from featurestream.cli.app import app

    path = tmp_path / "secrets" / "tokens.yaml"
    monkeypatch.setenv("FEATURESTREAM_TOKENS", str(path))
    result = CliRunner().invoke(app, ["token", "create", "--name", "a", "--team", "t", "--scope", "*"])
    assert result.exit_code == 0, result.output
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_tokens_file(path).tokens[0].hash == hash_token(result.stdout.strip())
    refused = CliRunner().invoke(app, ["token", "create", "--name", "b", "--team", "t", "--scope", "read",
                                       "--hash-personal"])
    assert refused.exit_code == 1 and "needs a salt" in refused.output
