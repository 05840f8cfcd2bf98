/**
 * Behaviour a user of the public API relies on: leading dimensions, inputs
 * left untouched, caller index buffers, 16-bit dtypes, identical results from
 * both selection algorithms, from every routing layout and from chunked
 * batches, the radix-threshold environment variable, router lifetimes, saved
 * states, and the accuracy of the SIMD math routines.
 */

import assert from "node:assert";
import * as moduleApi from "../mod.ts";
import { createRouter } from "../mod.ts";
import type {
  AuxLossOptions,
  FloatTensor,
  IndexArray,
  IndexDType,
  Router,
  Tensor,
  TokensPerExpertDType,
  TopkOptions,
  TopkResult,
} from "../mod.ts";
import { WasmBackend } from "../wasm/backend.ts";
import { assertArrayEqual, assertBitIdentical, assertClose } from "./_assert.ts";
import { ARRAY_OF, assertTensor } from "./_golden_suite.ts";
import type { RouterOps } from "./_golden_suite.ts";
import { mulberry32, normals, routableLogits } from "./_generators.ts";
import type { Rng } from "./_generators.ts";
import {
  f32ToBf16,
  narrowTo,
  refAuxScoresBackward,
  refAuxScoresForward,
  refTopkBackward,
  refTopkForward,
  roundTo,
  widen,
} from "./reference.ts";
import type { RefTopkOptions } from "./reference.ts";

const router: Router = await createRouter({ backend: "wasm" });
globalThis.addEventListener("unload", () => router.dispose());

/** A score function with its softmax variant spelled out. */
type Score = "softmax-pre" | "softmax-post" | "sigmoid" | "sqrtsoftplus";
const SCORES: readonly Score[] = ["softmax-pre", "softmax-post", "sigmoid", "sqrtsoftplus"];

/** Settings of one routing configuration. */
interface Config {
  E: number;
  K: number;
  score: Score;
  /** [numGroups, groupTopk] */
  groups?: [number, number];
  bias?: boolean;
  scalingFactor?: number;
}

/** The library's and the reference's options for a configuration (the bias drawn from `rng`). */
function optionsOf(c: Config, rng: Rng): { lib: TopkOptions; ref: RefTopkOptions } {
  const scoreFunction = c.score.startsWith("softmax") ? "softmax" : c.score as "sigmoid" | "sqrtsoftplus";
  const lib: TopkOptions = { topk: c.K, scoreFunction };
  if (scoreFunction === "softmax") lib.usePreSoftmax = c.score === "softmax-pre";
  if (c.groups) [lib.numGroups, lib.groupTopk] = c.groups;
  if (c.scalingFactor !== undefined) lib.scalingFactor = c.scalingFactor;
  const bias = c.bias && scoreFunction !== "softmax" ? normals(rng, c.E, 0.1) : undefined;
  if (bias) lib.expertBias = { data: bias, shape: [c.E], dtype: "float32" };
  const { expertBias: _, ...rest } = lib;
  return { lib, ref: { ...rest, expertBias: bias } };
}

function labelOf(c: Config): string {
  return `E=${c.E} K=${c.K} ${c.score}${c.groups ? ` G${c.groups.join("x")}` : ""}${c.bias ? " bias" : ""}`;
}

const f32 = (data: Float32Array, shape: readonly number[]): Tensor<"float32"> => ({ data, shape, dtype: "float32" });

/** A copy of the bytes of a typed array. */
function bytesOf(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength).slice();
}

/** Logits [T, E] drawn from a few levels only, so that many scores tie exactly. */
function levelLogits(rng: Rng, n: number, levels: readonly number[]): Float32Array {
  return Float32Array.from({ length: n }, () => levels[Math.floor(rng() * levels.length)]!);
}

/** The dense layouts and a caller buffer, with the dtype each gives. */
function routeLayouts(T: number, K: number): [string, Partial<TopkOptions>, "map" | IndexDType][] {
  return [
    ["bytemap", {}, "map"],
    ["bitmap_u8", { routingMapFormat: "bitmap_u8" }, "map"],
    ["int16", { indexDtype: "int16" }, "int16"],
    ["int32", { indexDtype: "int32" }, "int32"],
    ["int64", { indexDtype: "int64" }, "int64"],
    ["indicesOut BigInt64Array", { indicesOut: new BigInt64Array(T * K) }, "int64"],
  ];
}

// ---------------------------------------------------------------------------

Deno.test("`fusedTopkWithScoreFunction()` keeps leading dimensions on every output, with the results of the flat batch", async (t) => {
  const rng = mulberry32(11);
  const E = 20;
  const K = 4;
  const configs: Config[] = [
    { E, K, score: "softmax-pre", scalingFactor: 1.5 },
    { E, K, score: "softmax-post" },
    { E, K, score: "sigmoid", groups: [4, 2], bias: true },
    { E, K, score: "sqrtsoftplus", bias: true },
  ];
  for (const lead of [[4, 3], [2, 3, 2]]) {
    const T = lead.reduce((a, b) => a * b, 1);
    for (const c of configs) {
      await t.step(`[${lead}, E] ${labelOf(c)}`, async () => {
        const { lib } = optionsOf(c, rng);
        const x = normals(rng, T * E);
        const g = normals(rng, T * E);
        const shaped = f32(x, [...lead, E]);
        const flat = f32(x, [T, E]);
        const shapes: Record<string, number[]> = {
          bytemap: [E],
          bitmap_u8: [Math.ceil(E / 8)],
          int16: [K],
          int32: [K],
          int64: [K],
          "indicesOut BigInt64Array": [K],
        };
        for (const [name, layout] of routeLayouts(T, K)) {
          const a = await router.fusedTopkWithScoreFunction(shaped, { ...lib, ...layout });
          const withFreshBuffer = layout.indicesOut ? { indicesOut: new BigInt64Array(T * K) } : {};
          const b = await router.fusedTopkWithScoreFunction(flat, { ...lib, ...layout, ...withFreshBuffer });
          assertTensor(a.probs, "float32", [...lead, E], `${name} probs`);
          assertTensor(a.intermediate, "float32", [...lead, E], `${name} intermediate`);
          const route = a.routingMap ?? a.indices;
          const flatRoute = b.routingMap ?? b.indices;
          assert.ok(route && flatRoute, `${name}: a routing output`);
          assert.deepStrictEqual([...route.shape], [...lead, ...shapes[name]!], `${name} routing shape`);
          assertBitIdentical(a.probs.data, b.probs.data, `${name} probs vs flat`);
          assertBitIdentical(a.intermediate.data, b.intermediate.data, `${name} intermediate vs flat`);
          assertBitIdentical(route.data, flatRoute.data, `${name} routing vs flat`);
          const ga = await router.fusedTopkWithScoreFunctionBackward(a.saved, f32(g, [...lead, E]));
          const gb = await router.fusedTopkWithScoreFunctionBackward(b.saved, f32(g, [T, E]));
          assertTensor(ga, "float32", [...lead, E], `${name} gradLogits`);
          assertBitIdentical(ga.data, gb.data, `${name} gradLogits vs flat`);
        }
      });
    }
    await t.step(`[${lead}, E] aux scores and their gradient`, async () => {
      for (const scoreFunction of ["softmax", "sigmoid", "sqrtsoftplus"] as const) {
        const x = normals(rng, T * E);
        const g = normals(rng, T * E);
        for (const routingMapFormat of ["bytemap", "bitmap_u8"] as const) {
          const options = { topk: K, scoreFunction, routingMapFormat };
          const a = await router.fusedComputeScoreForMoEAuxLoss(f32(x, [...lead, E]), options);
          const b = await router.fusedComputeScoreForMoEAuxLoss(f32(x, [T, E]), options);
          assertTensor(a.scores, "float32", [...lead, E], "scores");
          assertTensor(a.intermediate, "float32", [...lead, E], "intermediate");
          const last = routingMapFormat === "bytemap" ? E : Math.ceil(E / 8);
          assertTensor(a.routingMap, "uint8", [...lead, last], routingMapFormat);
          assertBitIdentical(a.scores.data, b.scores.data, "scores vs flat");
          assertBitIdentical(a.routingMap.data, b.routingMap.data, "routing map vs flat");
          const ga = await router.fusedComputeScoreForMoEAuxLossBackward(a.saved, f32(g, [...lead, E]));
          const gb = await router.fusedComputeScoreForMoEAuxLossBackward(b.saved, f32(g, [T, E]));
          assertTensor(ga, "float32", [...lead, E], "gradLogits");
          assertBitIdentical(ga.data, gb.data, "gradLogits vs flat");
        }
      }
    });
  }
});

