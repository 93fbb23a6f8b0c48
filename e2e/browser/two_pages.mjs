// Two browser pages on the gateway's try-it page (served at `/`): each mints a token in the
// page, connects, sends one message to the other, and must show the other's message as a
// delivery and its own as acked. Driven by e2e/tests/browser.rs, which starts the stack.
//
// env: CHATIFY_PAGE_URL (http://127.0.0.1:PORT/), JWT_SECRET, USER_A, USER_B,
//      CHATIFY_PLAYWRIGHT_DIR (where playwright-core is installed), CHROMIUM (binary path)
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.CHATIFY_PLAYWRIGHT_DIR, "package.json"));
const { chromium } = require("playwright-core");

const url = process.env.CHATIFY_PAGE_URL;
const users = [process.env.USER_A, process.env.USER_B];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const timeout = 30_000;
try {
  const pages = [];
  for (const [index, user] of users.entries()) {
    const page = await browser.newPage();
    page.on("console", (message) => console.log(`[page ${user}] ${message.text()}`));
    await page.goto(url);
    await page.fill("#user", user);
    await page.fill("#secret", process.env.JWT_SECRET);
    await page.click("#mint");
    await page.waitForFunction(() => document.getElementById("token").value.split(".").length === 3, null, { timeout });
    await page.click("#connect");
    await page.waitForSelector("#state:text('connected')", { timeout });
    await page.fill("#to", users[1 - index]);
    pages.push(page);
  }
  for (const [index, page] of pages.entries()) {
    await page.fill("#text", `hello from ${users[index]}`);
    await page.click("#send");
  }
  for (const [index, page] of pages.entries()) {
    const other = users[1 - index];
    await page.waitForSelector(`#log .deliver:has-text("hello from ${other}")`, { timeout });
    await page.waitForSelector("#log .ack", { timeout });
    const lines = await page.$$eval("#log div", (divs) => divs.map((d) => d.textContent));
    console.log(`${users[index]} sees:\n  ${lines.join("\n  ")}`);
  }
  console.log("BROWSER TEST PASSED");
} finally {
  await browser.close();
}
