from __future__ import annotations

import pytest

from gateway import sse
from gateway.protocol import (
    ProblemError,
    checked_content_type,
    media_type,
    next_cursor,
    parse_expires_at,
    parse_producer,
    parse_stream_closed,
    parse_sub_offset,
    parse_ttl,
    sse_needs_base64,
)

# JSON bodies: tests/unit/test_json_validation.py


@pytest.mark.parametrize("raw", ["abc", "-1", "00060", "+60", "60.5", "1e3", " 60", ""])
def test_bad_ttls(raw):
    with pytest.raises(ProblemError):
        parse_ttl(raw)


def test_good_ttls():
    assert parse_ttl("0") == 0 and parse_ttl("3600") == 3600 and parse_ttl(None) is None


def test_expires_at_forms():
    assert parse_expires_at("2030-01-01T00:00:00Z")[1] == 1893456000000
    assert parse_expires_at("2030-01-01T00:00:00.123+00:00")[1] == 1893456000123
    assert parse_expires_at("2030-01-01T02:00:00+02:00")[1] == 1893456000000
    for bad in ["not-a-timestamp", "2030-01-01", "2030-01-01T00:00:00", "2030-13-01T00:00:00Z"]:
        with pytest.raises(ProblemError):
            parse_expires_at(bad)


def test_producer_headers_go_together_and_are_bounded():
    assert parse_producer(None, None, None) is None
    assert parse_producer("p", "0", "7") == ("p", 0, 7)
    for args in [
        ("p", "0", None),
        ("", "0", "0"),
        ("p", "1abc", "0"),
        ("p", "0", "-1"),
        ("p", str(2**53), "0"),
    ]:
        with pytest.raises(ProblemError) as err:
            parse_producer(*args)
        assert err.value.status == 400


def test_stream_closed_is_true_in_any_case_and_nothing_else():
    assert parse_stream_closed("true") and parse_stream_closed("TRUE")
    assert (
        not parse_stream_closed("false") and not parse_stream_closed("yes") and not parse_stream_closed(None)
    )


def test_sub_offsets():
    assert parse_sub_offset("0") == 0 and parse_sub_offset("12") == 12
    for bad in ["-1", "abc", "1.5", "05", "+1"]:
        with pytest.raises(ProblemError):
            parse_sub_offset(bad)


def test_content_types():
    assert media_type(" Application/JSON ; charset=utf-8") == "application/json"
    assert checked_content_type("text/plain") == "text/plain"
    assert checked_content_type(None) is None
    with pytest.raises(ProblemError):
        checked_content_type("nonsense")
    assert sse_needs_base64("application/octet-stream") and sse_needs_base64("application/x-ndjson")
    assert not sse_needs_base64("text/plain") and not sse_needs_base64("application/json")


def test_cursor_never_goes_backwards():
    now = 1_800_000_000.0
    current = next_cursor(None, now)
    assert next_cursor("12", now) == current  # older client cursor: the current interval
    ahead = next_cursor(current, now)
    assert int(ahead) > int(current)
    assert next_cursor("garbage", now) == current


def test_sse_frames_split_every_line_break_and_cannot_inject_events():
    framed = sse.frame("data", b"a\r\n\r\nevent: control\rdata: x\nb")
    assert framed == b"event: data\ndata:a\ndata:\ndata:event: control\ndata:data: x\ndata:b\n\n"
    control = sse.control_event("0_1", cursor="5", up_to_date=True, closed=False)
    assert (
        control == b'event: control\ndata:{"streamNextOffset":"0_1","streamCursor":"5","upToDate":true}\n\n'
    )
    closed = sse.control_event("0_1", cursor="5", up_to_date=True, closed=True)
    assert b"streamCursor" not in closed and b'"streamClosed":true' in closed


HUGE = "9" * 5000  # beyond Python's 4,300-digit int() limit


@pytest.mark.parametrize(
    ("parse", "args"),
    [
        (parse_ttl, (HUGE,)),
        (parse_sub_offset, (HUGE,)),
        (parse_sub_offset, ("1" + "0" * 4999,)),
        (parse_producer, ("p", HUGE, "0")),
        (parse_producer, ("p", "0", HUGE)),
        (parse_producer, ("p", "0" * 5000 + "1" + "0" * 4999, "0")),
    ],
)
def test_numeric_headers_with_thousands_of_digits_are_400_not_a_crash(parse, args):
    with pytest.raises(ProblemError) as err:
        parse(*args)
    assert err.value.status == 400


def test_numeric_headers_keep_their_bounds_exactly():
    limit = 2**53 - 1
    assert parse_sub_offset(str(limit)) == limit
    assert parse_ttl(str(limit // 1000)) == limit // 1000
    assert parse_producer("p", str(limit), str(limit)) == ("p", limit, limit)
    # Producer numbers may carry leading zeros; only significant digits count.
    assert parse_producer("p", "0" * 5000 + "7", "0" * 30 + str(limit)) == ("p", 7, limit)
    for parse, args in [
        (parse_sub_offset, (str(limit + 1),)),
        (parse_ttl, (str(limit // 1000 + 1),)),
        (parse_producer, ("p", "0", str(limit + 1))),
    ]:
        with pytest.raises(ProblemError):
            parse(*args)
