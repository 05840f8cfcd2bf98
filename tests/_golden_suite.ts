/**
 * The library against every golden case, through the public API, for one
 * backend: `goldenSuite("wasm")` registers the test (the WebGPU backend
 * reuses it with `goldenSuite("webgpu")`).
 *
 * @module
 */

import assert from "node:assert";
import { createRouter } from "../mod.ts";
import type { BackendName, DType, IndexArray, IndexDType, Router, Tensor } from "../mod.ts";
import { assertArrayEqual, assertBitIdentical, assertClose } from "./_assert.ts";
import { listCases, loadCase, topkOptionsOf } from "./_golden.ts";
import type { AuxLossCase, AuxScoresCase, GoldenCase, TopkCase } from "./_golden.ts";
import { packBitmap, refAuxScoresForward, sortedRows, widen } from "./reference.ts";

/** The six operations, as a router or the module's own functions offer them. */
export type RouterOps = Pick<
  Router,
  | "fusedTopkWithScoreFunction"
  | "fusedTopkWithScoreFunctionBackward"
  | "fusedComputeScoreForMoEAuxLoss"
  | "fusedComputeScoreForMoEAuxLossBackward"
  | "fusedMoEAuxLoss"
  | "fusedMoEAuxLossBackward"
>;

/** Typed-array constructor of each dtype, to check what the library returns. */
export const ARRAY_OF: Record<DType, new (n: number) => ArrayBufferView> = {
  float32: Float32Array,
  float16: Float16Array,
  bfloat16: Uint16Array,
  int16: Int16Array,
  int32: Int32Array,
  int64: BigInt64Array,
  uint8: Uint8Array,
};

/** Asserts a tensor's dtype, shape, and that its data is the dtype's typed array of the right length. */
export function assertTensor(
  tensor: Tensor | undefined,
  dtype: DType,
  shape: readonly number[],
  label: string,
): Tensor {
  assert.ok(tensor !== undefined, `${label}: missing`);
  assert.strictEqual(tensor.dtype, dtype, `${label}: dtype`);
  assert.deepStrictEqual([...tensor.shape], [...shape], `${label}: shape`);
  assert.strictEqual(tensor.data.constructor, ARRAY_OF[dtype], `${label}: data is ${tensor.data.constructor.name}`);
  assert.strictEqual(tensor.data.length, shape.reduce((a, b) => a * b, 1), `${label}: data length`);
  return tensor;
}

/** Index dtypes of the dense output that can hold `experts` expert ids. */
export function indexDtypesFor(experts: number): IndexDType[] {
  return experts <= 32767 ? ["int16", "int32", "int64"] : ["int32", "int64"];
}

/**
 * One top-k case: the bytemap, bitmap_u8 and dense (every index dtype, and
 * a caller buffer) runs, their probs, intermediate, routing output and
 * gradients, which must be bit-identical whatever the routing output.
 */
