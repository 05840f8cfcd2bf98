/**
 * A plain scalar reference of the router's maths (SPEC sections 2, 3 and 4),
 * written to be read, not to be fast: one token at a time, sort-based top-k,
 * and float32 rounding (`Math.fround`) after every arithmetic step, so that
 * it follows the spec's "all arithmetic is float32" literally. Sums run in
 * a fixed, documented order (expert index order, or the selection order for
 * sums over the chosen experts).
 *
 * Shares no code with the library: tests compare the two.
 *
 * @module
 */

import type { FloatDType, ScoreFunction, Tensor } from "../_types.ts";

/** Rounds to float32: every arithmetic step of the reference goes through it. */
const f32 = Math.fround;
/** The epsilon of the normalisation denominators (sum + 1e-20), as float32. */
const EPS = f32(1e-20);
/** Above this, softplus(x) is taken as x (as in TransformerEngine). */
const SOFTPLUS_LINEAR_ABOVE = 20;

/** Options of {@linkcode refTopkForward}: the names of `TopkOptions`, with a plain array bias. */
export interface RefTopkOptions {
  topk: number;
  scoreFunction: ScoreFunction;
  usePreSoftmax?: boolean | undefined;
  numGroups?: number | undefined;
  groupTopk?: number | undefined;
  scalingFactor?: number | undefined;
  /** Per-expert bias [E], float32 values. */
  expertBias?: Float32Array | undefined;
}

/** Everything the reference forward computes, for T tokens of E experts. */
export interface RefTopkForward {
  tokens: number;
  experts: number;
  options: RefTopkOptions;
  /** [T, E] scores s (section 2.1). */
  scores: Float32Array;
  /** [T, E] selection scores r = s + bias (section 2.2). */
  selectionScores: Float32Array;
  /** [T, E] probs in float32, before any narrowing to the logits dtype. */
  probs: Float32Array;
  /** [T, E] intermediate saved for backward (section 2.7). */
  intermediate: Float32Array;
  /** [T, K] chosen experts per token, by descending selection score, ties by lower index. */
  routing: Int32Array;
  /** [T, E] 0/1 routing map. */
  bytemap: Uint8Array;
}

// ---------------------------------------------------------------------------
// Elementwise score functions

/**
 * sigmoid(x) = 1 / (1 + exp(-x)); below 0 as exp(x) / (1 + exp(x)), so that
 * logits under -88.7 keep their subnormal scores instead of dividing by an
 * overflowed exp (the README's "tiny scores keep their order").
 */
export function sigmoid(x: number): number {
  if (x < 0) {
    const e = f32(Math.exp(x));
    return f32(e / f32(1 + e));
  }
  return f32(1 / f32(1 + f32(Math.exp(-x))));
}

/** sqrtsoftplus(x) = sqrt(softplus(x)); softplus(x) = x above 20, else log1p(exp(x)). */
export function sqrtSoftplus(x: number): number {
  // below -20 softplus(x) = exp(x) to float32 precision, so sqrt of it is exp(x / 2), which stays
  // representable far below where exp(x) underflows (README: "tiny scores keep their order")
  if (x < -SOFTPLUS_LINEAR_ABOVE) return f32(Math.exp(x / 2));
  const softplus = x > SOFTPLUS_LINEAR_ABOVE ? x : f32(Math.log1p(f32(Math.exp(x))));
  return f32(Math.sqrt(softplus));
}

/** d sqrtsoftplus / dx = sigmoid(x) / (2 sqrtsoftplus(x) + 1e-20); sigmoid(x) is taken as 1 above 20. */
function sqrtSoftplusGrad(x: number): number {
  const dSoftplus = x > SOFTPLUS_LINEAR_ABOVE ? 1 : sigmoid(x);
  return f32(dSoftplus / f32(f32(2 * sqrtSoftplus(x)) + EPS));
}

