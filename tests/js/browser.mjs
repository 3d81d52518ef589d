// The demo pages in headless Chromium (Debian's `chromium`, driven by puppeteer-core): a
// message typed on one node's chat page appears on another node's page, and the topology page
// draws every node. Usage: node browser.mjs http://node-a http://node-b [screenshot.png]
// CHROMIUM overrides the browser's path.
import puppeteer from "puppeteer-core";

const [a, b, screenshot] = process.argv.slice(2);
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    // Two pages at once: neither may be throttled as a background tab.
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
    "--disable-renderer-backgrounding",
  ],
});
// Every page records its WebSocket's life and its errors, printed if the test fails.
const events = [];
async function watch(page, name) {
  page.on("pageerror", (e) => events.push(`${name} pageerror ${e}`));
  page.on("console", (m) => events.push(`${name} console ${m.type()} ${m.text()}`));
  await page.evaluateOnNewDocument(() => {
    const Ws = window.WebSocket;
    window.__ws = [];
    const t0 = performance.now();
    const at = () => Math.round(performance.now() - t0);
    window.WebSocket = function (url, protocols) {
      const ws = new Ws(url, protocols);
      window.__ws.push(`${at()} new`);
      ws.addEventListener("open", () => window.__ws.push(`${at()} open`));
      ws.addEventListener("close", (e) => window.__ws.push(`${at()} close ${e.code} ${e.reason}`));
      ws.addEventListener("error", () => window.__ws.push(`${at()} error`));
      ws.addEventListener("message", (m) => {
        if (typeof m.data === "string" && !m.data.startsWith("2") && !m.data.startsWith("43")) {
          window.__ws.push(`${at()} recv ${m.data.slice(0, 60)}`);
        }
      });
      const send = ws.send.bind(ws);
      ws.send = (d) => {
        if (typeof d === "string" && d !== "3" && !d.startsWith("42[\"fetch")) {
          window.__ws.push(`${at()} send ${d.slice(0, 60)}`);
        }
        send(d);
      };
      return ws;
    };
    window.WebSocket.prototype = Ws.prototype;
  });
}
try {
  const connected = () => document.getElementById("who").textContent.startsWith("You are");
  const pa = await browser.newPage();
  await watch(pa, "a");
  await pa.goto(a + "/");
  const pb = await browser.newPage();
  await watch(pb, "b");
  await pb.goto(b + "/");
  await pa.waitForFunction(connected, { polling: 100, timeout: 30000 });
  await pb.waitForFunction(connected, { polling: 100, timeout: 30000 });
  console.log("ok pages connected");

  // Fill the form and submit it as the page's own handler expects (synthetic keystrokes to a
  // background tab got lost on a loaded machine).
  await pa.$eval("#msg", (el) => {
    el.value = "hello from a browser";
  });
  await pa.$eval("#form", (form) => form.requestSubmit());
  await pa.waitForFunction(
    () => [...document.querySelectorAll("#log p")].some((p) => p.textContent === "me: hello from a browser"),
    { polling: 100, timeout: 30000 },
  );
  await pb.bringToFront();
  await pb.waitForFunction(
    () => [...document.querySelectorAll("#log p")].some((p) => p.textContent.includes("hello from a browser")),
    { polling: 100, timeout: 30000 },
  );
  console.log("ok chat across nodes");
  // The live line: this node and its members.
  await pb.waitForFunction(() => /2 other node\(s\) live/.test(document.getElementById("mesh").textContent), {
    polling: 100, timeout: 30000,
  });
  console.log("ok members line");

  const pt = await browser.newPage();
  await pt.setViewport({ width: 1280, height: 720 });
  await pt.goto(a + "/topology");
  await pt.waitForFunction(() => document.querySelectorAll("#map circle").length === 3, { polling: 100, timeout: 30000 });
  await pt.waitForFunction(() => document.getElementById("status").textContent.startsWith("ready"), {
    polling: 100, timeout: 30000,
  });
  console.log("ok topology");
  if (screenshot) await pt.screenshot({ path: screenshot, fullPage: true });
} catch (e) {
  // What each page showed, to tell a slow machine from a broken page.
  for (const page of await browser.pages()) {
    const state = await page
      .evaluate(() => ({
        url: location.href,
        who: document.getElementById("who")?.textContent,
        mesh: document.getElementById("mesh")?.textContent,
        status: document.getElementById("status")?.textContent,
        log: [...document.querySelectorAll("#log p")].map((p) => p.textContent),
        input: document.getElementById("msg")?.value,
        ws: window.__ws,
      }))
      .catch((err) => String(err));
    console.log("page state:", JSON.stringify(state));
  }
  for (const e of events) console.log(e);
  // And the nodes' own counters (commands received, drops...).
  for (const url of [a, b]) {
    const mesh = await fetch(url + "/mesh").then((r) => r.json()).catch((err) => String(err));
    console.log("node state:", url, JSON.stringify(mesh));
  }
  throw e;
} finally {
  await browser.close();
}
