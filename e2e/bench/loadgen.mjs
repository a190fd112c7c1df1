// The load generator of `make bench` (e2e/bench_compare.py): one Node process,
// node:http with keep-alive agents, every phase bounded in time.
//
//   node loadgen.mjs CONFIG.json RESULT.json
//
// Measured requests and SSE subscribers go through http1.mjs (lean raw-socket
// HTTP/1.1: one keep-alive connection per writer or reader); setup uses node:http.
//
// CONFIG: {scenario, base, hardDeadlineS, cpu: {clkTck, groups: {name: [pid]}, redisPort}, ...}
// scenario is one of append | catchup | fanout | longpoll (parameters below).
// RESULT: counts, latency percentiles (ms), the server groups' CPU seconds and
// Redis commandstats over the measured window, and this process's own CPU.
import http from "node:http"
import net from "node:net"
import { readFileSync, writeFileSync } from "node:fs"
import { performance } from "node:perf_hooks"
import { Connection, openStream, setExtraHeaders } from "./http1.mjs"

const [configPath, resultPath] = process.argv.slice(2)
const config = JSON.parse(readFileSync(configPath, "utf8"))
const base = new URL(config.base)
setExtraHeaders(config.headers)
const now = () => performance.now()
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)))

// A loadgen that hangs must not hang the harness: exit with what we know.
setTimeout(() => {
  console.error(`loadgen: hard deadline of ${config.hardDeadlineS}s reached`)
  process.exit(3)
}, config.hardDeadlineS * 1000).unref()

// --- statistics ---------------------------------------------------------------

function percentiles(values) {
  if (values.length === 0) return { n: 0 }
  const sorted = Float64Array.from(values).sort()
  const at = (p) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]
  let sum = 0
  for (const v of sorted) sum += v
  return { n: sorted.length, mean: sum / sorted.length, p50: at(50), p90: at(90), p99: at(99), p999: at(99.9), max: sorted[sorted.length - 1] }
}

function median(values) {
  return percentiles(values).p50
}

// --- CPU accounting: /proc for every server process, INFO for Redis ----------

function procTicks(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8")
    // Fields after "(comm)": index 0 is field 3 (state); utime is field 14, stime 15.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ")
    return Number(fields[11]) + Number(fields[12])
  } catch {
    return null // the process is gone: reported as missing
  }
}

function redisCommand(port, line) {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1")
    let buffer = ""
    socket.setEncoding("utf8")
    socket.setTimeout(5000, () => socket.destroy(new Error("redis INFO timed out")))
    socket.on("connect", () => socket.write(`${line}\r\n`))
    socket.on("error", reject)
    socket.on("data", (chunk) => {
      buffer += chunk
      const eol = buffer.indexOf("\r\n")
      if (eol < 0) return
      if (buffer[0] !== "$") return reject(new Error(`redis answered ${buffer.slice(0, eol)}`))
      const length = Number(buffer.slice(1, eol))
      if (buffer.length >= eol + 2 + length) {
        socket.destroy()
        resolve(buffer.slice(eol + 2, eol + 2 + length))
      }
    })
  })
}

async function commandStats(port) {
  const stats = {}
  for (const line of (await redisCommand(port, "INFO commandstats")).split("\r\n")) {
    const match = /^cmdstat_([^:]+):calls=(\d+),usec=(\d+)/.exec(line)
    if (match) stats[match[1]] = { calls: Number(match[2]), usec: Number(match[3]) }
  }
  return stats
}

async function cpuSnapshot() {
  const groups = {}
  for (const [name, pids] of Object.entries(config.cpu?.groups ?? {})) {
    groups[name] = pids.map(procTicks)
  }
  const redis = config.cpu?.redisPort ? await commandStats(config.cpu.redisPort) : null
  return { t: now(), self: process.cpuUsage(), groups, redis }
}

function cpuDelta(before, after) {
  const clkTck = config.cpu?.clkTck ?? 100
  const seconds = (after.t - before.t) / 1000
  const self = after.self.user - before.self.user + after.self.system - before.self.system
  const groups = {}
  for (const [name, ticks] of Object.entries(after.groups)) {
    let total = 0
    let missing = 0
    const perPid = {}
    ticks.forEach((tick, i) => {
      const pid = config.cpu.groups[name][i]
      if (tick === null || before.groups[name][i] === null) missing += 1
      else {
        total += tick - before.groups[name][i]
        perPid[pid] = (tick - before.groups[name][i]) / clkTck
      }
    })
    groups[name] = { cpuS: total / clkTck, missingPids: missing, perPid }
  }
  let redisCommands = null
  if (after.redis) {
    redisCommands = {}
    for (const [name, stat] of Object.entries(after.redis)) {
      const old = before.redis[name] ?? { calls: 0, usec: 0 }
      if (stat.calls > old.calls) redisCommands[name] = { calls: stat.calls - old.calls, usec: stat.usec - old.usec }
    }
  }
  return { seconds, loadgenCpuS: self / 1e6, groups, redisCommands }
}

