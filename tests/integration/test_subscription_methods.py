"""A subscription's URL answers other methods with 405 and an Allow header
listing every method it serves."""

from __future__ import annotations

import uuid

import httpx


def test_a_subscription_answers_405_naming_every_method_it_allows(gateway):
    url = f"{gateway.url}/v1/stream/__ds/subscriptions/methods-{uuid.uuid4().hex[:8]}"
    for method in ("POST", "PATCH"):
        refused = httpx.request(method, url, json={})
        assert refused.status_code == 405
        assert {m.strip() for m in refused.headers["allow"].split(",")} == {"GET", "PUT", "DELETE"}
