"""The official clients against a gateway with authentication on: the
TypeScript client (npm @durable-streams/client, pinned in e2e/package-lock.json)
and the Python client (PyPI durable-streams), each given a bearer token,
create, append, read live and resume. The TypeScript client also rides out
429s from the append rate limit (it waits for Retry-After) and an SSE
connection ended by token expiry (its headers function supplies a new token)."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, GatewayProcess, start_gateway
from tests.integration.test_auth import ALL, AUDIENCE, ISSUER, SECRET, bearer, mint

E2E = ROOT / "e2e"
APPENDS_PER_S = 5


@pytest.fixture(scope="module")
def client_gateway(redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = start_gateway(
        redis_server.url,
        tmp_path_factory.mktemp("gw-clients"),
        DSGW_AUTH_JWT_SECRET=SECRET,
        DSGW_AUTH_ISSUER=ISSUER,
        DSGW_AUTH_AUDIENCE=AUDIENCE,
        DSGW_RATE_APPENDS_PER_S=str(APPENDS_PER_S),
        DSGW_LONG_POLL_TIMEOUT_MS="2000",
    )
    yield gw
    gw.stop()


# --- TypeScript -----------------------------------------------------------------------------

TS_SCENARIO = r"""
import { createHmac } from "node:crypto";
import { DurableStream, stream } from "@durable-streams/client";

const [base, secret, issuer, audience, run] = process.argv.slice(1);
const b64 = (v) => Buffer.from(typeof v === "string" ? v : JSON.stringify(v)).toString("base64url");
// A token minted per request, like an app refreshing its session token.
function mint(sub, ttlSeconds, ds) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64({ iss: issuer, aud: audience, sub, iat: now, exp: now + ttlSeconds, ds });
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}
const scope = (name) => ({ read: [name], append: [name], manage: [name] });
const statuses = [];
const counting = async (input, init) => {
  const response = await fetch(input, init);
  statuses.push([init?.method ?? "GET", String(input).includes("live=sse") ? "sse" : "", response.status]);
  return response;
};
const result = {};

// 1. Create, append, read live over SSE, resume from a saved offset.
{
  const name = `ts/${run}/chat`;
  const url = `${base}/v1/stream/${name}`;
  const headers = { Authorization: `Bearer ${mint("ts-user", 600, scope(name))}` };
  const handle = await DurableStream.create({ url, contentType: "application/json", headers });
  await handle.append(JSON.stringify({ n: 1 }));
  const res = await stream({ url, headers, offset: "-1", live: "sse" });
  const live = [];
  let saved;
  let appended = false;
  await new Promise((resolve) => {
    res.subscribeJson(async (batch) => {
      live.push(...batch.items);
      // Once, after the first message: batches without items come too.
      if (live.length === 1 && !appended) { appended = true; await handle.append(JSON.stringify({ n: 2 })); }
      if (live.length >= 2) { saved = batch.offset; resolve(); }
    });
  });
  res.cancel();
  await handle.append(JSON.stringify({ n: 3 }));
  const resumed = await (await stream({ url, headers, offset: saved, live: false })).json();
  result.live = live;
  result.resumed = resumed;
}

// 2. Appends over the rate limit: 429 + Retry-After, the client waits and succeeds.
{
  const name = `ts/${run}/burst`;
  const url = `${base}/v1/stream/${name}`;
  const headers = { Authorization: `Bearer ${mint(`ts-burst-${run}`, 600, scope(name))}` };
  const handle = await DurableStream.create({ url, contentType: "application/json", headers, fetch: counting, batching: false });
  for (let i = 0; i < 12; i++) await handle.append(JSON.stringify({ i }));
  result.burst = await (await stream({ url, headers, offset: "-1", live: false })).json();
  result.burst429 = statuses.filter(([m, , s]) => m === "POST" && s === 429).length;
}

