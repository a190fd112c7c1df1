"""JSON mode: validating an append's body and splitting it into messages,
without building it as Python objects (see below). Every refusal is a
ProblemError (400, or 413 for too many messages)."""

from __future__ import annotations

import json
import re

import orjson

from .protocol import ProblemError, bad_request

# A JSON body is validated without building it: an 8 MiB body of tiny objects
# would take ~200 MB as Python objects. Small bodies, the hot path of every
# append, go through orjson in one C call. Large bodies (orjson needs about ten
# times a body's size, whatever its shape), and the valid texts orjson refuses
# (`1e400`, `"\ud800"`), go through a scanner: compiled regexes validate whole
# values of up to _REGEX_DEPTH levels in C, and a loop with an explicit stack (no recursion) walks deeper nesting.
# Either way a message's text is kept exactly as sent: numbers keep every digit.

MAX_JSON_DEPTH = 512
"""Deepest nesting of arrays and objects in one message (deeper is a 400), so
that every later reader of the text can parse it: Python's json in the sink
(recursion limit 1000), orjson (1024), Postgres jsonb, browsers."""

# orjson takes up to ~12 times a body's size (10 MB for 256 KiB of tiny
# objects); the split runs without awaiting, so one body at a time per process.
_ORJSON_MAX_BYTES = 256 * 1024
# Nesting that one regex match validates; each level doubles the pattern (and
# the time to compile it at import).
_REGEX_DEPTH = 3
_WHITESPACE = " \t\n\r"

_WS = r"[ \t\n\r]*+"
# Possessive quantifiers and atomic groups: no backtracking, so every match is linear.
# Character classes are written as positive ranges: Python's re matches those
# about twice as fast as negated ones. A str from UTF-8 holds no surrogates.
_STRING_CHAR = r"[\x20\x21\x23-\x5b\x5d-\U0010ffff]"  # not '"', '\' or a control character
_STRING = rf'"{_STRING_CHAR}*+(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{{4}}){_STRING_CHAR}*+)*+"'
_NUMBER = r"-?+(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][+-]?+[0-9]++)?+"
_SCALAR = rf"(?>{_STRING}|{_NUMBER}|true|false|null)"
_MEMBER_NAME = rf"{_STRING}{_WS}:{_WS}"


def _one_level_deeper(inner: str) -> str:
    """A value that is a scalar, or an array or object of `inner` values. A comma
    must be followed by another item (no trailing comma)."""
    array = rf"\[{_WS}(?:{inner}{_WS}(?:,{_WS}(?!\])|(?=\])))*+\]"
    obj = rf"\{{{_WS}(?:{_MEMBER_NAME}{inner}{_WS}(?:,{_WS}(?!\}})|(?=\}})))*+\}}"
    return rf"(?>{_SCALAR}|{array}|{obj})"


_shallow_value = _SCALAR
for _ in range(_REGEX_DEPTH):
    _shallow_value = _one_level_deeper(_shallow_value)
# [0]: a scalar; [1]: a value nested at most _REGEX_DEPTH deep (the scanner uses
# [0] within _REGEX_DEPTH levels of MAX_JSON_DEPTH). _ARRAY_REST / _OBJECT_REST:
# the next items of a container, as long as they are that shallow.
_VALUE = [re.compile(p) for p in (_SCALAR, _shallow_value)]
_ARRAY_REST = [re.compile(rf"(?:{_WS},{_WS}{p})*+") for p in (_SCALAR, _shallow_value)]
_OBJECT_REST = [re.compile(rf"(?:{_WS},{_WS}{_MEMBER_NAME}{p})*+") for p in (_SCALAR, _shallow_value)]
_MEMBER_NAME_RE = re.compile(_MEMBER_NAME)
_WS_RE = re.compile(_WS)

