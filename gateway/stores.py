"""The Store every process that writes streams uses, configured from the
gateway's settings: the gateway, the Postgres source worker and `dsgw publish`
create streams alike (producer limits, which JSON streams the sink receives,
whether new streams are tiered, and the pattern subscriptions a new stream
is linked to at creation)."""

from __future__ import annotations

from typing import Any

from .settings import Settings
from .store import Store
from .subscriptions.patterns import PatternCache


def configured_store(mux: Any, publish_command: str, settings: Settings) -> Store:
    store = Store(
        mux,
        publish_command=publish_command,
        sink_filter=settings.sink_filter,
        max_producers=settings.max_producers_per_stream,
        producer_idle_s=settings.producer_idle_s,
        tiered=settings.retention_enabled,
    )
    # A stream created outside the gateway (by the source worker, say) must
    # wake the pattern subscriptions it matches like any other.
    store.subscription_links = PatternCache(mux).links_for
    return store
