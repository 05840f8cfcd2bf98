/**
 * The npm bundle in a browser: headless Chromium (Debian's package, at
 * /usr/bin/chromium or $MOE_ROUTER_CHROMIUM), driven by playwright-core from
 * Node (tests/_browser_driver.mjs) with a fresh profile, loads `mod.js` from
 * a loopback server and routes the golden cases on the WebAssembly backend,
 * a big batch on worker threads (the page is cross-origin isolated), the
 * README's page as written and, where the browser offers WebGPU
 * (`--enable-unsafe-webgpu`: SwiftShader, a software adapter), the golden
 * cases on the WebGPU backend. Skipped, with a message, only where no
 * Chromium is installed (`.ci/run` installs it).
 *
 * @module
 */

import assert from "node:assert";
import { buildNpm } from "../scripts/build_npm.ts";
import { checkRemoteGolden, processTransport, RemoteRouter } from "./_remote.ts";
import { readmeExample } from "./_readme.ts";

function chromiumPath(): string | undefined {
  const granted = Deno.permissions.querySync({ name: "env", variable: "MOE_ROUTER_CHROMIUM" }).state === "granted";
  const path = (granted ? Deno.env.get("MOE_ROUTER_CHROMIUM") : undefined) ?? "/usr/bin/chromium";
  try {
    return Deno.statSync(path).isFile ? path : undefined;
  } catch {
    return undefined;
  }
}

const CHROMIUM = chromiumPath();
if (CHROMIUM === undefined) {
  console.warn("browser_test: no Chromium found (apt-get install chromium); the browser tests are skipped");
}

// The flags this machine needs (no network beyond loopback), plus WebGPU.
const FLAGS = [
  "--no-sandbox",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--enable-unsafe-webgpu",
];

// Cross-origin isolation gives the page SharedArrayBuffer, so the WebAssembly backend may use worker threads.
const ISOLATION = { "cross-origin-opener-policy": "same-origin", "cross-origin-embedder-policy": "require-corp" };

/** The browser, through tests/_browser_driver.mjs. */
class Browser {
  #transport: ReturnType<typeof processTransport>;

  constructor() {
    const driver = new URL("_browser_driver.mjs", import.meta.url).pathname;
    const child = new Deno.Command("node", { args: [driver], stdin: "piped", stdout: "piped", stderr: "inherit" })
      .spawn();
    this.#transport = processTransport(child);
  }

  async #do(command: Record<string, unknown>): Promise<unknown> {
    const answer = JSON.parse(await this.#transport.send(JSON.stringify(command))) as {
      value?: unknown;
      error?: string;
    };
    if (answer.error !== undefined) throw new Error(`browser (${command.op}): ${answer.error}`);
    return answer.value;
  }

  launch(profile: string): Promise<string> {
    return this.#do({ op: "launch", executablePath: CHROMIUM, args: FLAGS, profile }) as Promise<string>;
  }
  goto(url: string): Promise<unknown> {
    return this.#do({ op: "goto", url });
  }
  /** Runs `fn(arg)` in the main page (its source is sent: it may use only its argument and the page's globals). */
  evaluate<A, R>(fn: (arg: A) => R | Promise<R>, arg: A): Promise<R> {
    return this.#do({ op: "evaluate", source: fn.toString(), arg }) as Promise<R>;
  }
  /** Opens `url` in a new page and waits until its body contains `contains`; resolves with the body text. */
  text(url: string, contains: string): Promise<string> {
    return this.#do({ op: "text", url, contains }) as Promise<string>;
  }
  /** One message to the page's `rpc` function (tests/_remote_runner.js); resolves with its answer. */
  rpc(message: string): Promise<string> {
    return this.#do({ op: "rpc", message }) as Promise<string>;
  }
  /** Console errors and warnings of the pages (WebGPU reports shader and validation errors there). */
  console(): Promise<string[]> {
    return this.#do({ op: "console" }) as Promise<string[]>;
  }
  errors(): Promise<string[]> {
    return this.#do({ op: "errors" }) as Promise<string[]>;
  }
  async close(): Promise<void> {
    const status = await this.#transport.close();
    assert.strictEqual(status.code, 0, "the browser driver exited cleanly");
  }
}

type PageGlobals = Record<string, unknown> & { rpc: (m: string) => Promise<string> };

