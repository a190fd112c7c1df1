// The ds-gateway console: plain browser JavaScript, no build step.
// Listing and details come from /console/api/streams; everything else (live
// tail over SSE, create, append, delete) is the stream API itself, so the
// gateway's authentication and scopes apply exactly as for any client. The
// bearer token the user pastes lives in sessionStorage (this tab only).
"use strict";

const TOKEN_KEY = "dsgw.console.token";
const API = "/console/api/streams";
const REFRESH_MS = 5000;
const TAIL_MAX_LINES = 1000;

const $ = (id) => document.getElementById(id);
let selected = null; // the stream shown on the right
let selectedInfo = null; // its details, as /console/api/streams/{name} gave them
let tail = null; // the running live tail: {name, offset, controller}

function authHeaders(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, authorization: `Bearer ${token}` } : extra;
}

// A stream name keeps its slashes in the URL; every other special character is escaped.
function streamUrl(name) {
  return "/v1/stream/" + name.split("/").map(encodeURIComponent).join("/");
}

function apiUrl(name) {
  return `${API}/${name.split("/").map(encodeURIComponent).join("/")}`;
}

function setStatus(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.className = kind;
}

// "403 Forbidden: the credential does not grant ..." from a problem+json body.
async function describeError(res) {
  let text = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    text = `${res.status} ${body.title || res.statusText}${body.detail ? ": " + body.detail : ""}`;
  } catch (_) {
    // not JSON: the status line says enough
  }
  if (res.status === 401) text += " (paste a bearer token above)";
  return text;
}

function isJson(contentType) {
  return (contentType || "").split(";")[0].trim().toLowerCase() === "application/json";
}

function cell(row, text, className = "") {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function sinkLag(sink) {
  if (!sink) return "not synced";
  if (!sink.group) return sink.backlog === undefined ? "no sink yet" : `no sink yet (${sink.backlog} waiting)`;
  if (!sink.backlog) return "0";
  return `${sink.backlog} entries, ${(sink.oldest_age_ms / 1000).toFixed(1)} s`;
}

function streamState(s) {
  if (s.deleted) return "deleted (forks live)";
  if (s.closed) return "closed";
  return "open";
}

// --- listing ---------------------------------------------------------------------

async function loadStreams() {
  let res;
  try {
    res = await fetch(API, { headers: authHeaders(), cache: "no-store" });
  } catch (err) {
    setStatus(`gateway unreachable: ${err.message}`, "error");
    return;
  }
  const body = $("streams").tBodies[0];
  if (!res.ok) {
    body.replaceChildren();
    setStatus(await describeError(res), "error");
    return;
  }
  const { streams } = await res.json();
  const rows = streams.map((s) => {
    const tr = document.createElement("tr");
    tr.dataset.name = s.name;
    if (s.name === selected) tr.className = "selected";
    cell(tr, s.name, "name");
    cell(tr, s.content_type);
    cell(tr, String(s.messages), "num");
    cell(tr, String(s.bytes), "num");
    cell(tr, String(s.producers), "num");
    cell(tr, sinkLag(s.sink));
    cell(tr, streamState(s));
    tr.addEventListener("click", () => select(s.name));
    return tr;
  });
  body.replaceChildren(...rows);
  $("streams-empty").hidden = rows.length > 0;
}

// --- one stream --------------------------------------------------------------------

function select(name) {
  if (name !== selected) {
    stopTail("stopped");
    $("tail-offset").value = "-1";
    $("tail-log").replaceChildren();
  }
  selected = name;
  for (const tr of $("streams").tBodies[0].rows) {
    tr.className = tr.dataset.name === name ? "selected" : "";
  }
  $("stream-panel").hidden = false;
  $("stream-name").textContent = name;
  loadInfo();
}

async function loadInfo() {
  if (!selected) return;
  const name = selected;
  const res = await fetch(apiUrl(name), { headers: authHeaders(), cache: "no-store" });
  if (name !== selected) return;
  if (!res.ok) {
    setStatus(await describeError(res), "error");
    return;
  }
  selectedInfo = await res.json();
  const info = selectedInfo;
  const fields = [
    ["Content type", info.content_type],
    ["Messages", info.messages],
    ["Bytes", info.bytes],
    ["Tail offset", info.tail_offset],
    ["State", streamState(info)],
    ["TTL", info.ttl === null ? "none" : `${info.ttl} s`],
    ["Expires at", info.expires_at || "never"],
    ["Forked from", info.forked_from ? `${info.forked_from} at ${info.fork_offset}` : "—"],
    ["Forks", info.forks.length ? info.forks.join(", ") : "—"],
    ["Sink lag (shard)", sinkLag(info.sink)],
  ];
  $("stream-info").replaceChildren(
    ...fields.flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = String(v);
      return [dt, dd];
    }),
  );
  const producers = info.producers.map((p) => {
    const tr = document.createElement("tr");
    cell(tr, p.id);
    cell(tr, String(p.epoch), "num");
    cell(tr, String(p.seq), "num");
    cell(tr, p.updated_ms ? new Date(p.updated_ms).toISOString() : "—");
    return tr;
  });
  if (!producers.length) {
    const tr = document.createElement("tr");
    cell(tr, "none (no idempotent producer has appended)").colSpan = 4;
    producers.push(tr);
  }
  $("producers").tBodies[0].replaceChildren(...producers);
}

// --- live tail (SSE over fetch, so the Authorization header can go along) -----------

function tailLine(offset, text, note = false) {
  const log = $("tail-log");
  const li = document.createElement("li");
  const code = document.createElement("span");
  code.className = "offset";
  code.textContent = offset;
  const msg = document.createElement("span");
  msg.className = note ? "note msg" : "msg";
  msg.textContent = text;
  li.append(code, msg);
  log.appendChild(li);
  while (log.children.length > TAIL_MAX_LINES) log.firstChild.remove();
  log.scrollTop = log.scrollHeight;
}

