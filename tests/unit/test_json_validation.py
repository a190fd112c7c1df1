"""JSON bodies: every rule of split_json_messages on both of its paths (orjson
for small bodies, the non-building scanner for large ones), checked against
Python's json as the reference, plus its memory bound on an 8 MiB body."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import json_messages
from gateway.json_messages import MAX_JSON_DEPTH, json_array_elements, split_json_messages
from gateway.protocol import ProblemError


@contextlib.contextmanager
def scanner_only() -> Iterator[None]:
    """Every body goes to the scanner, however small."""
    saved = json_messages._ORJSON_MAX_BYTES
    json_messages._ORJSON_MAX_BYTES = -1
    try:
        yield
    finally:
        json_messages._ORJSON_MAX_BYTES = saved


def outcome(body: bytes, *, allow_empty: bool = True, max_messages: int = 0) -> list[str] | int:
    """The messages, or the status of the refusal."""
    try:
        return split_json_messages(body, allow_empty=allow_empty, max_messages=max_messages)
    except ProblemError as err:
        return err.status


def both_paths(body: bytes, **kwargs: object) -> list[str] | int:
    """The outcome of the orjson path, asserted equal to the scanner's."""
    fast = outcome(body, **kwargs)  # type: ignore[arg-type]
    with scanner_only():
        scanned = outcome(body, **kwargs)  # type: ignore[arg-type]
    assert fast == scanned, f"orjson path {fast!r} != scanner {scanned!r}"
    return fast


HUGE_INT = "1" + "0" * 5000  # beyond Python's 4,300-digit int() limit


@pytest.mark.parametrize(
    ("body", "messages"),
    [
        (b'{"a":1}', ['{"a":1}']),
        (b' \t\r\n{"a" : [1, {"b": null}]} \n', ['{"a" : [1, {"b": null}]}']),
        (b"[1, 2 ,3]", ["1", "2", "3"]),
        (b"[[1,2],[3,4]]", ["[1,2]", "[3,4]"]),
        (b"[[[1,2,3]]]", ["[[1,2,3]]"]),
        (b'[ "a,]" , {"b" : [ ]} , "\\"]"]', ['"a,]"', '{"b" : [ ]}', '"\\"]"']),
        (b"[true,false,null]", ["true", "false", "null"]),
        (b"-0.5e-7", ["-0.5e-7"]),
        (b"[1E+2, 0, -0, 10.25]", ["1E+2", "0", "-0", "10.25"]),
        (b"1e400", ["1e400"]),
        (b"[-1e400, 1e-400]", ["-1e400", "1e-400"]),
        (b"18446744073709551616", ["18446744073709551616"]),
        (HUGE_INT.encode(), [HUGE_INT]),
        (f'[{HUGE_INT}, {{"n": -{HUGE_INT}.5e3}}]'.encode(), [HUGE_INT, f'{{"n": -{HUGE_INT}.5e3}}']),
        (b'"\\ud800"', ['"\\ud800"']),
        (b'["\\udc00x", "\\uD83D\\uDE00"]', ['"\\udc00x"', '"\\uD83D\\uDE00"']),
        ('"h\u00e9llo \U0001f600 \x7f"'.encode(), ['"h\u00e9llo \U0001f600 \x7f"']),
        (b'"\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9"', ['"\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9"']),
        (b'{"a":1,"a":2}', ['{"a":1,"a":2}']),
        (b'[{}, [], {"": []}]', ["{}", "[]", '{"": []}']),
        (b'"x"', ['"x"']),
        (b"null", ["null"]),
    ],
)
def test_valid_bodies_keep_every_message_text_as_sent(body, messages):
    assert both_paths(body, allow_empty=False) == messages


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"[",
        b"]",
        b"[1,]",
        b"[,1]",
        b"[1,,2]",
        b"[1 2]",
        b"[1 2 3]",
        b"[1}2]",
        b"[[1,]]",
        b"[[,1]]",
        b"[[1 2 3]]",
        b'{"a":[1,]}',
        b'{"a":[1 2 3]}',
        b'{"a":{"b":1,}}',
        b'{"a":{"b":1 "c":2}}',
        b'[{"a":1 "b":2}]',
        b"{",
        b'{"a"}',
        b'{"a":}',
        b'{"a":1,}',
        b'{"a" 1}',
        b"{1:2}",
        b"{'a':1}",
        b'{"a":1 "b":2}',
        b"NaN",
        b"[NaN]",
        b"Infinity",
        b"[-Infinity]",
        b'{"a":Infinity}',
        b"nul",
        b"True",
        b"1 2",
        b"[1]x",
        b"[1] [2]",
        b"01",
        b"[-01]",
        b"1.",
        b".5",
        b"+1",
        b"1e",
        b"1e+",
        b"0x10",
        b"-",
        b'"abc',
        b'"a\x00b"',
        b'"tab\there"',
        b'"line\nbreak"',
        b'"\\x41"',
        b'"\\u12"',
        b'"\\u12G4"',
        b"'single'",
        b"\xef\xbb\xbf1",  # a byte order mark
        b"\x0c1",  # form feed is no JSON whitespace
        "\u00a01".encode(),  # nor is a no-break space
        b"1\x0b",
        b"\xff",
        b'"\xc3"',  # truncated UTF-8
        b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8
        b'"\xc0\xaf"',  # overlong UTF-8
        b"[1e400x]",
        b"[]",
        b"[[]",
        b"[]]",
        b"{}}",
        b'{"a":[1,2}',
        b'[{"a":1]}',
    ],
)
def test_invalid_bodies_are_400(body):
    assert both_paths(body, allow_empty=False) == 400


