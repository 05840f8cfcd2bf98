/**
 * Seeded test data: a small PRNG, normal draws, and logits whose routing is
 * unambiguous (every selection boundary has a margin that float32 rounding
 * differences between two correct implementations cannot cross).
 *
 * @module
 */

import type { FloatDType, FloatTensor, TopkOptions } from "../_types.ts";
import { narrowTo, roundTo, routeToken, widen } from "./reference.ts";
import type { RefTopkOptions } from "./reference.ts";

/** A PRNG: returns uniform numbers in [0, 1). */
export type Rng = () => number;

/** mulberry32: a tiny, fast, seeded 32-bit PRNG (good enough for test data). */
export function mulberry32(seed: number): Rng {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** One standard normal draw (Box-Muller). */
export function normal(rng: Rng): number {
  const u = 1 - rng(); // (0, 1]: log(u) is finite
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rng());
}

/** `n` normal draws with standard deviation `scale` and mean `mean`, rounded to float32. */
export function normals(rng: Rng, n: number, scale = 1, mean = 0): Float32Array {
  return Float32Array.from({ length: n }, () => mean + scale * normal(rng));
}

/** Options of {@linkcode routableLogits}. */
export interface RoutableOptions {
  /** Standard deviation of the logits (default 1). */
  scale?: number;
  /** Mean of the logits (default 0). */
  mean?: number;
  /** Values are made representable in this dtype (default float32). */
  dtype?: FloatDType;
  /**
   * Smallest relative gap allowed at a selection boundary (default 2e-6,
   * about 30 float32 ulps): the K-th and (K+1)-th selection scores, every
   * pair of adjacent chosen experts (so the dense order is unambiguous too),
   * and the last kept and first dropped group.
   */
  margin?: number;
  /** Draws per row before giving up (default 1000). */
  maxDraws?: number;
}

/**
 * Whether one token's routing is unambiguous: at each boundary, the gap
 * between the two selection scores exceeds `margin` times the size of the
 * terms they were computed from (|s| + |bias|, summed over a group's top
 * experts for group scores). Two experts with identical logits and biases
 * are an exact tie, which every implementation breaks the same way (lower
 * index), so they are allowed.
 */
export function isUnambiguous(x: Float32Array, options: RefTopkOptions, margin: number): boolean {
  const { scores, selectionScores: r, selection } = routeToken(x, options);
  const bias = options.expertBias;
  const size = (e: number) => Math.abs(scores[e]!) + Math.abs(bias?.[e] ?? 0);
  const separated = (a: number, b: number, sizeA: number, sizeB: number) =>
    Number.isFinite(a) && Number.isFinite(b) && Math.abs(a - b) > margin * Math.max(sizeA, sizeB);

  const { ranked } = selection;
  const last = Math.min(options.topk, ranked.length - 1); // compare up to the (K+1)-th
  for (let i = 0; i < last; i++) {
    const a = ranked[i]!;
    const b = ranked[i + 1]!;
    const identical = x[a] === x[b] && (bias?.[a] ?? 0) === (bias?.[b] ?? 0);
    if (!identical && !separated(r[a]!, r[b]!, size(a), size(b))) return false;
  }

  const { groupScores, rankedGroups } = selection;
  const GK = options.groupTopk ?? 0;
  if (groupScores !== undefined && rankedGroups !== undefined && GK < rankedGroups.length) {
    const groupSize = x.length / rankedGroups.length;
    const perGroup = options.topk / GK;
    const groupTermSize = (g: number) => {
      const members = Array.from({ length: groupSize }, (_, i) => g * groupSize + i);
      return members.map(size).sort((p, q) => q - p).slice(0, perGroup).reduce((p, q) => p + q, 0);
    };
    const kept = rankedGroups[GK - 1]!;
    const dropped = rankedGroups[GK]!;
    if (!separated(groupScores[kept]!, groupScores[dropped]!, groupTermSize(kept), groupTermSize(dropped))) {
      return false;
    }
  }
  return true;
}

/**
 * Normal logits [T, E] (float32 values, representable in `dtype`) whose
 * routing under `options` is unambiguous: each row is re-drawn until
 * {@linkcode isUnambiguous} holds.
 *
 * @throws {Error} When a row is still ambiguous after `maxDraws` draws.
 */
