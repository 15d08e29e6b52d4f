"""Seeded, pure generator of demo card transactions for the ``transactions`` source.

``generate_transactions(count, seed, now=...)`` yields ``DemoEvent``s: the exact key and value
bytes to send, what kind of event each one is, and (for well-formed ones) the parsed event and its
event time. The same arguments always give the same events, so a test can recompute reference
feature values from exactly what a producer sent.

What the stream looks like:

* a few thousand users (``u_00000`` ...) with Zipf-like activity: the busiest 1% of users make
  about 40% of the transactions;
* each user has a home country (most transactions are there), a few favourite merchants (most
  transactions go to them, the rest to a popularity-weighted pool) and a log-normal amount
  distribution of their own;
* event time is the scheduled send time (``now + index / rate``; just ``now`` when ``rate`` is
  0) minus up to two seconds of jitter, in milliseconds; ``ts`` is an ISO-8601 string (``Z`` or
  ``+00:00``) or epoch milliseconds, about half each;
* kinds: ``valid``; ``out_of_order`` (event time 5 s to 15 min in the past); ``late`` (65 min to
  6 h in the past, beyond a 1 h window); ``malformed:<reason>`` with the reasons in
  ``MALFORMED_REASONS`` (broken JSON, a required field missing, a wrong JSON type, a negative
  amount, an absurd string beyond the declared ``max_length``, an unparseable timestamp).

Every event is keyed by the user it was generated for (UTF-8 ``user_id``), malformed ones too, so
one user's events share a partition even when the payload's ``user_id`` is broken.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

KIND_VALID = "valid"
KIND_OUT_OF_ORDER = "out_of_order"
KIND_LATE = "late"
WELL_FORMED_KINDS = (KIND_VALID, KIND_OUT_OF_ORDER, KIND_LATE)
MALFORMED_PREFIX = "malformed:"
MALFORMED_REASONS = (
    "broken_json",
    "missing_field",
    "wrong_type",
    "negative_amount",
    "absurd_string",
    "bad_timestamp",
)
FIELDS = ("user_id", "amount", "merchant", "country", "ts")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

# Country of the card holders (weights) and where they pay when abroad.
_COUNTRIES = {
    "DE": 22, "FR": 16, "GB": 12, "ES": 10, "IT": 10, "NL": 8, "PL": 6,
    "SE": 4, "BE": 4, "AT": 4, "PT": 2, "US": 2,
}  # fmt: skip
ABROAD_SHARE = 0.08
MERCHANTS = 400
FAVOURITE_SHARE = 0.7
ISO_SHARE = 0.5
USER_ZIPF_EXPONENT = 1.1
USER_ZIPF_OFFSET = 5
JITTER_MS = (0, 2_000)
OUT_OF_ORDER_MS = (5_000, 15 * 60_000)
LATE_MS = (65 * 60_000, 6 * 3_600_000)


@dataclass(frozen=True, slots=True, eq=False)
class DemoEvent:
    """One event as sent: ``key`` and ``value`` are the Kafka message's bytes.

    ``kind`` is ``valid``, ``out_of_order``, ``late`` or ``malformed:<reason>``. For the first
    three, ``event`` is the parsed JSON (``ts`` as sent: ISO string or epoch ms) and
    ``event_time`` the UTC instant it denotes; for malformed events both are None.
    """

    index: int
    key: bytes
    value: bytes
    kind: str
    event: dict[str, Any] | None
    event_time: datetime | None

    @property
    def user_id(self) -> str:
        return self.key.decode()

    @property
    def well_formed(self) -> bool:
        return self.event is not None

    @property
    def malformed_reason(self) -> str | None:
        return self.kind.removeprefix(MALFORMED_PREFIX) if self.kind.startswith(MALFORMED_PREFIX) else None


@dataclass(frozen=True, slots=True)
class _User:
    user_id: str
    home: str
    favourites: tuple[str, ...]
    mu: float
    sigma: float


def _cumulative(weights: list[float]) -> list[float]:
    return list(itertools.accumulate(weights))


def _pick(rng: random.Random, items: list[Any] | tuple[Any, ...], cumulative: list[float]) -> Any:
    return items[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])]


class _World:
    """Users, merchants and their weights; depends only on the seed and the number of users."""

    def __init__(self, seed: int, users: int) -> None:
        rng = random.Random(f"featurestream-demo-world:{seed}:{users}")
        self.merchants = [f"m_{i:04d}" for i in range(MERCHANTS)]
        rng.shuffle(self.merchants)  # popularity rank is not the id order
        self.merchant_cum = _cumulative([(rank + 1) ** -0.8 for rank in range(MERCHANTS)])
        self.countries = list(_COUNTRIES)
        self.country_cum = _cumulative([float(w) for w in _COUNTRIES.values()])
        self.users: list[_User] = []
        for i in range(users):
            home = _pick(rng, self.countries, self.country_cum)
            favourites = {_pick(rng, self.merchants, self.merchant_cum) for _ in range(rng.randint(2, 6))}
            self.users.append(
                _User(
                    user_id=f"u_{i:05d}",
                    home=home,
                    favourites=tuple(sorted(favourites)),
                    mu=math.log(25.0) + rng.gauss(0.0, 0.6),
                    sigma=rng.uniform(0.6, 1.1),
                )
            )
        ranked = list(self.users)
        rng.shuffle(ranked)  # activity rank is not the id order either
        self.ranked_users = ranked
        self.user_cum = _cumulative(
            [(rank + USER_ZIPF_OFFSET) ** -USER_ZIPF_EXPONENT for rank in range(users)]
        )

    def user(self, rng: random.Random) -> _User:
        user: _User = _pick(rng, self.ranked_users, self.user_cum)
        return user

    def merchant(self, rng: random.Random, user: _User) -> str:
        if rng.random() < FAVOURITE_SHARE:
            return rng.choice(user.favourites)
        merchant: str = _pick(rng, self.merchants, self.merchant_cum)
        return merchant

    def country(self, rng: random.Random, user: _User) -> str:
        if rng.random() >= ABROAD_SHARE:
            return user.home
        while (country := _pick(rng, self.countries, self.country_cum)) == user.home:
            pass
        return str(country)


def to_millis(instant: datetime) -> int:
    """Whole epoch milliseconds of an aware datetime (truncated)."""
    if instant.tzinfo is None:
        raise ValueError("expected a timezone-aware datetime")
    return (instant - EPOCH) // _MS


def from_millis(millis: int) -> datetime:
    return EPOCH + timedelta(milliseconds=millis)


def parse_event_time(ts: Any) -> datetime:
    """The UTC instant of a well-formed ``ts``: epoch milliseconds (int) or an ISO-8601 string with offset."""
    if isinstance(ts, int) and not isinstance(ts, bool):
        return from_millis(ts)
    if isinstance(ts, str):
        parsed = datetime.fromisoformat(ts)
        if parsed.tzinfo is None:
            raise ValueError(f"timestamp without a UTC offset: {ts!r}")
        return parsed.astimezone(UTC)
    raise ValueError(f"not a timestamp: {ts!r}")


def _format_ts(rng: random.Random, millis: int) -> str | int:
    if rng.random() >= ISO_SHARE:
        return millis
    text = from_millis(millis).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z") if rng.random() < 0.5 else text


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _dumps(event: dict[str, Any]) -> bytes:
    return _ENCODER.encode(event).encode()


def _malformed(rng: random.Random, reason: str, event: dict[str, Any]) -> bytes:
    """The bytes of ``event`` broken in the way ``reason`` names; each is refused by the source schema."""
    broken = dict(event)
    if reason == "broken_json":
        text = _dumps(event).decode()
        variant = rng.randrange(3)
        if variant == 0:
            return text[: rng.randint(1, len(text) - 2)].encode()  # truncated
        if variant == 1:
            return repr(event).encode()  # Python repr: single quotes
        return (text + "}").encode()  # trailing garbage
    if reason == "missing_field":
        del broken[rng.choice(FIELDS)]
    elif reason == "wrong_type":
        name = rng.choice(FIELDS)
        broken[name] = {
            "user_id": 4711,
            "amount": f"{event['amount']:.2f}",
            "merchant": {"id": event["merchant"]},
            "country": [event["country"]],
            "ts": True,
        }[name]
    elif reason == "negative_amount":
        broken["amount"] = -round(abs(event["amount"]) + 0.01, 2)
    elif reason == "absurd_string":
        name = rng.choice(("user_id", "merchant", "country"))
        broken[name] = {
            "user_id": "u_" + "9" * 5000,
            "merchant": "\U0001f4b3" * 300,
            "country": rng.choice(("Germany", "DEU", "d\x00e")),
        }[name]
    elif reason == "bad_timestamp":
        broken["ts"] = rng.choice(("yesterday", "2024-13-45T25:61:00Z", "", "1700000000000ms"))
    else:
        raise ValueError(f"unknown malformed reason {reason!r}")
    return _dumps(broken)


def generate_transactions(
    count: int,
    seed: int = 0,
    *,
    now: datetime | None = None,
    rate: float = 0.0,
    users: int = 3000,
    malformed_share: float = 0.002,
    late_share: float = 0.02,
    out_of_order_share: float = 0.05,
) -> Iterator[DemoEvent]:
    """Yield ``count`` demo transactions; a pure function of its arguments.

    ``now`` anchors event time (default: the current time, which is the only impure default;
    pass it to reproduce a run). With ``rate`` > 0 event ``i`` is scheduled at
    ``now + i / rate``, matching a producer paced to ``rate`` events per second.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    if users < 1:
        raise ValueError("users must be >= 1")
    if rate < 0:
        raise ValueError("rate must be >= 0 (0: as fast as possible)")
    shares = (malformed_share, late_share, out_of_order_share)
    if any(not 0 <= share <= 1 for share in shares) or sum(shares) > 1:
        raise ValueError("shares must each be in [0, 1] and add up to at most 1")
    anchor = to_millis(now if now is not None else datetime.now(UTC))
    return _generate(count, seed, anchor, rate, users, shares)


