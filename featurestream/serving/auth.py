"""API tokens, scopes and PII rules: the ``AccessPolicy`` used when a tokens file is configured.

A tokens file (YAML) maps the SHA-256 of each token to a name, a team and scopes; it never
holds a token itself. ``TokenPolicy`` checks a request's scopes before the read, and after it
hashes ``personal`` values for the principals configured so, writes one audit record per
request that touched PII features and counts reads per feature and token (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from featurestream.definitions.errors import Problem
from featurestream.definitions.yaml_source import PathKey, YamlDocument, YamlReadError, read_yaml
from featurestream.serving.access import AccessPolicy, OpenAccess, Principal
from featurestream.serving.audit import AuditLog, UsageCounter, registry_sink
from featurestream.serving.refs import ServingError

if TYPE_CHECKING:
    from featurestream.registry.store import Registry
    from featurestream.serving.refs import FeatureRef
    from featurestream.serving.service import ServedRow, ServedRows

ENV_TOKENS = "FEATURESTREAM_TOKENS"
DEFAULT_TOKENS_FILE = "tokens.yaml"
TOKEN_PREFIX = "fst_"
ALL = "*"
METHOD_SCOPES = {"online": "read", "as_of": "read", "subscribe": "read", "push": "push", "catalog": "catalog"}
READ_METHODS = frozenset({"online", "as_of", "subscribe"})
PII_SCOPES = {"personal": "pii:personal", "sensitive": "pii:sensitive"}

Scope = Literal["read", "push", "catalog", "pii:personal", "pii:sensitive", "*"]
Label = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
TokenHash = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]


# ---------------------------------------------------------------- tokens and values


def new_token() -> str:
    """A fresh API token: 256 random bits, URL-safe, with a prefix secret scanners can match."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """``sha256:<hex>`` of a token, as the tokens file stores it.

    A fast unsalted hash is enough here, unlike for passwords: tokens are 256 random bits, so
    neither a dictionary nor brute force can invert the hash however fast it is, and a slow KDF
    (bcrypt, argon2) would only add milliseconds to every request.
    """
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def hash_value(salt: bytes, value: Any) -> str:
    """HMAC-SHA256 (hex) of a served value under the organisation's salt: equal values hash
    equally, so joins still work, but the raw value is never returned. Strings are hashed as
    they are, other values as compact JSON (``42``, ``1.5``, ``true``)."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True)
    return hmac.new(salt, text.encode(), hashlib.sha256).hexdigest()


def scope_allows(scopes: frozenset[str], needed: str) -> bool:
    """Each scope grants exactly what it names (``pii:sensitive`` does not imply ``pii:personal``);
    ``*`` grants everything."""
    return ALL in scopes or needed in scopes


# ---------------------------------------------------------------- the tokens file


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class TokenEntry(_Model):
    name: Label
    team: Label
    scopes: tuple[Scope, ...] = Field(min_length=1)
    hash: TokenHash
    hash_personal: bool | None = None
    """True/False overrides the file's team list for this token."""
    created_at: AwareDatetime | None = None
    description: str = ""


class TokensFile(_Model):
    tokens: tuple[TokenEntry, ...] = ()
    hash_personal: tuple[Label, ...] = ()
    """Teams whose tokens get ``personal`` features as HMAC hashes instead of raw values."""
    salt: str | None = Field(default=None, min_length=16)
    salt_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name of the environment variable holding the salt (keeps the secret out of the file)."""
    audit_log: str | None = None
    """Path of the PII audit log, relative to the tokens file; default ``pii-audit.jsonl`` beside it."""
    usage_flush_seconds: float = Field(default=5.0, gt=0, le=3600)

    def hashes_personal(self, entry: TokenEntry) -> bool:
        return entry.hash_personal if entry.hash_personal is not None else entry.team in self.hash_personal


class TokenConfigError(ValueError):
    """A tokens file was refused; ``problems`` lists every problem found, with file and line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line or 0, p.field))
        count = len(self.problems)
        lines = [f"{count} problem{'s' if count != 1 else ''} in the tokens file:"]
        super().__init__("\n".join([*lines, *(f"  {p}" for p in self.problems)]))