export function routableLogits(
  rng: Rng,
  tokens: number,
  experts: number,
  options: RefTopkOptions,
  generation: RoutableOptions = {},
): Float32Array {
  const { scale = 1, mean = 0, dtype = "float32", margin = 2e-6, maxDraws = 1000 } = generation;
  const logits = new Float32Array(tokens * experts);
  for (let t = 0; t < tokens; t++) {
    for (let draw = 0;; draw++) {
      if (draw === maxDraws) {
        throw new Error(
          `no unambiguous row in ${maxDraws} draws for E=${experts} ${
            JSON.stringify({ ...options, expertBias: options.expertBias && "[bias]" })
          }`,
        );
      }
      const row = roundTo(normals(rng, experts, scale, mean), dtype);
      if (isUnambiguous(row, options, margin)) {
        logits.set(row, t * experts);
        break;
      }
    }
  }
  return logits;
}

/** The cases of the cross-backend tests: a batch shape, its dtype and its router options. */
export interface CrossCase {
  T: number;
  E: number;
  dtype: FloatDType;
  options: TopkOptions;
}

/** Tolerances of values and gradients between two backends, by dtype. */
export const CROSS_TOLERANCE = {
  float32: { atol: 1e-5, rtol: 1e-4 },
  float16: { atol: 2e-3, rtol: 2e-3 },
  bfloat16: { atol: 1.6e-2, rtol: 1.6e-2 },
} as const;

/** Routable logits of a case as a tensor of its dtype ({@linkcode routableLogits}, scale 2). */
export function routableTensor(c: CrossCase, seed: number): FloatTensor {
  const ref: RefTopkOptions = {
    topk: c.options.topk,
    scoreFunction: c.options.scoreFunction,
    usePreSoftmax: c.options.usePreSoftmax,
    numGroups: c.options.numGroups,
    groupTopk: c.options.groupTopk,
    expertBias: c.options.expertBias && widen(c.options.expertBias),
  };
  const x = routableLogits(mulberry32(seed), c.T, c.E, ref, { dtype: c.dtype, scale: 2 });
  return { data: narrowTo(x, c.dtype), shape: [c.T, c.E], dtype: c.dtype } as FloatTensor;
}

/** Gradients of a case: uniform in [-0.5, 0.5), as a tensor of its dtype. */
export function gradTensor(c: CrossCase, seed: number): FloatTensor {
  const r = mulberry32(seed);
  const g = Float32Array.from({ length: c.T * c.E }, () => r() - 0.5);
  return { data: narrowTo(g, c.dtype), shape: [c.T, c.E], dtype: c.dtype } as FloatTensor;
}

/**
 * Router configurations that between them take every path of the
 * WebAssembly top-k forward (grouped sigmoid with bias, sigmoid keyed by the
 * logits, post- and pre-softmax, wide top-32, sqrtsoftplus with groups,
 * radix selection, the four-token lanes with dense rows, small rows with a
 * bias), each with another input dtype and routing output. At `scale` 1
 * every batch but the last (12 experts) is big enough for worker threads.
 */
export function forwardPaths(scale = 1): CrossCase[] {
  const bias = (E: number, seed: number): FloatTensor => ({
    data: normals(mulberry32(seed), E, 0.01),
    shape: [E],
    dtype: "float32",
  });
  const base: Array<[number, number, TopkOptions]> = [
    [1100, 256, {
      topk: 8,
      scoreFunction: "sigmoid",
      numGroups: 8,
      groupTopk: 4,
      expertBias: bias(256, 1),
      scalingFactor: 2.5,
    }],
    [1100, 256, { topk: 8, scoreFunction: "sigmoid", expertBias: bias(256, 2) }], // keyed by the logits
    [2113, 128, { topk: 8, scoreFunction: "softmax" }],
    [2113, 128, { topk: 6, scoreFunction: "softmax", usePreSoftmax: true }],
    [300, 1024, { topk: 32, scoreFunction: "sigmoid" }],
    [1500, 200, { topk: 4, scoreFunction: "sqrtsoftplus", numGroups: 4, groupTopk: 2 }],
    [700, 512, { topk: 20, scoreFunction: "softmax", radixTopkThreshold: 4 }], // radix selection
    [33000, 8, { topk: 2, scoreFunction: "softmax" }], // four-token lanes, dense probs rows
    [3000, 12, { topk: 3, scoreFunction: "sigmoid", expertBias: bias(12, 3) }],
  ];
  const outputs = ["bytemap", "bitmap_u8", "int16", "int32", "int64"] as const;
  return base.map(([T, E, options], i) => {
    const format = outputs[i % outputs.length]!;
    const route = format === "bytemap" || format === "bitmap_u8"
      ? { routingMapFormat: format }
      : { indexDtype: format };
    const dtype: FloatDType = (["float32", "float16", "bfloat16"] as const)[i % 3]!;
    return { T: Math.ceil(T * scale), E, dtype, options: { ...options, ...route } };
  });
}
