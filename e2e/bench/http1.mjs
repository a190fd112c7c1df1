// A minimal HTTP/1.1 client connection for the load generator's hot paths:
// keep-alive, Content-Length or chunked bodies, and pipelining (requests sent
// before earlier responses arrived are answered in order, which lets a writer
// keep a fixed rate on one connection without reordering its appends). It costs
// a fraction of node:http's CPU per request, which matters on a 2-core machine
// where the generator shares the CPU with the servers it measures.
import net from "node:net"
import { performance } from "node:perf_hooks"

const CRLF2 = Buffer.from("\r\n\r\n")
const READ_BUFFER = Buffer.alloc(256 * 1024)

// Connections with requests in flight. One sweeper enforces every request's
// timeout (the oldest one's, on each connection): cheaper than a timer per request.
const active = new Set()
setInterval(() => {
  const t = performance.now()
  for (const conn of active) if (t > conn.queue[0].deadline) conn.fail(`timeout after ${conn.queue[0].timeoutMs} ms`)
}, 100).unref()

// Response headers, looked up by name in the raw head only when asked for: the
// hot path (an append's 204) needs two of them.
class Headers {
  constructor(head) {
    this.head = head
    this.lower = null
  }

  get(name) {
    this.lower ??= this.head.toLowerCase() // same length: the head is latin1
    const at = this.lower.indexOf(`\r\n${name}:`)
    if (at < 0) return undefined
    const end = this.head.indexOf("\r\n", at + 2)
    return this.head.slice(at + name.length + 3, end < 0 ? undefined : end).trim()
  }
}

// Headers every request carries (e.g. a bearer token for the auth-on run).
let extraHead = ""
export function setExtraHeaders(headers) {
  extraHead = Object.entries(headers ?? {}).map(([name, value]) => `${name}: ${value}\r\n`).join("")
}

export class Connection {
  constructor(host, port, timeoutMs = 10000) {
    this.host = host
    this.port = port
    this.timeoutMs = timeoutMs
    this.socket = null
    this.queue = [] // requests in flight, oldest first: {resolve, started, deadline, timeoutMs}
    this.buffer = Buffer.alloc(0) // the bytes parse() looks at
    this.chunks = [] // bytes received and not yet parsed
    this.received = 0
    this.needed = 0
  }

  open() {
    // `onread` hands bytes over without the stream machinery (less CPU per
    // response); they land in a shared buffer, so onData copies what it keeps.
    const socket = net.connect({
      port: this.port,
      host: this.host,
      noDelay: true,
      onread: { buffer: READ_BUFFER, callback: (n, buf) => this.socket === socket && this.onData(Buffer.from(buf.subarray(0, n))) },
    })
    // Events of a socket we already replaced must not touch the current request.
    socket.on("error", (error) => this.socket === socket && this.fail(String(error)))
    socket.on("close", () => this.socket === socket && this.fail("connection closed"))
    this.socket = socket
    this.chunks = []
    this.received = 0
    this.needed = 0
  }

  // Resolves to {status, headers (.get(name)), body, started, ended}; status 0 and `error` on
  // failure. `body` is a string (sent as UTF-8) or null.
  request(method, path, headers = {}, body = null, timeoutMs = this.timeoutMs) {
    if (!this.socket) this.open()
    let head = `${method} ${path} HTTP/1.1\r\nhost: ${this.host}:${this.port}\r\n`
    for (const name in headers) head += `${name}: ${headers[name]}\r\n`
    head += extraHead
    head += `content-length: ${body === null ? 0 : Buffer.byteLength(body)}\r\n\r\n`
    return new Promise((resolve) => {
      const started = performance.now()
      this.queue.push({ resolve, started, deadline: started + timeoutMs, timeoutMs })
      active.add(this)
      this.socket.write(body === null ? head : head + body)
    })
  }

  // Every request in flight fails: their responses can no longer be told apart.
  fail(error) {
    this.socket?.destroy()
    this.socket = null
    const failed = this.queue
    this.queue = []
    active.delete(this)
    const ended = performance.now()
    for (const pending of failed) pending.resolve({ status: 0, error, started: pending.started, ended })
  }