// --- HTTP ---------------------------------------------------------------------

const keepAlive = new http.Agent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 1024 })

function request(method, path, { headers = {}, body = null, timeoutMs = 10000, agent = keepAlive } = {}) {
  return new Promise((resolve) => {
    const started = now()
    const req = http.request(
      { host: base.hostname, port: base.port, method, path, headers: { ...config.headers, ...headers }, agent },
      (res) => {
        const chunks = []
        res.on("data", (chunk) => chunks.push(chunk))
        res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks), started, ended: now() }))
        res.on("error", (error) => resolve({ status: 0, error: String(error), started, ended: now() }))
      },
    )
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`timeout after ${timeoutMs} ms`)))
    req.on("error", (error) => resolve({ status: 0, error: String(error), started, ended: now() }))
    if (body !== null) req.setHeader("content-length", Buffer.byteLength(body))
    req.end(body ?? undefined)
  })
}

const connection = (timeoutMs = 10000) => new Connection(base.hostname, base.port, timeoutMs)
const streamPath = (name) => `/v1/stream/${name}`
const JSON_TYPE = { "content-type": "application/json" }

async function createStream(name) {
  // connection: close, so that idle setup connections do not sit on the server during the run.
  const res = await request("PUT", streamPath(name), { headers: { ...JSON_TYPE, connection: "close" } })
  if (res.status !== 201) throw new Error(`PUT ${name}: ${res.status} ${res.error ?? res.body}`)
}

// A JSON object of about `size` bytes: the fields, then a pad.
const PAD = "x".repeat(4096)
function padded(fields, size) {
  const head = `${JSON.stringify(fields).slice(0, -1)},"pad":"`
  return `${head}${PAD.slice(0, Math.max(0, size - head.length - 2))}"}`
}

function countStatus(counts, res) {
  const key = res.status === 0 ? "error" : String(res.status)
  counts[key] = (counts[key] ?? 0) + 1
}

// Read a stream from -1 following Stream-Next-Offset until Stream-Up-To-Date.
// A failed read is retried (up to 3 times), then the read is reported incomplete.
async function readAll(conn, name, { maxRequests = 100000, deadline = now() + 60000 } = {}) {
  const bodies = []
  let offset = "-1"
  let requests = 0
  let bytes = 0
  let failures = 0
  const started = now()
  while (requests < maxRequests && now() < deadline) {
    const res = await conn.request("GET", `${streamPath(name)}?offset=${encodeURIComponent(offset)}`, {}, null, 30000)
    requests += 1
    if (res.status !== 200) {
      console.error(`loadgen: GET ${name} at ${offset}: ${res.status} ${res.error ?? res.body}`)
      if (++failures > 3) break
      await sleep(100)
      continue
    }
    bodies.push(res.body)
    bytes += res.body.length
    offset = res.headers.get("stream-next-offset")
    if (res.headers.get("stream-up-to-date") === "true") return { bodies, requests, bytes, ms: now() - started, complete: true }
  }
  return { bodies, requests, bytes, ms: now() - started, complete: false }
}

const messagesOf = (bodies) => bodies.flatMap((body) => (body.length ? JSON.parse(body.toString("utf8")) : []))

// --- (a)/(b) appends: one writer per stream, one request in flight each ------