/** softmax over `x` (max-subtracted), summed in index order. */
export function softmax(x: ArrayLike<number>): Float32Array {
  let max = -Infinity;
  for (let i = 0; i < x.length; i++) max = Math.max(max, x[i]!);
  const out = new Float32Array(x.length);
  let sum = 0;
  for (let i = 0; i < x.length; i++) {
    out[i] = f32(Math.exp(f32(x[i]! - max)));
    sum = f32(sum + out[i]!);
  }
  for (let i = 0; i < x.length; i++) out[i] = f32(out[i]! / sum);
  return out;
}

// ---------------------------------------------------------------------------
// Ordering and selection

/**
 * Sort comparator for "ranks higher first": larger value first, NaN after
 * every number, equal values (and two NaNs) by lower index.
 */
export function compareRank(a: number, ia: number, b: number, ib: number): number {
  const aNaN = Number.isNaN(a);
  const bNaN = Number.isNaN(b);
  if (aNaN !== bNaN) return aNaN ? 1 : -1;
  if (!aNaN && a !== b) return a > b ? -1 : 1;
  return ia - ib;
}

/** The candidate indices ordered by {@linkcode compareRank} of `values[index]`. */
export function rankDescending(values: ArrayLike<number>, candidates: readonly number[]): number[] {
  return [...candidates].sort((i, j) => compareRank(values[i]!, i, values[j]!, j));
}

/** The result of the selection steps 2.3 and 2.4 for one token. */
export interface TokenSelection {
  /** Group scores [G] when the group limit is on. */
  groupScores?: Float32Array;
  /** Groups ordered by rank when the group limit is on (the first groupTopk are kept). */
  rankedGroups?: number[];
  /** Experts allowed by the group limit (all when it is off), by rank of r. */
  ranked: number[];
  /** The first K of `ranked`. */
  chosen: number[];
}

/**
 * Steps 2.3 (group limit) and 2.4 (top-k) for one token's selection scores r.
 *
 * @throws {RangeError} When topk or the group parameters break SPEC 2.3.
 */
export function selectToken(r: ArrayLike<number>, options: RefTopkOptions): TokenSelection {
  const E = r.length;
  const K = options.topk;
  if (!(Number.isInteger(K) && K >= 1 && K <= E)) throw new RangeError(`topk must be in [1, ${E}], got ${K}`);
  const all = Array.from({ length: E }, (_, i) => i);
  const GK = options.groupTopk ?? 0;
  if (GK <= 0) {
    const ranked = rankDescending(r, all);
    return { ranked, chosen: ranked.slice(0, K) };
  }

  const G = options.numGroups ?? 0;
  if (!(G > 0 && K % GK === 0 && GK <= G && E % G === 0 && K / GK <= E / G)) {
    throw new RangeError(
      `group limit needs G > 0, K % GK == 0, GK <= G, E % G == 0, K/GK <= E/G; got E=${E} K=${K} G=${G} GK=${GK}`,
    );
  }
  const groupSize = E / G;
  const perGroup = K / GK;
  // A group's score: the sum of its top K/GK selection scores, largest first.
  const groupScores = new Float32Array(G);
  for (let g = 0; g < G; g++) {
    const members = all.slice(g * groupSize, (g + 1) * groupSize);
    let sum = 0;
    for (const e of rankDescending(r, members).slice(0, perGroup)) sum = f32(sum + r[e]!);
    groupScores[g] = sum;
  }
  const rankedGroups = rankDescending(groupScores, Array.from({ length: G }, (_, g) => g));
  const kept = new Set(rankedGroups.slice(0, GK));
  const ranked = rankDescending(r, all.filter((e) => kept.has(Math.floor(e / groupSize))));
  return { groupScores, rankedGroups, ranked, chosen: ranked.slice(0, K) };
}