Deno.test("no operation writes to its inputs", async (t) => {
  const rng = mulberry32(12);
  const T = 9;
  const E = 16;
  const K = 4;
  for (const dtype of ["float32", "float16", "bfloat16"] as const) {
    await t.step(dtype, async () => {
      const tensorOf = (v: Float32Array, shape: number[]) =>
        ({ data: narrowTo(v, dtype), shape, dtype }) as FloatTensor;
      const logits = tensorOf(normals(rng, T * E), [T, E]);
      const expertBias = tensorOf(normals(rng, E, 0.1), [E]);
      const gradProbs = tensorOf(normals(rng, T * E), [T, E]);
      const gradScores = f32(normals(rng, T * E), [T, E]);
      const probs = tensorOf(Float32Array.from({ length: T * E }, () => rng()), [T, E]);
      const counts: Tensor<TokensPerExpertDType>[] = [
        { data: Int32Array.from({ length: E }, (_, i) => i), shape: [E], dtype: "int32" },
        { data: BigInt64Array.from({ length: E }, (_, i) => BigInt(i)), shape: [E], dtype: "int64" },
        { data: Float32Array.from({ length: E }, (_, i) => i), shape: [E], dtype: "float32" },
        { data: Uint16Array.from({ length: E }, (_, i) => f32ToBf16(i)), shape: [E], dtype: "bfloat16" },
      ];
      const inputs: [string, ArrayBufferView][] = [
        ["logits", logits.data],
        ["expertBias", expertBias.data],
        ["gradProbs", gradProbs.data],
        ["gradScores", gradScores.data],
        ["probs", probs.data],
        ...counts.map((c): [string, ArrayBufferView] => [`tokensPerExpert ${c.dtype}`, c.data]),
      ];
      const before = inputs.map(([, a]) => bytesOf(a));
      const outputs: ArrayBufferView[] = [];

      for (const score of SCORES) {
        const { lib } = optionsOf({ E, K, score, groups: [4, 2] }, rng);
        if (score === "sigmoid" || score === "sqrtsoftplus") lib.expertBias = expertBias;
        for (const [, layout] of routeLayouts(T, K)) {
          const r = await router.fusedTopkWithScoreFunction(logits, { ...lib, ...layout });
          const g = await router.fusedTopkWithScoreFunctionBackward(r.saved, gradProbs);
          outputs.push(r.probs.data, r.intermediate.data, g.data);
        }
      }
      for (const scoreFunction of ["softmax", "sigmoid", "sqrtsoftplus"] as const) {
        const r = await router.fusedComputeScoreForMoEAuxLoss(logits, { topk: K, scoreFunction });
        const g = await router.fusedComputeScoreForMoEAuxLossBackward(r.saved, gradScores);
        outputs.push(r.scores.data, r.intermediate.data, r.routingMap.data, g.data);
      }
      for (const c of counts) {
        const r = await router.fusedMoEAuxLoss(probs, c, { totalNumTokens: T, numExperts: E, topk: K, coeff: 0.1 });
        const g = await router.fusedMoEAuxLossBackward(r.saved, 2);
        outputs.push(r.loss.data, g.data);
      }

      inputs.forEach(([name, a], i) => assertArrayEqual(bytesOf(a), before[i]!, `${name} after every op`));
      const inputBuffers = new Set(inputs.map(([, a]) => a.buffer));
      assert.ok(outputs.every((o) => !inputBuffers.has(o.buffer)), "no output is a view of an input");
    });
  }
});

Deno.test("a caller's indicesOut is written in place and returned, and reusing it does not change an earlier backward", async (t) => {
  const rng = mulberry32(13);
  const T = 17;
  const E = 48;
  const K = 6;
  const { lib } = optionsOf({ E, K, score: "sigmoid", bias: true, groups: [8, 3] }, rng);
  for (const indexDtype of ["int16", "int32", "int64"] as const) {
    await t.step(indexDtype, async () => {
      const x1 = f32(normals(rng, T * E), [T, E]);
      const x2 = f32(normals(rng, T * E), [T, E]);
      const g = f32(normals(rng, T * E), [T, E]);
      const buffer = new ARRAY_OF[indexDtype](T * K) as IndexArray;
      const first = await router.fusedTopkWithScoreFunction(x1, { ...lib, indicesOut: buffer });
      assert.strictEqual(first.indices?.data, buffer, "result.indices.data is the caller's buffer");
      assert.strictEqual(first.indices.dtype, indexDtype);
      const byDtype = await router.fusedTopkWithScoreFunction(x1, { ...lib, indexDtype });
      assertArrayEqual(buffer, byDtype.indices!.data as IndexArray, "buffer vs indexDtype run");
      const firstIndices = buffer.slice();

      // The buffer is reused for another batch before the first backward runs.
      const second = await router.fusedTopkWithScoreFunction(x2, { ...lib, indicesOut: buffer });
      assert.strictEqual(second.indices?.data, buffer);
      assert.notDeepStrictEqual([...buffer], [...firstIndices], "the second batch routes differently");
      const grad = await router.fusedTopkWithScoreFunctionBackward(first.saved, g);
      const expected = await router.fusedTopkWithScoreFunctionBackward(byDtype.saved, g);
      assertBitIdentical(grad.data, expected.data, "first backward after the buffer was reused");
    });
  }
  await t.step("a view into a larger buffer: only its own elements are written", async () => {
    const x = f32(normals(rng, T * E), [T, E]);
    const whole = new Int32Array(T * K + 8).fill(-7);
    const view = whole.subarray(3, 3 + T * K);
    const r = await router.fusedTopkWithScoreFunction(x, { ...lib, indicesOut: view });
    assert.strictEqual(r.indices?.data, view);
    const byDtype = await router.fusedTopkWithScoreFunction(x, { ...lib, indexDtype: "int32" });
    assertArrayEqual(view, byDtype.indices!.data as Int32Array, "view contents");
    assertArrayEqual(
      [...whole.subarray(0, 3), ...whole.subarray(3 + T * K)],
      new Array(8).fill(-7),
      "outside the view",
    );
  });
});

Deno.test("the saved state does not change when the caller edits the returned routing map or intermediate", async (t) => {
  // A user may zero routing-map rows (token dropping) or reuse the returned
  // arrays; the backward of the saved state must not see it.
  const rng = mulberry32(14);
  const T = 9;
  const E = 16;
  const { lib } = optionsOf({ E, K: 4, score: "sigmoid", bias: true }, rng);
  const x = f32(normals(rng, T * E), [T, E]);
  const g = f32(normals(rng, T * E), [T, E]);
  for (const [name, layout] of [["bytemap", {}], ["bitmap_u8", { routingMapFormat: "bitmap_u8" }]] as const) {
    await t.step(`${name}: routingMap`, async () => {
      const expected = await router.fusedTopkWithScoreFunctionBackward(
        (await router.fusedTopkWithScoreFunction(x, { ...lib, ...layout })).saved,
        g,
      );
      const r = await router.fusedTopkWithScoreFunction(x, { ...lib, ...layout });
      r.routingMap!.data.fill(0);
      const grad = await router.fusedTopkWithScoreFunctionBackward(r.saved, g);
      assertBitIdentical(grad.data, expected.data, `${name} backward after routingMap.data.fill(0)`);
    });
  }
  await t.step("intermediate", async () => {
    const expected = await router.fusedTopkWithScoreFunctionBackward(
      (await router.fusedTopkWithScoreFunction(x, { ...lib, indexDtype: "int32" })).saved,
      g,
    );
    const r = await router.fusedTopkWithScoreFunction(x, { ...lib, indexDtype: "int32" });
    r.intermediate.data.fill(0.5);
    const grad = await router.fusedTopkWithScoreFunctionBackward(r.saved, g);
    assertBitIdentical(grad.data, expected.data, "backward after intermediate.data.fill(0.5)");
  });
  await t.step("aux scores intermediate", async () => {
    const options = { topk: 4, scoreFunction: "sigmoid" } as const;
    const expected = await router.fusedComputeScoreForMoEAuxLossBackward(
      (await router.fusedComputeScoreForMoEAuxLoss(x, options)).saved,
      g,
    );
    const r = await router.fusedComputeScoreForMoEAuxLoss(x, options);
    r.intermediate.data.fill(0.5);
    const grad = await router.fusedComputeScoreForMoEAuxLossBackward(r.saved, g);
    assertBitIdentical(grad.data, expected.data, "aux backward after intermediate.data.fill(0.5)");
  });
});