function setTailState(state) {
  $("tail-state").textContent = state;
  const live = state === "live";
  $("tail-pause").disabled = !live;
  $("tail-start").disabled = live;
  $("tail-start").textContent = state.startsWith("paused") ? "Resume" : "Start";
}

function stopTail(state) {
  if (tail) {
    tail.controller.abort();
    tail = null;
  }
  setTailState(state);
}

// Reads one SSE response; returns true once the stream is closed.
async function readEvents(res, current, json, base64) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let pending = []; // messages of the last data event, shown with the next control's offset
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5));
      }
      const payload = data.join("\n");
      if (event === "data") {
        if (json) pending = JSON.parse(payload).map((m) => JSON.stringify(m));
        else pending = [base64 ? `(base64) ${payload}` : payload];
      } else if (event === "control") {
        const control = JSON.parse(payload);
        if (tail !== current) return false;
        for (const text of pending) tailLine(control.streamNextOffset, text);
        pending = [];
        current.offset = control.streamNextOffset;
        $("tail-offset").value = current.offset;
        if (control.streamClosed) return true;
      }
    }
  }
}

async function startTail() {
  if (!selected) return;
  stopTail("live");
  const name = selected;
  const json = isJson(selectedInfo && selectedInfo.content_type);
  const current = { name, offset: $("tail-offset").value.trim() || "-1", controller: new AbortController() };
  tail = current;
  setTailState("live");
  // The gateway ends an SSE response after DSGW_SSE_MAX_LIFETIME_MS (and when it
  // restarts): carry on from the last offset until paused or the stream closes.
  while (tail === current) {
    try {
      const url = `${streamUrl(name)}?offset=${encodeURIComponent(current.offset)}&live=sse`;
      const res = await fetch(url, { headers: authHeaders(), signal: current.controller.signal });
      if (!res.ok) {
        setStatus(await describeError(res), "error");
        if (tail === current) stopTail("stopped");
        return;
      }
      const base64 = res.headers.get("stream-sse-data-encoding") === "base64";
      if (await readEvents(res, current, json, base64)) {
        tailLine(current.offset, "stream closed", true);
        if (tail === current) stopTail("closed");
        return;
      }
    } catch (err) {
      if (tail !== current) return; // paused or switched: the abort lands here
      setStatus(`live tail interrupted: ${err.message}; retrying`, "error");
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
}

function pauseTail() {
  if (!tail) return;
  const offset = tail.offset;
  stopTail(`paused at ${offset}`);
  $("tail-offset").value = offset;
}

// --- writes (the stream API) ------------------------------------------------------------

async function createStream(event) {
  event.preventDefault();
  const name = $("create-name").value.trim();
  const contentType = $("create-type").value.trim() || "application/json";
  const ttl = $("create-ttl").value.trim();
  if (!name) return;
  const headers = authHeaders({ "content-type": contentType });
  if (ttl) headers["stream-ttl"] = ttl;
  const res = await fetch(streamUrl(name), { method: "PUT", headers });
  if (!res.ok) {
    setStatus(`create ${name}: ${await describeError(res)}`, "error");
    return;
  }
  setStatus(res.status === 201 ? `created ${name}` : `${name} already exists with these settings`, "ok");
  $("create-name").value = "";
  await loadStreams();
  select(name);
}

async function appendMessage(event) {
  event.preventDefault();
  if (!selected || !selectedInfo) return;
  const name = selected;
  const res = await fetch(streamUrl(name), {
    method: "POST",
    headers: authHeaders({ "content-type": selectedInfo.content_type }),
    body: $("append-body").value,
  });
  if (!res.ok) {
    setStatus(`append to ${name}: ${await describeError(res)}`, "error");
    return;
  }
  setStatus(`appended to ${name}; next offset ${res.headers.get("stream-next-offset")}`, "ok");
  $("append-body").value = "";
  loadInfo();
  loadStreams();
}

async function deleteStream() {
  if (!selected) return;
  const name = selected;
  if (!window.confirm(`Delete the stream ${name} and all its messages?`)) return;
  const res = await fetch(streamUrl(name), { method: "DELETE", headers: authHeaders() });
  if (!res.ok) {
    setStatus(`delete ${name}: ${await describeError(res)}`, "error");
    return;
  }
  setStatus(`deleted ${name}`, "ok");
  stopTail("stopped");
  selected = null;
  selectedInfo = null;
  $("stream-panel").hidden = true;
  await loadStreams();
}

// --- token ---------------------------------------------------------------------------------

function showTokenState() {
  $("token-state").textContent = sessionStorage.getItem(TOKEN_KEY) ? "token set for this tab" : "";
}

function useToken(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  showTokenState();
  setStatus("");
  loadStreams();
  loadInfo();
}

function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  showTokenState();
  loadStreams();
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", useToken);
  $("token-forget").addEventListener("click", forgetToken);
  $("refresh").addEventListener("click", () => {
    loadStreams();
    loadInfo();
  });
  $("create-form").addEventListener("submit", createStream);
  $("append-form").addEventListener("submit", appendMessage);
  $("delete").addEventListener("click", deleteStream);
  $("tail-start").addEventListener("click", startTail);
  $("tail-pause").addEventListener("click", pauseTail);
  $("tail-clear").addEventListener("click", () => $("tail-log").replaceChildren());
  showTokenState();
  loadStreams();
  setInterval(() => {
    if (document.visibilityState !== "visible") return;
    loadStreams();
    loadInfo();
  }, REFRESH_MS);
});
