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
try {
  const connected = () => document.getElementById("who").textContent.startsWith("You are");
  const pa = await browser.newPage();
  await pa.goto(a + "/");
  const pb = await browser.newPage();
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
      }))
      .catch((err) => String(err));
    console.log("page state:", JSON.stringify(state));
  }
  // And the nodes' own counters (commands received, drops...).
  for (const url of [a, b]) {
    const mesh = await fetch(url + "/mesh").then((r) => r.json()).catch((err) => String(err));
    console.log("node state:", url, JSON.stringify(mesh));
  }
  throw e;
} finally {
  await browser.close();
}
