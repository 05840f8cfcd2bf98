/**
 * The wasm router against tests/reference.ts over a grid of tokens, experts,
 * k, groups, scaling, bias, score functions and output layouts, in the
 * spirit of TransformerEngine's router tests; both selection algorithms are
 * forced on every configuration and must give the reference's sets exactly.
 */

import assert from "node:assert";
import { createRouter } from "../mod.ts";
import type { FloatDType, FloatTensor, IndexArray, IndexDType, Router, TopkOptions, TopkResult } from "../mod.ts";
import { assertArrayEqual, assertBitIdentical, assertClose } from "./_assert.ts";
import type { Tolerance } from "./_assert.ts";
import { ARRAY_OF, assertTensor } from "./_golden_suite.ts";
import { mulberry32, normals, routableLogits } from "./_generators.ts";
import type { Rng } from "./_generators.ts";
import { narrowTo, packBitmap, refTopkBackward, refTopkForward, roundTo, widen } from "./reference.ts";
import type { RefTopkForward, RefTopkOptions } from "./reference.ts";

/** A score function with its softmax variant spelled out. */
type Score = "softmax-pre" | "softmax-post" | "sigmoid" | "sqrtsoftplus";

/** One point of the grid. */
interface GridConfig {
  /** Full logits shape; the last axis is E. */
  shape: number[];
  topk: number;
  score: Score;
  /** 8 groups, top-4 groups kept. */
  groups: boolean;
  scalingFactor?: number;
  bias: boolean;
  dtype: FloatDType;
}

const TOKENS_FULL = [1, 33];
const EXPERTS = [8, 32, 128, 130, 1024];
const TOPKS = [1, 2, 4, 8, 16, 32];
const SCORES: Score[] = ["softmax-pre", "softmax-post", "sigmoid", "sqrtsoftplus"];
const NUM_GROUPS = 8;
const GROUP_TOPK = 4;

/** Whether 8 groups / top-4 groups meet the constraints of SPEC 2.3 for E experts and top-k K. */
function groupsFit(E: number, K: number): boolean {
  return E % NUM_GROUPS === 0 && K % GROUP_TOPK === 0 && K / GROUP_TOPK <= E / NUM_GROUPS;
}

/** Every grid point for T tokens (bias only with sigmoid and sqrtsoftplus). */
function gridConfigs(tokens: number, dtype: FloatDType = "float32"): GridConfig[] {
  const configs: GridConfig[] = [];
  for (const E of EXPERTS) {
    for (const topk of TOPKS.filter((k) => k <= E)) {
      for (const groups of groupsFit(E, topk) ? [false, true] : [false]) {
        for (const scalingFactor of [undefined, 1.2]) {
          for (const score of SCORES) {
            for (const bias of score.startsWith("softmax") ? [false] : [false, true]) {
              configs.push({
                shape: [tokens, E],
                topk,
                score,
                groups,
                bias,
                dtype,
                ...(scalingFactor && { scalingFactor }),
              });
            }
          }
        }
      }
    }
  }
  return configs;
}

/** A short label of a grid point, for failure messages. */
function labelOf(c: GridConfig): string {
  return `[${c.shape}] k=${c.topk} ${c.score}${c.groups ? " G8x4" : ""}${c.bias ? " bias" : ""}` +
    `${c.scalingFactor ? ` s${c.scalingFactor}` : ""} ${c.dtype}`;
}

/**
 * Tolerance for E experts: 1e-6 * max(1, log2(E)) in float32. The softmax
 * and normalisation sums run over up to E terms in an order each
 * implementation chooses, so the bound grows with E; correct float32 code
 * (the wasm backend) stays below a tenth of it (about 2 ulps at E=8).
 */
function tolerance(E: number, dtype: FloatDType): Tolerance {
  const base = 1e-6 * Math.max(1, Math.log2(E));
  // Narrowed outputs may land one unit in the last place apart (a float32
  // value near a rounding boundary); float16 also has subnormals below 2^-14.
  const ulp = { float32: 0, float16: 2 ** -10, bfloat16: 2 ** -7 }[dtype];
  const subnormal = dtype === "float16" ? 2 ** -24 : 0;
  return { atol: base + subnormal, rtol: base + ulp };
}