/** Step 2.1: the scores s of one token. */
function tokenScores(x: Float32Array, options: RefTopkOptions): Float32Array {
  switch (options.scoreFunction) {
    case "softmax":
      return options.usePreSoftmax ? softmax(x) : Float32Array.from(x);
    case "sigmoid":
      return x.map(sigmoid);
    case "sqrtsoftplus":
      return x.map(sqrtSoftplus);
  }
}

/** Step 2.2: the selection scores r = s + bias of one token. */
function tokenSelectionScores(s: Float32Array, options: RefTopkOptions): Float32Array {
  const bias = options.expertBias;
  return bias === undefined ? s : s.map((v, i) => f32(v + bias[i]!));
}

/**
 * Steps 2.1 to 2.4 for one token: its scores, selection scores and the
 * selection (used by data generators to measure selection margins).
 */
export function routeToken(
  x: Float32Array,
  options: RefTopkOptions,
): { scores: Float32Array; selectionScores: Float32Array; selection: TokenSelection } {
  const scores = tokenScores(x, options);
  const selectionScores = tokenSelectionScores(scores, options);
  return { scores, selectionScores, selection: selectToken(selectionScores, options) };
}

// ---------------------------------------------------------------------------
// Top-k router forward and backward (SPEC sections 2 and 3)

/**
 * The top-k router forward of SPEC section 2 for `logits` [T, E] (float32
 * values; widen float16 or bfloat16 logits first).
 */
export function refTopkForward(
  logits: Float32Array,
  tokens: number,
  experts: number,
  options: RefTopkOptions,
): RefTopkForward {
  const T = tokens;
  const E = experts;
  const K = options.topk;
  if (logits.length !== T * E) throw new RangeError(`logits must hold T*E=${T * E} values, got ${logits.length}`);
  if (options.expertBias !== undefined && options.scoreFunction === "softmax") {
    throw new RangeError("expertBias is only for sigmoid and sqrtsoftplus");
  }
  const scale = f32(options.scalingFactor ?? 1);
  const out: RefTopkForward = {
    tokens: T,
    experts: E,
    options,
    scores: new Float32Array(T * E),
    selectionScores: new Float32Array(T * E),
    probs: new Float32Array(T * E),
    intermediate: new Float32Array(T * E),
    routing: new Int32Array(T * K),
    bytemap: new Uint8Array(T * E),
  };
  for (let t = 0; t < T; t++) {
    const x = logits.subarray(t * E, (t + 1) * E);
    const { scores, selectionScores, selection } = routeToken(x, options);
    const chosen = selection.chosen;
    out.scores.set(scores, t * E);
    out.selectionScores.set(selectionScores, t * E);
    out.routing.set(chosen, t * K);
    for (const e of chosen) out.bytemap[t * E + e] = 1;

    // Step 2.5: the values v of the chosen experts (in `chosen` order).
    let values: number[];
    if (options.scoreFunction === "softmax") {
      values = options.usePreSoftmax ? chosen.map((e) => scores[e]!) : Array.from(softmax(chosen.map((e) => x[e]!)));
    } else {
      values = chosen.map((e) => scores[e]!); // the unbiased score
      if (K > 1) {
        let sum = 0;
        for (const v of values) sum = f32(sum + v);
        const denominator = f32(sum + EPS);
        values = values.map((v) => f32(v / denominator));
      }
    }

    // Step 2.6: probs = c * v at the chosen experts.
    chosen.forEach((e, i) => out.probs[t * E + e] = f32(scale * values[i]!));

    // Step 2.7: intermediate.
    const intermediate = out.intermediate.subarray(t * E, (t + 1) * E);
    switch (options.scoreFunction) {
      case "softmax":
        if (options.usePreSoftmax) intermediate.set(scores);
        else {
          intermediate.fill(-Infinity);
          chosen.forEach((e, i) => intermediate[e] = values[i]!);
        }
        break;
      case "sigmoid":
        intermediate.set(scores);
        break;
      case "sqrtsoftplus":
        intermediate.set(x);
        break;
    }
  }
  return out;
}