async function appendScenario() {
  const { prefix, writers, seconds, warmupS, idempotent, bodyBytes } = config
  const names = Array.from({ length: writers }, (_, w) => `${prefix}-${w}`)
  await Promise.all(names.map(createStream))
  const state = names.map(() => ({ seq: 0, acked: [], uncertain: new Set() }))
  const statuses = {}
  const errors = []
  const latencies = []
  let windowAcks = 0
  let totalAcks = 0
  const start = now()
  const windowStart = start + warmupS * 1000
  const windowEnd = windowStart + seconds * 1000
  let before = null
  let after = null
  const marks = (async () => {
    await sleep(windowStart - now())
    before = await cpuSnapshot()
    await sleep(windowEnd - now())
    after = await cpuSnapshot()
  })()

  async function writer(w) {
    const mine = state[w]
    const conn = connection()
    while (now() < windowEnd) {
      const seq = mine.seq
      const headers = { ...JSON_TYPE }
      if (idempotent) Object.assign(headers, { "producer-id": `w${w}`, "producer-epoch": "0", "producer-seq": String(seq) })
      const res = await conn.request("POST", streamPath(names[w]), headers, padded({ type: "bench", w, s: seq }, bodyBytes))
      countStatus(statuses, res)
      const ok = res.status >= 200 && res.status < 300
      if (ok) {
        mine.acked.push(seq)
        totalAcks += 1
        if (res.ended >= windowStart && res.ended <= windowEnd) {
          windowAcks += 1
          latencies.push(res.ended - res.started)
        }
        mine.seq += 1
      } else {
        if (errors.length < 20) errors.push(`w${w} s${seq}: ${res.status} ${res.error ?? res.body?.toString().slice(0, 200)}`)
        mine.uncertain.add(seq)
        // A producer retries the same seq; a plain writer moves on (the failed
        // append may or may not have landed: read-back tolerates it).
        if (!idempotent) mine.seq += 1
        await sleep(10)
      }
    }
    conn.close()
  }
  await Promise.all(names.map((_, w) => writer(w)))
  await marks

  // Every acknowledged append read back, exactly once, in order.
  const check = { missing: 0, duplicate: 0, outOfOrder: 0, unexpected: 0, foreign: 0, readIncomplete: 0, readRequests: 0 }
  const readDeadline = now() + Math.max(30000, seconds * 3000)
  const reader = connection()
  for (let w = 0; w < writers; w++) {
    const read = await readAll(reader, names[w], { deadline: readDeadline })
    check.readRequests += read.requests
    if (!read.complete) check.readIncomplete += 1
    const seen = new Set()
    let last = -1
    for (const message of messagesOf(read.bodies)) {
      if (message.w !== w) {
        check.foreign += 1
        continue
      }
      if (seen.has(message.s)) check.duplicate += 1
      else if (message.s < last) check.outOfOrder += 1
      seen.add(message.s)
      last = Math.max(last, message.s)
    }
    const acked = new Set(state[w].acked)
    for (const seq of acked) if (!seen.has(seq)) check.missing += 1
    for (const seq of seen) if (!acked.has(seq) && !state[w].uncertain.has(seq)) check.unexpected += 1
  }
  reader.close()
  return {
    windowS: seconds,
    acked: windowAcks,
    ackedTotal: totalAcks,
    perSecond: windowAcks / seconds,
    latencyMs: percentiles(latencies),
    statuses,
    errors,
    readBack: check,
    cpu: cpuDelta(before, after),
  }
}

// --- (c) catch-up from -1 ------------------------------------------------------

async function catchupScenario() {
  const { name, messages, batch, repeats, bodyBytes } = config
  await createStream(name)
  const conn = connection()
  for (let i = 0; i < messages; i += batch) {
    const items = []
    for (let j = i; j < Math.min(messages, i + batch); j++) items.push(padded({ type: "bench", i: j }, bodyBytes))
    const res = await conn.request("POST", streamPath(name), JSON_TYPE, `[${items.join(",")}]`, 60000)
    if (res.status < 200 || res.status >= 300) throw new Error(`fill ${name} at ${i}: ${res.status} ${res.error ?? res.body}`)
  }
  await readAll(conn, name) // warm-up: the first read after a fill is not a catch-up
  const runs = []
  let wrong = 0
  const before = await cpuSnapshot()
  let cpu = null
  const reads = []
  for (let r = 0; r < repeats; r++) reads.push(await readAll(conn, name))
  conn.close()
  cpu = cpuDelta(before, await cpuSnapshot())
  // Verify outside the timed reads: parsing 10 MB of JSON is the client's cost.
  for (const read of reads) {
    const items = messagesOf(read.bodies)
    const inOrder = items.length === messages && items.every((item, i) => item.i === i)
    if (!inOrder || !read.complete) wrong += 1
    runs.push({ ms: read.ms, requests: read.requests, bytes: read.bytes, messages: items.length, mbPerS: read.bytes / 1e6 / (read.ms / 1000) })
  }
  return {
    messages,
    runs,
    wrongReads: wrong,
    bestMs: Math.min(...runs.map((r) => r.ms)),
    medianMs: median(runs.map((r) => r.ms)),
    bestMbPerS: Math.max(...runs.map((r) => r.mbPerS)),
    medianMbPerS: median(runs.map((r) => r.mbPerS)),
    requestsPerRead: median(runs.map((r) => r.requests)),
    bytesPerRead: median(runs.map((r) => r.bytes)),
    cpu,
  }
}