Deno.test("the intermediate is copied out of the saved state on first read, and must be read before release()", async (t) => {
  const rng = mulberry32(15);
  const T = 33;
  const E = 24;
  const x = f32(normals(rng, T * E), [T, E]);
  const g = f32(normals(rng, T * E), [T, E]);
  const cases: Array<[string, TopkOptions]> = [
    ["sigmoid", { topk: 4, scoreFunction: "sigmoid", numGroups: 4, groupTopk: 2 }],
    ["pre-softmax", { topk: 3, scoreFunction: "softmax", usePreSoftmax: true }],
    ["post-softmax, int16 indices", { topk: 3, scoreFunction: "softmax", indexDtype: "int16" }],
    ["post-softmax, int64 indices", { topk: 5, scoreFunction: "softmax", indexDtype: "int64" }],
    ["post-softmax, bytemap", { topk: 3, scoreFunction: "softmax" }],
    ["post-softmax, bitmap_u8", { topk: 4, scoreFunction: "softmax", routingMapFormat: "bitmap_u8" }],
  ];
  for (const [name, options] of cases) {
    await t.step(name, async () => {
      const buf = new Float32Array(T * E);
      const eager = await router.fusedTopkWithScoreFunction(x, { ...options, intermediateOut: buf });
      assert.strictEqual(eager.intermediate.data, buf);
      const expected = (await router.fusedTopkWithScoreFunctionBackward(eager.saved, g)).data;
      const kept = buf.slice();
      const r = await router.fusedTopkWithScoreFunction(x, options);
      assert.deepStrictEqual(Object.keys(r.intermediate).sort(), ["data", "dtype", "shape"]);
      const data = r.intermediate.data;
      assertBitIdentical(data, kept, `${name}: intermediate read on demand`);
      assert.strictEqual(r.intermediate.data, data, `${name}: a second read gives the same array`);
      assert.strictEqual({ ...r.intermediate }.data, data, `${name}: a spread tensor carries the data`);
      data.fill(7); // the caller's copy: the backward does not see it
      assertBitIdentical(
        (await router.fusedTopkWithScoreFunctionBackward(r.saved, g)).data,
        expected,
        `${name}: backward`,
      );
      r.saved.release();
      r.saved.release();
      // the released buffers serve the next forwards (two states alive at once: none may share a buffer)
      const a = await router.fusedTopkWithScoreFunction(x, options);
      const b = await router.fusedTopkWithScoreFunction(x, options);
      assert.ok(data.every((v) => v === 7), `${name}: a read intermediate belongs to the caller`);
      assertBitIdentical((await router.fusedTopkWithScoreFunctionBackward(a.saved, g)).data, expected, `${name}: a`);
      assertBitIdentical((await router.fusedTopkWithScoreFunctionBackward(b.saved, g)).data, expected, `${name}: b`);
      assertBitIdentical(a.intermediate.data, kept, `${name}: intermediate of a later forward`);
      b.saved.release();
      assert.throws(
        () => b.intermediate.data,
        (e: unknown) =>
          e instanceof TypeError && /before its saved state was released/.test(e.message) &&
          /intermediateOut/.test(e.message),
      );
      assert.deepStrictEqual(b.intermediate.shape, [T, E]);
    });
  }
  await t.step("aux scores", async () => {
    const options = { topk: 4, scoreFunction: "sqrtsoftplus" } as const;
    const r = await router.fusedComputeScoreForMoEAuxLoss(x, options);
    assertBitIdentical(r.intermediate.data, x.data as Float32Array, "sqrtsoftplus intermediate: the logits");
    const late = await router.fusedComputeScoreForMoEAuxLoss(x, options);
    late.saved.release();
    assert.throws(() => late.intermediate.data, TypeError);
  });
});

// ---------------------------------------------------------------------------

/** Signed distance in units in the last place between two 16-bit floats given by their bits. */
function ulps16(a: number, b: number): number {
  const ordered = (bits: number) => (bits & 0x8000 ? -(bits & 0x7fff) : bits & 0x7fff);
  return Math.abs(ordered(a) - ordered(b));
}

/** The 16-bit patterns of float16 or bfloat16 data. */
function bits16(data: FloatTensor["data"]): Uint16Array {
  return data instanceof Uint16Array ? data : new Uint16Array(data.buffer, data.byteOffset, data.length);
}

/** Asserts two 16-bit float arrays are within `max` ulps everywhere (NaN only against NaN). */
function assertUlps(actual: FloatTensor["data"], expected: FloatTensor["data"], max: number, label: string): number {
  assert.strictEqual(actual.length, expected.length, `${label}: length`);
  const a = bits16(actual);
  const e = bits16(expected);
  let worst = 0;
  for (let i = 0; i < a.length; i++) {
    const nanA = (a[i]! & 0x7fff) > (actual instanceof Uint16Array ? 0x7f80 : 0x7c00);
    const nanE = (e[i]! & 0x7fff) > (actual instanceof Uint16Array ? 0x7f80 : 0x7c00);
    assert.strictEqual(nanA, nanE, `${label}[${i}]: NaN`);
    if (nanA) continue;
    const d = ulps16(a[i]!, e[i]!);
    assert.ok(d <= max, `${label}[${i}]: ${d} ulps apart (bits ${a[i]!.toString(16)} vs ${e[i]!.toString(16)})`);
    worst = Math.max(worst, d);
  }
  return worst;
}

Deno.test("float16 and bfloat16 logits give probs and gradients in their dtype, within 1 ulp of the reference", async (t) => {
  const T = 33;
  for (const dtype of ["float16", "bfloat16"] as const) {
    for (
      const c of [
        { E: 64, K: 8, score: "softmax-pre", groups: [8, 4] },
        { E: 64, K: 8, score: "softmax-post", scalingFactor: 2.5 },
        { E: 130, K: 16, score: "sigmoid", bias: true },
        { E: 64, K: 8, score: "sqrtsoftplus", bias: true, groups: [8, 4] },
        { E: 32, K: 1, score: "sigmoid" },
      ] satisfies Config[]
    ) {
      await t.step(`${dtype} ${labelOf(c)}`, async () => {
        const rng = mulberry32(15 + c.E + c.K);
        const { lib, ref: refOptions } = optionsOf(c, rng);
        const x = routableLogits(rng, T, c.E, refOptions, { dtype });
        const gradValues = roundTo(normals(rng, T * c.E), dtype);
        const ref = refTopkForward(x, T, c.E, refOptions);
        const refGrad = refTopkBackward(ref, gradValues);
        const logits = { data: narrowTo(x, dtype), shape: [T, c.E], dtype } as FloatTensor;
        const r = await router.fusedTopkWithScoreFunction(logits, { ...lib, indexDtype: "int32" });
        assertTensor(r.probs, dtype, [T, c.E], "probs");
        assertTensor(r.intermediate, "float32", [T, c.E], "intermediate");
        assertArrayEqual(r.indices!.data as Int32Array, ref.routing, "indices");
        assertUlps(r.probs.data, narrowTo(ref.probs, dtype), 1, "probs");
        const tol = 1e-6 * Math.log2(c.E);
        assertClose(r.intermediate.data as Float32Array, ref.intermediate, { atol: tol, rtol: tol }, "intermediate");
        const gradProbs = { data: narrowTo(gradValues, dtype), shape: [T, c.E], dtype } as FloatTensor;
        const g = await router.fusedTopkWithScoreFunctionBackward(r.saved, gradProbs);
        assertTensor(g, dtype, [T, c.E], "gradLogits");
        assertUlps(g.data, narrowTo(refGrad, dtype), 1, "gradLogits");
      });
    }
    await t.step(`${dtype} aux scores: float32 scores, gradient in ${dtype}`, async () => {
      const rng = mulberry32(16);
      const E = 64;
      for (const scoreFunction of ["softmax", "sigmoid", "sqrtsoftplus"] as const) {
        const x = roundTo(normals(rng, T * E), dtype);
        const gradScores = normals(rng, T * E);
        const ref = refAuxScoresForward(x, T, E, { topk: 4, scoreFunction });
        const refGrad = refAuxScoresBackward(ref, gradScores);
        const r = await router.fusedComputeScoreForMoEAuxLoss(
          { data: narrowTo(x, dtype), shape: [T, E], dtype } as FloatTensor,
          { topk: 4, scoreFunction },
        );
        assertTensor(r.scores, "float32", [T, E], "scores");
        assertClose(r.scores.data as Float32Array, ref.scores, { atol: 1e-6, rtol: 6e-6 }, `${scoreFunction} scores`);
        const g = await router.fusedComputeScoreForMoEAuxLossBackward(r.saved, f32(gradScores, [T, E]));
        assertTensor(g, dtype, [T, E], "gradLogits");
        assertUlps(g.data, narrowTo(refGrad, dtype), 1, `${scoreFunction} gradLogits`);
      }
    });
    await t.step(`${dtype} aux loss: loss and gradient in ${dtype}`, async () => {
      const probs = {
        data: narrowTo(Float32Array.from({ length: 64 }, (_, i) => i / 64), dtype),
        shape: [8, 8],
        dtype,
      };
      const counts = { data: Int32Array.from({ length: 8 }, (_, i) => i + 1), shape: [8], dtype: "int32" } as const;
      const r = await router.fusedMoEAuxLoss(probs as FloatTensor, counts, {
        totalNumTokens: 8,
        numExperts: 8,
        topk: 2,
        coeff: 1,
      });
      assertTensor(r.loss, dtype, [], "loss");
      // sum_j (sum_t (8t + j) / 64) (j + 1) = sum_j (3.5 + j / 8) (j + 1) = 126 + 21 = 147; times 8 / (2 * 64)
      assert.strictEqual(widen(r.loss)[0], 147 * 8 / 128);
      const g = await router.fusedMoEAuxLossBackward(r.saved, 1);
      assertTensor(g, dtype, [8, 8], "gradProbs");
      assertArrayEqual(widen(g).subarray(0, 8), [1, 2, 3, 4, 5, 6, 7, 8].map((v) => v / 16), "gradProbs row 0");
    });
  }
});

