// Starts the official in-memory reference server (npm @durable-streams/server,
// pinned in package.json) for benchmarks: node reference_server.mjs PORT
import { DurableStreamTestServer } from "@durable-streams/server"

const port = Number(process.argv[2] || 4473)
const server = new DurableStreamTestServer({ port, host: "127.0.0.1" })
await server.start()
console.log(`reference server on http://127.0.0.1:${port}`)
