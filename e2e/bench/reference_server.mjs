// Starts the official in-memory reference server (npm @durable-streams/server,
// pinned in package.json) for benchmarks:
//   node reference_server.mjs PORT [LONG_POLL_TIMEOUT_MS]
// The long-poll timeout (default 500 ms, as the conformance runs use) is also
// how long an idle SSE connection waits before a keep-alive control event.
import { DurableStreamTestServer } from "@durable-streams/server"

const port = Number(process.argv[2] || 4473)
const longPollTimeout = Number(process.argv[3] || 500)
const server = new DurableStreamTestServer({ port, host: "127.0.0.1", longPollTimeout })
await server.start()
console.log(`reference server on http://127.0.0.1:${port} (long-poll timeout ${longPollTimeout} ms)`)