/**
 * The top-k router backward of SPEC section 3: d(sum(probs * gradProbs)) / d
 * logits, from what the forward saved (intermediate and chosen experts).
 */
export function refTopkBackward(forward: RefTopkForward, gradProbs: Float32Array): Float32Array {
  const { tokens: T, experts: E, options } = forward;
  const K = options.topk;
  const scale = f32(options.scalingFactor ?? 1);
  const grad = new Float32Array(T * E);
  for (let t = 0; t < T; t++) {
    const y = forward.intermediate.subarray(t * E, (t + 1) * E);
    const chosen = Array.from(forward.routing.subarray(t * K, (t + 1) * K));
    const g = grad.subarray(t * E, (t + 1) * E); // zero where not chosen
    for (const e of chosen) g[e] = f32(gradProbs[t * E + e]! * scale);

    switch (options.scoreFunction) {
      case "softmax": {
        // Softmax backward: g_i = y_i (g_i - sum_chosen g y); over the chosen
        // experts after selection (post), over every expert before it (pre).
        let d = 0;
        for (const e of chosen) d = f32(d + f32(g[e]! * y[e]!));
        const experts = options.usePreSoftmax ? g.keys() : chosen;
        for (const e of experts) g[e] = f32(y[e]! * f32(g[e]! - d));
        break;
      }
      case "sigmoid":
      case "sqrtsoftplus": {
        // Normalisation backward (K > 1): v = a / S, S = sum a + 1e-20.
        if (K > 1) {
          const activation = (e: number) => options.scoreFunction === "sigmoid" ? y[e]! : sqrtSoftplus(y[e]!);
          let sum = 0;
          let dot = 0;
          for (const e of chosen) {
            sum = f32(sum + activation(e));
            dot = f32(dot + f32(g[e]! * activation(e)));
          }
          const S = f32(sum + EPS);
          const dotOverS2 = f32(dot / f32(S * S));
          for (const e of chosen) g[e] = f32(f32(g[e]! / S) - dotOverS2);
        }
        activationBackward(g, y, options.scoreFunction);
        break;
      }
    }
  }
  return grad;
}

/**
 * g_i *= d activation / dx for every expert, from the saved intermediate:
 * sigmoid' = y (1 - y) with y = sigmoid(x); sqrtsoftplus' from the raw logits.
 */
function activationBackward(g: Float32Array, saved: Float32Array, fn: "sigmoid" | "sqrtsoftplus"): void {
  for (let e = 0; e < g.length; e++) {
    const y = saved[e]!;
    const derivative = fn === "sigmoid" ? f32(y * f32(1 - y)) : sqrtSoftplusGrad(y);
    g[e] = f32(g[e]! * derivative);
  }
}

// ---------------------------------------------------------------------------
// Aux-loss helpers (SPEC section 4)

/** Options of {@linkcode refAuxScoresForward}. */
export interface RefAuxScoresOptions {
  topk: number;
  scoreFunction: ScoreFunction;
}

/** What the aux-scores forward computes. */
export interface RefAuxScoresForward {
  tokens: number;
  experts: number;
  options: RefAuxScoresOptions;
  /** [T, E] normalised scores. */
  scores: Float32Array;
  /** [T, E] softmax, sigmoid(x) or the raw logits. */
  intermediate: Float32Array;
  /** [T, K] top-K experts of the scores, by rank. */
  routing: Int32Array;
  /** [T, E] 0/1 routing map. */
  bytemap: Uint8Array;
}