// --- (d)/(f) SSE fan-out -------------------------------------------------------

const DATA_ITEM = /"k":(\d+),"t":([0-9.]+)/g
const NEXT_OFFSET = /"streamNextOffset":"([^"]+)"/

async function fanoutScenario() {
  const { prefix, streams, subsPerStream, messagesPerStream: M, rate, bodyBytes, connectConcurrency, drainS, connectTimeoutS } = config
  const names = Array.from({ length: streams }, (_, j) => `${prefix}-${j}`)
  await Promise.all(names.map(createStream))
  const total = streams * subsPerStream
  const expected = total * M
  const perMessageMax = names.map(() => new Float64Array(M).fill(-1))
  const deliveries = []
  const acked = names.map(() => new Uint8Array(M))
  const subs = []
  let delivered = 0
  let duplicate = 0
  let outOfOrder = 0
  let reconnects = 0
  let connectFailures = 0
  let finished = false
  let resolveAll
  const allDelivered = new Promise((resolve) => (resolveAll = resolve))

  function onEvent(sub, block, received) {
    if (block.startsWith("event: control") || block.startsWith("event:control")) {
      const match = NEXT_OFFSET.exec(block)
      if (match) sub.offset = match[1]
      if (sub.connectMs === null) sub.connectMs = received - sub.requested
      sub.onConnected() // settles this connection attempt (once)
      return
    }
    if (!block.startsWith("event: data") && !block.startsWith("event:data")) return
    for (const [, kText, tText] of block.matchAll(DATA_ITEM)) {
      const k = Number(kText)
      if (sub.got[k]) {
        duplicate += 1
        continue
      }
      if (k < sub.lastK) outOfOrder += 1
      sub.lastK = Math.max(sub.lastK, k)
      sub.got[k] = 1
      const latency = received - Number(tText)
      deliveries.push(latency)
      const row = perMessageMax[sub.stream]
      if (latency > row[k]) row[k] = latency
      delivered += 1
    }
    if (delivered === expected) resolveAll()
  }

  function connect(sub) {
    return new Promise((resolve) => {
      let buffer = ""
      let settled = false
      const settle = (failed) => {
        if (settled) return
        settled = true
        clearTimeout(timer)
        if (failed) connectFailures += 1
        resolve()
      }
      sub.onConnected = () => settle(false)
      sub.requested = now()
      const path = `${streamPath(names[sub.stream])}?offset=${encodeURIComponent(sub.offset)}&live=sse`
      const socket = openStream(base.hostname, Number(base.port), path, {
        onHead: (status) => status !== 200 && settle(true),
        onText: (text, received) => {
          buffer += text.includes("\r") ? text.replace(/\r\n?/g, "\n") : text
          let end
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            onEvent(sub, buffer.slice(0, end), received)
            buffer = buffer.slice(end + 2)
          }
        },
        onClose: () => {
          if (!settled) return settle(true)
          // The server ended the stream (lifetime, shutdown): resume like a client.
          if (!finished && sub.connectMs !== null) {
            reconnects += 1
            connect(sub)
          }
        },
      })
      sub.socket = socket
      const timer = setTimeout(() => {
        if (!settled) {
          settle(true)
          socket.destroy()
        }
      }, connectTimeoutS * 1000)
    })
  }

  for (let j = 0; j < streams; j++) {
    for (let i = 0; i < subsPerStream; i++) {
      subs.push({ stream: j, offset: "now", got: new Uint8Array(M), lastK: -1, connectMs: null, requested: 0, socket: null, onConnected: null })
    }
  }
  const connectStarted = now()
  let next = 0
  await Promise.all(
    Array.from({ length: Math.min(connectConcurrency, subs.length) }, async () => {
      while (next < subs.length) await connect(subs[next++])
    }),
  )
  const connectAllMs = now() - connectStarted
  const connected = subs.filter((sub) => sub.connectMs !== null)

  const before = await cpuSnapshot()
  const appendLatencies = []
  const appendStatuses = {}
  const t0 = now() + 50
  const interval = 1000 / rate
  let firstSent = null
  let lastSent = null
  let maxPipelined = 0 // most appends of one stream in flight at once
  // Open loop: each append leaves at its scheduled time, pipelined behind any
  // still unanswered on its stream's one connection, so a slow server sees the
  // offered rate (and its queue) while each stream's order stays the send order.
  await Promise.all(
    names.map(async (name, j) => {
      const conn = connection()
      const inFlight = []
      let unanswered = 0
      for (let k = 0; k < M; k++) {
        await sleep(t0 + (k * streams + j) * interval - now())
        const sent = now()
        firstSent ??= sent
        lastSent = sent
        const body = padded({ type: "fanout", k, t: Number(sent.toFixed(3)) }, bodyBytes)
        maxPipelined = Math.max(maxPipelined, ++unanswered)
        inFlight.push(
          conn.request("POST", streamPath(name), JSON_TYPE, body, 30000).then((res) => {
            unanswered -= 1
            countStatus(appendStatuses, res)
            if (res.status >= 200 && res.status < 300) {
              acked[j][k] = 1
              appendLatencies.push(res.ended - res.started)
            }
          }),
        )
      }
      await Promise.all(inFlight)
      conn.close()
    }),
  )
  const sendMs = lastSent - firstSent
  const expectedAcked = subs.reduce((sum, sub) => sum + acked[sub.stream].reduce((a, b) => a + b, 0), 0)
  if (delivered >= expectedAcked) resolveAll()
  await Promise.race([allDelivered, sleep(drainS * 1000)])
  const after = await cpuSnapshot()
  finished = true
  for (const sub of subs) sub.socket?.destroy()

  let missing = 0
  for (const sub of subs) for (let k = 0; k < M; k++) if (acked[sub.stream][k] && !sub.got[k]) missing += 1
  const allServed = []
  let messagesNotServedToAll = 0
  names.forEach((_, j) => {
    for (let k = 0; k < M; k++) {
      if (!acked[j][k]) continue
      const everyone = subs.every((sub) => sub.stream !== j || sub.got[k])
      if (everyone) allServed.push(perMessageMax[j][k])
      else messagesNotServedToAll += 1
    }
  })
  return {
    subscribers: total,
    connected: connected.length,
    connectFailures,
    connectMs: percentiles(connected.map((sub) => sub.connectMs)),
    connectAllMs,
    messagesSent: streams * M,
    messagesAcked: appendLatencies.length,
    appendStatuses,
    appendLatencyMs: percentiles(appendLatencies),
    sendMs,
    maxPipelined,
    achievedRate: sendMs > 0 ? (streams * M - 1) / (sendMs / 1000) : null,
    expectedDeliveries: expectedAcked,
    delivered,
    missing,
    duplicate,
    outOfOrder,
    reconnects,
    deliveryMs: percentiles(deliveries),
    allServedMs: percentiles(allServed),
    messagesNotServedToAll,
    cpu: cpuDelta(before, after),
  }
}