_FRIENDLY = {"extra_forbidden": "unknown key", "missing": "required key is missing", "too_short": "must not be empty"}


def _message(error: Any) -> str:
    if error["type"] in _FRIENDLY:
        return _FRIENDLY[error["type"]]
    pattern = str(error.get("ctx", {}).get("pattern", ""))
    if pattern.startswith("^sha256"):
        return "must be 'sha256:' and 64 lower-case hex digits (see 'featurestream token create')"
    if pattern.startswith("^[A-Za-z0-9]"):
        return "letters, digits, '.', '_' and '-' only, at most 63, starting with a letter or digit"
    return str(error["msg"]).removeprefix("Value error, ")


def _dotted(loc: PathKey, data: Any) -> str:
    """``tokens[fraud-model].scopes[1]``: list items by name when they have one."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            item = data[part] if isinstance(data, list) and part < len(data) else None
            name = item.get("name") if isinstance(item, dict) else None
            text += f"[{name}]" if isinstance(name, str) else f"[{part}]"
            data = item
        else:
            text += f".{part}" if text else str(part)
            data = data.get(part) if isinstance(data, dict) else None
    return text


def _cross_check(config: TokensFile) -> list[tuple[PathKey, str]]:
    """What no single key can check: unique names and hashes, where the salt comes from."""
    problems: list[tuple[PathKey, str]] = []
    names: dict[str, int] = {}
    hashes: dict[str, int] = {}
    for i, entry in enumerate(config.tokens):
        if entry.name in names:
            problems.append((("tokens", i, "name"), f"token name '{entry.name}' is already used by tokens[{names[entry.name]}]"))
        names.setdefault(entry.name, i)
        if entry.hash in hashes:
            problems.append((("tokens", i, "hash"), f"the same token hash as tokens[{hashes[entry.hash]}]"))
        hashes.setdefault(entry.hash, i)
    if config.salt is not None and config.salt_env is not None:
        problems.append((("salt_env",), "give salt or salt_env, not both"))
    hashing = bool(config.hash_personal) or any(e.hash_personal for e in config.tokens)
    if hashing and config.salt is None and config.salt_env is None:
        problems.append((("hash_personal",), "hashing personal values needs a salt: set salt_env (or salt)"))
    return problems


def parse_tokens(document: YamlDocument) -> TokensFile:
    """Validate a parsed tokens file; raise ``TokenConfigError`` naming every problem's line."""
    file = str(document.path)
    data = {} if document.data is None else document.data
    if not isinstance(data, dict):
        raise TokenConfigError([Problem(file, 1, "", "expected a mapping with keys 'tokens', 'hash_personal', ...")])
    try:
        config = TokensFile.model_validate(data)
    except ValidationError as exc:
        raise TokenConfigError(
            [
                Problem(file, document.line_of(tuple(e["loc"])), _dotted(tuple(e["loc"]), data), _message(e))
                for e in exc.errors(include_url=False)
            ]
        ) from None
    problems = _cross_check(config)
    if problems:
        raise TokenConfigError([Problem(file, document.line_of(loc), _dotted(loc, data), m) for loc, m in problems])
    return config


def read_tokens_file(path: Path) -> TokensFile:
    if not path.is_file():
        raise TokenConfigError([Problem(str(path), None, "", "no such tokens file")])
    try:
        return parse_tokens(read_yaml(path))
    except YamlReadError as exc:
        raise TokenConfigError([Problem(str(path), exc.line, "", str(exc))]) from None


def default_tokens_path() -> Path:
    return Path(os.environ.get(ENV_TOKENS) or DEFAULT_TOKENS_FILE)


