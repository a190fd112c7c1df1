"""ds-gateway: a Durable Streams server that keeps its streams in Redis Streams."""

__version__ = "0.1.0"
