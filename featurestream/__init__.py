"""featurestream: a streaming-first, real-time feature store."""

__version__ = "0.1.0"