# The extent of one element of an array already known to be valid JSON: a
# string, a number or literal, or a container nested at most _SPLIT_DEPTH deep.
_SPLIT_DEPTH = 16
_ANY_BUT_QUOTE_BACKSLASH = r"[\x00-\x21\x23-\x5b\x5d-\U0010ffff]"
_VALID_STRING = rf'"{_ANY_BUT_QUOTE_BACKSLASH}*+(?:\\.{_ANY_BUT_QUOTE_BACKSLASH}*+)*+"'
_OTHER = r"[\x00-\x21\x23-\x5a\x5c\x5e-\x7a\x7c\x7e-\U0010ffff]"  # not '"', '[', ']', '{' or '}'
_valid_container = rf"[\[{{]{_OTHER}*+(?:{_VALID_STRING}{_OTHER}*+)*+[\]}}]"
for _ in range(_SPLIT_DEPTH - 1):
    _valid_container = rf"[\[{{]{_OTHER}*+(?:(?:{_VALID_STRING}|{_valid_container}){_OTHER}*+)*+[\]}}]"
# One element and what follows it: "," or the closing "]".
_VALID_ELEMENT = re.compile(
    rf"({_VALID_STRING}|{_valid_container}|[^\"\[\]{{}},{_WHITESPACE}]++){_WS}([,\]]){_WS}", re.DOTALL
)


def split_json_messages(body: bytes, *, allow_empty: bool, max_messages: int = 0) -> list[str]:
    """Validate a JSON body and return its messages as JSON texts.

    A top-level array is flattened one level (one message per element); any
    other value is one message. Texts are kept as sent, so numbers keep every
    digit. More than `max_messages` (when set) is a 413, found without reading
    the rest of a large body.
    """
    messages = _split_with_orjson(body, max_messages) if len(body) <= _ORJSON_MAX_BYTES else None
    if messages is None:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("Invalid JSON", "body is not UTF-8") from None
        try:
            messages = _split_text(text, element_depth=1, max_messages=max_messages)
        except ValueError as exc:
            raise bad_request("Invalid JSON", str(exc)[:200]) from None
    if not messages and not allow_empty:
        raise bad_request("Empty JSON array", "an append needs at least one message")
    return messages


def _too_many(max_messages: int) -> ProblemError:
    return ProblemError(413, "Too many messages", f"at most {max_messages} per append")


def _split_with_orjson(body: bytes, max_messages: int) -> list[str] | None:
    """The messages if orjson finds the body valid, else None (invalid, or one
    of the valid texts orjson refuses: the scanner decides)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if len(body) > 2 * MAX_JSON_DEPTH and not _nests_at_most(body, MAX_JSON_DEPTH):
        return None  # orjson takes 1024 levels: let the scanner refuse it
    if type(value) is not list:
        return [body.decode().strip(_WHITESPACE)]  # orjson checked that it is UTF-8
    if max_messages and len(value) > max_messages:
        raise _too_many(max_messages)
    if not value:
        return []
    try:
        # Compact JSON as orjson writes it (what JSON.stringify sends, mostly):
        # then each element's text is exactly its serialisation.
        if orjson.dumps(value) == body:
            return [orjson.dumps(element).decode() for element in value]
    except orjson.JSONEncodeError:
        pass  # nested deeper than orjson writes
    return _valid_array_elements(body.decode())


_VALID_STRING_RE = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_BRACKETS_TO_PARENS = bytes.maketrans(b"[]{}", b"()()")
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"\\')))


def _nests_at_most(body: bytes, limit: int) -> bool:
    """Whether the arrays and objects of a valid JSON body nest at most `limit`
    deep: keep its brackets outside strings, remove innermost pairs level by level."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return True
    skeleton = body.translate(None, _NOT_STRUCTURE)
    if b"\\" in skeleton:  # an escaped quote may hide in a string: strip them properly
        skeleton = _VALID_STRING_RE.sub(b"", body).translate(None, _NOT_STRUCTURE)
    else:  # no escapes: every other '"' opens a string
        skeleton = b"".join(skeleton.split(b'"')[::2])
    brackets = skeleton.translate(_BRACKETS_TO_PARENS)
    for _ in range(limit):
        if not brackets:
            return True
        brackets = brackets.replace(b"()", b"")
    return not brackets


def _valid_array_elements(text: str) -> list[str] | None:
    """The element texts of a valid, non-empty JSON array; None if an element is
    nested too deep for _VALID_ELEMENT."""
    messages = []
    pos = _skip_ws(text, _skip_ws(text, 0) + 1)
    for match in _VALID_ELEMENT.finditer(text, pos):
        if match.start() != pos:
            return None  # the element at pos is nested too deep: finditer skipped it
        messages.append(match[1])
        if match[2] == "]":
            return messages
        pos = match.end()
    return None


