/**
 * The router composed from TensorFlow.js ops, as a TensorFlow.js user would
 * write it, on the WebAssembly (SIMD) or the plain JavaScript CPU backend.
 *
 * Forward: sigmoid, add bias, group limit (reshape, topk, sum, topk of the
 * groups, one-hot mask), topk, gather, normalise, scatterND. Backward:
 * `tf.grad` of sum(probs * gradProbs). The selection (topk indices) is not
 * differentiable, and TensorFlow.js has no gradient for TopK, so it is
 * computed first, off the tape; the differentiable part (scores of the
 * chosen, normalisation, scatter) then runs under `tf.grad`. Gather and
 * scatter carry their own gradients (`tf.customGrad`: the gradient of one is
 * the other), since the WebAssembly backend has no UnsortedSegmentSum kernel
 * for the built-in gather gradient.
 *
 * @module
 */
// the union package: tfjs-core plus the gradients of its ops (tfjs-core alone registers none) and the CPU backend
import * as tf from "@tensorflow/tfjs";
import "@tensorflow/tfjs-backend-wasm";
import type { Case } from "./cases.ts";
import type { PeerOutput } from "./validate.ts";

/** The elements of `src` [T, E] at the flat positions `flat` [T, K] (t * E + expert): [T, K]. */
function gatherFlat(src: tf.Tensor, flat: tf.Tensor2D): tf.Tensor2D {
  const values: tf.Tensor = tf.gather(tf.reshape(src, [-1]), flat);
  return values as tf.Tensor2D;
}

/** The TensorFlow.js backends compared. */
export type TfBackend = "wasm" | "cpu";

/** Switches TensorFlow.js to `backend`; returns what it runs with (SIMD, threads). */
export async function useTfBackend(backend: TfBackend): Promise<string> {
  if (!(await tf.setBackend(backend))) {
    throw new Error(`TensorFlow.js backend ${backend} failed to start`);
  }
  await tf.ready();
  if (backend === "cpu") return "plain JavaScript";
  const simd = tf.env().getBool("WASM_HAS_SIMD_SUPPORT");
  const threads = tf.env().getBool("WASM_HAS_MULTITHREAD_SUPPORT");
  return `SIMD ${simd ? "on" : "off"}, ${threads ? "multi-threaded" : "one thread"}`;
}

/** TensorFlow.js versions in use. */
export function tfVersions(): string {
  return `@tensorflow/tfjs ${tf.version.tfjs}`;
}

/** The router of one case, forward and forward+backward, on the current TensorFlow.js backend. */
export class TfRouter {
  readonly #c: Case;
  readonly #bias: tf.Tensor1D | null;
  /** [T, 1] int32: t * E, the offset of each token's row in the flat [T * E] view. */
  readonly #rowOffsets: tf.Tensor2D;