/** The aux-loss scores forward: softmax, or the activation normalised over all E experts. */
export function refAuxScoresForward(
  logits: Float32Array,
  tokens: number,
  experts: number,
  options: RefAuxScoresOptions,
): RefAuxScoresForward {
  const T = tokens;
  const E = experts;
  const K = options.topk;
  if (logits.length !== T * E) throw new RangeError(`logits must hold T*E=${T * E} values, got ${logits.length}`);
  const out: RefAuxScoresForward = {
    tokens: T,
    experts: E,
    options,
    scores: new Float32Array(T * E),
    intermediate: new Float32Array(T * E),
    routing: new Int32Array(T * K),
    bytemap: new Uint8Array(T * E),
  };
  for (let t = 0; t < T; t++) {
    const x = logits.subarray(t * E, (t + 1) * E);
    let scores: Float32Array;
    if (options.scoreFunction === "softmax") {
      scores = softmax(x);
      out.intermediate.set(scores, t * E);
    } else {
      const a = x.map(options.scoreFunction === "sigmoid" ? sigmoid : sqrtSoftplus);
      let sum = 0;
      for (const v of a) sum = f32(sum + v);
      const denominator = f32(sum + EPS);
      scores = a.map((v) => f32(v / denominator));
      out.intermediate.set(options.scoreFunction === "sigmoid" ? a : x, t * E);
    }
    out.scores.set(scores, t * E);
    const chosen = selectToken(scores, { topk: K, scoreFunction: options.scoreFunction }).chosen;
    out.routing.set(chosen, t * K);
    for (const e of chosen) out.bytemap[t * E + e] = 1;
  }
  return out;
}

/** The aux-loss scores backward: gradScores through the normalisation (or softmax) and the activation. */
export function refAuxScoresBackward(forward: RefAuxScoresForward, gradScores: Float32Array): Float32Array {
  const { tokens: T, experts: E, options } = forward;
  const grad = new Float32Array(T * E);
  for (let t = 0; t < T; t++) {
    const y = forward.intermediate.subarray(t * E, (t + 1) * E);
    const g = grad.subarray(t * E, (t + 1) * E);
    g.set(gradScores.subarray(t * E, (t + 1) * E));
    if (options.scoreFunction === "softmax") {
      let d = 0;
      for (let e = 0; e < E; e++) d = f32(d + f32(g[e]! * y[e]!));
      for (let e = 0; e < E; e++) g[e] = f32(y[e]! * f32(g[e]! - d));
    } else {
      const a = options.scoreFunction === "sigmoid" ? y : y.map(sqrtSoftplus);
      let sum = 0;
      let dot = 0;
      for (let e = 0; e < E; e++) {
        sum = f32(sum + a[e]!);
        dot = f32(dot + f32(g[e]! * a[e]!));
      }
      const S = f32(sum + EPS);
      const dotOverS2 = f32(dot / f32(S * S));
      for (let e = 0; e < E; e++) g[e] = f32(f32(g[e]! / S) - dotOverS2);
      activationBackward(g, y, options.scoreFunction);
    }
  }
  return grad;
}

/** Options of the aux loss (the names of `AuxLossOptions`). */
export interface RefAuxLossOptions {
  totalNumTokens: number;
  numExperts: number;
  topk: number;
  coeff: number;
}

/** The aux-loss constant numExperts * coeff / (topk * totalNumTokens^2), as float32. */
function auxLossConstant(o: RefAuxLossOptions): number {
  return f32((o.numExperts * o.coeff) / (o.topk * o.totalNumTokens * o.totalNumTokens));
}

/**
 * The aux loss: sum_j (sum_t probs[t, j]) * tokensPerExpert[j] times the
 * constant; column sums first (token order), then the weighted sum (column order).
 */
export function refAuxLoss(
  probs: Float32Array,
  rows: number,
  cols: number,
  tokensPerExpert: ArrayLike<number>,
  options: RefAuxLossOptions,
): number {
  if (probs.length !== rows * cols) {
    throw new RangeError(`probs must hold rows*cols=${rows * cols} values, got ${probs.length}`);
  }
  let total = 0;
  for (let j = 0; j < cols; j++) {
    let column = 0;
    for (let t = 0; t < rows; t++) column = f32(column + probs[t * cols + j]!);
    total = f32(total + f32(column * f32(tokensPerExpert[j]!)));
  }
  return f32(total * auxLossConstant(options));
}

