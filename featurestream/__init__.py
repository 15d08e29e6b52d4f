"""featurestream: a streaming-first, real-time feature store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Client", "OnlineReader", "__version__", "training_set"]

if TYPE_CHECKING:
    from featurestream.offline.training import training_set
    from featurestream.serving.client import Client
    from featurestream.serving.reader import OnlineReader


def __getattr__(name: str) -> Any:
    # Lazy: ``import featurestream`` stays cheap (no gRPC) until the client is used.
    if name == "Client":
        from featurestream.serving.client import Client

        return Client
    if name == "OnlineReader":  # the serving layer in-process, without a server
        from featurestream.serving.reader import OnlineReader

        return OnlineReader
    if name == "training_set":  # pandas/pyarrow load only when a training set is built
        from featurestream.offline.training import training_set

        return training_set
    raise AttributeError(f"module 'featurestream' has no attribute {name!r}")
