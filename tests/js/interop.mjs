// Drives a socketioxide-mesh cluster (the `node` example, one process per node) with the
// official Socket.IO JS client: every cross-node operation, as a browser app would use it.
//
//   node interop.mjs [--msgpack] http://node0 http://node1 http://node2
//
// Exits 0 when every check passed; otherwise prints the failure and exits 1.
import { io } from "socket.io-client";
import msgpackParser from "socket.io-msgpack-parser";
import assert from "node:assert/strict";

const args = process.argv.slice(2);
const msgpack = args.includes("--msgpack");
const urls = args.filter((a) => !a.startsWith("--"));
if (urls.length !== 3) {
  console.error("usage: node interop.mjs [--msgpack] URL0 URL1 URL2");
  process.exit(2);
}

const WAIT_MS = 15000;
const withTimeout = (p, what) =>
  Promise.race([
    p,
    new Promise((_, rej) => setTimeout(() => rej(new Error(`timed out: ${what}`)), WAIT_MS)),
  ]);
const once = (socket, event) => withTimeout(new Promise((res) => socket.once(event, (...a) => res(a))), event);
const ask = (socket, event, ...data) => withTimeout(socket.emitWithAck(event, ...data), event);

function connect(url) {
  const opts = { reconnection: false, forceNew: true };
  if (msgpack) opts.parser = msgpackParser;
  const socket = io(url, opts);
  // Every client answers questions with its own id.
  socket.on("question", (_q, ack) => ack(socket.id));
  return withTimeout(new Promise((res, rej) => {
    socket.on("connect", () => res(socket));
    socket.on("connect_error", rej);
  }), `connect ${url}`);
}

const checks = [];
const check = (name, fn) => checks.push([name, fn]);

let c0, c1, c2;

check("connect to three nodes", async () => {
  [c0, c1, c2] = await Promise.all(urls.map(connect));
});

check("fetch_sockets lists every socket with its own server", async () => {
  const all = await ask(c0, "fetch", null);
  assert.deepEqual(all.map((s) => s.id).sort(), [c0.id, c1.id, c2.id].sort());
  assert.equal(new Set(all.map((s) => s.server)).size, 3);
});

check("rooms across nodes: join, emit to room, fetch in room, rooms()", async () => {
  assert.equal(await ask(c1, "join", "red"), "joined");
  assert.equal(await ask(c2, "join", "red"), "joined");
  const got = Promise.all([once(c1, "hello"), once(c2, "hello")]);
  assert.equal(await ask(c0, "to-room", { room: "red", event: "hello", data: { n: 1 } }), true);
  for (const [data] of await got) assert.deepEqual(data, { n: 1 });
  const red = await ask(c0, "fetch", "red");
  assert.deepEqual(red.map((s) => s.id).sort(), [c1.id, c2.id].sort());
  assert.ok((await ask(c0, "rooms")).includes("red"));
});

check("broadcast from a socket reaches the others, not itself", async () => {
  let echoed = false;
  c0.on("chat", () => { echoed = true; });
  const got = Promise.all([once(c1, "chat"), once(c2, "chat")]);
  c0.emit("chat", { text: "hi all" });
  for (const [m] of await got) assert.deepEqual(m, { text: "hi all" });
  // A marker through the same path: once it arrives, an echo would have too.
  const marker = once(c0, "hello");
  await ask(c1, "join", "marker");
  await ask(c0, "join", "marker");
  await ask(c1, "to-room", { room: "marker", event: "hello", data: 0 });
  await marker;
  assert.equal(echoed, false, "the sender got its own broadcast");
});

check("binary payloads across nodes", async () => {
  // A Buffer: the msgpack parser (notepack) encodes Buffers, not bare Uint8Arrays, as binary.
  const bytes = Buffer.from(Array.from({ length: 300 }, (_, i) => (i * 7) % 256));
  const got = once(c1, "bin");
  assert.equal(await ask(c2, "bin-to-room", { room: "red", data: bytes }), true);
  const [data] = await got;
  assert.ok(Buffer.from(data).equals(bytes), "binary payload changed on the way");
});

check("emit with acks across nodes ends with every answer", async () => {
  const answers = await ask(c0, "ask-all", "who?");
  assert.deepEqual(answers.sort(), [c1.id, c2.id].sort());
});

check("remote socket: emit, join, rooms, ask, leave, disconnect", async () => {
  const remote = (op, extra = {}) => ask(c0, "remote", { id: c2.id, op, ...extra });
  const direct = once(c2, "direct");
  assert.equal(await remote("emit", { data: "psst" }), true);
  assert.deepEqual(await direct, ["psst"]);
  assert.equal(await remote("join", { room: "green" }), true);
  assert.ok((await remote("rooms")).includes("green"));
  assert.deepEqual(await remote("ask", { data: "q" }), [c2.id]);
  assert.equal(await remote("leave", { room: "green" }), true);
  assert.ok(!(await remote("rooms")).includes("green"));
  const gone = once(c2, "disconnect");
  assert.equal(await remote("disconnect"), true);
  const [reason] = await gone;
  assert.equal(reason, "io server disconnect");
});

let failed = false;
for (const [name, fn] of checks) {
  try {
    await fn();
    console.log(`ok   ${name}`);
  } catch (e) {
    console.log(`FAIL ${name}: ${e.stack || e}`);
    failed = true;
    break;
  }
}
for (const s of [c0, c1, c2]) s?.close();
process.exit(failed ? 1 : 0);