def _skip_ws(text: str, pos: int) -> int:
    return _WS_RE.match(text, pos).end()  # type: ignore[union-attr]  # matches the empty string


def _split_text(text: str, *, element_depth: int, max_messages: int) -> list[str]:
    """The scanner: a top-level array's element texts, or the one value's text.
    `element_depth` is the nesting an element starts at (1: the array counts).
    Raises ValueError if the text is not JSON."""
    pos = _skip_ws(text, 0)
    if not text.startswith("[", pos):
        end = _value_end(text, pos, 0)
        messages = [text[pos:end]]
    else:
        messages = []
        end = _skip_ws(text, pos + 1)
        if text.startswith("]", end):
            end += 1
        else:
            while True:
                pos = end
                end = _value_end(text, pos, element_depth)
                messages.append(text[pos:end])
                if max_messages and len(messages) > max_messages:
                    raise _too_many(max_messages)
                end = _skip_ws(text, end)
                if text.startswith("]", end):
                    end += 1
                    break
                if not text.startswith(",", end):
                    raise ValueError(f"expected ',' or ']' at char {end}")
                end = _skip_ws(text, end + 1)
    if _skip_ws(text, end) != len(text):
        raise ValueError(f"extra data after the JSON value at char {end}")
    return messages


def _value_end(text: str, pos: int, depth: int) -> int:
    """Where the JSON value starting at `pos` ends, `depth` containers deep.
    Raises ValueError if there is no valid value there."""
    match = _VALUE[depth + _REGEX_DEPTH <= MAX_JSON_DEPTH].match(text, pos)
    if match:
        return match.end()
    # Nested deeper than one regex validates (or invalid): walk the containers,
    # handing every shallow enough value and run of items back to the regexes.
    closers: list[str] = []
    while True:
        # A value is expected at pos.
        level = depth + len(closers)
        match = _VALUE[level + _REGEX_DEPTH <= MAX_JSON_DEPTH].match(text, pos)
        if match:
            pos = match.end()
        else:
            opener = text[pos : pos + 1]
            if opener not in ("[", "{"):
                raise ValueError(f"expected a JSON value at char {pos}")
            if level >= MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            closer = "]" if opener == "[" else "}"
            pos = _skip_ws(text, pos + 1)
            if text.startswith(closer, pos):
                pos += 1
            else:
                closers.append(closer)
                if closer == "}":
                    pos = _member_name_end(text, pos)
                continue
        # After a value: the next items of the innermost container, then its end.
        while closers:
            closer = closers[-1]
            rest = (_ARRAY_REST if closer == "]" else _OBJECT_REST)[
                depth + len(closers) + _REGEX_DEPTH <= MAX_JSON_DEPTH
            ]
            pos = _skip_ws(text, rest.match(text, pos).end())  # type: ignore[union-attr]
            if text.startswith(",", pos):
                pos = _skip_ws(text, pos + 1)
                if closer == "}":
                    pos = _member_name_end(text, pos)
                break
            if not text.startswith(closer, pos):
                raise ValueError(f"expected ',' or '{closer}' at char {pos}")
            closers.pop()
            pos += 1
        else:
            return pos


def _member_name_end(text: str, pos: int) -> int:
    match = _MEMBER_NAME_RE.match(text, pos)
    if match is None:
        raise ValueError(f"expected a member name and ':' at char {pos}")
    return match.end()


def _int_or_float(digits: str) -> int | float:
    # Python refuses to convert more than 4,300 digits (quadratic time); a float
    # approximation is enough for what the sink reads from a message.
    try:
        return int(digits)
    except ValueError:
        return float(digits)


_sink_decoder = json.JSONDecoder(parse_int=_int_or_float)


def json_array_elements(text: str) -> list[tuple[str, object]]:
    """(text as written, parsed value) of each element of a JSON array text
    whose elements are messages this module accepted (the sink's feed entries)."""
    if not text.startswith("[", _skip_ws(text, 0)):
        raise ValueError("not a JSON array")
    texts = _split_text(text, element_depth=0, max_messages=0)
    return [(element, _sink_decoder.decode(element)) for element in texts]