async function checkTopk(api: RouterOps, c: TopkCase, backend: BackendName | undefined): Promise<void> {
  const { num_tokens: T, num_experts: E, topk: K, dtype } = c;
  const tolerance = { atol: c.atol, rtol: c.rtol };
  const options = topkOptionsOf(c);
  const { logits, grad_probs: gradProbs } = c.inputs;
  const expected = c.expected;

  /** Checks probs and intermediate of a run, runs its backward, and returns the gradient. */
  const checkRun = async (result: Awaited<ReturnType<RouterOps["fusedTopkWithScoreFunction"]>>, label: string) => {
    const probs = assertTensor(result.probs, dtype, [T, E], `${label} probs`);
    assertClose(widen(probs), widen(expected.probs), tolerance, `${label} probs`);
    const intermediate = assertTensor(result.intermediate, "float32", [T, E], `${label} intermediate`);
    assertClose(intermediate.data as Float32Array, expected.intermediate.data, tolerance, `${label} intermediate`);
    if (backend !== undefined) assert.strictEqual(result.saved.backend, backend, `${label} saved.backend`);
    const grad = await api.fusedTopkWithScoreFunctionBackward(result.saved, gradProbs);
    assertTensor(grad, dtype, [T, E], `${label} grad_logits`);
    assertClose(widen(grad), widen(expected.grad_logits), tolerance, `${label} grad_logits`);
    result.saved.release();
    return grad.data;
  };

  // Bytemap, the default routing output.
  const bytemapRun = await api.fusedTopkWithScoreFunction(logits, options);
  assert.strictEqual(bytemapRun.indices, undefined, "bytemap run: indices");
  const map = assertTensor(bytemapRun.routingMap, "uint8", [T, E], "bytemap");
  assertArrayEqual(map.data, expected.routing_map.data, "bytemap");
  const grad = await checkRun(bytemapRun, "bytemap");

  // Bitmap: bit e % 8 of byte e / 8, LSB first.
  const bitmapRun = await api.fusedTopkWithScoreFunction(logits, { ...options, routingMapFormat: "bitmap_u8" });
  assert.strictEqual(bitmapRun.indices, undefined, "bitmap run: indices");
  const bitmap = assertTensor(bitmapRun.routingMap, "uint8", [T, Math.ceil(E / 8)], "bitmap_u8");
  assertArrayEqual(bitmap.data, packBitmap(expected.routing_map.data, T, E), "bitmap_u8");
  assertBitIdentical(await checkRun(bitmapRun, "bitmap_u8"), grad, "bitmap_u8 grad_logits vs bytemap");

  // Dense indices of every dtype: the same set as expected, in one order for all dtypes.
  let firstOrder: ArrayLike<number | bigint> | undefined;
  for (const indexDtype of indexDtypesFor(E)) {
    const label = `dense ${indexDtype}`;
    const run = await api.fusedTopkWithScoreFunction(logits, { ...options, indexDtype });
    assert.strictEqual(run.routingMap, undefined, `${label}: routingMap`);
    const indices = assertTensor(run.indices, indexDtype, [T, K], label);
    assertArrayEqual(sortedRows(indices.data as IndexArray, T, K), expected.topk_set.data, `${label} sets`);
    if (firstOrder === undefined) firstOrder = indices.data as IndexArray;
    else assertArrayEqual(indices.data as IndexArray, firstOrder, `${label} order vs ${indexDtypesFor(E)[0]}`);
    assertBitIdentical(await checkRun(run, label), grad, `${label} grad_logits vs bytemap`);
  }

  // Dense indices into a caller buffer of the case's dtype: written in place, the same object returned.
  const indexDtype = c.dense_index_dtype;
  const buffer = new ARRAY_OF[indexDtype](T * K) as IndexArray;
  const run = await api.fusedTopkWithScoreFunction(logits, { ...options, indicesOut: buffer });
  const indices = assertTensor(run.indices, indexDtype, [T, K], "indicesOut");
  assert.strictEqual(indices.data, buffer, "indicesOut: result.indices.data is the caller's buffer");
  assertArrayEqual(buffer, firstOrder ?? [], "indicesOut vs indexDtype run");
  assertBitIdentical(await checkRun(run, "indicesOut"), grad, "indicesOut grad_logits vs bytemap");
}

