// The demo page's own Socket.IO client (examples/common/client.js), as served by a node's
// /client.js, driven from Node.js with the `ws` WebSocket: an event emitted before the connect
// is answered; two clients on two nodes chat, ask for the people connected (an ack), and
// answer a server's question (an ack the other way).
// Usage: node page-client.mjs http://node-a http://node-b
import WebSocket from "ws";

const [a, b] = process.argv.slice(2);
globalThis.WebSocket = WebSocket;
globalThis.window = undefined;
const src = await (await fetch(a + "/client.js")).text();
new Function(src)(); // defines globalThis.io, as the <script> tag does in the page

const within = (ms, what, promise) =>
  Promise.race([
    promise,
    new Promise((_, reject) => setTimeout(() => reject(new Error("timeout: " + what)), ms)),
  ]);
const connected = (s) => new Promise((resolve) => s.on("connect", resolve));

const sa = io(a + "/");
const sb = io(b + "/");
// Emitted before the connection is even open: buffered, sent once the server accepted the
// connect, answered (a Socket.IO server closes a session that sends an event too early).
const early = new Promise((resolve) => sa.emit("fetch", null, resolve));
await within(5000, "connect", Promise.all([connected(sa), connected(sb)]));
console.log("ok connected", sa.id, sb.id);
const earlyList = await within(5000, "early fetch", early);
if (!earlyList.some((s) => s.id === sa.id)) throw new Error("early fetch lists " + JSON.stringify(earlyList));
console.log("ok early emit");

const got = new Promise((resolve) => sb.on("chat", resolve));
sa.emit("chat", { from: "a", text: "hello across the mesh" });
const m = await within(5000, "chat", got);
if (m.text !== "hello across the mesh") throw new Error("wrong chat " + JSON.stringify(m));
console.log("ok chat");

const list = await within(5000, "fetch", new Promise((resolve) => sa.emit("fetch", null, resolve)));
const ids = list.map((s) => s.id);
if (!ids.includes(sa.id) || !ids.includes(sb.id)) throw new Error("fetch lists " + ids);
console.log("ok fetch");

// Node b's client answers a question node a's client has node a ask it (a remote emit with ack).
sb.on("question", (q, ack) => ack("answer to " + q));
const answers = await within(
  5000,
  "question",
  new Promise((resolve) =>
    sa.emit("remote", { id: sb.id, op: "ask", data: "ping" }, resolve)
  )
);
if (JSON.stringify(answers) !== JSON.stringify(["answer to ping"])) {
  throw new Error("answers " + JSON.stringify(answers));
}
console.log("ok question");
sa.close();
sb.close();
process.exit(0);