// ---------------------------------------------------------------------------

/** Runs a forward with dense int32 indices and the given threshold, then its backward. */
async function runWith(
  logits: FloatTensor,
  options: TopkOptions,
  radixTopkThreshold: number,
  gradProbs: FloatTensor,
): Promise<{ r: TopkResult; grad: FloatTensor }> {
  const r = await router.fusedTopkWithScoreFunction(logits, { ...options, indexDtype: "int32", radixTopkThreshold });
  return { r, grad: await router.fusedTopkWithScoreFunctionBackward(r.saved, gradProbs) };
}

Deno.test("naive and radix selection give the same indices in the same order and bit-identical values, ties included", async (t) => {
  const T = 17;
  const rng = mulberry32(17);
  for (const [E, Ks] of [[8, [1, 3, 8]], [32, [2, 8, 16, 32]], [130, [4, 16, 17]], [1024, [8, 32, 100]]] as const) {
    await t.step(`E=${E}`, async () => {
      for (const K of Ks) {
        for (const score of SCORES) {
          const groupOptions: ([number, number] | undefined)[] = [undefined];
          if (E % 8 === 0 && K % 4 === 0 && K / 4 <= E / 8) groupOptions.push([8, 4]);
          for (const groups of groupOptions) {
            for (const bias of score.startsWith("softmax") ? [false] : [false, true]) {
              for (const levels of [[-1, 0, 1.5], [0.25]]) {
                const c: Config = { E, K, score, bias, ...(groups && { groups }) };
                const label = `${labelOf(c)} levels ${levels}`;
                const { lib } = optionsOf(c, rng);
                if (lib.expertBias) lib.expertBias.data = levelLogits(rng, E, [0, 0.5]);
                const logits = f32(levelLogits(rng, T * E, levels), [T, E]);
                const gradProbs = f32(normals(rng, T * E), [T, E]);
                const radix = await runWith(logits, lib, 1, gradProbs);
                const naive = await runWith(logits, lib, Infinity, gradProbs);
                assertArrayEqual(
                  radix.r.indices!.data as Int32Array,
                  naive.r.indices!.data as Int32Array,
                  `${label} indices`,
                );
                assertBitIdentical(radix.r.probs.data, naive.r.probs.data, `${label} probs`);
                assertBitIdentical(radix.r.intermediate.data, naive.r.intermediate.data, `${label} intermediate`);
                assertBitIdentical(radix.grad.data, naive.grad.data, `${label} gradLogits`);
              }
            }
          }
        }
      }
    });
  }
  await t.step("aux scores", async () => {
    for (const scoreFunction of ["softmax", "sigmoid", "sqrtsoftplus"] as const) {
      for (const [E, K] of [[32, 16], [1024, 64]] as const) {
        const logits = f32(levelLogits(rng, T * E, [-1, 0, 1.5]), [T, E]);
        const radix = await router.fusedComputeScoreForMoEAuxLoss(logits, {
          topk: K,
          scoreFunction,
          radixTopkThreshold: 1,
        });
        const naive = await router.fusedComputeScoreForMoEAuxLoss(logits, {
          topk: K,
          scoreFunction,
          radixTopkThreshold: Infinity,
        });
        assertBitIdentical(radix.routingMap.data, naive.routingMap.data, `${scoreFunction} E=${E} K=${K} routing map`);
        assertBitIdentical(radix.scores.data, naive.scores.data, `${scoreFunction} E=${E} K=${K} scores`);
      }
    }
  });
});

/** Dense int32 indices of one token's logits under both algorithms (asserted equal). */
async function chosen(x: number[], options: Partial<TopkOptions>): Promise<number[]> {
  const result: number[][] = [];
  for (const radixTopkThreshold of [1, Infinity]) {
    const r = await router.fusedTopkWithScoreFunction(f32(new Float32Array(x), [1, x.length]), {
      topk: 1,
      scoreFunction: "softmax",
      ...options,
      indexDtype: "int32",
      radixTopkThreshold,
    });
    result.push([...(r.indices!.data as Int32Array)]);
  }
  assert.deepStrictEqual(result[0], result[1], "radix vs naive");
  return result[0]!;
}

Deno.test("selection breaks ties toward the lower index, ranks NaN last and treats -0 and +0 as equal", async (t) => {
  await t.step("equal scores pick the lower expert index", async () => {
    assert.deepStrictEqual(await chosen([1, 3, 3, 2, 3], { topk: 2 }), [1, 2]);
    assert.deepStrictEqual(await chosen([1, 3, 3, 2, 3], { topk: 3 }), [1, 2, 4]);
    assert.deepStrictEqual(await chosen([5, 5, 5, 5], { topk: 3 }), [0, 1, 2]);
    // sigmoid saturates to exactly 1 above ~17: those experts tie, whatever their logits
    assert.deepStrictEqual(await chosen([0, 30, 20, 40], { topk: 2, scoreFunction: "sigmoid" }), [1, 2]);
  });
  await t.step("equal group scores keep the lower group", async () => {
    const groups = { numGroups: 4, groupTopk: 1 };
    assert.deepStrictEqual(await chosen([0, 0, 0, 0, 0, 0, 0, 0], { topk: 2, ...groups }), [0, 1]);
    assert.deepStrictEqual(await chosen([0, 0, 1, 1, 0, 0, 1, 1], { topk: 2, ...groups }), [2, 3]);
  });
  await t.step("NaN ranks below every number, -Infinity included", async () => {
    assert.deepStrictEqual(await chosen([NaN, 1, NaN, 0, -Infinity], { topk: 3 }), [1, 3, 4]);
    assert.deepStrictEqual(await chosen([NaN, 1, NaN, 0, -Infinity], { topk: 4 }), [1, 3, 4, 0]);
    assert.deepStrictEqual(await chosen([NaN, NaN, NaN], { topk: 2 }), [0, 1]);
    const negativeNaN = new Float32Array(new Uint32Array([0xffc00000]).buffer)[0]!;
    assert.deepStrictEqual(await chosen([negativeNaN, -5, NaN], { topk: 2 }), [1, 0]);
  });
  await t.step("-0 and +0 tie, so the lower index wins", async () => {
    assert.deepStrictEqual(await chosen([-0, 0, -1], {}), [0]);
    assert.deepStrictEqual(await chosen([0, -0, -1], {}), [0]);
    assert.deepStrictEqual(await chosen([-1, -0, 0], {}), [1]);
    assert.deepStrictEqual(await chosen([-0, -1, 0, -0], { topk: 3 }), [0, 2, 3]);
  });
});

Deno.test("the backward is bit-identical for bytemap, bitmap_u8 and dense int16/int32/int64 routing outputs", async (t) => {
  const rng = mulberry32(18);
  const T = 33;
  const E = 64;
  for (const score of SCORES) {
    for (
      const c of [
        { E, K: 8, score, groups: [8, 4], bias: true, scalingFactor: 1.7 },
        { E, K: 1, score, bias: true },
        { E, K: 32, score, bias: true },
      ] satisfies Config[]
    ) {
      await t.step(labelOf(c), async () => {
        const { lib } = optionsOf(c, rng);
        const logits = f32(normals(rng, T * E), [T, E]);
        const gradProbs = f32(normals(rng, T * E), [T, E]);
        let first: FloatTensor | undefined;
        for (const [name, layout] of routeLayouts(T, c.K)) {
          const r = await router.fusedTopkWithScoreFunction(logits, { ...lib, ...layout });
          const g = await router.fusedTopkWithScoreFunctionBackward(r.saved, gradProbs);
          if (first === undefined) first = g;
          else assertBitIdentical(g.data, first.data, `${name} vs bytemap`);
        }
      });
    }
  }
  await t.step("WebAssembly: the ids the forward saves give the backward of the routing output read back", async () => {
    // the sparse backward takes the chosen experts from the forward's ascending list; without it, it reads them
    // back from the saved routing output (routeList), as for any format
    const b = await WasmBackend.create({ threads: 1 });
    const { planTopk } = await import("../_validate.ts");
    for (const score of SCORES) {
      for (const K of [1, 8, 20]) {
        const { lib } = optionsOf({ E: 300, K, score, bias: true }, rng);
        const logits = f32(normals(rng, T * 300), [T, 300]);
        const grad = f32(normals(rng, T * 300), [T, 300]);
        for (const [name, layout] of routeLayouts(T, K)) {
          const plan = planTopk(logits, { ...lib, ...layout });
          const out = await b.topkForward(plan, logits);
          const ids = (out.payload as { ids?: Int32Array | null }).ids;
          assert.strictEqual(ids instanceof Int32Array, !(score === "softmax-pre"), `${score} ${name}: ids saved`);
          const withIds = await b.topkBackward(plan, out.payload, grad);
          const fromRoute = await b.topkBackward(plan, { ...(out.payload as object), ids: null }, grad);
          assertBitIdentical(withIds, fromRoute, `${score} K=${K} ${name}: gradient from the saved ids vs the route`);
        }
      }
    }
    b.dispose();
  });
  await t.step("aux scores: bytemap vs bitmap_u8", async () => {
    for (const scoreFunction of ["softmax", "sigmoid", "sqrtsoftplus"] as const) {
      const logits = f32(normals(rng, T * E), [T, E]);
      const gradScores = f32(normals(rng, T * E), [T, E]);
      const grads = [];
      for (const routingMapFormat of ["bytemap", "bitmap_u8"] as const) {
        const r = await router.fusedComputeScoreForMoEAuxLoss(logits, { topk: 8, scoreFunction, routingMapFormat });
        grads.push(await router.fusedComputeScoreForMoEAuxLossBackward(r.saved, gradScores));
      }
      assertBitIdentical(grads[1]!.data, grads[0]!.data, `${scoreFunction} bitmap_u8 vs bytemap`);
    }
  });
});

