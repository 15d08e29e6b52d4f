"""A small complete project (entities, a source, two views, a service, a consumer) for tests and docs.

``sample_spec()`` returns a fresh JSON-able spec to modify; ``sample_definition()`` the model.
"""

from __future__ import annotations

import copy
from typing import Any

from featurestream.definitions.models import ProjectDefinition

_SPEC: dict[str, Any] = {
    "project": {"name": "shop", "description": "Sample shop project.", "owner": "ml@example.com"},
    "entities": [
        {"name": "user", "join_keys": [{"name": "user_id"}], "description": "A customer."},
        {"name": "merchant", "join_keys": [{"name": "merchant"}], "description": "A merchant."},
    ],
    "sources": [
        {
            "name": "transactions",
            "topic": "shop.transactions",
            "event_time_field": "ts",
            "description": "Card payments.",
            "owner": "payments@example.com",
            "tags": ["payments"],
            "fields": [
                {"name": "user_id", "type": "string"},
                {"name": "merchant", "type": "string"},
                {"name": "amount", "type": "float64", "description": "Amount in EUR."},
                {"name": "country", "type": "string"},
                {"name": "ts", "type": "timestamp"},
            ],
        }
    ],
    "feature_views": [
        {
            "name": "user_txn",
            "entity": "user",
            "source": "transactions",
            "description": "Spending of a user.",
            "owner": "fraud@example.com",
            "tags": ["fraud"],
            "features": [
                {"name": "txn_count_1h", "aggregation": "count", "window": "1h",
                 "description": "Payments in the last hour.", "example": 3},
                {"name": "amount_sum_1h", "aggregation": "sum", "field": "amount", "window": "1h",
                 "description": "EUR spent in the last hour.", "example": 42.5, "tags": ["velocity"]},
                {"name": "amount_max_1d", "aggregation": "max", "field": "amount", "window": "1d",
                 "description": "Largest payment in the last day."},
                {"name": "last_country", "aggregation": "last", "field": "country", "pii": "personal"},
            ],
        },
        {
            "name": "merchant_fr",
            "entity": "merchant",
            "source": "transactions",
            "description": "French payments at a merchant.",
            "filter": [{"field": "country", "op": "eq", "value": "FR"}],
            "features": [
                {"name": "txn_count_15m", "aggregation": "count", "window": {"type": "tumbling", "size": "15m"},
                 "description": "French payments in the last closed quarter hour.", "owner": "risk@example.com",
                 "example": 7},
            ],
        },
    ],
    "feature_services": [
        {"name": "fraud", "features": ["user_txn", "merchant_fr:txn_count_15m"], "owner": "fraud@example.com"}
    ],
    "consumers": [
        {"name": "fraud_model", "kind": "model", "feature_services": ["fraud"], "owner": "fraud@example.com"},
        {"name": "dashboard", "kind": "dashboard", "features": ["user_txn:amount_sum_1h"]},
    ],
}


def sample_spec(project: str = "shop") -> dict[str, Any]:
    spec = copy.deepcopy(_SPEC)
    spec["project"]["name"] = project
    return spec


def sample_definition(project: str = "shop") -> ProjectDefinition:
    return ProjectDefinition.model_validate(sample_spec(project))