  onData(chunk) {
    this.chunks.push(chunk)
    this.received += chunk.length
    // A large Content-Length body (a catch-up read) is joined once, not per chunk.
    if (this.received < this.needed) return
    this.buffer = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks)
    const ended = performance.now()
    let response
    while (this.queue.length && (response = this.parse())) {
      this.needed = 0
      const pending = this.queue.shift()
      response.started = pending.started
      response.ended = ended
      pending.resolve(response)
      if (response.headers.get("connection") === "close") {
        this.fail("connection closed by the server") // requests pipelined behind it are lost
        break
      }
    }
    if (!this.queue.length) active.delete(this)
    this.chunks = this.buffer.length ? [this.buffer] : []
    this.received = this.buffer.length
  }

  // A complete response from the front of the buffer, or null if more bytes are
  // needed (then `needed` says how many, when the head tells).
  parse() {
    const headEnd = this.buffer.indexOf(CRLF2)
    if (headEnd < 0) return null
    const head = this.buffer.toString("latin1", 0, headEnd)
    const status = Number(head.slice(9, 12))
    const headers = new Headers(head)
    let at = headEnd + 4
    let body
    if (status === 204 || status === 304 || (status >= 100 && status < 200)) {
      body = Buffer.alloc(0)
    } else if (headers.get("transfer-encoding")?.includes("chunked")) {
      const parts = []
      for (;;) {
        const lineEnd = this.buffer.indexOf("\r\n", at)
        if (lineEnd < 0) return null
        const size = parseInt(this.buffer.toString("latin1", at, lineEnd), 16)
        if (this.buffer.length < lineEnd + 2 + size + 2) return null
        if (size === 0) {
          at = lineEnd + 4 // no trailers expected
          break
        }
        parts.push(this.buffer.subarray(lineEnd + 2, lineEnd + 2 + size))
        at = lineEnd + 2 + size + 2
      }
      body = Buffer.concat(parts)
    } else {
      const length = Number(headers.get("content-length") ?? 0)
      if (this.buffer.length < at + length) {
        this.needed = at + length
        return null
      }
      body = this.buffer.subarray(at, at + length)
      at += length
    }
    this.buffer = this.buffer.subarray(at)
    return { status, headers, body }
  }

  close() {
    this.socket?.destroy()
    this.socket = null
  }
}

// A lean SSE (or any long streamed GET) reader: writes the request on a raw
// socket and hands the de-chunked body text to `onText(text, receivedAt)` as
// it arrives. `onHead(status)` runs once the response head is in; `onClose()`
// when the socket closes for any reason. Bodies are read as latin1, which is
// exact for the ASCII payloads the benchmark sends.
export function openStream(host, port, path, { onHead, onText, onClose }) {
  const socket = net.connect(port, host)
  socket.setNoDelay(true)
  socket.setEncoding("latin1")
  let head = ""
  let chunked = null // null until the head is parsed
  let pending = ""
  let state = "size"
  let remaining = 0
  socket.on("connect", () => socket.write(`GET ${path} HTTP/1.1\r\nhost: ${host}:${port}\r\naccept: text/event-stream\r\n${extraHead}\r\n`))
  socket.on("data", (text) => {
    const receivedAt = performance.now()
    if (chunked === null) {
      head += text
      const end = head.indexOf("\r\n\r\n")
      if (end < 0) return
      const status = Number(head.slice(9, 12))
      chunked = /\r\ntransfer-encoding:[^\r]*chunked/i.test(head.slice(0, end))
      text = head.slice(end + 4)
      head = ""
      onHead(status)
      if (status !== 200) return socket.destroy()
    }
    if (!chunked) return text && onText(text, receivedAt)
    pending += text
    let out = ""
    for (;;) {
      if (state === "size") {
        const eol = pending.indexOf("\r\n")
        if (eol < 0) break
        remaining = parseInt(pending.slice(0, eol), 16)
        pending = pending.slice(eol + 2)
        if (remaining === 0) {
          socket.destroy() // the last chunk: the server ended the stream
          break
        }
        state = "data"
      } else if (state === "data") {
        const take = Math.min(remaining, pending.length)
        if (take === 0) break
        out += pending.slice(0, take)
        pending = pending.slice(take)
        remaining -= take
        if (remaining === 0) state = "crlf"
      } else {
        if (pending.length < 2) break
        pending = pending.slice(2)
        state = "size"
      }
    }
    if (out) onText(out, receivedAt)
  })
  socket.on("error", () => socket.destroy())
  socket.on("close", () => onClose())
  return socket
}
