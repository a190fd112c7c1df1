"""The OpenAPI 3.1 description of the gateway's HTTP API, served at /openapi.json.

Written out here rather than generated: the stream handlers are lean ASGI
(gateway/routes.py, gateway/reads.py), not FastAPI routes, and what a client
needs is their headers and status codes. tests/integration/test_openapi.py
checks real responses against this document (Schemathesis) and that every path
and method the gateway serves is in it; docs/http.md is the prose version."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import __version__
from .settings import Settings
from .subscriptions.errors import STATUS as SUB_ERROR_STATUS

OPENAPI_PATH = "/openapi.json"
STREAM_PATH = "/v1/stream/{name}"
RESERVED_PATH = "/v1/stream/__ds/{path}"

Doc = dict[str, Any]

DIGITS = {"type": "string", "pattern": "^[0-9]+$"}
TRUE = {"type": "string", "enum": ["true"]}


def _header(description: str, schema: Doc | None = None) -> Doc:
    return {"description": description, "schema": schema or {"type": "string"}}


HEADERS: dict[str, Doc] = {
    "Stream-Next-Offset": _header(
        "Where to read next: the offset after the data returned (the tail when nothing is).",
        {"$ref": "#/components/schemas/Offset"},
    ),
    "Stream-Up-To-Date": _header("Present (`true`) when the response reaches the stream's tail.", TRUE),
    "Stream-Closed": _header(
        "Present (`true`) when the stream is closed and this response reaches its end.", TRUE
    ),
    "Stream-Cursor": _header("The cursor to send back on the next live read (cache busting).", DIGITS),
    "Stream-TTL": _header("The stream's sliding time to live, in seconds.", DIGITS),
    "Stream-Expires-At": _header("The stream's fixed expiry (RFC 3339), as it was set."),
    "Stream-Hot-Offset": _header(
        "Tiered history: the stream's trim point. Reads from it on are served from Redis, reads below it "
        "from the history database. Absent when nothing was trimmed.",
        {"$ref": "#/components/schemas/Offset"},
    ),
    "Stream-Earliest-Offset": _header(
        "Tiered history without a history database: the earliest offset a read can start from (the trim "
        "point; reading from it returns the oldest retained message). Not sent when every offset is readable.",
        {"$ref": "#/components/schemas/Offset"},
    ),
    "Stream-SSE-Data-Encoding": _header(
        "`base64` when SSE data payloads are base64 (streams that are neither text/* nor JSON).",
        {"type": "string", "enum": ["base64"]},
    ),
    "ETag": _header("Identifies this read's range (and whether it ends closed); for If-None-Match."),
    "Cache-Control": _header(
        "`public, max-age=60, stale-while-revalidate=300` for a historical chunk, else no-cache or no-store."
    ),
    "Location": _header("The created stream's absolute URL."),
    "Producer-Epoch": _header("The producer's epoch: echoed, or the current one on a 403.", DIGITS),
    "Producer-Seq": _header("The accepted seq; on a duplicate, the highest accepted seq.", DIGITS),
    "Producer-Expected-Seq": _header("On a sequence gap: the seq the gateway expected.", DIGITS),
    "Producer-Received-Seq": _header("On a sequence gap: the seq it received.", DIGITS),
    "Retry-After": _header("Seconds to wait before retrying.", DIGITS),
    "WWW-Authenticate": _header("The bearer challenge (RFC 6750) when auth is on."),
    "Allow": _header("The methods a stream URL takes."),
    "X-Request-Id": _header(
        "The request's id (the client's X-Request-Id when sane), in every log line of it."
    ),
    "X-Content-Type-Options": _header("Always `nosniff`.", {"type": "string", "enum": ["nosniff"]}),
    "Cross-Origin-Resource-Policy": _header("DSGW_CROSS_ORIGIN_RESOURCE_POLICY."),
}

# On every response of every path (gateway/app.py, EdgeMiddleware).
ALWAYS = ("X-Request-Id", "X-Content-Type-Options", "Cross-Origin-Resource-Policy")


def response(
    description: str,
    required: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
    content: Doc | None = None,
) -> Doc:
    headers = {
        name: {"$ref": f"#/components/headers/{name}", "required": True} for name in (*ALWAYS, *required)
    }
    headers |= {name: {"$ref": f"#/components/headers/{name}"} for name in optional}
    out: Doc = {"description": description, "headers": headers}
    if content is not None:
        out["content"] = content
    return out


PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def problem(
    description: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = (), *, body: bool = True
) -> Doc:
    """An error with an application/problem+json body (none on HEAD)."""
    return response(description, required, optional, PROBLEM if body else None)


def problem_examples(
    description: str,
    examples: dict[str, tuple[int, str, str]],
    required: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
) -> Doc:
    """A problem response whose bodies are shown by example: name -> (status, title, detail)."""
    shown = {
        key: {"value": {"type": "about:blank", "status": status, "title": title, "detail": detail}}
        for key, (status, title, detail) in examples.items()
    }
    content = {"application/problem+json": {**PROBLEM["application/problem+json"], "examples": shown}}
    return response(description, required, optional, content)


# GET's 410 and 503 with tiered history (gateway/tiering/cold.py; docs/http.md).
TRIMMED = "0000000000000012_0000000000000003"
READ_GONE = problem_examples(
    "The stream was deleted while forks of it live (soft-deleted); or the offset is below the stream's "
    "trim point and this gateway has no history database (DSGW_HISTORY_DATABASE_URL / DATABASE_URL): "
    "Stream-Earliest-Offset says where to read from. Long-poll and SSE answer the same before they start.",
    {
        "belowTrimPoint": (
            410,
            "Offset below the retained data",
            f"messages up to offset {TRIMMED} were removed; read from {TRIMMED} (header Stream-Earliest-Offset)",
        ),
    },
    optional=("Stream-Earliest-Offset",),
)
READ_UNAVAILABLE = problem_examples(
    "Redis did not answer in time, or this replica has too many live readers; or the offset is below the "
    "stream's trim point and the history database did not answer within DSGW_HISTORY_TIMEOUT_MS (reads "
    "from the trim point on still work).",
    {
        "historyUnavailable": (503, "History unavailable", "reads below the trim point need Postgres"),
        "historyIncomplete": (503, "History incomplete", "rows below the trim point are missing"),
    },
    required=("Retry-After",),
)


def json_content(schema: Doc) -> Doc:
    return {"application/json": {"schema": schema}}


def stream_errors(*codes: int, body: bool = True) -> dict[str, Doc]:
    """The error responses a stream operation may give, from one list."""
    texts: dict[int, Doc] = {
        400: problem("Bad request: an invalid header, offset, name or JSON body.", body=body),
        401: problem(
            "Auth is on and the bearer token is missing or invalid.", ("WWW-Authenticate",), body=body
        ),
        403: problem(
            "The token does not grant this operation on this stream; or, on POST, a stale Producer-Epoch "
            "(the response carries the current one).",
            optional=("WWW-Authenticate", "Producer-Epoch"),
            body=body,
        ),
        404: problem("No such stream (or it expired), or a missing fork source.", body=body),
        405: problem("A method stream URLs do not take.", ("Allow",), body=body),
        409: problem(
            "A conflict: PUT with other settings than the existing stream's, or on a soft-deleted one; "
            "POST to a closed stream (with Stream-Closed and Stream-Next-Offset), with another content type, "
            "a Stream-Seq not above the last, or a producer seq gap (with Producer-Expected-Seq and "
            "Producer-Received-Seq).",
            optional=(
                "Stream-Closed",
                "Stream-Next-Offset",
                "Producer-Expected-Seq",
                "Producer-Received-Seq",
            ),
            body=body,
        ),
        410: problem("The stream was deleted while forks of it live (soft-deleted).", body=body),
        413: problem(
            "Body over DSGW_MAX_BODY_BYTES or more than DSGW_MAX_APPEND_MESSAGES messages.", body=body
        ),
        429: problem("A rate limit of the credential (DSGW_RATE_*).", ("Retry-After",), body=body),
        503: problem(
            "Redis did not answer in time, or this replica has too many live readers.",
            ("Retry-After",),
            body=body,
        ),
    }
    return {str(code): texts[code] for code in codes}


def _param(name: str, where: str, description: str, schema: Doc | None = None, **extra: Any) -> Doc:
    return {
        "name": name,
        "in": where,
        "description": description,
        "schema": schema or {"type": "string"},
        **extra,
    }


NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": (
        "The stream's name: 1 to 1024 bytes, no control characters, may contain `/` (sent as is or as "
        "%2F). The root segment `__ds` is reserved."
    ),
    "schema": {"type": "string", "minLength": 1},
    "examples": {"chat": {"value": "chat/room-1"}},
}

STREAM_BODY = {
    "description": (
        "Messages. A JSON stream (application/json) takes a JSON value per message; a top-level array is "
        "flattened one level (one message per element). Any other content type takes bytes as they are."
    ),
    "content": {
        "application/json": {"schema": {}},
        "text/plain": {"schema": {"type": "string"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}

BEARER: list[Doc] = [{}, {"bearer": []}]  # optional: required only when auth is on


def stream_operations() -> Doc:
    sse_or_data = {
        "application/json": {"schema": {"type": "array", "description": "A JSON stream's messages."}},
        "text/event-stream": {
            # The schema of one event (as OpenAPI tools read an SSE body: event by event).
            "schema": {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"type": "string", "enum": ["data", "control"]},
                    "data": {"type": "string"},
                },
            },
            "description": "live=sse: `event: data` (a JSON array, text, or base64) and `event: control` "
            "(JSON: streamNextOffset, streamCursor, upToDate, streamClosed) events.",
        },
        "*/*": {"schema": {}, "description": "Any other stream: its bytes, in its own content type."},
    }
    return {
        "put": {
            "operationId": "createStream",
            "summary": "Create a stream, or fork one (Stream-Forked-From); idempotent with the same settings",
            "security": BEARER,
            "parameters": [
                {"$ref": "#/components/parameters/name"},
                _param(
                    "Stream-TTL", "header", "Sliding time to live in seconds (0 or a whole number).", DIGITS
                ),
                _param("Stream-Expires-At", "header", "Fixed expiry, RFC 3339. Not with Stream-TTL."),
                _param(
                    "Stream-Closed", "header", "`true` creates the stream closed (the body is all it holds)."
                ),
                _param("Stream-Forked-From", "header", "Fork this stream (a path under /v1/stream/)."),
                _param(
                    "Stream-Fork-Offset",
                    "header",
                    "Inherit the source up to this offset (default: its tail).",
                ),
                _param(
                    "Stream-Fork-Sub-Offset",
                    "header",
                    "Inherit this many more messages (JSON) or bytes of the source's next append.",
                    DIGITS,
                ),
            ],
            "requestBody": {**STREAM_BODY, "required": False},
            "responses": {
                "201": response("Created.", ("Stream-Next-Offset", "Location"), ("Stream-Closed",)),
                "200": response(
                    "It already exists with these settings.", ("Stream-Next-Offset",), ("Stream-Closed",)
                ),
                **stream_errors(400, 401, 403, 404, 409, 413, 503),
            },
        },
        "post": {
            "operationId": "appendToStream",
            "summary": "Append messages (and close with Stream-Closed: true; an empty body only closes)",
            "security": BEARER,
            "parameters": [
                {"$ref": "#/components/parameters/name"},
                _param(
                    "Stream-Seq", "header", "Must be above the stream's last, byte-wise (writer ordering)."
                ),
                _param("Stream-Closed", "header", "`true` closes the stream (after this body, if any)."),
                _param("Producer-Id", "header", "Idempotent producer: all three producer headers or none."),
                _param("Producer-Epoch", "header", "The producer's epoch.", DIGITS),
                _param("Producer-Seq", "header", "The producer's request number within its epoch.", DIGITS),
            ],
            "requestBody": {**STREAM_BODY, "required": False},
            "responses": {
                "200": response(
                    "A producer's append was accepted.",
                    ("Stream-Next-Offset", "Producer-Epoch", "Producer-Seq"),
                    ("Stream-Closed",),
                ),
                "204": response(
                    "Appended (or closed); with producer headers: a duplicate, nothing written.",
                    ("Stream-Next-Offset",),
                    ("Stream-Closed", "Producer-Epoch", "Producer-Seq"),
                ),
                **stream_errors(400, 401, 403, 404, 409, 410, 413, 429, 503),
            },
        },
        "get": {
            "operationId": "readStream",
            "summary": "Read from an offset: catch-up, long-poll (live=long-poll) or SSE (live=sse)",
            "security": BEARER,
            "parameters": [
                {"$ref": "#/components/parameters/name"},
                _param(
                    "offset",
                    "query",
                    "Read after this offset: `-1` (the start, also when absent), `now` (the tail), or an offset "
                    "the gateway returned. Required with `live`.",
                    examples={"start": {"value": "-1"}, "tail": {"value": "now"}},
                ),
                _param(
                    "live",
                    "query",
                    "Wait for data: long-poll or sse.",
                    {"type": "string", "enum": ["long-poll", "sse"]},
                ),
                _param("cursor", "query", "The last Stream-Cursor received (live reads)."),
                _param(
                    "If-None-Match",
                    "header",
                    "An ETag of an earlier read of the same range: 304 if unchanged.",
                ),
            ],
            "responses": {
                "200": response(
                    "Data after the offset (a JSON stream's messages as one JSON array), or an SSE stream.",
                    ("Cache-Control",),
                    (
                        "Stream-Next-Offset",
                        "ETag",
                        "Stream-Up-To-Date",
                        "Stream-Closed",
                        "Stream-Cursor",
                        "Stream-SSE-Data-Encoding",
                    ),
                    sse_or_data,
                ),
                "204": response(
                    "Long-poll: nothing arrived in time, or the stream is closed at this offset.",
                    ("Stream-Next-Offset", "Stream-Up-To-Date", "Cache-Control"),
                    ("Stream-Cursor", "Stream-Closed"),
                ),
                "304": response(
                    "If-None-Match matched this read's ETag.",
                    ("Stream-Next-Offset", "ETag", "Cache-Control"),
                    ("Stream-Up-To-Date", "Stream-Closed", "Stream-Cursor"),
                ),
                **stream_errors(400, 401, 403, 404, 429),
                "410": READ_GONE,
                "503": READ_UNAVAILABLE,
            },
        },
        "head": {
            "operationId": "streamMetadata",
            "summary": "The stream's metadata, without a body (does not renew its TTL)",
            "security": BEARER,
            "parameters": [{"$ref": "#/components/parameters/name"}],
            "responses": {
                "200": response(
                    "The stream exists.",
                    ("Stream-Next-Offset", "Cache-Control"),
                    (
                        "Stream-TTL",
                        "Stream-Expires-At",
                        "Stream-Closed",
                        "Stream-Hot-Offset",
                        "Stream-Earliest-Offset",
                    ),
                ),
                **stream_errors(400, 401, 403, 404, 410, 503, body=False),
            },
        },
        "delete": {
            "operationId": "deleteStream",
            "summary": "Delete the stream (soft-deleted while forks of it live)",
            "security": BEARER,
            "parameters": [{"$ref": "#/components/parameters/name"}],
            "responses": {"204": response("Deleted."), **stream_errors(400, 401, 403, 404, 410, 503)},
        },
        "options": {
            "operationId": "streamPreflight",
            "summary": "CORS preflight (every path answers it the same way)",
            "parameters": [{"$ref": "#/components/parameters/name"}],
            "responses": {"204": response("The allowed methods and headers (Access-Control-Allow-*).")},
        },
    }


# --- subscriptions (issue 12): /v1/stream/__ds/... (gateway/subscriptions/api.py) ---------------

DS_PREFIX = "/v1/stream/__ds"
SUB_PATH = DS_PREFIX + "/subscriptions/{id}"
JWKS_PATH = DS_PREFIX + "/jwks.json"

SUB_ID = _param(
    "id",
    "path",
    "The subscription's id: 1 to 256 bytes, printable, no spaces and no `/` (400 otherwise).",
    {"type": "string", "minLength": 1, "pattern": "^[^/]+$"},
    required=True,
    examples={"orders": {"value": "orders-indexer"}},
)
# Callbacks, pull-wake acks and releases carry the wake's own token (from the
# webhook body or the claim), never a service token; fencing checks it.
CALLBACK_TOKEN: list[Doc] = [{"callbackToken": []}]


def sub_error(description: str, *codes: str) -> Doc:
    """A subscription API error: application/json `{"error": {"code", "message"}}`
    whose code is one of `codes`."""
    schema = {
        "allOf": [
            {"$ref": "#/components/schemas/SubscriptionError"},
            {"properties": {"error": {"properties": {"code": {"enum": list(codes)}}}}},
        ]
    }
    return response(f"{description} (code {', '.join(codes)}).", content=json_content(schema))


def sub_errors(*statuses: int) -> dict[str, Doc]:
    """The errors every __ds/subscriptions/{id}... operation may give besides its own."""
    texts: dict[int, Doc] = {
        400: sub_error("Invalid id or body", "INVALID_REQUEST"),
        401: problem("Auth is on and the bearer token is missing or invalid.", ("WWW-Authenticate",)),
        403: problem(
            "The token's `manage` (PUT, DELETE, streams) or `read` (GET, claim) globs do not cover "
            "`__ds/subscriptions/{id}`.",
            optional=("WWW-Authenticate",),
        ),
        404: sub_error("No such subscription", "SUBSCRIPTION_NOT_FOUND"),
        413: problem("Body over 1 MiB."),
        503: problem("Redis did not answer in time.", ("Retry-After",)),
    }
    return {str(code): texts[code] for code in statuses}


def token_errors() -> Doc:
    return {
        "401": sub_error(
            "The Authorization bearer is missing, malformed, not signed by this deployment, for another "
            "subscription, or expired",
            "TOKEN_INVALID",
            "TOKEN_EXPIRED",
        )
    }


def json_body(ref: str, description: str) -> Doc:
    return {
        "description": description,
        "required": True,
        "content": json_content({"$ref": f"#/components/schemas/{ref}"}),
    }


def subscription_paths() -> Doc:
    """Every __ds operation; declared before the generic stream path that would
    otherwise match them (a stream name may contain `/`)."""
    subscription = json_content({"$ref": "#/components/schemas/Subscription"})
    ack_result = json_content({"$ref": "#/components/schemas/AckResult"})
    id_param = [SUB_ID]
    return {
        JWKS_PATH: plain_get(
            "subscriptionJwks",
            "The public Ed25519 keys that sign webhook deliveries (public, no auth)",
            {
                "200": response(
                    "The JSON Web Key Set; a rotated-in key is listed before it signs anything.",
                    ("Cache-Control",),
                    content={"application/jwk-set+json": {"schema": {"$ref": "#/components/schemas/JwkSet"}}},
                ),
                "503": problem("Redis did not answer in time.", ("Retry-After",)),
            },
        ),
        SUB_PATH: {
            "put": {
                "operationId": "putSubscription",
                "summary": "Create a subscription; idempotent with the same configuration",
                "security": BEARER,
                "parameters": id_param,
                "requestBody": json_body("SubscriptionConfig", "The subscription's configuration."),
                "responses": {
                    "201": response("Created.", content=subscription),
                    "200": response("It already exists with this configuration.", content=subscription),
                    "400": sub_error(
                        "Invalid id or configuration, or a webhook URL that is not allowed "
                        "(DSGW_WEBHOOK_ALLOW_PRIVATE)",
                        "INVALID_REQUEST",
                        "WEBHOOK_URL_REJECTED",
                    ),
                    **sub_errors(401, 403),
                    "409": sub_error(
                        "A subscription with this id has another configuration", "SUBSCRIPTION_ALREADY_EXISTS"
                    ),
                    **sub_errors(413, 503),
                },
            },
            "get": {
                "operationId": "getSubscription",
                "summary": "The subscription: configuration, linked streams with their acked offsets, status",
                "security": BEARER,
                "parameters": [
                    *id_param,
                    _param(
                        "streams_cursor",
                        "query",
                        "The next page of the linked streams (over 1,000 links): `streams_cursor` of the "
                        "previous answer. A stream may appear on two pages.",
                        {"type": "string", "pattern": "^[0-9]{1,19}$"},
                    ),
                ],
                "responses": {
                    "200": response("The subscription.", content=subscription),
                    **sub_errors(400, 401, 403, 404, 503),
                },
            },
            "delete": {
                "operationId": "deleteSubscription",
                "summary": "Delete the subscription and unlink its streams (204 also when it does not exist)",
                "security": BEARER,
                "parameters": id_param,
                "responses": {"204": response("Deleted."), **sub_errors(400, 401, 403, 503)},
            },
        },
        SUB_PATH + "/streams": {
            "post": {
                "operationId": "addSubscriptionStreams",
                "summary": "Link more streams explicitly",
                "security": BEARER,
                "parameters": id_param,
                "requestBody": json_body("AddStreams", "The streams to link."),
                "responses": {"204": response("Linked."), **sub_errors(400, 401, 403, 404, 413, 503)},
            }
        },
        SUB_PATH + "/streams/{path}": {
            "delete": {
                "operationId": "removeSubscriptionStream",
                "summary": "Remove a stream's explicit link (a stream the pattern matches stays linked)",
                "security": BEARER,
                "parameters": [
                    SUB_ID,
                    _param(
                        "path",
                        "path",
                        "The stream's path (may contain `/`).",
                        {"type": "string", "minLength": 1},
                        required=True,
                    ),
                ],
                "responses": {"204": response("Unlinked."), **sub_errors(400, 401, 403, 404, 503)},
            }
        },
        SUB_PATH + "/callback": {
            "post": {
                "operationId": "subscriptionCallback",
                "summary": "A webhook receiver acks (and says done) for the wake it was sent",
                "description": "Authorization: Bearer <callback_token from the webhook body>.",
                "security": CALLBACK_TOKEN,
                "parameters": id_param,
                "requestBody": json_body("Ack", "The wake being answered and the offsets processed."),
                "responses": {
                    "200": response(
                        "Acked; `next_wake` when a new wake was issued at once.", content=ack_result
                    ),
                    **sub_errors(400),
                    **token_errors(),
                    **sub_errors(404),
                    "409": sub_error(
                        "The wake is not current (stale generation or wake id), or an offset beyond the "
                        "stream's tail",
                        "FENCED",
                        "INVALID_OFFSET",
                    ),
                    **sub_errors(413, 503),
                },
            }
        },
        SUB_PATH + "/claim": {
            "post": {
                "operationId": "claimSubscriptionWake",
                "summary": "A pull-wake worker claims the pending wake and its lease",
                "security": BEARER,
                "parameters": id_param,
                "requestBody": json_body("Claim", "The claiming worker."),
                "responses": {
                    "200": response(
                        "Claimed: the token for ack and release, and the linked streams.",
                        content=json_content({"$ref": "#/components/schemas/ClaimResult"}),
                    ),
                    "400": sub_error(
                        "Invalid id or body, or not a pull-wake subscription", "INVALID_REQUEST"
                    ),
                    **sub_errors(401, 403, 404),
                    "409": sub_error(
                        "Another worker holds the lease (with current_holder and generation), or "
                        "nothing is pending",
                        "ALREADY_CLAIMED",
                        "NO_PENDING_WORK",
                    ),
                    **sub_errors(413, 503),
                },
            }
        },
        SUB_PATH + "/ack": {
            "post": {
                "operationId": "ackSubscriptionWake",
                "summary": "A pull-wake worker acks offsets (and says done) under its claim",
                "description": "Authorization: Bearer <token from the claim>.",
                "security": CALLBACK_TOKEN,
                "parameters": id_param,
                "requestBody": json_body("Ack", "The claimed wake and the offsets processed."),
                "responses": {
                    "200": response(
                        "Acked; `next_wake` when a new wake was issued at once.", content=ack_result
                    ),
                    "400": sub_error(
                        "Invalid id or body, or not a pull-wake subscription", "INVALID_REQUEST"
                    ),
                    **token_errors(),
                    **sub_errors(404),
                    "409": sub_error(
                        "The claim is not current, or an offset beyond the stream's tail",
                        "FENCED",
                        "INVALID_OFFSET",
                    ),
                    **sub_errors(413, 503),
                },
            }
        },
        SUB_PATH + "/release": {
            "post": {
                "operationId": "releaseSubscriptionWake",
                "summary": "A pull-wake worker gives its claim back without finishing",
                "description": "Authorization: Bearer <token from the claim>.",
                "security": CALLBACK_TOKEN,
                "parameters": id_param,
                "requestBody": json_body("Release", "The claimed wake."),
                "responses": {
                    "204": response("Released."),
                    "400": sub_error(
                        "Invalid id or body, or not a pull-wake subscription", "INVALID_REQUEST"
                    ),
                    **token_errors(),
                    **sub_errors(404),
                    "409": sub_error("The claim is not current", "FENCED"),
                    **sub_errors(413, 503),
                },
            }
        },
    }


def subscription_webhooks() -> Doc:
    """What the gateway POSTs to a webhook subscription's URL (gateway/subscriptions/core.py)."""
    return {
        "subscriptionWake": {
            "post": {
                "operationId": "subscriptionWake",
                "summary": "A wake: linked streams have data past their acked offsets",
                "description": "Verify Webhook-Signature with the key of its kid from jwks.json; answer 2xx "
                'and, when done, either `{"done": true}` (acks the listed streams at their tails) or a '
                "POST to callback_url. Anything else is retried with backoff.",
                "parameters": [
                    _param(
                        "Webhook-Signature",
                        "header",
                        '`t=<unix seconds>,kid=<kid>,ed25519=<base64url signature of "<t>.<body>">`.',
                        required=True,
                    )
                ],
                "requestBody": json_body("WebhookWake", "The wake."),
                "responses": {
                    "2XX": {
                        "description": 'Received; `{"done": true}` ends the wake at once.',
                        "content": json_content(
                            {"type": "object", "properties": {"done": {"type": "boolean"}}}
                        ),
                    },
                    "default": {"description": "Not received: the wake is delivered again later."},
                },
            }
        }
    }