/** The reference's options and the library's options of a grid point. */
function optionsOf(c: GridConfig, rng: Rng): { ref: RefTopkOptions; lib: TopkOptions } {
  const E = c.shape.at(-1)!;
  const scoreFunction = c.score.startsWith("softmax") ? "softmax" : c.score as "sigmoid" | "sqrtsoftplus";
  const lib: TopkOptions = { topk: c.topk, scoreFunction };
  if (scoreFunction === "softmax") lib.usePreSoftmax = c.score === "softmax-pre";
  if (c.groups) {
    lib.numGroups = NUM_GROUPS;
    lib.groupTopk = GROUP_TOPK;
  }
  if (c.scalingFactor !== undefined) lib.scalingFactor = c.scalingFactor;
  const bias = c.bias ? normals(rng, E, 0.1) : undefined;
  if (bias) lib.expertBias = { data: bias, shape: [E], dtype: "float32" };
  const { expertBias: _, ...rest } = lib;
  return { ref: { ...rest, expertBias: bias }, lib };
}

/** Runs one forward and returns it with its backward gradient (after checking both against the reference). */
async function runAndCheck(
  router: Router,
  logits: FloatTensor,
  options: TopkOptions,
  ref: RefTopkForward,
  refGrad: Float32Array,
  gradProbs: FloatTensor,
  tol: Tolerance,
  label: string,
): Promise<{ result: TopkResult; grad: FloatTensor["data"] }> {
  const { dtype, shape } = logits;
  const result = await router.fusedTopkWithScoreFunction(logits, options);
  assertTensor(result.probs, dtype, shape, `${label} probs`);
  assertClose(widen(result.probs), roundTo(ref.probs, dtype), tol, `${label} probs`);
  assertTensor(result.intermediate, "float32", shape, `${label} intermediate`);
  assertClose(result.intermediate.data as Float32Array, ref.intermediate, tol, `${label} intermediate`);
  const grad = await router.fusedTopkWithScoreFunctionBackward(result.saved, gradProbs);
  assertTensor(grad, dtype, shape, `${label} grad_logits`);
  assertClose(widen(grad), roundTo(refGrad, dtype), tol, `${label} grad_logits`);
  result.saved.release();
  return { result, grad: grad.data };
}

/**
 * One grid point: every output layout (bytemap, bitmap_u8, dense int16 /
 * int32 / int64 and a caller buffer), with the radix and the naive
 * selection forced on two of the dense runs. Sets and the dense order must
 * equal the reference's exactly; gradients must be bit-identical across layouts.
 */
async function checkConfig(router: Router, c: GridConfig, seed: number): Promise<void> {
  const label = labelOf(c);
  const rng = mulberry32(seed);
  const E = c.shape.at(-1)!;
  const T = c.shape.reduce((a, b) => a * b, 1) / E;
  const K = c.topk;
  const lead = c.shape.slice(0, -1);
  const tol = tolerance(E, c.dtype);
  const { ref: refOptions, lib: options } = optionsOf(c, rng);

  const x = routableLogits(rng, T, E, refOptions, { dtype: c.dtype });
  const gradValues = roundTo(normals(rng, T * E), c.dtype);
  const ref = refTopkForward(x, T, E, refOptions);
  const refGrad = refTopkBackward(ref, gradValues);
  const logits = { data: narrowTo(x, c.dtype), shape: c.shape, dtype: c.dtype } as FloatTensor;
  const gradProbs = { data: narrowTo(gradValues, c.dtype), shape: c.shape, dtype: c.dtype } as FloatTensor;
  const run = (o: TopkOptions, l: string) =>
    runAndCheck(router, logits, o, ref, refGrad, gradProbs, tol, `${label} ${l}`);

  try {
    const bytemap = await run(options, "bytemap");
    const map = assertTensor(bytemap.result.routingMap, "uint8", c.shape, "bytemap");
    assertArrayEqual(map.data, ref.bytemap, "bytemap");

    const bitmap = await run({ ...options, routingMapFormat: "bitmap_u8" }, "bitmap_u8");
    const bits = assertTensor(bitmap.result.routingMap, "uint8", [...lead, Math.ceil(E / 8)], "bitmap_u8");
    assertArrayEqual(bits.data, packBitmap(ref.bytemap, T, E), "bitmap_u8");
    assertBitIdentical(bitmap.grad, bytemap.grad, "bitmap_u8 grad_logits vs bytemap");

    // Dense indices in the documented order (descending selection score,
    // ties by lower index): int16 with the default algorithm, int32 with
    // radix forced, int64 with naive forced, and a caller buffer.
    const dense: [string, TopkOptions, IndexDType][] = [
      ["int16", { ...options, indexDtype: "int16" }, "int16"],
      ["int32 radix", { ...options, indexDtype: "int32", radixTopkThreshold: 1 }, "int32"],
      ["int64 naive", { ...options, indexDtype: "int64", radixTopkThreshold: 1e9 }, "int64"],
    ];
    const outDtype = (["int16", "int32", "int64"] as const)[seed % 3]!;
    const buffer = new ARRAY_OF[outDtype](T * K) as IndexArray;
    dense.push([`indicesOut ${outDtype}`, { ...options, indicesOut: buffer }, outDtype]);
    for (const [name, o, indexDtype] of dense) {
      const { result, grad } = await run(o, name);
      assert.strictEqual(result.routingMap, undefined, `${name}: routingMap`);
      const indices = assertTensor(result.indices, indexDtype, [...lead, K], name);
      assertArrayEqual(indices.data as IndexArray, ref.routing, `${name} indices`);
      if (o.indicesOut) {
        assert.strictEqual(indices.data, o.indicesOut, `${name}: result.indices.data is the caller's buffer`);
      }
      assertBitIdentical(grad, bytemap.grad, `${name} grad_logits vs bytemap`);
    }
  } catch (e) {
    if (e instanceof Error) e.message = `${label} (seed ${seed}): ${e.message}`;
    throw e;
  }
}