def _salt(config: TokensFile, path: Path) -> bytes | None:
    if config.salt is not None:
        return config.salt.encode()
    if config.salt_env is None:
        return None
    value = os.environ.get(config.salt_env, "")
    if len(value) < 16:
        state = "is not set" if not value else "is shorter than 16 characters"
        raise TokenConfigError([Problem(str(path), None, "salt_env", f"environment variable {config.salt_env} {state}")])
    return value.encode()


# ---------------------------------------------------------------- the policy


class TokenPolicy:
    """Bearer tokens from a tokens file; scopes per method and per PII level; hashing, audit, usage."""

    def __init__(
        self,
        config: TokensFile,
        *,
        salt: bytes | None = None,
        audit: AuditLog | None = None,
        usage: UsageCounter | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        problems = _cross_check(config)
        if problems:
            raise ValueError("; ".join(f"{'.'.join(map(str, loc))}: {m}" for loc, m in problems))
        self.config = config
        self._salt = salt
        self.audit = audit
        self.usage = usage
        self._clock = clock or (lambda: datetime.now(UTC))
        self._digests = [(bytes.fromhex(e.hash.removeprefix("sha256:")), e) for e in config.tokens]
        self._principals = {e.name: Principal(e.name, e.team, frozenset(e.scopes)) for e in config.tokens}
        self._hashing = {e.name: config.hashes_personal(e) for e in config.tokens}
        if salt is None and any(self._hashing.values()):
            raise ValueError("hashing personal values needs a salt")

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise ServingError("UNAUTHENTICATED", "this server requires an API token (authorization: Bearer <token>)")
        digest = hashlib.sha256(token.encode()).digest()
        found: TokenEntry | None = None
        # Compare with every entry in constant time, without stopping at the match.
        for stored, entry in self._digests:
            if hmac.compare_digest(digest, stored):
                found = entry
        if found is None:
            raise ServingError("UNAUTHENTICATED", "unknown API token")
        return self._principals[found.name]

    def _known(self, principal: Principal) -> Principal:
        # A principal not issued by authenticate (e.g. the service's ANONYMOUS default) gets nothing.
        if self._principals.get(principal.name) != principal:
            raise ServingError("UNAUTHENTICATED", "the request carries no API token this server knows")
        return principal

    def hashes_personal(self, principal: Principal) -> bool:
        return self._hashing.get(principal.name, False)

    def authorize(self, principal: Principal, refs: Sequence[FeatureRef], method: str) -> None:
        self._known(principal)
        who = f"token '{principal.name}' (team '{principal.team}')"
        needed = METHOD_SCOPES.get(method, method)
        if not scope_allows(principal.scopes, needed):
            raise ServingError("PERMISSION_DENIED", f"{who} lacks scope '{needed}', needed for {method} requests")
        if method not in READ_METHODS:
            return
        for ref in refs:
            pii = ref.feature.pii
            if pii == "none" or (pii == "personal" and self.hashes_personal(principal)):
                continue
            scope = PII_SCOPES[pii]
            if not scope_allows(principal.scopes, scope):
                raise ServingError(
                    "PERMISSION_DENIED", f"{who} may not read '{ref.name}' (pii: {pii}): it needs scope '{scope}'"
                )

    def present(self, principal: Principal, rows: ServedRows, method: str) -> ServedRows:
        now = self._clock()
        hashed = {
            i for i, ref in enumerate(rows.refs)
            if ref.feature.pii == "personal" and self.hashes_personal(principal)
        }
        pii = [ref for ref in rows.refs if ref.feature.pii != "none"]
        if pii and rows.rows and self.audit is not None:
            self._audit(self.audit, principal, rows, method, pii, hashed, now)
        if self.usage is not None and method in READ_METHODS and rows.rows:
            self.usage.add_many(_usage_keys(rows.refs), principal.name, len(rows.rows), now)
        if not hashed:
            return rows
        return replace(rows, rows=[self._hash_row(row, hashed) for row in rows.rows])

    def _hash_row(self, row: ServedRow, columns: set[int]) -> ServedRow:
        assert self._salt is not None  # checked in __init__
        values = [
            v._replace(value=hash_value(self._salt, v.value)) if i in columns and v.value is not None else v
            for i, v in enumerate(row.values)
        ]
        return replace(row, values=values)

    @staticmethod
    def _audit(
        audit: AuditLog, principal: Principal, rows: ServedRows, method: str, pii: list[FeatureRef],
        hashed: set[int], now: datetime,
    ) -> None:
        key_fields = {k for ref in pii for k in ref.served.key_fields}
        record: dict[str, Any] = {
            "time": now.isoformat(),
            "principal": principal.name,
            "team": principal.team,
            "method": method,
            "features": {ref.name: ref.feature.pii for ref in pii},
            "hashed": [rows.refs[i].name for i in sorted(hashed)],
            "entities": [{k: v for k, v in row.entity.items() if k in key_fields} for row in rows.rows],
        }
        if method != "online":  # the times asked for (as_of); online reads are all at "time"
            record["at_ms"] = [row.at_ms for row in rows.rows]
        try:
            audit.write(record)
        except OSError as exc:
            # Fail closed: PII is not returned when its read cannot be recorded.
            raise ServingError("UNAVAILABLE", f"the PII audit log cannot be written: {exc}") from exc

    def flush_usage(self) -> int:
        return self.usage.flush() if self.usage is not None else 0

    def close(self) -> None:
        """Flush the usage counts and close the audit log (call at server shutdown)."""
        if self.usage is not None:
            self.usage.close()
        if self.audit is not None:
            self.audit.close()


class CountingOpenAccess(OpenAccess):
    """Everyone may read everything, and reads are counted under the client ``anonymous``."""

    def __init__(self, usage: UsageCounter, clock: Callable[[], datetime] | None = None) -> None:
        self.usage = usage
        self._clock = clock or (lambda: datetime.now(UTC))

    def present(self, principal: Principal, rows: ServedRows, method: str) -> ServedRows:
        if method in READ_METHODS and rows.rows:
            self.usage.add_many(_usage_keys(rows.refs), principal.name, len(rows.rows), self._clock())
        return rows

    def flush_usage(self) -> int:
        return self.usage.flush()

    def close(self) -> None:
        self.usage.close()


def _usage_keys(refs: Sequence[FeatureRef]) -> list[tuple[str, int, str]]:
    return [(*ref.view_key, ref.feature.name) for ref in refs]


def load_policy(
    path: Path | None,
    *,
    registry: Registry | None = None,
    project: str | None = None,
    clock: Callable[[], datetime] | None = None,
) -> AccessPolicy:
    """The policy of a tokens file, or ``OpenAccess`` without one.

    With ``registry`` and ``project`` read counts are flushed to the registry's usage table (also
    under ``OpenAccess``, as client ``anonymous``); call ``close_policy`` at shutdown.
    """
    if (registry is None) != (project is None):
        raise ValueError("give both registry and project, or neither")

    def counter(interval_s: float) -> UsageCounter | None:
        if registry is None or project is None:
            return None
        return UsageCounter(project, registry_sink(registry), interval_s)

    if path is None:
        usage = counter(5.0)
        return OpenAccess() if usage is None else CountingOpenAccess(usage, clock)
    config = read_tokens_file(path)
    salt = _salt(config, path)
    audit_path = path.parent / (config.audit_log or "pii-audit.jsonl")
    return TokenPolicy(config, salt=salt, audit=AuditLog(audit_path), usage=counter(config.usage_flush_seconds),
                       clock=clock)


def close_policy(policy: AccessPolicy) -> None:
    """Flush and close what a policy holds (a no-op for plain ``OpenAccess``)."""
    close = getattr(policy, "close", None)
    if callable(close):
        close()