  constructor(c: Case) {
    this.#c = c;
    const bias = c.options.expertBias;
    this.#bias = bias ? tf.tensor1d(bias) : null;
    this.#rowOffsets = tf.reshape(
      tf.mul(tf.range(0, c.tokens, 1, "int32"), tf.scalar(c.experts, "int32")),
      [c.tokens, 1],
    );
  }

  /** Frees the constant tensors. */
  dispose(): void {
    this.#bias?.dispose();
    this.#rowOffsets.dispose();
  }

  /** Forward: probs [T, E] and the chosen experts [T, K]. */
  forward(logits: Float32Array): PeerOutput {
    return tf.tidy(() => {
      const x = tf.tensor2d(logits, [this.#c.tokens, this.#c.experts]);
      const { indices, scores, top } = this.#select(x);
      const flat = tf.add(indices, this.#rowOffsets) as tf.Tensor2D;
      // softmax: the top-k values are the chosen logits; sigmoid: gather the unbiased scores
      const values = this.#c.options.scoreFunction === "softmax" ? top : gatherFlat(scores, flat);
      const probs = this.#scatter(this.#normalise(values), flat);
      return {
        probs: probs.dataSync() as Float32Array,
        indices: indices.dataSync() as Int32Array,
      };
    });
  }

  /** Forward and backward: probs, the chosen experts and d sum(probs * gradProbs) / d logits. */
  forwardBackward(logits: Float32Array, gradProbs: Float32Array): PeerOutput {
    const { tokens: T, experts: E } = this.#c;
    return tf.tidy(() => {
      const x = tf.tensor2d(logits, [T, E]);
      const gp = tf.tensor2d(gradProbs, [T, E]);
      const { indices } = this.#select(x); // off the tape: no gradient flows through the selection
      const flat = tf.add(indices, this.#rowOffsets) as tf.Tensor2D;
      // customGrad's function receives its tensor arguments (then a save function, unused here)
      const gather = tf.customGrad((src: tf.Tensor | tf.GradSaveFunc) => {
        return {
          value: gatherFlat(src as tf.Tensor, flat),
          gradFunc: (dy: tf.Tensor) => this.#scatter(dy as tf.Tensor2D, flat),
        };
      });
      let probs: tf.Tensor | null = null;
      const loss = (x: tf.Tensor) => {
        const src = this.#c.options.scoreFunction === "sigmoid" ? tf.sigmoid(x) : x;
        const p = this.#scatterWithGrad(this.#normalise(gather(src) as tf.Tensor2D), flat);
        probs = tf.keep(p);
        return tf.sum(tf.mul(p, gp)) as tf.Scalar;
      };
      const grad = tf.grad(loss)(x);
      const kept = probs as tf.Tensor | null;
      if (kept === null) throw new Error("tf.grad did not run the forward");
      const out = {
        probs: kept.dataSync() as Float32Array,
        indices: indices.dataSync() as Int32Array,
        grad: grad.dataSync() as Float32Array,
      };
      kept.dispose();
      return out;
    });
  }

  /** Selection: the chosen experts [T, K] (int32), their selection scores [T, K] and the scores s [T, E]. */
  #select(x: tf.Tensor2D): { indices: tf.Tensor2D; top: tf.Tensor2D; scores: tf.Tensor2D } {
    const { tokens: T, experts: E, options: o } = this.#c;
    const scores = o.scoreFunction === "sigmoid" ? tf.sigmoid(x) : x;
    let r: tf.Tensor2D = this.#bias ? tf.add(scores, this.#bias) : scores;
    if (o.numGroups !== undefined && o.groupTopk !== undefined) {
      const G = o.numGroups;
      const grouped = tf.reshape(r, [T, G, E / G]);
      const groupScores = tf.sum(tf.topk(grouped, o.topk / o.groupTopk).values, -1) as tf.Tensor2D;
      const kept = tf.topk(groupScores, o.groupTopk).indices; // [T, GK]
      // [T, G], 1 = kept. (oneHot in int32, then cast: the WebAssembly backend's oneHot with
      // dtype "float32" writes integer bit patterns, 1 reads as 1.4e-45, in 4.22.0.)
      const keptMask = tf.cast(tf.sum(tf.oneHot(kept, G), 1), "float32");
      // kept groups: + 0; the others: - 1e30, so that they are never chosen
      const penalty = tf.mul(tf.sub(keptMask, 1), 1e30);
      r = tf.reshape(tf.add(grouped, tf.expandDims(penalty, 2)), [T, E]);
    }
    const { indices, values } = tf.topk(r, o.topk);
    return { indices, top: values, scores };
  }

  /** Values of the chosen [T, K] to their final form: normalised sigmoid, or softmax over K; times the scale. */
  #normalise(values: tf.Tensor2D): tf.Tensor2D {
    const o = this.#c.options;
    let v = values;
    if (o.scoreFunction === "softmax") v = tf.softmax(v);
    else if (o.topk > 1) v = tf.div(v, tf.add(tf.sum(v, -1, true), 1e-20));
    return o.scalingFactor === undefined || o.scalingFactor === 1 ? v : tf.mul(v, o.scalingFactor);
  }

  /** Scatters [T, K] values to [T, E] zeros at the flat positions `flat` [T, K]. */
  #scatter(values: tf.Tensor2D, flat: tf.Tensor2D): tf.Tensor2D {
    const { tokens: T, experts: E } = this.#c;
    return tf.reshape(tf.scatterND(tf.expandDims(flat, -1), values, [T * E]), [T, E]);
  }

  /** {@linkcode TfRouter.#scatter} with a gradient: the gather of dy at the same positions. */
  #scatterWithGrad(values: tf.Tensor2D, flat: tf.Tensor2D): tf.Tensor2D {
    const scatter = tf.customGrad((v: tf.Tensor | tf.GradSaveFunc) => {
      return {
        value: this.#scatter(v as tf.Tensor2D, flat),
        gradFunc: (dy: tf.Tensor) => gatherFlat(dy, flat),
      };
    });
    return scatter(values) as tf.Tensor2D;
  }
}
