/**
 * Long differential fuzz runs: `deno task fuzz --runs N` checks N random
 * cases (tests/_fuzz.ts) on the WebAssembly backend (one thread, worker
 * threads, and small token chunks) and, with `--webgpu`, on WebGPU, against
 * the plain reference. The base seed comes from FUZZ_SEED when set, else is
 * random; it is printed first. Each failure prints its case and the command
 * that replays it alone. The last line is `N passed, M failed`; the exit
 * status is 1 when a case failed.
 *
 * Options: --runs N (default 200), --max-elements N (largest T*E, default
 * 2^20), --webgpu (also the WebGPU backend, restricted to a few pipeline
 * families: its shader compilation is slow on software adapters),
 * --stop (stop at the first failure), --quiet.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { createRouter } from "../mod.ts";
import type { Router } from "../mod.ts";
import { type CaseFamily, describeCase, fuzz } from "../tests/_fuzz.ts";

/** --family: the WebGPU cases of one pipeline family (few shader compilations). */
const FAMILY: CaseFamily = {
  scores: ["sigmoid", "softmax-pre", "softmax-post", "sqrtsoftplus"],
  experts: [49, 63],
  topk: [1, 15],
};

const { values } = parseArgs({
  args: Deno.args,
  options: {
    runs: { type: "string", default: "200" },
    "max-elements": { type: "string", default: String(1 << 20) },
    webgpu: { type: "boolean", default: false },
    family: { type: "boolean", default: false },
    "gpu-only": { type: "boolean", default: false },
    stop: { type: "boolean", default: false },
    quiet: { type: "boolean", default: false },
  },
});

const runs = Number(values.runs);
const maxElements = Number(values["max-elements"]);
if (!Number.isInteger(runs) || runs < 0 || !Number.isInteger(maxElements) || maxElements < 1) {
  console.error(
    `--runs and --max-elements must be positive integers, got ${values.runs} and ${values["max-elements"]}`,
  );
  Deno.exit(2);
}
const envSeed = Deno.env.get("FUZZ_SEED");
const seed = envSeed !== undefined && envSeed !== "" ? Number(envSeed) | 0 : (Math.random() * 2 ** 31) | 0;
console.log(`FUZZ_SEED=${seed} runs=${runs} max-elements=${maxElements}${values.webgpu ? " +webgpu" : ""}`);

const wasm: [string, Router][] = [
  ["wasm", await createRouter({ backend: "wasm", threads: 1 })],
  ["wasm threads", await createRouter({ backend: "wasm", threads: 4 })],
  ["wasm chunked", await createRouter({ backend: "wasm", threads: 1, chunkBytes: 1 << 14 })],
];
let failed = 0;
let passed = 0;
const started = performance.now();
const report = (label: string, r: Awaited<ReturnType<typeof fuzz>>) => {
  passed += r.passed;
  failed += r.failed;
  for (const f of r.failures) {
    console.log(`\nFAILED ${label} case ${f.index}: ${f.description}\n  ${f.message.replaceAll("\n", "\n  ")}`);
    console.log(`  replay: FUZZ_SEED=${f.caseSeed} deno task fuzz --runs 1${label === "webgpu" ? " --webgpu" : ""}`);
  }
  console.log(
    `${label}: ${r.passed} passed, ${r.failed} failed; ${r.tokens} tokens checked, ${r.nearTies} near-tie tokens compared leniently`,
  );
};
const progress = (i: number, c: Parameters<typeof describeCase>[0], error: Error | null) => {
  if (!values.quiet) console.log(`${error ? "FAIL" : "ok  "} ${i} ${describeCase(c)}`);
};
try {
  if (!values["gpu-only"]) {
    report(
      "wasm",
      await fuzz({ routers: wasm, limits: { maxElements }, seed, runs, stopOnFailure: values.stop, onCase: progress }),
    );
  }
  if (values.webgpu) {
    const gpu = await createRouter({ backend: "webgpu" });
    try {
      report(
        "webgpu",
        await fuzz({
          routers: [["webgpu", gpu], ["wasm", wasm[0]![1]]],
          limits: { maxElements },
          ...(values.family ? { family: FAMILY } : {}),
          seed,
          runs,
          stopOnFailure: values.stop,
          onCase: progress,
        }),
      );
    } finally {
      gpu.dispose();
    }
  }
} finally {
  for (const [, r] of wasm) r.dispose();
}
console.log(`(${((performance.now() - started) / 1000).toFixed(1)} s)`);
console.log(`${passed} passed, ${failed} failed`);
if (failed > 0) Deno.exit(1);