// 3. SSE with 2-second tokens: the server ends each connection at its token's
//    expiry; the client reconnects from its offset with a freshly minted token.
{
  const name = `ts/${run}/expiring`;
  const url = `${base}/v1/stream/${name}`;
  const admin = { Authorization: `Bearer ${mint("ts-admin", 600, scope(name))}` };
  const handle = await DurableStream.create({ url, contentType: "application/json", headers: admin });
  statuses.length = 0;
  const headers = { Authorization: () => `Bearer ${mint("ts-reader", 2, scope(name))}` };
  const res = await stream({ url, headers, offset: "-1", live: "sse", fetch: counting });
  const seen = [];
  let wake = () => {};
  res.subscribeJson((batch) => { seen.push(...batch.items); wake(); });
  const until = (n) => new Promise((resolve) => { wake = () => seen.length >= n && resolve(); wake(); });
  await handle.append(JSON.stringify({ n: 1 }));
  await until(1);
  // Wait for a reconnect: a second SSE request, made with a new token.
  while (statuses.filter(([, kind]) => kind === "sse").length < 2) await new Promise((r) => setTimeout(r, 100));
  await handle.append(JSON.stringify({ n: 2 }));
  await until(2);
  res.cancel();
  result.expiring = seen;
  result.sseRequests = statuses.filter(([, kind]) => kind === "sse").map(([, , s]) => s);
}
console.log(JSON.stringify(result));
"""


def test_typescript_client_with_a_bearer_token(client_gateway: GatewayProcess) -> None:
    node = shutil.which("node")
    assert node is not None, "node is needed (Node 20, as for the conformance suite)"
    assert (E2E / "node_modules" / "@durable-streams" / "client").is_dir(), (
        "run `make install` (npm ci in e2e/)"
    )
    run = uuid.uuid4().hex[:8]
    done = subprocess.run(
        [node, "--input-type=module", "-e", TS_SCENARIO, client_gateway.url, SECRET, ISSUER, AUDIENCE, run],
        cwd=E2E,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["live"] == [{"n": 1}, {"n": 2}]
    assert result["resumed"] == [{"n": 3}]
    assert result["burst"] == [{"i": i} for i in range(12)]
    assert result["burst429"] > 0  # it was limited, and recovered by itself
    assert result["expiring"] == [{"n": 1}, {"n": 2}]
    assert result["sseRequests"][:2] == [200, 200]


# --- Python -----------------------------------------------------------------------------------


def test_python_client_with_a_bearer_token(client_gateway: GatewayProcess) -> None:
    import durable_streams as ds

    name = f"py/{uuid.uuid4().hex[:8]}/chat"
    url = client_gateway.stream_url(name)
    token = mint({"read": [name], "append": [name], "manage": [name]}, sub="py-user")
    headers = bearer(token)

    # Without the token the client gets the 401 (and does not retry it).
    with pytest.raises(Exception) as refused:
        ds.DurableStream.create(url, content_type="application/json")
    assert "401" in str(refused.value) or getattr(refused.value, "status", None) == 401

    handle = ds.DurableStream.create(url, content_type="application/json", headers=headers)
    handle.append({"n": 1})
    with ds.stream(url, offset="-1", live="sse", headers=headers) as res:
        live: list[Any] = []
        # Events carry the offset to resume from after them (a checkpoint).
        for event in res.iter_events(mode="json"):
            live.extend(event.data)
            if live == [{"n": 1}]:
                handle.append({"n": 2})
            if len(live) == 2:
                saved = event.next_offset
                break
    assert live == [{"n": 1}, {"n": 2}]
    handle.append({"n": 3})
    with ds.stream(url, offset=saved, live=False, headers=headers) as res:
        assert res.read_json() == [{"n": 3}]
    # Long-poll too.
    with ds.stream(url, offset=saved, live="long-poll", headers=headers) as res:
        assert next(iter(res.iter_json())) == {"n": 3}
    # And the server holds what the client wrote.
    body = httpx.get(url, params={"offset": "-1"}, headers=bearer(mint(ALL))).json()
    assert body == [{"n": 1}, {"n": 2}, {"n": 3}]