def reserved_operations() -> Doc:
    # Anything under `__ds/` that is not one of the subscription routes.
    other = {"type": "string", "minLength": 1, "pattern": "^(?!subscriptions/[^/]|jwks\\.json$)"}
    path = _param("path", "path", "A path under `__ds/` that is no control route.", other, required=True)
    op = {
        "summary": "Other paths under the reserved `__ds` root: 404",
        "parameters": [path],
        "responses": {"404": sub_error("No such control route", "SUBSCRIPTION_NOT_FOUND")},
    }
    return {
        method: {**op, "operationId": f"reserved_{method}"} for method in ("get", "put", "post", "delete")
    }


def plain_get(operation_id: str, summary: str, responses: Doc) -> Doc:
    return {"get": {"operationId": operation_id, "summary": summary, "responses": responses}}


def console_paths() -> Doc:
    name = {**NAME, "description": "The stream's name (may contain `/`)."}
    limit = _param(
        "limit",
        "query",
        "At most this many streams (1 to 10000, default 1000).",
        {"type": "integer", "minimum": 1, "maximum": 10000},
    )
    page = {
        "/console": ("consolePage", "The web console (HTML)", "text/html"),
        "/console/console.js": ("consoleScript", "The console's script", "text/javascript"),
        "/console/console.css": ("consoleStyle", "The console's style sheet", "text/css"),
    }
    paths: Doc = {
        path: plain_get(
            op, summary, {"200": response(summary + ".", content={ct: {"schema": {"type": "string"}}})}
        )
        for path, (op, summary, ct) in page.items()
    }
    paths["/console/api/streams"] = {
        "get": {
            "operationId": "consoleStreams",
            "summary": "Streams with their size, producers and sink lag (those the token may read)",
            "security": BEARER,
            "parameters": [limit],
            "responses": {
                "200": response(
                    "The streams, by name.",
                    content=json_content(
                        {
                            "type": "object",
                            "required": ["streams", "auth"],
                            "properties": {
                                "streams": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/StreamRow"},
                                },
                                "auth": {"type": "boolean", "description": "Whether auth is on."},
                            },
                        }
                    ),
                ),
                "400": problem("Invalid limit."),
                "401": problem(
                    "Auth is on and the bearer token is missing or invalid.", ("WWW-Authenticate",)
                ),
                "503": problem("Redis did not answer.", ("Retry-After",)),
            },
        }
    }
    paths["/console/api/streams/{name}"] = {
        "get": {
            "operationId": "consoleStream",
            "summary": "One stream: metadata, producers, forks, sink lag, Redis keys (what `dsgw info` shows)",
            "security": BEARER,
            "parameters": [name],
            "responses": {
                "200": response(
                    "The stream.", content=json_content({"$ref": "#/components/schemas/StreamInfo"})
                ),
                "401": problem(
                    "Auth is on and the bearer token is missing or invalid.", ("WWW-Authenticate",)
                ),
                "403": problem("The token does not grant read on this stream.", ("WWW-Authenticate",)),
                "404": problem("No such stream."),
                "503": problem("Redis did not answer.", ("Retry-After",)),
            },
        }
    }
    return paths