// --- (e) long-poll wake-up ---------------------------------------------------

async function longpollScenario() {
  const { name, rounds, delayMs, seconds, bodyBytes } = config
  await createStream(name)
  const reader = connection(15000)
  const writer = connection()
  const head = await writer.request("GET", `${streamPath(name)}?offset=now`)
  let offset = head.headers.get("stream-next-offset")
  const wakes = []
  const statuses = {}
  let wrong = 0
  const deadline = now() + seconds * 1000
  const before = await cpuSnapshot()
  for (let round = 0; round < rounds && now() < deadline; round++) {
    const poll = reader.request("GET", `${streamPath(name)}?offset=${encodeURIComponent(offset)}&live=long-poll`)
    await sleep(delayMs)
    const sent = now()
    const append = writer.request("POST", streamPath(name), JSON_TYPE, padded({ type: "wake", round }, bodyBytes))
    const [res] = await Promise.all([poll, append])
    countStatus(statuses, res)
    if (res.status === 200) {
      const items = JSON.parse(res.body.toString("utf8"))
      if (items.length !== 1 || items[0].round !== round) wrong += 1
      wakes.push(res.ended - sent)
      offset = res.headers.get("stream-next-offset")
    } else {
      wrong += 1
      const tail = await writer.request("GET", `${streamPath(name)}?offset=now`)
      offset = tail.headers.get("stream-next-offset")
    }
  }
  reader.close()
  writer.close()
  return { rounds: wakes.length, wrong, statuses, wakeMs: percentiles(wakes), cpu: cpuDelta(before, await cpuSnapshot()) }
}

// --- main ---------------------------------------------------------------------

const scenarios = { append: appendScenario, catchup: catchupScenario, fanout: fanoutScenario, longpoll: longpollScenario }
const run = scenarios[config.scenario]
if (!run) throw new Error(`unknown scenario ${config.scenario}`)
const started = process.cpuUsage()
const wallStarted = now()
const result = await run()
const own = process.cpuUsage(started)
result.loadgen = { cpuS: (own.user + own.system) / 1e6, wallS: (now() - wallStarted) / 1000 }
writeFileSync(resultPath, JSON.stringify(result))
process.exit(0)
