"""The one aggregation core: aggregators, tiles and windows, shared by stream and batch paths.

See ``docs/aggregation.md`` for the semantics (windows, near and far edge, late events) and
the byte formats.
"""

from featurestream.aggregation.aggregators import (
    AGGREGATORS,
    IR,
    Aggregator,
    make_aggregator,
)
from featurestream.aggregation.codec import CodecError
from featurestream.aggregation.distinct import EXACT_UP_TO, HLL_LG_K, DistinctSet
from featurestream.aggregation.layout import FeatureAggregator, TileGroup, ViewLayout
from featurestream.aggregation.state import FoldResult, StateLayoutError, ViewState
from featurestream.aggregation.view import ViewAggregator
from featurestream.aggregation.windows import (
    Instant,
    TileKey,
    WindowSpec,
    from_millis,
    tile_start,
    to_millis,
)

__all__ = [
    "AGGREGATORS",
    "EXACT_UP_TO",
    "HLL_LG_K",
    "IR",
    "Aggregator",
    "CodecError",
    "DistinctSet",
    "FeatureAggregator",
    "FoldResult",
    "Instant",
    "StateLayoutError",
    "TileGroup",
    "TileKey",
    "ViewAggregator",
    "ViewLayout",
    "ViewState",
    "WindowSpec",
    "from_millis",
    "make_aggregator",
    "tile_start",
    "to_millis",
]
