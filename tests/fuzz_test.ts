/**
 * Differential fuzzing within the CI budget (see tests/_fuzz.ts for what a
 * case is and what "agree" means), and the NaN / infinity policy of SPEC
 * section 2 on every backend.
 *
 * The base seed is FUZZ_SEED when set, else a fixed one; it is printed.
 * A failure names each failing case and the line that replays it alone;
 * `deno task fuzz --runs N` makes longer runs.
 *
 * WebGPU: shader compilation is slow on software adapters (seconds per
 * pipeline), so its share is restricted to one pipeline family (E in
 * [49, 63], top-k <= 15, two score functions) on one router.
 */

import assert from "node:assert";
import { createRouter } from "../mod.ts";
import type { FloatDType, FloatTensor, Router, TopkOptions } from "../mod.ts";
import { type CaseFamily, type CaseLimits, fuzz, type FuzzReport } from "./_fuzz.ts";
import { narrowTo, widen } from "./reference.ts";

/** Base seed of the CI budget: FUZZ_SEED when set, else fixed. */
function baseSeed(): number {
  let env: string | undefined;
  try {
    env = Deno.env.get("FUZZ_SEED");
  } catch {
    env = undefined; // no env permission: the fixed seed
  }
  return env !== undefined && env !== "" ? Number(env) | 0 : 20251127;
}

const SEED = baseSeed();
const WASM_RUNS = 120;
const GPU_RUNS = 10;
const LIMITS: CaseLimits = { maxElements: 1 << 16 };
const GPU_FAMILY: CaseFamily = { scores: ["sigmoid", "softmax-post"], experts: [49, 63], topk: [1, 15], ops: ["topk"] };

const hasGpu = await (async () => {
  try {
    return (await navigator.gpu?.requestAdapter()) != null;
  } catch {
    return false;
  }
})();

// one WebGPU router for the whole file: its pipelines are compiled once
let gpuRouter: Router | null = null;
async function gpu(): Promise<Router> {
  gpuRouter ??= await createRouter({ backend: "webgpu" });
  return gpuRouter;
}
globalThis.addEventListener("unload", () => gpuRouter?.dispose());

/** Fails with every failing case and its replay line. */
function assertNoFailures(report: FuzzReport, what: string, replay: string): void {
  const lines = report.failures.map((f) =>
    `case ${f.index}: ${f.description}\n    ${f.message.replaceAll("\n", "\n    ")}\n` +
    `    replay: FUZZ_SEED=${f.caseSeed} ${replay}`
  );
  assert.strictEqual(
    report.failed,
    0,
    `${what}: ${report.failed} of ${report.passed + report.failed} cases failed (FUZZ_SEED=${SEED})\n${
      lines.join("\n")
    }`,
  );
}

// The WebGPU kernels are being rewritten (gpu/); the committed ones give NaN
// gradients to unchosen experts with non-finite logits. Flip once they land.
const GPU_REWRITE_PENDING = false;

Deno.test("the wasm backend agrees with the reference on random shapes, options, layouts and hostile data", async () => {
  console.log(`FUZZ_SEED=${SEED} (${WASM_RUNS} cases, T*E <= ${LIMITS.maxElements})`);
  const routers: [string, Router][] = [
    ["wasm", await createRouter({ backend: "wasm" })],
    ["wasm one thread, 16 KiB chunks", await createRouter({ backend: "wasm", threads: 1, chunkBytes: 1 << 14 })],
  ];
  try {
    const report = await fuzz({ routers, limits: LIMITS, seed: SEED, runs: WASM_RUNS });
    console.log(
      `${report.passed} passed, ${report.failed} failed; ${report.tokens} tokens, ${report.nearTies} near ties`,
    );
    assertNoFailures(report, "wasm", "deno task fuzz --runs 1");
  } finally {
    for (const [, r] of routers) r.dispose();
  }
});

Deno.test({
  name: "the webgpu backend agrees with the reference and with wasm on random data of one pipeline family",
  ignore: !hasGpu || GPU_REWRITE_PENDING,
  async fn() {
    const wasm = await createRouter({ backend: "wasm" });
    try {
      const report = await fuzz({
        routers: [["webgpu", await gpu()], ["wasm", wasm]],
        limits: { maxElements: 1 << 14, invalidRate: 0.2 },
        family: GPU_FAMILY,
        seed: SEED,
        runs: GPU_RUNS,
      });
      assertNoFailures(report, "webgpu", "deno task fuzz --runs 1 --webgpu");
    } finally {
      wasm.dispose();
    }
  },
});

// ---------------------------------------------------------------------------
// NaN and infinity (SPEC section 2)

const NEG_NAN = new Float32Array(new Uint32Array([0xffc00000]).buffer)[0]!;

function tensorOf(rows: number[][], dtype: FloatDType = "float32"): FloatTensor {
  const E = rows[0]!.length;
  return { data: narrowTo(Float32Array.from(rows.flat()), dtype), shape: [rows.length, E], dtype } as FloatTensor;
}

/** Chosen experts of each row, best first. */
async function chosen(router: Router, rows: number[][], options: Partial<TopkOptions>, dtype?: FloatDType) {
  const r = await router.fusedTopkWithScoreFunction(tensorOf(rows, dtype), {
    topk: 2,
    scoreFunction: "sigmoid",
    ...options,
    indexDtype: "int32",
  });
  const K = r.indices!.shape.at(-1)!;
  const data = [...r.indices!.data as Int32Array];
  return { rows: rows.map((_, t) => data.slice(t * K, (t + 1) * K)), result: r };
}