@pytest.mark.parametrize(
    "inner",
    [
        b"[1,]",
        b"[,1]",
        b"[1 2 3]",
        b'{"a":1,}',
        b'{"a":1 "b":2}',
        b'{"a"}',
        b"{1:2}",
        b"[1}",
        b"NaN",
        b'"\\x"',
    ],
)
def test_invalid_values_deep_inside_are_400(inner):
    for depth in (1, 2, 5, 40):
        for wrapped in (nested(depth, inner), b"[0," + nested(depth, inner) + b"]"):
            assert both_paths(wrapped) == 400, wrapped


def test_an_empty_array_is_allowed_only_on_create():
    assert both_paths(b" [ ] ", allow_empty=True) == []
    assert both_paths(b" [ ] ", allow_empty=False) == 400


def test_arrays_flatten_one_level_only():
    assert both_paths(b"[[1,[2]],[[3]],[]]") == ["[1,[2]]", "[[3]]", "[]"]
    assert both_paths(b'{"a":[1,2]}') == ['{"a":[1,2]}']


def test_more_messages_than_allowed_is_413_before_the_rest_is_read():
    assert both_paths(b"[" + b"1," * 9 + b"1]", max_messages=10) == ["1"] * 10
    assert both_paths(b"[" + b"1," * 10 + b"1]", max_messages=10) == 413
    # Garbage after the limit: the count is reached first.
    assert both_paths(b"[" + b"{}," * 11 + b"garbage", max_messages=10) == 413
    # ... but garbage before it is a 400.
    assert both_paths(b"[1,x," + b"1," * 11 + b"1]", max_messages=10) == 400


def nested(depth: int, inner: bytes = b"0") -> bytes:
    """`inner` inside `depth` levels of objects and arrays, an object outermost."""
    opening = b"".join(b'{"k":' if level % 2 == 0 else b"[" for level in range(depth))
    closing = b"".join(b"}" if level % 2 == 0 else b"]" for level in reversed(range(depth)))
    return opening + inner + closing


@pytest.mark.parametrize("leaf", [b"0", b"[]", b"{}"])
def test_nesting_is_accepted_up_to_the_limit_and_refused_beyond(leaf):
    # A leaf container counts as a level: `[]` inside `depth` levels is depth + 1.
    depth = MAX_JSON_DEPTH - (leaf != b"0")
    assert both_paths(nested(depth, leaf)) == [nested(depth, leaf).decode()]
    assert both_paths(nested(depth + 1, leaf)) == 400
    # In a top-level array, the array is the first level.
    element = nested(depth - 1, leaf)
    assert both_paths(b"[0," + element + b"]") == ["0", element.decode()]
    assert both_paths(b"[0," + nested(depth, leaf) + b"]") == 400


def test_deep_nesting_is_a_400_at_any_depth():
    for depth in (1025, 100_000):
        assert both_paths(b"[" * depth + b"]" * depth) == 400
        assert both_paths(b'{"a":' * depth + b"1" + b"}" * depth) == 400


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = '["' + "[" * 2000 + '", "\\"' + "{" * 2000 + '", ' + "[" * 500 + "]" * 500 + "]"
    assert both_paths(text.encode()) == [
        '"' + "[" * 2000 + '"',
        '"\\"' + "{" * 2000 + '"',
        "[" * 500 + "]" * 500,
    ]


