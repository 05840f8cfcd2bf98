/**
 * Measures what a user of each way in pays once: bundle and WebAssembly
 * sizes, the time from process start to the first routed batch in a fresh
 * Deno process (from the sources, as JSR serves them, and from the npm
 * bundle) and in a fresh Node process (the npm bundle), and the edge
 * example's cold start (process start to first answered request).
 * `deno task measure [--runs N]`; each time is the median of N runs (5).
 *
 * @module
 */

import * as embedded from "../wasm/_router_wasm.ts";
import { buildNpm } from "./build_npm.ts";

const ROOT = new URL("../", import.meta.url);
const at = Deno.args.indexOf("--runs");
const RUNS = at >= 0 ? Number(Deno.args[at + 1]) : 5;

// The first batch: 129 tokens x 32 experts, top-8 sigmoid with groups; prints the time since process start.
const FIRST_BATCH = (specifier: string) =>
  `import { createRouter, tensor } from ${JSON.stringify(specifier)};
const router = await createRouter({ backend: "wasm" });
const logits = tensor(Float32Array.from({ length: 129 * 32 }, (_, i) => Math.sin(i)), [129, 32]);
await router.fusedTopkWithScoreFunction(logits, { topk: 8, scoreFunction: "sigmoid", numGroups: 8, groupTopk: 4 });
console.log(performance.now());
`;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

/** Wall time from spawn to exit, and the time the process itself reports (since its start). */
async function timeProcess(cmd: string, args: string[]): Promise<{ wall: number; inside: number }> {
  const t0 = performance.now();
  const { code, stdout, stderr } = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  const wall = performance.now() - t0;
  if (code !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${new TextDecoder().decode(stderr)}`);
  return { wall, inside: Number(new TextDecoder().decode(stdout).trim()) };
}

async function edgeColdStart(): Promise<number> {
  const t0 = performance.now();
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-net=127.0.0.1",
      new URL("examples/edge_router.ts", ROOT).pathname,
      "--port=0",
      "--hostname=127.0.0.1",
    ],
    stdout: "piped",
    stderr: "null",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  let url: string | undefined;
  while (url === undefined) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`the edge example ended: ${text}`);
    text += value;
    url = /listening on (\S+)/.exec(text)?.[1];
  }
  const body = new Uint8Array(8 + 4 * 129 * 32);
  new DataView(body.buffer).setUint32(0, 129, true);
  new DataView(body.buffer).setUint32(4, 32, true);
  const res = await fetch(`${url}?topk=8&scoreFunction=sigmoid&numGroups=8&groupTopk=4`, {
    method: "POST",
    headers: { "content-type": "application/octet-stream" },
    body,
  });
  await res.arrayBuffer();
  const ms = performance.now() - t0;
  if (res.status !== 200) throw new Error(`edge example answered ${res.status}`);
  child.kill("SIGTERM");
  await reader.cancel();
  await child.status;
  return ms;
}

async function gzipSize(bytes: Uint8Array): Promise<number> {
  const stream = new Blob([bytes as Uint8Array<ArrayBuffer>]).stream().pipeThrough(new CompressionStream("gzip"));
  return (await new Response(stream).arrayBuffer()).byteLength;
}

const tmp = await Deno.makeTempDir({ prefix: "moe-router-measure-" });
try {
  const { bundle } = await buildNpm({ outDir: `${tmp}/dist`, declarations: false });
  const bytes = await Deno.readFile(bundle);
  console.log(`bundle mod.js: ${bytes.length} bytes, ${await gzipSize(bytes)} gzipped`);
  for (const [name, value] of Object.entries(embedded)) {
    if (name.endsWith("_BASE64") && typeof value === "string") {
      console.log(`WebAssembly module ${name}: ${atob(value).length} bytes (${value.length} as base64)`);
    }
  }

  await Deno.writeTextFile(`${tmp}/deno_source.ts`, FIRST_BATCH(new URL("mod.ts", ROOT).href));
  await Deno.writeTextFile(`${tmp}/bundle.mjs`, FIRST_BATCH("./dist/mod.js"));
  await Deno.writeTextFile(`${tmp}/empty.mjs`, "console.log(performance.now());\n");
  const runs: Record<string, [string, string[]]> = {
    "Deno, an empty program (baseline)": [Deno.execPath(), ["run", "--no-prompt", `${tmp}/empty.mjs`]],
    "Node, an empty program (baseline)": ["node", [`${tmp}/empty.mjs`]],
    "Deno, from the sources (mod.ts)": [Deno.execPath(), ["run", "--no-prompt", `${tmp}/deno_source.ts`]],
    "Deno, from the npm bundle": [Deno.execPath(), ["run", "--no-prompt", `${tmp}/bundle.mjs`]],
    "Node (npm bundle)": ["node", [`${tmp}/bundle.mjs`]],
  };
  for (const [label, [cmd, args]] of Object.entries(runs)) {
    await timeProcess(cmd, args); // fills the module caches: what a second start sees
    const times = [];
    for (let i = 0; i < RUNS; i++) times.push(await timeProcess(cmd, args));
    console.log(
      `${label}: done ${median(times.map((t) => t.inside)).toFixed(0)} ms after process start (its own clock), ` +
        `process done in ${median(times.map((t) => t.wall)).toFixed(0)} ms`,
    );
  }
  await edgeColdStart();
  const cold = [];
  for (let i = 0; i < RUNS; i++) cold.push(await edgeColdStart());
  console.log(`edge example cold start (spawn to first answer): ${median(cold).toFixed(0)} ms`);
} finally {
  await Deno.remove(tmp, { recursive: true });
}