def _generate(
    count: int, seed: int, anchor: int, rate: float, users: int, shares: tuple[float, float, float]
) -> Iterator[DemoEvent]:
    malformed_share, late_share, out_of_order_share = shares
    world = _World(seed, users)
    rng = random.Random(f"featurestream-demo-events:{seed}")
    for index in range(count):
        user = world.user(rng)
        scheduled = anchor + (round(index * 1000 / rate) if rate > 0 else 0)
        roll = rng.random()
        if roll < malformed_share:
            kind = MALFORMED_PREFIX + rng.choice(MALFORMED_REASONS)
            lag = rng.randint(*JITTER_MS)
        elif roll < malformed_share + late_share:
            kind, lag = KIND_LATE, rng.randint(*LATE_MS)
        elif roll < malformed_share + late_share + out_of_order_share:
            kind, lag = KIND_OUT_OF_ORDER, rng.randint(*OUT_OF_ORDER_MS)
        else:
            kind, lag = KIND_VALID, rng.randint(*JITTER_MS)
        millis = scheduled - lag
        amount = round(min(rng.lognormvariate(user.mu, user.sigma), 20_000.0), 2)
        event: dict[str, Any] = {
            "user_id": user.user_id,
            "amount": amount,
            "merchant": world.merchant(rng, user),
            "country": world.country(rng, user),
            "ts": _format_ts(rng, millis),
        }
        key = user.user_id.encode()
        if kind.startswith(MALFORMED_PREFIX):
            value = _malformed(rng, kind.removeprefix(MALFORMED_PREFIX), event)
            yield DemoEvent(index, key, value, kind, None, None)
        else:
            yield DemoEvent(index, key, _dumps(event), kind, event, from_millis(millis))