/** One aux-scores case: scores, routing maps (both layouts), intermediate and gradients. */
async function checkAuxScores(api: RouterOps, c: AuxScoresCase, backend: BackendName | undefined): Promise<void> {
  const { num_tokens: T, num_experts: E, topk: K } = c;
  const tolerance = { atol: c.atol, rtol: c.rtol };
  const options = { topk: K, scoreFunction: c.score_function };
  const gradScores = c.inputs.grad_scores;
  assert.strictEqual(gradScores.dtype, "float32", "golden grad_scores dtype");
  // The golden set has no aux intermediate: the (golden-checked) reference gives it.
  const reference = refAuxScoresForward(widen(c.inputs.logits), T, E, options);

  let grad: ArrayBufferView | undefined;
  for (const format of ["bytemap", "bitmap_u8"] as const) {
    const result = await api.fusedComputeScoreForMoEAuxLoss(c.inputs.logits, { ...options, routingMapFormat: format });
    const scores = assertTensor(result.scores, "float32", [T, E], `${format} scores`);
    assertClose(scores.data as Float32Array, c.expected.scores.data, tolerance, `${format} scores`);
    const intermediate = assertTensor(result.intermediate, "float32", [T, E], `${format} intermediate`);
    assertClose(intermediate.data as Float32Array, reference.intermediate, tolerance, `${format} intermediate`);
    const map = result.routingMap;
    if (format === "bytemap") {
      assertArrayEqual(assertTensor(map, "uint8", [T, E], format).data, c.expected.routing_map.data, format);
    } else {
      const bitmap = assertTensor(map, "uint8", [T, Math.ceil(E / 8)], format);
      assertArrayEqual(bitmap.data, packBitmap(c.expected.routing_map.data, T, E), format);
    }
    if (backend !== undefined) assert.strictEqual(result.saved.backend, backend, `${format} saved.backend`);
    const g = await api.fusedComputeScoreForMoEAuxLossBackward(result.saved, gradScores as Tensor<"float32">);
    assertTensor(g, c.dtype, [T, E], `${format} grad_logits`);
    assertClose(widen(g), widen(c.expected.grad_logits), tolerance, `${format} grad_logits`);
    if (grad === undefined) grad = g.data;
    else assertBitIdentical(g.data, grad, `${format} grad_logits vs bytemap`);
    result.saved.release();
  }
}

/** One aux-loss case: the 0-d loss and the gradient of the probs. */
async function checkAuxLoss(api: RouterOps, c: AuxLossCase, backend: BackendName | undefined): Promise<void> {
  const tolerance = { atol: c.atol, rtol: c.rtol };
  const { probs, tokens_per_expert: tokensPerExpert } = c.inputs;
  const result = await api.fusedMoEAuxLoss(probs, tokensPerExpert, {
    totalNumTokens: c.total_num_tokens,
    numExperts: c.num_experts,
    topk: c.topk,
    coeff: c.coeff,
  });
  const loss = assertTensor(result.loss, probs.dtype, [], "aux_loss");
  assertClose(widen(loss), c.expected.aux_loss.data, tolerance, "aux_loss");
  if (backend !== undefined) assert.strictEqual(result.saved.backend, backend, "saved.backend");
  const grad = await api.fusedMoEAuxLossBackward(result.saved, c.grad_aux_loss);
  assertTensor(grad, probs.dtype, [c.num_tokens, c.num_cols], "grad_probs");
  assertClose(widen(grad), c.expected.grad_probs.data, tolerance, "grad_probs");
  result.saved.release();
}

/**
 * Checks the library on one golden case through `api` (a router, or the
 * module's functions); `backend`, when given, is what every saved state must
 * name.
 */
export function checkGoldenCase(api: RouterOps, c: GoldenCase, backend?: BackendName): Promise<void> {
  switch (c.op) {
    case "topk":
      return checkTopk(api, c, backend);
    case "aux_scores":
      return checkAuxScores(api, c, backend);
    case "aux_loss":
      return checkAuxLoss(api, c, backend);
  }
}

/** Registers "<backend> backend matches every golden vector", one step per case. */
export function goldenSuite(backend: BackendName, options: { ignore?: boolean } = {}): void {
  Deno.test({
    name: `the ${backend} backend matches every golden vector`,
    ignore: options.ignore ?? false,
    async fn(t) {
      const names = listCases();
      assert.ok(names.length > 0, "no golden cases found");
      const router = await createRouter({ backend });
      assert.strictEqual(router.backend, backend);
      try {
        for (const name of names) {
          await t.step(name, () => checkGoldenCase(router, loadCase(name), backend));
        }
      } finally {
        router.dispose();
      }
    },
  });
}
