"""Subscription globs (PROTOCOL.md 6.2) and configuration normalisation: pure logic."""

from __future__ import annotations

import pytest

from gateway.subscriptions.config import parse_config
from gateway.subscriptions.errors import SubError
from gateway.subscriptions.patterns import glob_match


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("events/*", "events/a", True),
        ("events/*", "events/a/b", False),
        ("events/*", "events", False),
        ("events/*", "other/a", False),
        ("events/**", "events", True),
        ("events/**", "events/a/b/c", True),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**/b", "a/x/c", False),
        ("**", "x/y", True),
        ("*", "x/y", False),
        ("*/b", "a/b", True),
        ("a.b/*", "axb/c", False),  # every other character matches itself
        ("/events/*/", "events/a", True),  # slashes around are not part of paths
    ],
)
def test_glob_segments(pattern, path, matches):
    assert glob_match(pattern, path) is matches


def test_configurations_that_differ_only_in_stream_order_hash_the_same():
    a = parse_config({"type": "pull-wake", "streams": ["b", "a", "a"], "wake_stream": "w"})
    b = parse_config({"type": "pull-wake", "streams": ["a", "b"], "wake_stream": "/w/"})
    assert a.hash() == b.hash()
    assert a.hash() != parse_config({"type": "pull-wake", "streams": ["a"], "wake_stream": "w"}).hash()
    assert a.lease_ttl_ms == 30_000


@pytest.mark.parametrize(
    "body",
    [
        {"type": "pull-wake", "streams": ["__ds/x"], "wake_stream": "w"},
        {"type": "pull-wake", "streams": ["a"], "wake_stream": "w", "lease_ttl_ms": True},
        {"type": "pull-wake", "streams": ["a"], "wake_stream": "w", "lease_ttl_ms": 600_001},
        {"type": "webhook", "streams": ["a"], "webhook": {"url": 5}},
        {"type": "pull-wake", "streams": "a", "wake_stream": "w"},
        {"type": "pull-wake", "streams": ["a\nb"], "wake_stream": "w"},
    ],
)
def test_bad_configurations_are_invalid_requests(body):
    with pytest.raises(SubError) as err:
        parse_config(body)
    assert (err.value.status, err.value.code) == (400, "INVALID_REQUEST")