# --- agreement with Python's json, on generated bodies ---------------------------


def reference(body: bytes) -> list[object] | int | None:
    """What the rules say, from Python's json: the messages' values, 400, or
    None when it cannot tell (nested deeper than its recursion allows)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return 400

    def refuse(name: str) -> None:
        raise ValueError(name)

    try:
        value = json.loads(text, parse_constant=refuse, parse_int=str, parse_float=str)
    except RecursionError:
        return None
    except ValueError:
        return 400
    return value if isinstance(value, list) else [value]


def parsed(message: str) -> object:
    return json.loads(message, parse_int=str, parse_float=str)


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**30, max_value=10**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)
# Characters whose insertion or removal most often turns JSON into near-JSON.
tricky = st.sampled_from(
    [",", "]", "}", "[", "{", '"', "\\", ":", " ", "\x00", "\x1f", "\t", "\n", "0", "-", ".", "e", "\\u",
     "\\ud800", "NaN", "Infinity", "1e400", "x", "\u00e9", "\ufeff", "\x0c"]
)  # fmt: skip


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    value = draw(values)
    for wrap in draw(st.lists(st.booleans(), max_size=6)):  # deeper than one regex match validates
        value = [value] if wrap else {"k": value}
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", "\t:\r")]))
    text = json.dumps(value, separators=separators, ensure_ascii=draw(st.booleans()))
    text = draw(st.sampled_from(["", " ", "\n\t"])) + text + draw(st.sampled_from(["", " \r\n"]))
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()) and at < len(text):
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at] + draw(tricky) + text[at:]
    return text.encode()


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(bodies())
def test_both_paths_agree_with_pythons_json(body):
    expected = reference(body)
    got = both_paths(body)
    if expected is None:
        return
    if expected == 400:
        assert got == 400, f"accepted invalid JSON: {body!r}"
        return
    assert isinstance(expected, list)
    assert isinstance(got, list), f"refused valid JSON ({got}): {body!r}"
    assert [parsed(message) for message in got] == expected
    # The messages are slices of the body, in order.
    text, pos = body.decode(), 0
    for message in got:
        pos = text.index(message, pos) + len(message)


# --- the sink's reader ------------------------------------------------------------


def test_json_array_elements_reads_every_message_this_module_accepts():
    deep = nested(MAX_JSON_DEPTH).decode()
    text = f'[{{"key":"k","n":{HUGE_INT}}}, "\\ud800", 1e400, {deep}]'
    elements = json_array_elements(text)
    assert [t for t, _ in elements] == [f'{{"key":"k","n":{HUGE_INT}}}', '"\\ud800"', "1e400", deep]
    assert elements[0][1] == {"key": "k", "n": float("inf")}
    assert elements[1][1] == "\ud800"
    with pytest.raises(ValueError):
        json_array_elements('{"not": "an array"}')


# --- memory -------------------------------------------------------------------------

MEMORY_LIMIT_MB = 40


@pytest.mark.parametrize(
    ("shape", "max_messages", "status"),
    [
        # One message holding ~2.8 million objects: Python's json builds ~200 MB.
        ("b'{\"a\":[' + b'{},' * (size // 3) + b'{}]}'", 0, "ok"),
        ("b'[{\"a\":[' + b'[],' * (size // 3) + b'[]]}]'", 0, "ok"),
        # Many messages: refused at the limit, without reading the rest.
        ("b'[' + b'{},' * (size // 3) + b'{}]'", 10_000, "413"),
        ("b'[' + b'\"' + b'x' * size + b'\"]'", 0, "ok"),
    ],
)
def test_an_8_mib_body_is_validated_in_bounded_memory(shape, max_messages, status):
    script = textwrap.dedent(
        f"""
        import tracemalloc
        from gateway.json_messages import split_json_messages
        from gateway.protocol import ProblemError
        size = 8 * 1024 * 1024
        body = {shape}
        tracemalloc.start()
        try:
            split_json_messages(body, allow_empty=False, max_messages={max_messages})
            status = "ok"
        except ProblemError as err:
            status = str(err.status)
        print(status, tracemalloc.get_traced_memory()[1] // 2**20)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    got_status, peak_mb = out.split()
    assert got_status == status
    # The body's text and one message's copy: ~16 MB.
    assert int(peak_mb) < MEMORY_LIMIT_MB, f"peak {peak_mb} MB"
