/**
 * moe-router: the routing step of Mixture-of-Experts models (scores, top-k
 * expert selection, routing outputs, gradients and aux-loss helpers) with
 * NVIDIA TransformerEngine's fused-router semantics, on a WebAssembly SIMD
 * CPU backend.
 *
 * Tensors are plain `{ data, shape, dtype }` objects; the last axis is the
 * expert axis and every leading axis is kept on the outputs. Every operation
 * returns a Promise, whatever the backend.
 *
 * @example Route a batch and take the gradient
 * ```ts
 * import { createRouter, tensor } from "./mod.ts";
 * import assert from "node:assert";
 *
 * const router = await createRouter({ backend: "wasm" });
 * const logits = tensor(new Float32Array([1, 4, 2, 3, 0, -1, 5, 2]), [2, 4]);
 * const out = await router.fusedTopkWithScoreFunction(logits, { topk: 2, scoreFunction: "softmax", usePreSoftmax: true });
 * assert.deepStrictEqual([...out.routingMap!.data], [0, 1, 0, 1, 0, 0, 1, 1]);
 * const grad = await router.fusedTopkWithScoreFunctionBackward(out.saved, tensor(new Float32Array(8).fill(1), [2, 4]));
 * assert.deepStrictEqual(grad.shape, [2, 4]);
 * ```
 *
 * @module
 */
export * from "./_types.ts";
export { empty, tensor } from "./tensor.ts";
export { type BackwardOptions, createRouter, type GpuResidentOps, type Router, type RouterOptions } from "./router.ts";
export type { WebGpuBackendOptions } from "./gpu/backend.ts";
export { readGpuTensor, toGpuTensor } from "./gpu/gpu_tensor.ts";
export {
  fusedComputeScoreForMoEAuxLoss,
  fusedComputeScoreForMoEAuxLossBackward,
  fusedMoEAuxLoss,
  fusedMoEAuxLossBackward,
  fusedTopkWithScoreFunction,
  fusedTopkWithScoreFunctionBackward,
} from "./ops.ts";
