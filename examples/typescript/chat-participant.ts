/**
 * A chat participant over ds-gateway, with the official TypeScript client
 * (npm `@durable-streams/client`, pinned in examples/package.json).
 *
 *   npm --prefix examples ci && npm --prefix examples run build
 *   node examples/typescript/dist/chat-participant.js http://127.0.0.1:4437 chat/room-1 bob \
 *       --say "hi" --expect 1
 *
 * It joins a room (a JSON stream, created if absent), says something, and prints
 * what the others say, live, until it has seen --expect messages from them.
 *
 * - Exactly once: messages go through the client's IdempotentProducer
 *   (Producer-Id = the name, an epoch, a seq per message); its retries never
 *   write a message twice. Each run is a new epoch (kept in the state file),
 *   so a restarted participant never collides with its earlier seqs.
 * - Resume: the state file keeps the offset after the last batch it printed;
 *   the next run reads from there, so nothing is shown twice or missed.
 */
import { existsSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { DurableStream, IdempotentProducer } from "@durable-streams/client";

interface State {
  epoch: number;
  offset: string;
}

interface ChatMessage {
  type?: string;
  key?: string;
  value?: { from?: string; text?: string };
}

function parseArgs(argv: string[]) {
  const [baseUrl, room, name, ...rest] = argv;
  if (!baseUrl || !room || !name) {
    throw new Error("usage: chat-participant BASE_URL ROOM NAME [--say TEXT] [--expect N] [--state FILE] [--timeout S]");
  }
  const option = (flag: string) => {
    const i = rest.indexOf(flag);
    return i >= 0 ? rest[i + 1] : undefined;
  };
  return {
    baseUrl: baseUrl.replace(/\/$/, ""),
    room,
    name,
    say: option("--say"),
    expect: Number(option("--expect") ?? 0),
    statePath: option("--state") ?? `.chat-${name}.json`,
    timeoutS: Number(option("--timeout") ?? 30),
  };
}

function load(path: string): State {
  return existsSync(path) ? (JSON.parse(readFileSync(path, "utf8")) as State) : { epoch: -1, offset: "-1" };
}

function save(path: string, state: State): void {
  writeFileSync(`${path}.tmp`, JSON.stringify(state));
  renameSync(`${path}.tmp`, path);
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const state = load(args.statePath);
  state.epoch += 1; // a new producer session
  save(args.statePath, state);
  const timer = setTimeout(() => {
    console.error(`${args.name}: timed out`);
    process.exit(1);
  }, args.timeoutS * 1000);

  const url = `${args.baseUrl}/v1/stream/${args.room}`;
  const room = new DurableStream({ url, contentType: "application/json" });
  await room.create({ contentType: "application/json" }); // an existing room is kept

  if (args.say) {
    const producer = new IdempotentProducer(room, args.name, {
      epoch: state.epoch,
      onError: (error) => console.error(`${args.name}: ${error.message}`),
    });
    const message: ChatMessage = {
      type: "message",
      key: `${args.name}-${state.epoch}-0`,
      value: { from: args.name, text: args.say },
    };
    producer.append(JSON.stringify(message));
    await producer.detach(); // flush and stop, leaving the room open
  }

  if (args.expect > 0) {
    let seen = 0;
    const response = await room.stream<ChatMessage>({ offset: state.offset, live: "sse" });
    await new Promise<void>((resolve) => {
      const stop = response.subscribeJson<ChatMessage>((batch) => {
        for (const item of batch.items) {
          const from = item.value?.from;
          if (from && from !== args.name) {
            console.log(`${from}: ${item.value?.text ?? ""}`);
            seen += 1;
          }
        }
        state.offset = batch.offset; // where the next run resumes
        save(args.statePath, state);
        if (seen >= args.expect) {
          stop();
          resolve();
        }
      });
    });
    response.cancel?.();
  }
  clearTimeout(timer);
}

main().then(
  () => process.exit(0),
  (error: unknown) => {
    console.error(error instanceof Error ? error.message : String(error));
    process.exit(1);
  },
);