/** Runs `configs` as one step per score function (with and without bias). */
async function checkGrid(t: Deno.TestContext, router: Router, configs: GridConfig[], seed: number): Promise<void> {
  const names = [...new Set(configs.map((c) => `${c.score}${c.bias ? " with bias" : ""}`))];
  for (const name of names) {
    const group = configs.filter((c) => `${c.score}${c.bias ? " with bias" : ""}` === name);
    await t.step(`${name}: ${group.length} configurations`, async () => {
      for (const c of group) await checkConfig(router, c, seed + configs.indexOf(c));
    });
  }
}

const router: Router = await createRouter({ backend: "wasm" });
globalThis.addEventListener("unload", () => router.dispose());

Deno.test("the router matches the reference on the full grid for 1 and 33 tokens", async (t) => {
  for (const tokens of TOKENS_FULL) {
    const configs = gridConfigs(tokens);
    // Some 33-token batches keep two leading axes, [3, 11, E].
    if (tokens === 33) configs.forEach((c, i) => i % 2 && (c.shape = [3, 11, c.shape[1]!]));
    await t.step(`${tokens} tokens`, (t) => checkGrid(t, router, configs, 1000 * tokens));
  }
});

Deno.test("the router matches the reference on a sample of the grid for 2048 tokens", async (t) => {
  // A deterministic sample: two configurations per score function and bias
  // setting, with leading axes [16, 128].
  const all = gridConfigs(2048);
  const rng = mulberry32(2048);
  const sample: GridConfig[] = [];
  for (const score of SCORES) {
    for (const bias of score.startsWith("softmax") ? [false] : [false, true]) {
      const pool = all.filter((c) => c.score === score && c.bias === bias);
      for (let i = 0; i < 2; i++) sample.push({ ...pool[Math.floor(rng() * pool.length)]! });
    }
  }
  // Always include a large radix case: E=1024, k=32, with groups.
  sample.push({ shape: [2048, 1024], topk: 32, score: "softmax-post", groups: true, bias: false, dtype: "float32" });
  sample.forEach((c) => c.shape = [16, 128, c.shape.at(-1)!]);
  await checkGrid(t, router, sample, 7000);
});

Deno.test("the router matches the reference for float16 and bfloat16 logits", async (t) => {
  const configs = (["float16", "bfloat16"] as const).flatMap((dtype) =>
    gridConfigs(33, dtype).filter((c) => [32, 130, 1024].includes(c.shape[1]!) && [2, 8, 16].includes(c.topk))
  );
  await checkGrid(t, router, configs, 9000);
});

