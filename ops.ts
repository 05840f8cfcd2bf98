/**
 * The router operations on the default router (backend "auto"), created on
 * first use and shared by every call.
 *
 * @module
 */
import type {
  AuxLossOptions,
  AuxLossResult,
  AuxScoresOptions,
  AuxScoresResult,
  FloatTensor,
  SavedState,
  Tensor,
  TopkInferenceOptions,
  TopkInferenceResult,
  TopkOptions,
  TopkResult,
} from "./_types.ts";
import { type BackwardOptions, createRouter, type Router } from "./router.ts";

let shared: Promise<Router> | undefined;

function router(): Promise<Router> {
  shared ??= createRouter({ backend: "auto" });
  return shared;
}

/**
 * Top-k router forward (SPEC section 2): scores, optional bias and group
 * limit, top-k selection (ties: lower expert index), probs, intermediate, and
 * a routing map or dense indices.
 *
 * @param logits `[..., E]` float32, float16 or bfloat16
 * @param options topk, scoreFunction and the optional settings of {@linkcode TopkOptions}
 * @returns probs `[..., E]` (logits dtype), `routingMap` or `indices`, intermediate, saved state; with
 *   `saveForBackward: false` ({@linkcode TopkInferenceOptions}), probs and the routing output alone
 * @throws {TypeError|RangeError} for invalid arguments, before any work
 *
 * @example DeepSeek-style routing: sigmoid, bias, two groups, dense int32 indices
 * ```ts
 * import { fusedTopkWithScoreFunction } from "./mod.ts";
 * import assert from "node:assert";
 *
 * const logits = { data: new Float32Array([0.1, 2, -1, 0.5, 3, 0.2, 1, -2]), shape: [1, 8], dtype: "float32" as const };
 * const expertBias = { data: new Float32Array(8), shape: [8], dtype: "float32" as const };
 * const out = await fusedTopkWithScoreFunction(logits, {
 *   topk: 2, scoreFunction: "sigmoid", numGroups: 2, groupTopk: 1,
 *   expertBias, scalingFactor: 2.5, indexDtype: "int32",
 * });
 * assert.deepStrictEqual([...out.indices!.data], [4, 6]); // group 1 wins: 3 + 1 > 2 + 0.5
 * assert.ok(Math.abs(out.probs.data[4]! + out.probs.data[6]! - 2.5) < 1e-5);
 * ```
 *
 * @example Routing alone, as at inference: nothing is kept for a backward
 * ```ts
 * import { fusedTopkWithScoreFunction } from "./mod.ts";
 * import assert from "node:assert";
 *
 * const logits = { data: new Float32Array([0.5, -1, 2, 0.1]), shape: [1, 4], dtype: "float32" as const };
 * const out = await fusedTopkWithScoreFunction(logits, {
 *   topk: 2, scoreFunction: "sigmoid", indexDtype: "int32", saveForBackward: false,
 * });
 * assert.deepStrictEqual([...out.indices!.data], [2, 0]);
 * assert.ok(!("saved" in out) && !("intermediate" in out));
 * ```
 */
export function fusedTopkWithScoreFunction(logits: FloatTensor, options: TopkOptions): Promise<TopkResult>;
/**
 * Top-k router forward, routing alone (`saveForBackward: false`): probs and
 * the routing output, bit for bit those of the saving forward above, and no
 * intermediate or saved state.
 */
export function fusedTopkWithScoreFunction(
  logits: FloatTensor,
  options: TopkInferenceOptions,
): Promise<TopkInferenceResult>;
export async function fusedTopkWithScoreFunction(
  logits: FloatTensor,
  options: TopkOptions | TopkInferenceOptions,
): Promise<TopkResult | TopkInferenceResult> {
  return (await router()).fusedTopkWithScoreFunction(logits, options as TopkOptions);
}

/**
 * Top-k router backward (SPEC section 3): gradLogits from gradProbs.
 *
 * @param saved the `saved` of the forward call
 * @param gradProbs `[..., E]`, the forward's dtype and shape
 * @param options `gradLogitsOut`: a caller buffer to write gradLogits into
 * @returns gradLogits, same dtype and shape
 * @throws {TypeError} for a foreign or released state, or a mismatched gradient
 *
 * @example Gradient of the routed probabilities
 * ```ts
 * import { fusedTopkWithScoreFunction, fusedTopkWithScoreFunctionBackward } from "./mod.ts";
 * import assert from "node:assert";
 *
 * const logits = { data: new Float32Array([1, 2, 3, 4]), shape: [1, 4], dtype: "float32" as const };
 * const { saved } = await fusedTopkWithScoreFunction(logits, { topk: 2, scoreFunction: "softmax" });
 * const grad = await fusedTopkWithScoreFunctionBackward(saved, {
 *   data: new Float32Array([0, 0, 1, 0]), shape: [1, 4], dtype: "float32",
 * });
 * assert.strictEqual(grad.data[0], 0); // experts not chosen get no gradient (post-softmax)
 * assert.ok(grad.data[2]! > 0 && grad.data[3]! < 0);
 * ```
 */
export async function fusedTopkWithScoreFunctionBackward(
  saved: SavedState,
  gradProbs: FloatTensor,
  options?: BackwardOptions,
): Promise<FloatTensor> {
  return (await router()).fusedTopkWithScoreFunctionBackward(saved, gradProbs, options);
}