SINK_LAG = {
    "type": ["object", "null"],
    "description": "The sink's backlog on the stream's shard (null: the stream is not synced to Postgres).",
    "properties": {
        "feed": {"type": "string"},
        "group": {"type": ["string", "null"]},
        "backlog": {"type": "integer"},
        "oldest_age_ms": {"type": "integer"},
    },
}
NULLABLE_STRING = {"type": ["string", "null"]}
NULLABLE_INT = {"type": ["integer", "null"]}

SCHEMAS: Doc = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details.",
        "required": ["type", "status", "title"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "integer"},
            "title": {"type": "string"},
            "detail": {"type": "string"},
        },
    },
    "Offset": {
        "type": "string",
        "description": "A position in a stream; fixed width, so string order is stream order.",
        "pattern": "^[0-9]{16}_[0-9]{16}$",
    },
    "StreamRow": {
        "type": "object",
        "required": ["name", "content_type", "messages", "bytes", "closed", "producers", "sink"],
        "properties": {
            "name": {"type": "string"},
            "content_type": {"type": "string"},
            "messages": {"type": "integer", "description": "Redis entries of the stream's own data."},
            "bytes": {"type": "integer"},
            "closed": {"type": "boolean"},
            "deleted": {"type": "boolean", "description": "Soft-deleted: kept for its forks."},
            "ttl": NULLABLE_INT,
            "expires_at": NULLABLE_STRING,
            "forked_from": NULLABLE_STRING,
            "producers": {"type": "integer", "description": "Idempotent producers whose state it keeps."},
            "synced_to_postgres": {"type": "boolean"},
            "sink": SINK_LAG,
        },
    },
    "StreamInfo": {
        "type": "object",
        "required": [
            "name",
            "content_type",
            "tail_offset",
            "messages",
            "bytes",
            "closed",
            "producers",
            "sink",
        ],
        "properties": {
            "name": {"type": "string"},
            "content_type": {"type": "string"},
            "tail_offset": {"$ref": "#/components/schemas/Offset"},
            "messages": {"type": "integer"},
            "bytes": {"type": "integer"},
            "closed": {"type": "boolean"},
            "deleted": {"type": "boolean"},
            "ttl": NULLABLE_INT,
            "expires_at": NULLABLE_STRING,
            "created_ms": {"type": "integer"},
            "forked_from": NULLABLE_STRING,
            "fork_offset": NULLABLE_STRING,
            "forks": {"type": "array", "items": {"type": "string"}},
            "producers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "epoch", "seq"],
                    "properties": {
                        "id": {"type": "string"},
                        "epoch": {"type": "integer"},
                        "seq": {"type": "integer"},
                        "updated_ms": {"type": "integer"},
                    },
                },
            },
            "stream_seq": NULLABLE_STRING,
            "synced_to_postgres": {"type": "boolean"},
            "sink": SINK_LAG,
            "keys": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
}