// ---------------------------------------------------------------------------

/** Runs a script file in a fresh Deno with `env` set and the given permissions; returns its JSON output. */
async function runScript(file: string, env: Record<string, string>, permissions: string[]): Promise<string[]> {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--no-prompt", ...permissions, file],
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.strictEqual(code, 0, `script exit status; stderr: ${new TextDecoder().decode(stderr)}`);
  return JSON.parse(new TextDecoder().decode(stdout)) as string[];
}

const ENV_SCRIPT = `
import { createRouter, fusedComputeScoreForMoEAuxLoss, fusedTopkWithScoreFunction } from ${
  JSON.stringify(new URL("../mod.ts", import.meta.url).href)
};
const logits = { data: new Float32Array([1, 2, 3, 4, 4, 3, 2, 1]), shape: [2, 4], dtype: "float32" };
const outcome = async (call) => {
  try {
    const r = await call();
    return "ok " + (r.indices ? [...r.indices.data].join(",") : [...r.routingMap.data].join(","));
  } catch (e) {
    return e.constructor.name + ": " + e.message;
  }
};
const router = await createRouter({ backend: "wasm" });
const topk = (extra) => fusedTopkWithScoreFunction(logits, { topk: 2, scoreFunction: "sigmoid", indexDtype: "int32", ...extra });
console.log(JSON.stringify([
  await outcome(() => topk({})),
  await outcome(() => topk({ radixTopkThreshold: 16 })),
  await outcome(() => topk({})),
  await outcome(() => router.fusedTopkWithScoreFunction(logits, { topk: 2, scoreFunction: "softmax", indexDtype: "int32" })),
  await outcome(() => fusedComputeScoreForMoEAuxLoss(logits, { topk: 1, scoreFunction: "softmax" })),
]));
`;

/** What each line of ENV_SCRIPT's output stands for. */
const ENV_CALLS = [
  "first module-level call",
  "call with an explicit radixTopkThreshold",
  "second module-level call",
  "call on a new router",
  "aux-scores call",
];