Deno.test("sqrtsoftplus takes the identity branch of softplus for logits above 20", async () => {
  const options = { topk: 4, scoreFunction: "sqrtsoftplus" } as const;
  const rng = mulberry32(20);
  const x = routableLogits(rng, 33, 64, options, { mean: 20, scale: 4 });
  assert.ok(x.some((v) => v > 20) && x.some((v) => v <= 20), "logits on both sides of 20");
  const ref = refTopkForward(x, 33, 64, options);
  const gradProbs = normals(rng, 33 * 64);
  const logits = { data: x, shape: [33, 64], dtype: "float32" } as const;
  const result = await router.fusedTopkWithScoreFunction(logits, { ...options, indexDtype: "int32" });
  assertArrayEqual(result.indices!.data as Int32Array, ref.routing, "indices");
  assertClose(result.probs.data as Float32Array, ref.probs, tolerance(64, "float32"), "probs");
  const grad = await router.fusedTopkWithScoreFunctionBackward(result.saved, { ...logits, data: gradProbs });
  assertClose(grad.data as Float32Array, refTopkBackward(ref, gradProbs), tolerance(64, "float32"), "grad_logits");
});

Deno.test("both selection algorithms break exact ties toward the lower expert index", async (t) => {
  const rng = mulberry32(77);
  for (const score of SCORES) {
    await t.step(score, async () => {
      for (const [E, K] of [[8, 3], [32, 8], [130, 16], [1024, 32]] as const) {
        // Integer logits in [-3, 3]: many experts share a logit, so many scores tie exactly.
        const x = Float32Array.from({ length: 33 * E }, () => Math.floor(rng() * 7) - 3);
        const { ref: refOptions, lib } = optionsOf({
          shape: [33, E],
          topk: K,
          score,
          groups: false,
          bias: false,
          dtype: "float32",
        }, rng);
        const ref = refTopkForward(x, 33, E, refOptions);
        for (const radixTopkThreshold of [1, 1e9]) {
          const result = await router.fusedTopkWithScoreFunction(
            { data: x, shape: [33, E], dtype: "float32" },
            { ...lib, indexDtype: "int32", radixTopkThreshold },
          );
          assertArrayEqual(
            result.indices!.data as Int32Array,
            ref.routing,
            `E=${E} K=${K} threshold ${radixTopkThreshold}`,
          );
          result.saved.release();
        }
      }
    });
  }
});

Deno.test("both selection algorithms rank NaN below every number, whatever its sign bit", async (t) => {
  const rng = mulberry32(99);
  const negativeNaN = new Float32Array(new Uint32Array([0xffc00000]).buffer)[0]!;
  for (const score of ["softmax-post", "sigmoid", "sqrtsoftplus"] as const) {
    await t.step(score, async () => {
      for (const [E, K] of [[8, 3], [32, 8], [130, 16], [1024, 32]] as const) {
        const T = 9;
        const x = normals(rng, T * E);
        for (let t = 0; t < T; t++) {
          // Row t < T-1: NaN at expert 0 (where a naive arg-max starts) and at
          // t random places. Last row: NaN at experts 0 .. E-K+1, so only K-2
          // numbers are left and the two NaNs of lowest index complete the set.
          const nanAt = t === T - 1
            ? Array.from({ length: E - K + 2 }, (_, i) => i)
            : [0, ...Array.from({ length: t }, () => Math.floor(rng() * E))];
          nanAt.forEach((e, i) => x[t * E + e] = i % 2 ? negativeNaN : NaN);
        }
        const { ref: refOptions, lib } = optionsOf({
          shape: [T, E],
          topk: K,
          score,
          groups: false,
          bias: false,
          dtype: "float32",
        }, rng);
        const ref = refTopkForward(x, T, E, refOptions);
        for (const radixTopkThreshold of [1, 1e9]) {
          const result = await router.fusedTopkWithScoreFunction(
            { data: x, shape: [T, E], dtype: "float32" },
            { ...lib, indexDtype: "int32", radixTopkThreshold },
          );
          assertArrayEqual(
            result.indices!.data as Int32Array,
            ref.routing,
            `E=${E} K=${K} threshold ${radixTopkThreshold}`,
          );
          result.saved.release();
        }
      }
    });
  }
});