/**
 * Scores for the aux loss (SPEC section 4): softmax, or the activation
 * normalised over all experts, with the top-k routing map.
 *
 * @param logits `[..., E]` float32, float16 or bfloat16
 * @param options topk, scoreFunction, routingMapFormat
 * @returns scores (float32), routingMap, intermediate, saved state
 *
 * @example Sigmoid scores normalised over the experts
 * ```ts
 * import { fusedComputeScoreForMoEAuxLoss } from "./mod.ts";
 * import assert from "node:assert";
 *
 * const logits = { data: new Float32Array([0, 0, 0, 0]), shape: [1, 4], dtype: "float32" as const };
 * const { scores, routingMap } = await fusedComputeScoreForMoEAuxLoss(logits, { topk: 1, scoreFunction: "sigmoid" });
 * assert.ok(Math.abs(scores.data[0]! - 0.25) < 1e-6);
 * assert.deepStrictEqual([...routingMap.data], [1, 0, 0, 0]); // equal scores: lowest index
 * ```
 */
export async function fusedComputeScoreForMoEAuxLoss(
  logits: FloatTensor,
  options: AuxScoresOptions,
): Promise<AuxScoresResult> {
  return (await router()).fusedComputeScoreForMoEAuxLoss(logits, options);
}

/**
 * Backward of the aux-loss scores: gradLogits from gradScores (float32).
 *
 * @param saved the `saved` of the forward call
 * @param gradScores `[..., E]` float32
 * @returns gradLogits in the logits' dtype
 *
 * @example Softmax scores with a uniform gradient have zero gradient
 * ```ts
 * import { fusedComputeScoreForMoEAuxLoss, fusedComputeScoreForMoEAuxLossBackward } from "./mod.ts";
 * import assert from "node:assert";
 *
 * const logits = { data: new Float32Array([1, 2, 3]), shape: [1, 3], dtype: "float32" as const };
 * const { saved } = await fusedComputeScoreForMoEAuxLoss(logits, { topk: 1, scoreFunction: "softmax" });
 * const g = await fusedComputeScoreForMoEAuxLossBackward(saved, {
 *   data: new Float32Array([1, 1, 1]), shape: [1, 3], dtype: "float32",
 * });
 * assert.ok(g.data.every((v) => Math.abs(v) < 1e-6));
 * ```
 */
export async function fusedComputeScoreForMoEAuxLossBackward(
  saved: SavedState,
  gradScores: Tensor<"float32">,
): Promise<FloatTensor> {
  return (await router()).fusedComputeScoreForMoEAuxLossBackward(saved, gradScores);
}

/**
 * The load-balancing aux loss (SPEC section 4):
 * `sum_j(sum_t probs[t,j] * tokensPerExpert[j]) * numExperts * coeff / (topk * totalNumTokens^2)`.
 *
 * @param probs `[tokens, cols]`, cols a multiple of numExperts
 * @param tokensPerExpert `[cols]` int32, int64, float32 or bfloat16
 * @param options totalNumTokens, numExperts, topk, coeff
 * @returns the loss, a 0-d tensor in the probs dtype, and a saved state
 *
 * @example Two tokens, two experts
 * ```ts
 * import { fusedMoEAuxLoss } from "./mod.ts";
 * import assert from "node:assert";
 *
 * const probs = { data: new Float32Array([0.5, 0.5, 1, 0]), shape: [2, 2], dtype: "float32" as const };
 * const tokensPerExpert = { data: new Int32Array([1, 1]), shape: [2], dtype: "int32" as const };
 * const { loss } = await fusedMoEAuxLoss(probs, tokensPerExpert, { totalNumTokens: 2, numExperts: 2, topk: 1, coeff: 1 });
 * assert.ok(Math.abs(loss.data[0]! - 1) < 1e-6); // (1.5 + 0.5) * 2 / 4
 * ```
 */
export async function fusedMoEAuxLoss(
  probs: FloatTensor,
  tokensPerExpert: Tensor,
  options: AuxLossOptions,
): Promise<AuxLossResult> {
  return (await router()).fusedMoEAuxLoss(probs, tokensPerExpert, options);
}

/**
 * Backward of the aux loss: `gradProbs[t,j] = gradLoss * tokensPerExpert[j] * constant`.
 *
 * @param saved the `saved` of the forward call
 * @param gradLoss a number, or a one-element float tensor
 * @returns gradProbs in the probs' dtype and shape
 * @throws {TypeError} for a foreign, released or GPU-resident state (the
 *   backward of a GPU-resident forward runs on its router, see {@linkcode GpuResidentOps})
 *
 * @example
 * ```ts
 * import { fusedMoEAuxLoss, fusedMoEAuxLossBackward } from "./mod.ts";
 * import assert from "node:assert";
 *
 * const probs = { data: new Float32Array([0.5, 0.5]), shape: [1, 2], dtype: "float32" as const };
 * const tokensPerExpert = { data: new Float32Array([2, 4]), shape: [2], dtype: "float32" as const };
 * const { saved } = await fusedMoEAuxLoss(probs, tokensPerExpert, { totalNumTokens: 1, numExperts: 2, topk: 1, coeff: 0.5 });
 * const g = await fusedMoEAuxLossBackward(saved, 1);
 * assert.deepStrictEqual([...g.data], [2, 4]);
 * ```
 */
export async function fusedMoEAuxLossBackward(saved: SavedState, gradLoss: number | FloatTensor): Promise<FloatTensor> {
  // its gradProbs would be a GpuTensor on another router's device
  if ((saved as SavedState | null | undefined)?.gpuResident === true) {
    throw new TypeError(
      `saved comes from a GPU-resident fusedMoEAuxLoss: run its backward on the router that ran it, got a GPU-resident state`,
    );
  }
  return (await router()).fusedMoEAuxLossBackward(saved, gradLoss);
}
