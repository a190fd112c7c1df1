// Idempotent producers written with the official TypeScript client
// (@durable-streams/client's IdempotentProducer), for e2e/chaos.
//
//   node e2e/chaos/ts_producers.mjs SPEC_JSON
//   SPEC_JSON = {"producers": [{"url": ..., "id": ...}, ...], "count": N, "pauseMs": M}
//
// Each producer appends {"p": id, "i": 0..N-1} (pre-serialized JSON, batched
// by the client), flushes, and the script prints one JSON line:
// {"producers": [{"id", "acked", "errors"}], "retries": {...}}.
//
// IdempotentProducer does not retry a failed request itself (a 5xx or a broken
// connection rejects the batch). A correct producer retries the SAME
// (id, epoch, seq) until it is answered 200 or 204, so it gets a fetch that
// does exactly that: the request is resent unchanged, headers and body.
import { DurableStream, IdempotentProducer } from "@durable-streams/client"

const spec = JSON.parse(process.argv[2])
const retries = {}

async function retryingFetch(url, init) {
  for (;;) {
    try {
      const response = await fetch(url, init)
      if (response.status < 500) return response
      retries[response.status] = (retries[response.status] ?? 0) + 1
      await response.arrayBuffer()
    } catch (error) {
      const name = error?.cause?.code ?? error?.name ?? "error"
      retries[name] = (retries[name] ?? 0) + 1
    }
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function produce({ url, id }) {
  const errors = []
  const stream = new DurableStream({ url, contentType: "application/json" })
  const producer = new IdempotentProducer(stream, id, {
    epoch: 0,
    lingerMs: 5,
    fetch: retryingFetch,
    onError: (error) => errors.push(String(error)),
  })
  for (let i = 0; i < spec.count; i++) {
    producer.append(JSON.stringify({ p: id, i }))
    if (spec.pauseMs) await sleep(spec.pauseMs)
  }
  let acked = spec.count
  try {
    await producer.flush()
  } catch (error) {
    errors.push(String(error))
    acked = -1 // unknown: the test fails on any error
  }
  await producer.detach().catch(() => {})
  return { id, acked, errors }
}

const producers = await Promise.all(spec.producers.map(produce))
console.log(JSON.stringify({ producers, retries }))
