"""`featurestream token create|list`: API tokens in a tokens file (docs/security.md).

``create`` prints the new token once on stdout (and nothing else there, so it can be captured)
and appends only its hash to the file, keeping the file's comments and layout when it can.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
import yaml
from rich.table import Table

from featurestream.cli.app import app
from featurestream.cli.registry_cmds import AsJson, console, emit_json, fail
from featurestream.definitions.yaml_source import YamlDocument, YamlReadError, read_yaml

token_app = typer.Typer(help="Create and list API tokens (stored hashed in a tokens file).", no_args_is_help=True)
app.add_typer(token_app, name="token", rich_help_panel="Serving")

TokensOption = Annotated[
    Path | None,
    typer.Option("--tokens", help="Tokens file (default: FEATURESTREAM_TOKENS, else ./tokens.yaml)."),
]


def _path(tokens: Path | None) -> Path:
    from featurestream.serving.auth import default_tokens_path

    return tokens if tokens is not None else default_tokens_path()


def _entry_block(entry: dict[str, Any], indent: str) -> str:
    dumped = yaml.safe_dump([entry], sort_keys=False, default_flow_style=False, allow_unicode=True)
    return "".join(indent + line if line.strip() else line for line in dumped.splitlines(keepends=True))


def _candidates(document: YamlDocument, text: str, entry: dict[str, Any]) -> list[str]:
    """The file with the entry added: as text at the end of the tokens list (comments kept)
    first, else re-dumped. The caller keeps the first one that reads back as intended."""
    data = document.data
    if data is not None and not isinstance(data, dict):
        return []
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    out = []
    if data is None or "tokens" not in data:
        out.append("".join(lines) + "tokens:\n" + _entry_block(entry, "  "))
    else:
        indent = "  "
        first = document.lines.get(("tokens", 0))
        if first is not None:
            line = lines[first - 1]
            stripped = line.lstrip()
            if stripped.startswith("-"):
                indent = line[: len(line) - len(stripped)]
        # Before the next top-level key after 'tokens', or at the end.
        at = document.lines.get(("tokens",), 0)
        after = sorted(n for key, n in document.lines.items() if len(key) == 1 and n > at)
        cut = after[0] - 1 if after else len(lines)
        while cut > at and (not lines[cut - 1].strip() or lines[cut - 1].lstrip().startswith("#")):
            cut -= 1  # comments and blank lines above the next key belong to it
        out.append("".join(lines[:cut]) + _entry_block(entry, indent) + "".join(lines[cut:]))
    merged = dict(data or {})
    merged["tokens"] = [*(merged.get("tokens") or []), entry]
    out.append(yaml.safe_dump(merged, sort_keys=False, default_flow_style=False, allow_unicode=True))
    return out


def _write_atomically(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@token_app.command("create")
def create_cmd(
    name: Annotated[str, typer.Option("--name", help="Token name: the client in audit records and usage counts.")],
    team: Annotated[str, typer.Option("--team", help="Team the token belongs to.")],
    scope: Annotated[list[str], typer.Option("--scope", help="Repeatable: read, push, catalog, pii:personal, "
                                             "pii:sensitive or *.")],
    hash_personal: Annotated[bool | None, typer.Option("--hash-personal/--raw-personal",
                                                        help="Override the team rule: personal values hashed or raw.")] = None,
    description: Annotated[str, typer.Option(help="What the token is for.")] = "",
    tokens: TokensOption = None,
) -> None:
    """Create a token: print it once and append its hash to the tokens file."""
    from pydantic import ValidationError

    from featurestream.serving.auth import (
        Scope,
        TokenConfigError,
        TokenEntry,
        hash_token,
        new_token,
        parse_tokens,
    )

    path = _path(tokens)
    try:
        document = read_yaml(path) if path.exists() else YamlDocument(path, None, {})
        config = parse_tokens(document)
    except TokenConfigError as exc:
        raise fail(str(exc)) from None
    except (YamlReadError, OSError) as exc:
        raise fail(f"{path}: {exc}") from None
    if any(t.name == name for t in config.tokens):
        raise fail(f"{path} already has a token named '{name}'")
    token = new_token()
    entry: dict[str, Any] = {"name": name, "team": team, "scopes": list(dict.fromkeys(scope)), "hash": hash_token(token)}
    if hash_personal is not None:
        entry["hash_personal"] = hash_personal
    if description:
        entry["description"] = description
    entry["created_at"] = datetime.now(UTC).replace(microsecond=0).isoformat()
    unknown = [s for s in scope if s not in get_args(Scope)]
    if unknown:
        raise fail(f"unknown scope {', '.join(map(repr, unknown))} (expected {', '.join(get_args(Scope))})")
    try:
        expected = (*config.tokens, TokenEntry.model_validate(entry))
    except ValidationError as exc:
        flags = {"scopes": "--scope"}
        raise fail("; ".join(
            f"{flags.get(str(e['loc'][0]), '--' + str(e['loc'][0]))}: {e['msg']}" for e in exc.errors(include_url=False)
        )) from None
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    problem = f"cannot append a token to {path}; add it by hand"
    candidates = _candidates(document, text, entry)
    for index, candidate in enumerate(candidates):
        try:
            checked = parse_tokens(YamlDocument(path, yaml.safe_load(candidate), {}))
        except TokenConfigError as exc:
            problem = f"with the new token the file would be refused: {exc}"  # e.g. no salt for --hash-personal
            continue
        except yaml.YAMLError:
            continue
        if checked.tokens == expected and checked.model_dump(exclude={"tokens"}) == config.model_dump(exclude={"tokens"}):
            _write_atomically(path, candidate)
            if index == len(candidates) - 1 and len(candidates) > 1:
                typer.echo(f"note: {path} was rewritten to add the token; its comments were not kept.", err=True)
            break
    else:
        raise fail(problem)
    typer.echo(token)
    typer.echo(f"Token '{name}' (team '{team}') added to {path}. It is shown only once: store it now.", err=True)


@token_app.command("list")
def list_cmd(tokens: TokensOption = None, as_json: AsJson = False) -> None:
    """List the tokens of a tokens file: name, team, scopes, whether personal values are hashed."""
    from featurestream.serving.auth import TokenConfigError, read_tokens_file

    path = _path(tokens)
    try:
        config = read_tokens_file(path)
    except TokenConfigError as exc:
        raise fail(str(exc)) from None
    rows: list[dict[str, Any]] = [
        {"name": t.name, "team": t.team, "scopes": list(t.scopes), "hash_personal": config.hashes_personal(t),
         "created_at": t.created_at.isoformat() if t.created_at else None, "description": t.description,
         "hash": t.hash}
        for t in config.tokens
    ]
    if as_json:
        emit_json({"file": str(path), "tokens": rows})
        return
    table = Table("name", "team", "scopes", "personal", "created", "hash", "description",
                  title=f"{len(rows)} tokens in {path}")
    for t in config.tokens:
        table.add_row(t.name, t.team, ", ".join(t.scopes), "hashed" if config.hashes_personal(t) else "raw",
                      t.created_at.isoformat() if t.created_at else "-", t.hash[:19] + "...", t.description or "-")
    console().print(table)
