// Drives headless Chromium for tests/browser_test.ts: a Node program (where
// playwright-core is at home; under `deno test` it would need --allow-all)
// that reads one JSON command per line on stdin and writes one JSON answer
// per line on stdout:
//
//   { op: "launch", executablePath, args, profile }   start the browser
//   { op: "goto", url }                                 open the main page
//   { op: "evaluate", source, arg }                     run `(source)(arg)` in it
//   { op: "rpc", message }                              answer of `globalThis.rpc(message)` in it
//   { op: "text", url, contains }                       open url in a new page, wait for the text, answer the body text
//   { op: "errors" }                                    uncaught page errors so far
//   { op: "console" }                                   console errors and warnings so far (WebGPU reports there)
//
// An answer is { value } or { error }. The browser closes when stdin ends.

import process from "node:process";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

/** @type {import("playwright-core").BrowserContext | undefined} */
let context;
/** @type {import("playwright-core").Page | undefined} */
let page;
/** @type {string[]} */
const errors = [];
/** @type {string[]} */
const messages = [];

/** @param {import("playwright-core").Page} p */
function watch(p) {
  p.on("pageerror", (e) => errors.push(e.message));
  p.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") messages.push(`${m.type()}: ${m.text()}`);
  });
}

/** @param {{ op: string, [k: string]: any }} c */
async function run(c) {
  switch (c.op) {
    case "launch":
      context = await chromium.launchPersistentContext(c.profile, {
        executablePath: c.executablePath,
        headless: true,
        args: c.args,
      });
      page = context.pages()[0] ?? await context.newPage();
      watch(page);
      return (await context.browser()?.version()) ?? "chromium";
    case "goto":
      await page.goto(c.url);
      return null;
    case "evaluate":
      return await page.evaluate(`(${c.source})(${JSON.stringify(c.arg ?? null)})`);
    case "rpc":
      return await page.evaluate((m) => globalThis.rpc(m), c.message);
    case "text": {
      const p = await context.newPage();
      watch(p);
      await p.goto(c.url);
      await p.waitForFunction((text) => document.body?.textContent?.includes(text), c.contains, { timeout: 10_000 });
      const text = await p.textContent("body");
      await p.close();
      return text;
    }
    case "errors":
      return errors;
    case "console":
      return messages;
    default:
      throw new Error(`unknown op ${c.op}`);
  }
}

try {
  for await (const line of createInterface({ input: process.stdin })) {
    let answer;
    try {
      answer = { value: await run(JSON.parse(line)) };
    } catch (e) {
      answer = { error: e instanceof Error ? e.message : String(e) };
    }
    process.stdout.write(JSON.stringify(answer) + "\n");
  }
} finally {
  await context?.close();
}
