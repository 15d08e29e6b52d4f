"""Who is asking, and what they may see: the contract between the front ends and the policy.

Front ends turn a request's token into a ``Principal`` with ``authenticate`` and hand it to the
service; the service asks the policy to ``authorize`` the features before reading and to
``present`` the values after (hashing, audit log, usage counts). ``OpenAccess`` is the policy
when no tokens are configured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from featurestream.serving.refs import FeatureRef
    from featurestream.serving.service import ServedRows


@dataclass(frozen=True)
class Principal:
    name: str
    team: str = ""
    scopes: frozenset[str] = field(default_factory=frozenset)


ANONYMOUS = Principal("anonymous", scopes=frozenset({"*"}))


class AccessPolicy(Protocol):
    def authenticate(self, token: str | None) -> Principal:
        """The principal of a bearer token; ServingError UNAUTHENTICATED when absent or unknown."""

    def authorize(self, principal: Principal, refs: Sequence[FeatureRef], method: str) -> None:
        """ServingError PERMISSION_DENIED naming the first feature the principal may not read."""

    def present(self, principal: Principal, rows: ServedRows, method: str) -> ServedRows:
        """The rows as this principal may see them (e.g. personal values hashed), after
        auditing PII reads and counting usage."""


class OpenAccess:
    """Everyone may read everything: the policy when no tokens are configured."""

    def authenticate(self, token: str | None) -> Principal:
        return ANONYMOUS

    def authorize(self, principal: Principal, refs: Sequence[FeatureRef], method: str) -> None:
        return None

    def present(self, principal: Principal, rows: ServedRows, method: str) -> ServedRows:
        return rows