STRING_LIST = {"type": "array", "items": {"type": "string"}}
LINKED = {
    "path": {"type": "string"},
    "link_type": {"type": "string", "enum": ["explicit", "glob"]},
    "acked_offset": {
        "type": "string",
        "description": "Processed up to here: an offset, or `-1` for a stream linked before its first entry.",
    },
}
WAKE = {
    "generation": {"type": "integer", "description": "The wake's generation (fencing)."},
    "wake_id": {"type": "string"},
}
SUBSCRIPTION: Doc = {
    "id": {"type": "string"},
    "subscription_id": {"type": "string"},
    "type": {"type": "string", "enum": ["webhook", "pull-wake"]},
    "pattern": {"type": "string"},
    "streams": {
        "type": "array",
        "description": "The linked streams: all of them up to 1,000 links, otherwise a page of them.",
        "items": {"type": "object", "required": list(LINKED), "properties": LINKED},
    },
    "streams_total": {
        "type": "integer",
        "description": "Present when the subscription links more than 1,000 streams (`streams` is then one "
        "page of about 1,000): how many.",
    },
    "streams_cursor": {
        "type": "string",
        "description": "Present when more pages follow: pass it as `streams_cursor` to GET the next one.",
    },
    "webhook": {
        "type": "object",
        "required": ["url", "signing"],
        "properties": {
            "url": {"type": "string"},
            "signing": {
                "type": "object",
                "required": ["alg", "kid", "jwks_url"],
                "properties": {
                    "alg": {"type": "string", "enum": ["ed25519"]},
                    "kid": {"type": "string"},
                    "jwks_url": {"type": "string"},
                },
            },
        },
    },
    "wake_stream": NULLABLE_STRING,
    "lease_ttl_ms": {"type": "integer"},
    "created_at": {"type": "string", "format": "date-time"},
    "status": {"type": "string", "enum": ["active", "failed"]},
    "description": {"type": "string"},
}
SUB_SCHEMAS: Doc = {
    "SubscriptionError": {
        "type": "object",
        "description": "The subscription API's errors (PROTOCOL.md); ALREADY_CLAIMED adds current_holder "
        "and generation.",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": sorted(SUB_ERROR_STATUS)},
                    "message": {"type": "string"},
                    "current_holder": {"type": "string"},
                    "generation": {"type": "integer"},
                },
            }
        },
    },
    "SubscriptionConfig": {
        "type": "object",
        "description": "At least one of pattern and streams. Webhook subscriptions need webhook.url, "
        "pull-wake ones wake_stream. No path may be under `__ds`.",
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "enum": ["webhook", "pull-wake"]},
            "pattern": {
                "type": "string",
                "description": "A glob over stream paths (`*` one segment, `**` any).",
            },
            "streams": {**STRING_LIST, "minItems": 1, "maxItems": 1000},
            "webhook": {
                "type": "object",
                "required": ["url"],
                "properties": {"url": {"type": "string", "maxLength": 2048}},
            },
            "wake_stream": {"type": "string", "description": "Pull-wake: the stream wake events go to."},
            "lease_ttl_ms": {"type": "integer", "minimum": 1000, "maximum": 600000, "default": 30000},
            "description": {"type": "string", "maxLength": 2048},
        },
    },
    "Subscription": {
        "type": "object",
        # Every field but these three is always there.
        "required": [
            k
            for k in SUBSCRIPTION
            if k not in ("pattern", "webhook", "description", "streams_total", "streams_cursor")
        ],
        "properties": SUBSCRIPTION,
    },
    "AddStreams": {
        "type": "object",
        "required": ["streams"],
        "properties": {"streams": {**STRING_LIST, "minItems": 1, "maxItems": 1000}},
    },
    "Ack": {
        "type": "object",
        "required": list(WAKE),
        "properties": {
            **WAKE,
            "done": {"type": "boolean", "default": False, "description": "Nothing more to do for this wake."},
            "acks": {
                "type": "array",
                "maxItems": 10000,
                "items": {
                    "type": "object",
                    "required": ["stream", "offset"],
                    "properties": {"stream": {"type": "string"}, "offset": {"type": "string"}},
                },
            },
        },
    },
    "AckResult": {
        "type": "object",
        "required": ["ok", "next_wake"],
        "properties": {"ok": {"type": "boolean", "enum": [True]}, "next_wake": {"type": "boolean"}},
    },
    "Release": {"type": "object", "required": list(WAKE), "properties": WAKE},
    "Claim": {
        "type": "object",
        "required": ["worker"],
        "properties": {"worker": {"type": "string", "minLength": 1, "maxLength": 256}},
    },
    "ClaimResult": {
        "type": "object",
        "required": ["wake_id", "generation", "token", "streams", "lease_ttl_ms"],
        "properties": {
            **WAKE,
            "token": {"type": "string", "description": "The bearer for ack and release."},
            "lease_ttl_ms": {"type": "integer"},
            "streams": {
                "type": "array",
                "description": "Every linked stream, for a subscription of at most 1,000 links; "
                "otherwise the pending ones, at most 1,000.",
                "items": {"$ref": "#/components/schemas/PendingStream"},
            },
            "has_more": {
                "type": "boolean",
                "enum": [True],
                "description": "Present when more streams are pending than listed; the next wake names them.",
            },
        },
    },
    "PendingStream": {
        "type": "object",
        "required": [*LINKED, "tail_offset", "has_pending"],
        "properties": {**LINKED, "tail_offset": {"type": "string"}, "has_pending": {"type": "boolean"}},
    },
    "WebhookWake": {
        "type": "object",
        "required": [*WAKE, "subscription_id", "streams", "callback_url", "callback_token"],
        "properties": {
            "subscription_id": {"type": "string"},
            **WAKE,
            "streams": {
                "type": "array",
                "description": "The linked streams with pending work (at most 1,000, and as "
                "many as fit in DSGW_WEBHOOK_MAX_PAYLOAD_BYTES).",
                "items": {"$ref": "#/components/schemas/PendingStream"},
            },
            "has_more": {
                "type": "boolean",
                "enum": [True],
                "description": "Present when pending streams were left out; they come in the next wake.",
            },
            "callback_url": {"type": "string"},
            "callback_token": {"type": "string", "description": "The bearer for callback_url."},
        },
    },
    "WakeEvent": {
        "type": "object",
        "description": "What a pull-wake subscription appends to its wake_stream.",
        "required": ["type", "subscription_id", "stream", "generation", "ts"],
        "properties": {
            "type": {"type": "string", "enum": ["wake"]},
            "subscription_id": {"type": "string"},
            "stream": {"type": "string", "description": "The stream whose append woke it."},
            "generation": {"type": "integer"},
            "ts": {"type": "integer", "description": "Unix milliseconds."},
        },
    },
    "JwkSet": {
        "type": "object",
        "required": ["keys"],
        "properties": {
            "keys": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["kty", "crv", "alg", "use", "kid", "x"],
                    "properties": {
                        "kty": {"type": "string", "enum": ["OKP"]},
                        "crv": {"type": "string", "enum": ["Ed25519"]},
                        "alg": {"type": "string", "enum": ["EdDSA"]},
                        "use": {"type": "string", "enum": ["sig"]},
                        "kid": {"type": "string"},
                        "x": {"type": "string"},
                    },
                },
            }
        },
    },
}