Deno.test({
  name: "the bundle routes in headless Chromium on WebAssembly (and WebGPU where offered)",
  ignore: CHROMIUM === undefined,
  async fn(t) {
    const tmp = await Deno.makeTempDir({ prefix: "moe-router-browser-" });
    const { bundle } = await buildNpm({ outDir: `${tmp}/dist`, declarations: false });
    const files: Record<string, [string, string]> = {
      "/": ["text/html", "<!doctype html><title>moe-router test</title>"],
      "/moe-router.js": ["text/javascript", await Deno.readTextFile(bundle)],
      "/_remote_runner.js": ["text/javascript", await Deno.readTextFile(new URL("_remote_runner.js", import.meta.url))],
      "/readme.html": ["text/html", readmeExample("browser")],
    };
    const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (request) => {
      const path = new URL(request.url).pathname;
      if (path === "/favicon.ico") return new Response(null, { status: 204 });
      const file = files[path];
      if (file === undefined) return new Response("not found", { status: 404 });
      return new Response(file[1], { headers: { "content-type": file[0], ...ISOLATION } });
    });
    const base = `http://127.0.0.1:${server.addr.port}`;
    const browser = new Browser();
    try {
      const version = await browser.launch(`${tmp}/profile`);
      await browser.goto(`${base}/`);
      const setup = await browser.evaluate(async () => {
        const g = globalThis as unknown as PageGlobals;
        const mod = await import("/moe-router.js" as string);
        const { createRunner } = await import("/_remote_runner.js" as string);
        g.rpc = createRunner(mod);
        g.mod = mod;
        const gpu = (navigator as Navigator & { gpu?: { requestAdapter(): Promise<unknown> } }).gpu;
        return {
          isolated: g.crossOriginIsolated === true,
          webgpu: gpu !== undefined && (await gpu.requestAdapter()) !== null,
        };
      }, null);
      console.log(`chromium ${version}: cross-origin isolated ${setup.isolated}, WebGPU adapter ${setup.webgpu}`);
      assert.ok(setup.isolated, "the test page is cross-origin isolated");
      const send = (message: string) => browser.rpc(message);

      await t.step("WebAssembly: the golden cases match", async () => {
        const { checked } = await checkRemoteGolden(new RemoteRouter(send, "wasm"));
        console.log(`chromium wasm: ${checked} golden cases match`);
      });

      await t.step("WebAssembly: a big batch on two threads (a worker) equals one thread, bit for bit", async () => {
        const result = await browser.evaluate(async () => {
          // deno-lint-ignore no-explicit-any
          const mod = (globalThis as any).mod;
          const T = 4096, E = 256;
          let seed = 1;
          const next = () => (seed = (seed * 48271) % 2147483647) / 2147483647 * 8 - 4;
          const logits = mod.tensor(Float32Array.from({ length: T * E }, next), [T, E]);
          const options = { topk: 8, scoreFunction: "sigmoid", numGroups: 8, groupTopk: 4, indexDtype: "int32" };
          const many = await mod.createRouter({ backend: "wasm", threads: 2 });
          const one = await mod.createRouter({ backend: "wasm", threads: 1 });
          const a = await many.fusedTopkWithScoreFunction(logits, options);
          const b = await one.fusedTopkWithScoreFunction(logits, options);
          const bits = (x: Float32Array) => new Uint32Array(x.buffer, x.byteOffset, x.length);
          const same = (x: ArrayLike<number>, y: ArrayLike<number>) =>
            x.length === y.length && Array.from(x).every((v, i) => v === y[i]);
          return {
            threads: many.threads as number | undefined,
            indices: same(a.indices.data, b.indices.data),
            probs: same(bits(a.probs.data), bits(b.probs.data)),
          };
        }, null);
        assert.strictEqual(result.threads, 2, "shared memory and workers are available in an isolated page");
        assert.ok(result.indices && result.probs, `indices equal: ${result.indices}, probs equal: ${result.probs}`);
      });

      await t.step("the README's browser page shows its routing", async () => {
        const text = await browser.text(`${base}/readme.html`, "indices");
        assert.match(text, /wasm: indices 1,3,0,1/);
      });

      await t.step({
        name: "WebGPU: the golden cases match on the browser's adapter",
        ignore: !setup.webgpu,
        async fn() {
          try {
            const { checked } = await checkRemoteGolden(new RemoteRouter(send, "webgpu"));
            console.log(`chromium webgpu: ${checked} golden cases match`);
          } catch (e) {
            // WebGPU reports shader compilation and validation errors on the console, not as exceptions
            const log = (await browser.console()).slice(0, 2).join("\n");
            throw new Error(`${(e as Error).message}${log ? `\nbrowser console:\n${log}` : ""}`, { cause: e });
          }
        },
      });
      if (!setup.webgpu) {
        console.warn("browser_test: this Chromium offers no WebGPU adapter; the WebGPU step is skipped");
      }
      assert.deepStrictEqual(await browser.errors(), [], "uncaught errors in the pages");
    } finally {
      await browser.close();
      await server.shutdown();
      await Deno.remove(tmp, { recursive: true });
    }
  },
});