/** The NaN / infinity policy, checked on one router (E = 56 so that WebGPU stays in one pipeline family). */
async function checkNonFinitePolicy(t: Deno.TestContext, router: Router): Promise<void> {
  const E = 56;
  const row = (entries: Record<number, number>, fill = 0) => {
    const r = new Array<number>(E).fill(fill);
    for (const [e, v] of Object.entries(entries)) r[Number(e)] = v;
    return r;
  };
  await t.step("NaN ranks below every number, -Infinity included, and NaNs tie by lower index", async () => {
    for (const score of ["sigmoid", "softmax"] as const) {
      for (const radixTopkThreshold of [1, 1e9]) {
        const o = { scoreFunction: score, radixTopkThreshold };
        const rowsIn = [
          row({ 0: NaN, 5: 1, 9: NEG_NAN, 20: 0.5 }, -Infinity), // numbers first, then -Infinity by index
          row({}, NaN), // all NaN: the lowest indices
          row({ 3: -Infinity, 7: -Infinity }, NaN), // -Infinity beats NaN
        ];
        const { rows } = await chosen(router, rowsIn, { ...o, topk: 3 });
        assert.deepStrictEqual(rows[0], [5, 20, 1], `${score} ${radixTopkThreshold}: row 0`);
        assert.deepStrictEqual(rows[1], [0, 1, 2], `${score} ${radixTopkThreshold}: row 1`);
        assert.deepStrictEqual(rows[2], [3, 7, 0], `${score} ${radixTopkThreshold}: row 2`);
      }
    }
  });
  await t.step("+Infinity ranks first; equal infinities tie by lower index", async () => {
    const { rows } = await chosen(router, [row({ 4: Infinity, 2: Infinity, 9: 1e38 })], { topk: 3 });
    assert.deepStrictEqual(rows[0], [2, 4, 9]);
  });
  await t.step("a non-finite token does not disturb its neighbours; its values follow IEEE arithmetic", async () => {
    const finite = row({ 1: 2, 2: 1 });
    const { result } = await chosen(router, [finite, row({ 1: Infinity, 2: 1 }), finite], {
      topk: 2,
      scoreFunction: "softmax",
      usePreSoftmax: true,
    });
    const p = result.probs.data as Float32Array;
    // softmax of a row with +Infinity: exp(inf - inf) is NaN, so the row's values are NaN
    assert.ok(Number.isNaN(p[E + 1]!), `probs of the +Infinity token: ${p[E + 1]}`);
    assert.deepStrictEqual([...p.subarray(0, E)], [...p.subarray(2 * E, 3 * E)], "neighbours equal");
    assert.ok(p.subarray(0, E).every(Number.isFinite), "neighbours finite");
    // sigmoid: +Infinity is a score of 1, -Infinity of 0, both finite values
    const s = await chosen(router, [row({ 1: Infinity, 2: -Infinity, 3: 0 }, -Infinity)], { topk: 3 });
    assert.deepStrictEqual(s.rows[0], [1, 3, 0]);
    const sp = s.result.probs.data as Float32Array;
    assert.ok(Math.abs(sp[1]! - 2 / 3) < 1e-6 && Math.abs(sp[3]! - 1 / 3) < 1e-6 && sp[0] === 0, `${sp.slice(0, 4)}`);
  });
  await t.step("experts that were not chosen get a gradient of exactly 0, whatever their logit", async () => {
    const { result } = await chosen(router, [row({ 0: NaN, 1: 3, 2: 2, 3: Infinity, 4: -Infinity })], {
      topk: 2,
      scoreFunction: "sigmoid",
    });
    assert.deepStrictEqual([...result.indices!.data], [3, 1]);
    const g = await router.fusedTopkWithScoreFunctionBackward(result.saved, tensorOf([new Array(E).fill(1)]));
    const gd = g.data as Float32Array;
    for (const e of [0, 2, 4, 10]) assert.strictEqual(Math.abs(gd[e]!), 0, `gradLogits[${e}] = ${gd[e]}`);
  });
  await t.step("checkFinite names the first non-finite logit's token and expert, in every float dtype", async () => {
    for (const dtype of ["float32", "float16", "bfloat16"] as const) {
      for (const [bad, name] of [[NaN, "NaN"], [Infinity, "Infinity"], [-Infinity, "-Infinity"]] as const) {
        const x = tensorOf([row({}), row({ 7: bad, 9: NaN })], dtype);
        await assert.rejects(
          () => router.fusedTopkWithScoreFunction(x, { topk: 2, scoreFunction: "sigmoid", checkFinite: true }),
          (e: Error) =>
            e instanceof RangeError && e.message.includes(`got ${name} at token 1, expert 7`) &&
            e.message.includes("checkFinite"),
          `${dtype} ${name}`,
        );
        await assert.rejects(
          () => router.fusedComputeScoreForMoEAuxLoss(x, { topk: 2, scoreFunction: "softmax", checkFinite: true }),
          (e: Error) => e instanceof RangeError && e.message.includes(`at token 1, expert 7`),
          `aux ${dtype} ${name}`,
        );
      }
      const ok = await router.fusedTopkWithScoreFunction(tensorOf([row({ 1: 65504 })], dtype), {
        topk: 2,
        scoreFunction: "sigmoid",
        checkFinite: true,
      });
      assert.ok(widen(ok.probs).every(Number.isFinite), `${dtype}: finite logits pass checkFinite`);
    }
  });
}

Deno.test("the wasm backend follows the NaN and infinity policy", async (t) => {
  const router = await createRouter({ backend: "wasm" });
  try {
    await checkNonFinitePolicy(t, router);
  } finally {
    router.dispose();
  }
});

Deno.test({
  name: "the webgpu backend follows the NaN and infinity policy",
  ignore: !hasGpu || GPU_REWRITE_PENDING,
  fn: async (t) => checkNonFinitePolicy(t, await gpu()),
});
