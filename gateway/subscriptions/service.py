"""Starting and stopping subscriptions in a gateway process (called from gateway/app.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import webhook
from .api import SubscriptionRoutes
from .core import Subscriptions
from .dispatch import Dispatcher

if TYPE_CHECKING:
    from ..app import Gateway


class SubscriptionService:
    def __init__(self, gateway: Gateway) -> None:
        s = gateway.settings
        webhook.configure(s)
        self.core = Subscriptions(gateway)
        self.routes = SubscriptionRoutes(self.core)
        self.dispatcher = Dispatcher(
            self.core, s.subscriptions_poll_ms / 1000, max(1, s.subscriptions_sweep_s)
        )
        # New streams are linked to the pattern subscriptions they match, in create.lua.
        gateway.store.subscription_links = self.core.patterns.links_for

    def start(self) -> None:
        self.dispatcher.start()

    async def stop(self) -> None:
        await self.dispatcher.stop()
        await self.core.stop()