DESCRIPTION = """\
The Durable Streams protocol over HTTP, as ds-gateway serves it (prose: docs/http.md).
Every response carries X-Request-Id, X-Content-Type-Options and Cross-Origin-Resource-Policy,
plus CORS headers for allowed origins (DSGW_CORS_ORIGINS); OPTIONS on any path is a CORS
preflight (204). With auth on (DSGW_AUTH_*), stream requests and the console's JSON endpoints need
`Authorization: Bearer <token>` whose `ds` claim grants read (GET, HEAD), append (POST) or manage
(PUT, DELETE) on the stream. Every GET outside /v1/stream/ also answers HEAD.
Under /v1/stream/__ds/ the subscription API (PROTOCOL.md sections 6 and 7) answers its own errors as
application/json `{"error": {"code", "message"}}`; a method a __ds route does not take is 405 (problem
details, with Allow), and so are auth's 401 and 403."""


def build_document(settings: Settings) -> Doc:
    """The document for a gateway with these settings (the console's paths only when it is on)."""
    ok_json = {"application/json": {"schema": {"type": "object"}}}
    paths: Doc = {
        # The __ds control routes first: the generic stream path would match them too.
        **subscription_paths(),
        RESERVED_PATH: reserved_operations(),
        STREAM_PATH: stream_operations(),
        "/healthz": plain_get(
            "healthz", "The process is alive", {"200": response("Alive.", content=ok_json)}
        ),
        "/readyz": plain_get(
            "readyz",
            "Redis answers and this replica's live subscription is up",
            {"200": response("Ready.", content=ok_json), "503": response("Not ready.", content=ok_json)},
        ),
        "/metrics": plain_get(
            "metrics",
            "Prometheus metrics",
            {
                "200": response(
                    "The metrics, in the Prometheus text format.",
                    content={"text/plain": {"schema": {"type": "string"}}},
                )
            },
        ),
        OPENAPI_PATH: plain_get(
            "openapi", "This document", {"200": response("OpenAPI 3.1.", content=ok_json)}
        ),
    }
    if settings.console:
        paths |= console_paths()
    return {
        "openapi": "3.1.0",
        "info": {"title": "ds-gateway", "version": __version__, "description": DESCRIPTION},
        "paths": paths,
        "webhooks": subscription_webhooks(),
        "components": {
            "parameters": {"name": NAME},
            "headers": HEADERS,
            "schemas": SCHEMAS | SUB_SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT or API key"},
                "callbackToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A wake's own token: callback_token of the webhook body, or token of "
                    "the claim.",
                },
            },
        },
    }


def openapi_routes(settings: Settings) -> list[BaseRoute]:
    document = build_document(settings)

    async def endpoint(request: Request) -> Response:
        return JSONResponse(document)

    return [Route(OPENAPI_PATH, endpoint, methods=["GET"])]