Deno.test("MOE_ROUTER_RADIX_TOPK_THRESHOLD is read where env access is granted", async (t) => {
  const VARIABLE = "MOE_ROUTER_RADIX_TOPK_THRESHOLD";
  const ok = ["ok 3,2,0,1", "ok 3,2,0,1", "ok 3,2,0,1", "ok 3,2,0,1", "ok 0,0,0,1,1,0,0,0"];
  const valid = ["1", "4", "1000"];
  const invalid = ["abc", "0", "1.5"];
  const dir = await Deno.makeTempDir({ prefix: "moe_router_env_" });
  try {
    const file = `${dir}/script.ts`;
    await Deno.writeTextFile(file, ENV_SCRIPT);
    const granted = ["--allow-read", `--allow-env=${VARIABLE}`];
    // Every process at once: each is a fresh runtime that reads the variable on its first call.
    const [validRuns, invalidRuns, notGranted] = await Promise.all([
      Promise.all(valid.map((value) => runScript(file, { [VARIABLE]: value }, granted))),
      Promise.all(invalid.map((value) => runScript(file, { [VARIABLE]: value }, granted))),
      runScript(file, { [VARIABLE]: "abc" }, ["--allow-read"]),
    ]);
    await t.step("a valid value routes as usual", () => {
      validRuns.forEach((out, i) => assert.deepStrictEqual(out, ok, `${VARIABLE}=${valid[i]}`));
    });
    await t.step("without env permission the variable is not read, and nothing prompts", () => {
      assert.deepStrictEqual(notGranted, ok);
    });
    await t.step("an invalid value makes every call without an explicit threshold throw a RangeError naming it", () => {
      invalidRuns.forEach((out, v) => {
        const value = invalid[v]!;
        assert.strictEqual(out[1], ok[1], `${value}: an explicit radixTopkThreshold does not read the variable`);
        for (const i of [0, 2, 3, 4]) {
          assert.match(out[i]!, /^RangeError: /, `${VARIABLE}=${value}: the ${ENV_CALLS[i]} gave ${out[i]}`);
          assert.ok(out[i]!.includes(VARIABLE) && out[i]!.includes("integer >= 1"), out[i]);
          assert.ok(out[i]!.includes(`got ${JSON.stringify(value)}`), out[i]);
        }
      });
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---------------------------------------------------------------------------

/** Creates a wasm router and returns it with the backend it runs (caught at creation). */
async function routerWithBackend(chunkBytes?: number): Promise<{ router: Router; backend: WasmBackend }> {
  const create = WasmBackend.create;
  let backend: WasmBackend | undefined;
  WasmBackend.create = async (options) => (backend = await create.call(WasmBackend, options));
  try {
    const r = await createRouter(chunkBytes === undefined ? { backend: "wasm" } : { backend: "wasm", chunkBytes });
    assert.ok(backend !== undefined);
    return { router: r, backend };
  } finally {
    WasmBackend.create = create;
  }
}

Deno.test("a router with a small chunkBytes cuts the batch into chunks and gives bit-identical results", async (t) => {
  const rng = mulberry32(19);
  const T = 300;
  const E = 130;
  const whole = await routerWithBackend();
  const chunked = await routerWithBackend(4096);
  const a = whole.router;
  const b = chunked.router;
  try {
    for (const dtype of ["float32", "float16"] as const) {
      for (
        const c of [
          { E, K: 8, score: "sigmoid", groups: [10, 2], bias: true, scalingFactor: 2.5 },
          { E, K: 16, score: "sqrtsoftplus", bias: true },
          { E, K: 4, score: "softmax-pre" },
          { E, K: 4, score: "softmax-post" },
        ] satisfies Config[]
      ) {
        await t.step(`top-k ${dtype} ${labelOf(c)}, every layout, forward and backward`, async () => {
          const { lib } = optionsOf(c, rng);
          const logits = { data: narrowTo(normals(rng, T * E), dtype), shape: [T, E], dtype } as FloatTensor;
          const gradProbs = { data: narrowTo(normals(rng, T * E), dtype), shape: [T, E], dtype } as FloatTensor;
          for (const [name, layout] of routeLayouts(T, c.K)) {
            const ra = await a.fusedTopkWithScoreFunction(logits, { ...lib, ...layout });
            const fresh = layout.indicesOut ? { indicesOut: new BigInt64Array(T * c.K) } : {};
            const rb = await b.fusedTopkWithScoreFunction(logits, { ...lib, ...layout, ...fresh });
            assertBitIdentical(rb.probs.data, ra.probs.data, `${name} probs`);
            assertBitIdentical(rb.intermediate.data, ra.intermediate.data, `${name} intermediate`);
            assertBitIdentical(
              (rb.routingMap ?? rb.indices)!.data,
              (ra.routingMap ?? ra.indices)!.data,
              `${name} routing`,
            );
            const ga = await a.fusedTopkWithScoreFunctionBackward(ra.saved, gradProbs);
            const gb = await b.fusedTopkWithScoreFunctionBackward(rb.saved, gradProbs);
            assertBitIdentical(gb.data, ga.data, `${name} gradLogits`);
          }
        });
      }
    }
    await t.step("aux scores forward and backward", async () => {
      for (const scoreFunction of ["softmax", "sigmoid", "sqrtsoftplus"] as const) {
        for (const routingMapFormat of ["bytemap", "bitmap_u8"] as const) {
          const logits = f32(normals(rng, T * E), [T, E]);
          const gradScores = f32(normals(rng, T * E), [T, E]);
          const options = { topk: 8, scoreFunction, routingMapFormat };
          const ra = await a.fusedComputeScoreForMoEAuxLoss(logits, options);
          const rb = await b.fusedComputeScoreForMoEAuxLoss(logits, options);
          const label = `${scoreFunction} ${routingMapFormat}`;
          assertBitIdentical(rb.scores.data, ra.scores.data, `${label} scores`);
          assertBitIdentical(rb.intermediate.data, ra.intermediate.data, `${label} intermediate`);
          assertBitIdentical(rb.routingMap.data, ra.routingMap.data, `${label} routing map`);
          const ga = await a.fusedComputeScoreForMoEAuxLossBackward(ra.saved, gradScores);
          const gb = await b.fusedComputeScoreForMoEAuxLossBackward(rb.saved, gradScores);
          assertBitIdentical(gb.data, ga.data, `${label} gradLogits`);
        }
      }
    });
    await t.step("aux loss backward", async () => {
      const { probs, counts, options } = auxLossInputs(rng, T, E);
      const ga = await a.fusedMoEAuxLossBackward((await a.fusedMoEAuxLoss(probs, counts, options)).saved, 0.75);
      const gb = await b.fusedMoEAuxLossBackward((await b.fusedMoEAuxLoss(probs, counts, options)).saved, 0.75);
      assertBitIdentical(gb.data, ga.data, "gradProbs");
    });
    await t.step("a batch far beyond the chunk size grows the memory of the default router only", async () => {
      const big = f32(normals(rng, 4096 * 256), [4096, 256]);
      const options: TopkOptions = { topk: 8, scoreFunction: "sigmoid", indexDtype: "int32" };
      const ra = await a.fusedTopkWithScoreFunction(big, options);
      const rb = await b.fusedTopkWithScoreFunction(big, options);
      assertBitIdentical(rb.indices!.data, ra.indices!.data, "indices of a [4096, 256] batch");
      assertBitIdentical(rb.probs.data, ra.probs.data, "probs of a [4096, 256] batch");
      const fresh = await routerWithBackend();
      fresh.router.dispose();
      assert.ok(
        chunked.backend.memoryBytes === fresh.backend.memoryBytes &&
          whole.backend.memoryBytes > fresh.backend.memoryBytes,
        `memory: chunked ${chunked.backend.memoryBytes} bytes, whole ${whole.backend.memoryBytes} bytes, ` +
          `fresh ${fresh.backend.memoryBytes} bytes`,
      );
    });
  } finally {
    a.dispose();
    b.dispose();
  }
});

// Random aux-loss inputs: probs [T, E], int32 tokens per expert, options.
function auxLossInputs(rng: Rng, T: number, E: number) {
  return {
    probs: f32(Float32Array.from({ length: T * E }, () => rng()), [T, E]),
    counts: {
      data: Int32Array.from({ length: E }, () => Math.floor(rng() * 100)),
      shape: [E],
      dtype: "int32",
    } as const,
    options: { totalNumTokens: T, numExperts: E, topk: 8, coeff: 0.01 } as AuxLossOptions,
  };
}

Deno.test("`fusedMoEAuxLoss()` gives a bit-identical loss whatever the chunk size", async () => {
  const rng = mulberry32(20);
  const T = 300;
  const E = 130;
  const a = await createRouter({ backend: "wasm" });
  const b = await createRouter({ backend: "wasm", chunkBytes: 4096 });
  try {
    const { probs, counts, options } = auxLossInputs(rng, T, E);
    const la = await a.fusedMoEAuxLoss(probs, counts, options);
    const lb = await b.fusedMoEAuxLoss(probs, counts, options);
    assertBitIdentical(lb.loss.data, la.loss.data, `loss (chunked ${lb.loss.data[0]}, whole ${la.loss.data[0]})`);
  } finally {
    a.dispose();
    b.dispose();
  }
});

// ---------------------------------------------------------------------------

Deno.test("routers are independent, dispose() ends one, and the module-level functions need none", async (t) => {
  const rng = mulberry32(21);
  const T = 33;
  const E = 64;
  const { lib } = optionsOf({ E, K: 8, score: "sigmoid", bias: true, groups: [8, 4] }, rng);
  const batches = Array.from({ length: 4 }, () => f32(normals(rng, T * E), [T, E]));
  const g = f32(normals(rng, T * E), [T, E]);
  const run = async (api: RouterOps, x: FloatTensor) => {
    const r = await api.fusedTopkWithScoreFunction(x, { ...lib, indexDtype: "int32" });
    return { r, grad: await api.fusedTopkWithScoreFunctionBackward(r.saved, g) };
  };
  const expected: { r: TopkResult; grad: FloatTensor }[] = [];
  for (const x of batches) expected.push(await run(router, x));

  await t.step("two routers used alternately give the results of one", async () => {
    const one = await createRouter({ backend: "wasm" });
    const two = await createRouter({ backend: "wasm" });
    try {
      // Interleave: forward on both, then both backwards in reverse order.
      const pending = [];
      for (let i = 0; i < batches.length; i++) {
        const api = i % 2 ? two : one;
        pending.push({ api, i, r: await api.fusedTopkWithScoreFunction(batches[i]!, { ...lib, indexDtype: "int32" }) });
      }
      for (const { api, i, r } of pending.reverse()) {
        assertBitIdentical(r.probs.data, expected[i]!.r.probs.data, `batch ${i} probs`);
        assertBitIdentical(r.indices!.data, expected[i]!.r.indices!.data, `batch ${i} indices`);
        const grad = await api.fusedTopkWithScoreFunctionBackward(r.saved, g);
        assertBitIdentical(grad.data, expected[i]!.grad.data, `batch ${i} gradLogits`);
      }
      // Concurrent calls, one on each router.
      for (let i = 0; i < batches.length; i += 2) {
        const both = await Promise.all([run(one, batches[i]!), run(two, batches[i + 1]!)]);
        both.forEach((b, j) =>
          assertBitIdentical(b.grad.data, expected[i + j]!.grad.data, `concurrent batch ${i + j}`)
        );
      }

      one.dispose();
      await assert.rejects(
        () => one.fusedTopkWithScoreFunction(batches[0]!, lib),
        (e: Error) => /dispose/.test(e.message),
      );
      const after = await run(two, batches[1]!);
      assertBitIdentical(after.grad.data, expected[1]!.grad.data, "the other router still works");
    } finally {
      one.dispose();
      two.dispose();
    }
  });
  await t.step("the module-level functions work with no router and agree with one", async () => {
    for (let i = 0; i < batches.length; i++) {
      const m = await run(moduleApi, batches[i]!);
      assertBitIdentical(m.r.probs.data, expected[i]!.r.probs.data, `batch ${i} probs`);
      assertBitIdentical(m.grad.data, expected[i]!.grad.data, `batch ${i} gradLogits`);
    }
    const scores = await moduleApi.fusedComputeScoreForMoEAuxLoss(batches[0]!, { topk: 2, scoreFunction: "softmax" });
    assertTensor(
      await moduleApi.fusedComputeScoreForMoEAuxLossBackward(scores.saved, g),
      "float32",
      [T, E],
      "aux grad",
    );
    const loss = await moduleApi.fusedMoEAuxLoss(
      f32(new Float32Array(T * E).fill(0.5), [T, E]),
      { data: new Float32Array(E).fill(2), shape: [E], dtype: "float32" },
      { totalNumTokens: T, numExperts: E, topk: 8, coeff: 1 },
    );
    assertTensor(loss.loss, "float32", [], "loss");
    assertTensor(await moduleApi.fusedMoEAuxLossBackward(loss.saved, 1), "float32", [T, E], "aux loss grad");
  });
});

Deno.test("an expertBias edited in place between calls, or while a call waits its turn, routes by its values at the call", async () => {
  // plans share one copy of a bias whose bits did not change (see _validate.ts): an edit must give a new one
  const E = 16, T = 4;
  const x = f32(normals(mulberry32(25), T * E), [T, E]);
  const data = new Float32Array(E);
  const options: TopkOptions = {
    topk: 2,
    scoreFunction: "sigmoid",
    indexDtype: "int32",
    expertBias: { data, shape: [E], dtype: "float32" },
  };
  const fresh = (values: Float32Array) => ({
    ...options,
    expertBias: { data: values.slice(), shape: [E], dtype: "float32" as const },
  });
  const chosen = async (o: TopkOptions) => [...(await router.fusedTopkWithScoreFunction(x, o)).indices!.data];
  for (const e of [3, 11, 3, 0]) {
    data.fill(0);
    data[e] = 5; // expert e wins every token
    const got = await chosen(options);
    assert.deepStrictEqual(got, await chosen(fresh(data)), `bias on expert ${e}`);
    for (let t = 0; t < T; t++) assert.strictEqual(got[2 * t], e, `token ${t} takes expert ${e}`);
  }
  // calls queued on the router read the bias as it was when each was made
  data.fill(0);
  data[7] = 5;
  const first = router.fusedTopkWithScoreFunction(x, options);
  data[7] = 0;
  data[9] = 5;
  const second = router.fusedTopkWithScoreFunction(x, options);
  data.fill(0);
  assert.strictEqual((await first).indices!.data[0], 7);
  assert.strictEqual((await second).indices!.data[0], 9);
});

Deno.test("concurrent calls on one router give the results of the same calls made one after another", async (t) => {
  const rng = mulberry32(24);
  const { lib } = optionsOf({ E: 256, K: 8, score: "sigmoid", bias: true, groups: [8, 4] }, rng);
  for (const T of [33, 2048]) {
    await t.step(`${T} tokens x 256 experts, four batches at once`, async () => {
      const batches = Array.from({ length: 4 }, () => f32(normals(rng, T * 256), [T, 256]));
      const g = f32(normals(rng, T * 256), [T, 256]);
      const run = async (api: RouterOps, x: FloatTensor) => {
        const r = await api.fusedTopkWithScoreFunction(x, { ...lib, indexDtype: "int32" });
        const s = await api.fusedComputeScoreForMoEAuxLoss(x, { topk: 8, scoreFunction: "sigmoid" });
        return {
          r,
          grad: await api.fusedTopkWithScoreFunctionBackward(r.saved, g),
          scores: s.scores,
          auxGrad: await api.fusedComputeScoreForMoEAuxLossBackward(s.saved, g),
        };
      };
      const expected: Awaited<ReturnType<typeof run>>[] = [];
      for (const x of batches) expected.push(await run(router, x));
      for (const [name, api] of [["one router", router], ["module-level functions", moduleApi]] as const) {
        const results = await Promise.all(batches.map((x) => run(api, x)));
        results.forEach((got, i) => {
          const want = expected[i]!;
          assertBitIdentical(got.r.indices!.data, want.r.indices!.data, `${name} batch ${i} indices`);
          assertBitIdentical(got.r.probs.data, want.r.probs.data, `${name} batch ${i} probs`);
          assertBitIdentical(got.grad.data, want.grad.data, `${name} batch ${i} gradLogits`);
          assertBitIdentical(got.scores.data, want.scores.data, `${name} batch ${i} aux scores`);
          assertBitIdentical(got.auxGrad.data, want.auxGrad.data, `${name} batch ${i} aux gradLogits`);
        });
      }
    });
  }
});

Deno.test("a saved state reports its backend, flips `released` on release(), and release() is idempotent", async () => {
  const x = f32(normals(mulberry32(22), 16), [2, 8]);
  const states = [
    (await router.fusedTopkWithScoreFunction(x, { topk: 2, scoreFunction: "softmax" })).saved,
    (await router.fusedComputeScoreForMoEAuxLoss(x, { topk: 2, scoreFunction: "sigmoid" })).saved,
    (await router.fusedMoEAuxLoss(x, { data: new Int32Array(8), shape: [8], dtype: "int32" }, {
      totalNumTokens: 2,
      numExperts: 8,
      topk: 2,
      coeff: 1,
    })).saved,
  ];
  for (const saved of states) {
    assert.strictEqual(saved.backend, "wasm");
    assert.strictEqual(saved.released, false);
    saved.release();
    assert.strictEqual(saved.released, true);
    saved.release();
    assert.strictEqual(saved.released, true);
  }
});

Deno.test('`createRouter()` reports its backend and why, and "auto" gives a working router', async () => {
  assert.strictEqual(router.backend, "wasm");
  assert.ok(typeof router.reason === "string" && router.reason.length > 0, "reason");
  const auto = await createRouter({ backend: "auto" });
  try {
    assert.ok(auto.backend === "wasm" || auto.backend === "webgpu", auto.backend);
    assert.ok(auto.reason.length > 0, "auto reason");
    const r = await auto.fusedTopkWithScoreFunction(f32(new Float32Array([0, 3, 1, 2]), [1, 4]), {
      topk: 2,
      scoreFunction: "sigmoid",
      indexDtype: "int32",
    });
    assertArrayEqual(r.indices!.data as Int32Array, [1, 3], "auto indices");
    assert.strictEqual(r.saved.backend, auto.backend);
  } finally {
    auto.dispose();
  }
  const byDefault = await createRouter();
  assert.ok(byDefault.reason.length > 0);
  byDefault.dispose();
});

// ---------------------------------------------------------------------------
// The SIMD math routines, through WasmBackend.mathCheck.

const FLT_MIN = 2 ** -126;
const EXP = 0;
const LOG1P = 1;
const SIGMOID = 2;
const SQRTSOFTPLUS = 3;

/** One float32 ulp at the magnitude of y (subnormal spacing below FLT_MIN). */
function ulpOf(y: number): number {
  const a = Math.abs(Math.fround(y));
  if (a < FLT_MIN) return 2 ** -149;
  return 2 ** (Math.floor(Math.log2(a)) - 23);
}

/** Float32 values of every 2^shift-th bit pattern in [lo, hi] (both finite). */
function sweep(lo: number, hi: number, count: number): Float32Array {
  const out = Float32Array.from({ length: count }, (_, i) => lo + ((hi - lo) * i) / (count - 1));
  return out;
}

/** Random float32 bit patterns (finite or not) whose value lies in [lo, hi]. */
function randomBits(rng: Rng, n: number, lo: number, hi: number): Float32Array {
  const out = new Float32Array(n);
  const bits = new Uint32Array(out.buffer);
  for (let i = 0; i < n;) {
    bits[i] = Math.floor(rng() * 2 ** 32);
    if (out[i]! >= lo && out[i]! <= hi) i++;
  }
  return out;
}

/**
 * Compares a routine against a float64 formula: the error in float32 ulps of
 * the true value where it is at least `absBelow`, in absolute terms (at most
 * `absMax`) below it. Returns the worst ulp error seen.
 */
function checkMath(
  backend: WasmBackend,
  kind: number,
  exact: (x: number) => number,
  xs: Float32Array,
  bound: { ulps: number; absBelow: number; absMax: number },
  label: string,
): number {
  const ys = backend.mathCheck(kind, xs);
  let worst = 0;
  for (let i = 0; i < xs.length; i++) {
    const x = xs[i]!;
    const y = ys[i]!;
    const e = exact(x);
    if (Number.isNaN(e) || !Number.isFinite(e)) {
      assert.ok(Object.is(y, e), `${label}(${x}) = ${y}, expected ${e}`);
      continue;
    }
    if (Math.abs(e) < bound.absBelow) {
      assert.ok(Math.abs(y - e) <= bound.absMax, `${label}(${x}) = ${y}, expected ${e} (absolute ${Math.abs(y - e)})`);
      continue;
    }
    const u = Math.abs(y - e) / ulpOf(e);
    worst = Math.max(worst, u);
    assert.ok(u <= bound.ulps, `${label}(${x}) = ${y}, expected ${e}: ${u.toFixed(2)} ulps`);
  }
  return worst;
}

const exactSigmoid = (x: number) => 1 / (1 + Math.exp(-x));
const exactSqrtSoftplus = (x: number) => Math.sqrt(x > 20 ? x : Math.log1p(Math.exp(x)));

Deno.test("the SIMD exp, log1p, sigmoid and sqrtsoftplus stay within a few float32 ulps of float64", async (t) => {
  const backend = await WasmBackend.create();
  const rng = mulberry32(23);
  const report: string[] = [];
  const measure = (name: string, worst: number) => report.push(`${name} ${worst.toFixed(2)} ulp`);

  await t.step("exp: <= 2 ulp on [-87.33, 88.37]; 0 below -87.34 (absolute <= FLT_MIN); specials", () => {
    // Arguments reach exp as x - max(x) <= 0 (softmax), x <= 20 (softplus) and -x (sigmoid).
    const xs = new Float32Array([
      ...sweep(-87.33, 88.37, 200_001),
      ...sweep(-1, 1, 20_001),
      ...randomBits(rng, 100_000, -87.33, 88.37),
    ]);
    const bound = { ulps: 2, absBelow: FLT_MIN, absMax: FLT_MIN };
    measure("exp", checkMath(backend, EXP, Math.exp, xs, bound, "exp"));
    checkMath(backend, EXP, Math.exp, sweep(-200, -87.34, 10_001), {
      ulps: 0,
      absBelow: FLT_MIN * 1.01,
      absMax: FLT_MIN,
    }, "exp");
    const specials = backend.mathCheck(EXP, new Float32Array([-Infinity, NaN, 0, -0, 2 ** -149, -(2 ** -149), -1e30]));
    assert.deepStrictEqual([...specials], [0, NaN, 1, 1, 1, 1, 0]);
  });

  await t.step("log1p: <= 3 ulp on [0, +Infinity], exact for tiny and subnormal u, specials", () => {
    // The kernels call it on exp(x) >= 0 only (softplus).
    const xs = new Float32Array([
      ...sweep(0, 10, 100_001),
      ...sweep(0, 1e-3, 20_001),
      ...randomBits(rng, 200_000, 0, 3.4e38),
    ]);
    measure("log1p", checkMath(backend, LOG1P, Math.log1p, xs, { ulps: 3, absBelow: 0, absMax: 0 }, "log1p"));
    const specials = backend.mathCheck(LOG1P, new Float32Array([0, -0, Infinity, NaN, 2 ** -149, 1e-30]));
    assert.ok(Object.is(specials[0], 0) && Object.is(specials[1], -0), `log1p(±0) = ${specials[0]}, ${specials[1]}`);
    assert.strictEqual(specials[2], Infinity);
    assert.ok(Number.isNaN(specials[3]!));
    assert.strictEqual(specials[4], 2 ** -149);
    assert.strictEqual(specials[5], Math.fround(1e-30));
  });

  await t.step("sigmoid: <= 3 ulp where normal; absolute <= 5e-39 where the result is subnormal; specials", () => {
    const xs = new Float32Array([
      ...sweep(-87, 30, 200_001),
      ...sweep(-1e-3, 1e-3, 10_001),
      ...randomBits(rng, 200_000, -1e30, 1e30),
      ...sweep(-120, -87, 10_001),
    ]);
    const bound = { ulps: 3, absBelow: FLT_MIN, absMax: 5e-39 };
    measure("sigmoid", checkMath(backend, SIGMOID, exactSigmoid, xs, bound, "sigmoid"));
    const specials = backend.mathCheck(SIGMOID, new Float32Array([Infinity, NaN, 0, -0, 100]));
    assert.deepStrictEqual([...specials], [1, NaN, 0.5, 0.5, 1]);
    const minusInfinity = backend.mathCheck(SIGMOID, new Float32Array([-Infinity]))[0]!;
    assert.ok(minusInfinity >= 0 && minusInfinity <= 5e-39, `sigmoid(-Infinity) = ${minusInfinity}`);
  });

  await t.step("sqrtsoftplus: <= 3 ulp; the identity branch above 20 is exact; absolute <= 1.1e-19 below -87.3", () => {
    const xs = new Float32Array([
      ...sweep(-87, 40, 200_001),
      ...sweep(19.9, 20.1, 20_001),
      ...randomBits(rng, 200_000, -87, 3.4e38),
    ]);
    measure(
      "sqrtsoftplus",
      checkMath(backend, SQRTSOFTPLUS, exactSqrtSoftplus, xs, { ulps: 3, absBelow: 0, absMax: 0 }, "sqrtsoftplus"),
    );
    // exp(x) is flushed to 0 below -87.34, so sqrt(softplus) is 0 where the true value is below sqrt(FLT_MIN) = 1.08e-19
    checkMath(backend, SQRTSOFTPLUS, exactSqrtSoftplus, sweep(-200, -87, 10_001), {
      ulps: 3,
      absBelow: 1.1e-19,
      absMax: 1.1e-19,
    }, "sqrtsoftplus");
    // The switch at 20: x itself above, log1p(exp(x)) at and below.
    const around = new Float32Array([Math.fround(20 - 2 ** -19), 20, Math.fround(20 + 2 ** -19), 21, 1e30]);
    const ys = backend.mathCheck(SQRTSOFTPLUS, around);
    around.forEach((x, i) => {
      const expected = Math.fround(Math.sqrt(x > 20 ? x : Math.fround(Math.log1p(Math.exp(x)))));
      assert.ok(Math.abs(ys[i]! - expected) <= ulpOf(expected), `sqrtsoftplus(${x}) = ${ys[i]}, expected ${expected}`);
      if (x > 20) assert.strictEqual(ys[i], Math.fround(Math.sqrt(x)), `identity branch at ${x}`);
    });
    const specials = backend.mathCheck(SQRTSOFTPLUS, new Float32Array([Infinity, -Infinity, NaN]));
    assert.deepStrictEqual([...specials], [Infinity, 0, NaN]);
  });
  console.log(`worst errors: ${report.join(", ")}`);
});

Deno.test("extreme logits keep their order: tiny scores stay distinct instead of flushing to 0", async (t) => {
  const router = await createRouter({ backend: "wasm", threads: 1 });
  const cases: Array<{ name: string; logits: number[]; options: TopkOptions; want: number[] }> = [
    {
      name: "sigmoid of -100 and -88.4",
      logits: [-100, -88.4],
      options: { topk: 1, scoreFunction: "sigmoid" },
      want: [1],
    },
    {
      name: "sqrtsoftplus of -110 and -105",
      logits: [-110, -105],
      options: { topk: 1, scoreFunction: "sqrtsoftplus" },
      want: [1],
    },
    {
      name: "pre-softmax of [0, -100, -90]",
      logits: [0, -100, -90],
      options: { topk: 2, scoreFunction: "softmax", usePreSoftmax: true },
      want: [0, 2],
    },
  ];
  for (const c of cases) {
    await t.step(c.name, async () => {
      const logits = { data: new Float32Array(c.logits), shape: [1, c.logits.length], dtype: "float32" as const };
      for (const radixTopkThreshold of [1, Infinity]) {
        const out = await router.fusedTopkWithScoreFunction(logits, {
          ...c.options,
          indexDtype: "int32",
          radixTopkThreshold,
        });
        assert.deepStrictEqual([...out.indices!.data], c.want);
      }
    });
  }
  router.dispose();
});

Deno.test("caller output buffers are written in place, returned, and give the same results", async (t) => {
  const router = await createRouter({ backend: "wasm", threads: 1 });
  const T = 37, E = 40, K = 4;
  const logits = { data: normals(mulberry32(91), T * E), shape: [T, E], dtype: "float32" as const };
  const grad = { data: normals(mulberry32(92), T * E), shape: [T, E], dtype: "float32" as const };
  for (
    const [label, extra] of [
      ["sigmoid bytemap", { scoreFunction: "sigmoid" as const }],
      ["pre-softmax bitmap_u8", {
        scoreFunction: "softmax" as const,
        usePreSoftmax: true,
        routingMapFormat: "bitmap_u8" as const,
      }],
    ] as const
  ) {
    await t.step(label, async () => {
      const options: TopkOptions = { topk: K, ...extra };
      const want = await router.fusedTopkWithScoreFunction(logits, options);
      const wantGrad = await router.fusedTopkWithScoreFunctionBackward(want.saved, grad);
      // dirty buffers: every element must be overwritten
      const probsOut = new Float32Array(T * E).fill(7);
      const intermediateOut = new Float32Array(T * E).fill(7);
      const routingMapOut = new Uint8Array(want.routingMap!.data.length).fill(7);
      const gradLogitsOut = new Float32Array(T * E).fill(7);
      const got = await router.fusedTopkWithScoreFunction(logits, {
        ...options,
        probsOut,
        intermediateOut,
        routingMapOut,
      });
      assert.strictEqual(got.probs.data, probsOut);
      assert.strictEqual(got.intermediate.data, intermediateOut);
      assert.strictEqual(got.routingMap!.data, routingMapOut);
      assertBitIdentical(got.probs.data, want.probs.data, "probs");
      assertBitIdentical(got.intermediate.data, want.intermediate.data, "intermediate");
      assertArrayEqual(got.routingMap!.data, want.routingMap!.data, "routing map");
      const g = await router.fusedTopkWithScoreFunctionBackward(got.saved, grad, { gradLogitsOut });
      assert.strictEqual(g.data, gradLogitsOut);
      assertBitIdentical(g.data, wantGrad.data, "gradLogits");
    });
  }
  await t.step("buffers of the wrong kind, length or overlapping an input are refused", async () => {
    const options: TopkOptions = { topk: K, scoreFunction: "sigmoid" };
    await assert.rejects(
      router.fusedTopkWithScoreFunction(logits, {
        ...options,
        probsOut: new Float64Array(T * E) as unknown as Float32Array,
      }),
      (e: Error) => e instanceof TypeError && /probsOut must be a Float32Array, got Float64Array/.test(e.message),
    );
    await assert.rejects(
      router.fusedTopkWithScoreFunction(logits, { ...options, intermediateOut: new Float32Array(3) }),
      (e: Error) => e instanceof TypeError && /intermediateOut must have 1480 elements, got 3/.test(e.message),
    );
    await assert.rejects(
      router.fusedTopkWithScoreFunction(logits, { ...options, probsOut: logits.data }),
      (e: Error) => e instanceof TypeError && /probsOut must not share memory/.test(e.message),
    );
    const shared = new Float32Array(T * E);
    await assert.rejects(
      router.fusedTopkWithScoreFunction(logits, { ...options, probsOut: shared, intermediateOut: shared }),
      (e: Error) => e instanceof TypeError && /intermediateOut must not share memory/.test(e.message),
    );
    await assert.rejects(
      router.fusedTopkWithScoreFunction(logits, {
        ...options,
        indexDtype: "int32",
        routingMapOut: new Uint8Array(T * E),
      }),
      (e: Error) => e instanceof TypeError && /routingMapOut needs a routing map output/.test(e.message),
    );
  });
  router.dispose();
});