/** The aux-loss backward: gradProbs[t, j] = gradLoss * tokensPerExpert[j] * constant. */
export function refAuxLossBackward(
  rows: number,
  cols: number,
  tokensPerExpert: ArrayLike<number>,
  options: RefAuxLossOptions,
  gradLoss: number,
): Float32Array {
  const constant = auxLossConstant(options);
  const grad = new Float32Array(rows * cols);
  for (let t = 0; t < rows; t++) {
    for (let j = 0; j < cols; j++) {
      grad[t * cols + j] = f32(f32(f32(gradLoss) * f32(tokensPerExpert[j]!)) * constant);
    }
  }
  return grad;
}

// ---------------------------------------------------------------------------
// Layout and dtype helpers for tests

/** Packs a [T, E] 0/1 bytemap into [T, ceil(E/8)] bytes, bit e%8 of byte e/8, LSB first. */
export function packBitmap(bytemap: Uint8Array, tokens: number, experts: number): Uint8Array {
  const width = Math.ceil(experts / 8);
  const out = new Uint8Array(tokens * width);
  for (let t = 0; t < tokens; t++) {
    for (let e = 0; e < experts; e++) {
      if (bytemap[t * experts + e]) out[t * width + (e >> 3)]! |= 1 << (e & 7);
    }
  }
  return out;
}

const bitsView = new DataView(new ArrayBuffer(4));

/** float32 value to bfloat16 bits, round to nearest even (NaN stays a quiet NaN). */
export function f32ToBf16(x: number): number {
  bitsView.setFloat32(0, x);
  const bits = bitsView.getUint32(0);
  if (Number.isNaN(x)) return (bits >>> 16) | 0x0040;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

/** bfloat16 bits to the float32 value they stand for. */
export function bf16ToF32(bits: number): number {
  bitsView.setUint32(0, (bits & 0xffff) << 16);
  return bitsView.getFloat32(0);
}

/** Float32 values narrowed to `dtype` and widened back (what a store then a load gives). */
export function roundTo(values: Float32Array, dtype: FloatDType): Float32Array {
  switch (dtype) {
    case "float32":
      return values;
    case "float16":
      return Float32Array.from(new Float16Array(values));
    case "bfloat16":
      return values.map((v) => bf16ToF32(f32ToBf16(v)));
  }
}

/** Float32 values narrowed into the typed array of `dtype` (bfloat16: round to nearest even). */
export function narrowTo(values: Float32Array, dtype: FloatDType): Float32Array | Float16Array | Uint16Array {
  switch (dtype) {
    case "float32":
      return Float32Array.from(values);
    case "float16":
      return new Float16Array(values);
    case "bfloat16":
      return Uint16Array.from(values, f32ToBf16);
  }
}

/**
 * Any tensor's values as float32 (bfloat16 bits decoded, int64 converted,
 * everything rounded to float32).
 */
export function widen(tensor: Tensor): Float32Array {
  if (tensor.dtype === "bfloat16") return Float32Array.from(tensor.data as Uint16Array, bf16ToF32);
  if (tensor.data instanceof BigInt64Array) return Float32Array.from(tensor.data, (v) => Number(v));
  return Float32Array.from(tensor.data as ArrayLike<number>);
}

/** Each row of a [rows, cols] index array sorted ascending, as numbers (to compare sets). */
export function sortedRows(indices: ArrayLike<number | bigint>, rows: number, cols: number): Int32Array {
  const out = Int32Array.from({ length: rows * cols }, (_, i) => Number(indices[i]!));
  for (let t = 0; t < rows; t++) out.subarray(t * cols, (t + 1) * cols).sort();
  return out;
}
