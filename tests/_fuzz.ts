/**
 * Property-based differential testing of the router against the plain
 * reference of tests/reference.ts: random shapes, options, output layouts,
 * dtypes and hostile data (heavy ties, huge and tiny magnitudes, infinities,
 * NaN), and invalid arguments. Shared by the CI budget (tests/fuzz_test.ts)
 * and the long-run task (scripts/fuzz.ts).
 *
 * A case is drawn by fast-check from structural parameters plus a data seed;
 * the data itself comes from the seeded PRNG of tests/_generators.ts, so a
 * case is small to print and exact to replay.
 *
 * What "agree" means, per token:
 * - strict tokens (every selection boundary of the reference is either an
 *   exact tie that every correct implementation reproduces, or wider than the
 *   float32 rounding of the scores): the chosen set, and the dense order, must
 *   equal the reference's exactly; probs, intermediate and gradients must be
 *   within a tolerance derived from the magnitudes of the terms summed;
 * - near-tie tokens (two different scores closer than rounding can tell
 *   apart): the chosen set must be a valid top-k within that rounding; values
 *   are not compared, since they follow the (legitimately different) set.
 * Invalid arguments must throw the same error class and message on every
 * router, before any output buffer is written.
 *
 * @module
 */

import assert from "node:assert";
import fc from "fast-check";
import type {
  AuxScoresOptions,
  FloatDType,
  FloatTensor,
  IndexArray,
  IndexDType,
  Router,
  ScoreFunction,
  Tensor,
  TopkOptions,
} from "../mod.ts";
import { assertArrayEqual, assertBitIdentical, assertClose } from "./_assert.ts";
import { mulberry32, normal } from "./_generators.ts";
import type { Rng } from "./_generators.ts";
import {
  compareRank,
  narrowTo,
  refAuxScoresBackward,
  refAuxScoresForward,
  refTopkBackward,
  refTopkForward,
  roundTo,
  routeToken,
  sigmoid,
  sqrtSoftplus,
  widen,
} from "./reference.ts";
import type { RefTopkOptions } from "./reference.ts";

// ---------------------------------------------------------------------------
// Cases

/** How the logits of a case are drawn. */
export type DataKind = "normal" | "levels" | "huge" | "tiny" | "special" | "mixed";
/** The routing output of a top-k case. */
export type Layout = "bytemap" | "bitmap_u8" | IndexDType | `out-${IndexDType}`;
/** A deliberate argument error. */
export type Invalid =
  | "none"
  | "groups"
  | "topk"
  | "bias-softmax"
  | "bias-shape"
  | "out-short"
  | "out-type"
  | "out-alias"
  | "out-dtype"
  | "grad-shape"
  | "grad-dtype";

/** One fuzz case: everything needed to rebuild its tensors and options. */
export interface FuzzCase {
  op: "topk" | "aux";
  /** Leading axes; their product is the token count T. */
  lead: number[];
  E: number;
  K: number;
  dtype: FloatDType;
  score: "softmax-pre" | "softmax-post" | "sigmoid" | "sqrtsoftplus";
  /** [numGroups, groupTopk], or null for no group limit. */
  groups: [number, number] | null;
  bias: null | { kind: "normal" | "levels" | "special"; dtype: FloatDType };
  scale: number | null;
  layout: Layout;
  /** radixTopkThreshold: null for the default. */
  threshold: number | null;
  data: DataKind;
  /** Sprinkle NaN and infinities into gradProbs too. */
  gradSpecial: boolean;
  invalid: Invalid;
  seed: number;
}

/** Size limits of generated cases. */
export interface CaseLimits {
  /** Largest T * E (the reference is scalar; keep it affordable). */
  maxElements: number;
  maxTokens?: number;
  maxExperts?: number;
  maxTopk?: number;
  /** Share of cases with an invalid argument (default 0.15). */
  invalidRate?: number;
}

/** A restricted family (few GPU pipelines): allowed score functions, E range, K range, no groups. */
export interface CaseFamily {
  scores: FuzzCase["score"][];
  experts: [number, number];
  topk: [number, number];
  ops?: FuzzCase["op"][];
}

const DTYPES: FloatDType[] = ["float32", "float16", "bfloat16"];
const LAYOUTS: Layout[] = ["bytemap", "bitmap_u8", "int16", "int32", "int64", "out-int16", "out-int32", "out-int64"];
const INVALIDS: Invalid[] = [
  "groups",
  "topk",
  "bias-softmax",
  "bias-shape",
  "out-short",
  "out-type",
  "out-alias",
  "out-dtype",
  "grad-shape",
  "grad-dtype",
];

/** Divisors of n (ascending). */
function divisors(n: number): number[] {
  const out: number[] = [];
  for (let d = 1; d * d <= n; d++) {
    if (n % d === 0) {
      out.push(d);
      if (d * d !== n) out.push(n / d);
    }
  }
  return out.sort((a, b) => a - b);
}

/** Whether [G, GK] meets SPEC 2.3 for E experts and top-k K. */
export function groupsValid(E: number, K: number, G: number, GK: number): boolean {
  return G > 0 && GK > 0 && K % GK === 0 && GK <= G && E % G === 0 && K / GK <= E / G;
}

/** Valid [G, GK] pairs for E and K (at most a few dozen). */
function validGroups(E: number, K: number): [number, number][] {
  const out: [number, number][] = [];
  for (const G of divisors(E).filter((g) => g > 1 && g <= 256)) {
    for (const GK of divisors(K).filter((gk) => gk <= G)) {
      if (groupsValid(E, K, G, GK)) out.push([G, GK]);
    }
  }
  return out;
}

/** Small-biased integer in [lo, hi]: half the draws near lo, the rest uniform. */
function sized(lo: number, hi: number): fc.Arbitrary<number> {
  if (hi <= lo) return fc.constant(lo);
  const near = Math.min(hi, lo + 40);
  return fc.oneof(fc.integer({ min: lo, max: near }), fc.integer({ min: lo, max: hi }), fc.constantFrom(lo, hi));
}

/** The fast-check arbitrary of fuzz cases within `limits` (and `family`, when given). */
export function caseArbitrary(limits: CaseLimits, family?: CaseFamily): fc.Arbitrary<FuzzCase> {
  const maxT = limits.maxTokens ?? 5000;
  const maxE = limits.maxExperts ?? 9000;
  const maxK = limits.maxTopk ?? 128;
  const invalidRate = limits.invalidRate ?? 0.15;
  const [eLo, eHi] = family?.experts ?? [1, maxE];
  return fc.record({
    E: sized(eLo, Math.min(eHi, maxE, limits.maxElements)),
    op: fc.constantFrom(...(family?.ops ?? ["topk", "topk", "topk", "aux"] as const)),
    score: fc.constantFrom(...(family?.scores ?? ["softmax-pre", "softmax-post", "sigmoid", "sqrtsoftplus"] as const)),
    dtype: fc.constantFrom(...DTYPES),
    tokens: fc.integer({ min: 1, max: maxT }),
    small: fc.boolean(),
    split: fc.integer({ min: 0, max: 3 }),
    kPick: fc.integer({ min: 0, max: 1 << 30 }),
    kSmall: fc.boolean(),
    groupPick: fc.option(fc.integer({ min: 0, max: 1 << 30 }), { freq: 2 }),
    bias: fc.option(
      fc.record({ kind: fc.constantFrom("normal", "levels", "special"), dtype: fc.constantFrom(...DTYPES) }),
      {
        freq: 2,
      },
    ),
    scale: fc.option(
      fc.oneof(
        fc.constantFrom(2.5, 0.5, -1, 1e-30, 1e30, 0),
        fc.double({ min: -16, max: 16, noNaN: true }).map(Math.fround),
      ),
      { freq: 2 },
    ),
    layout: fc.constantFrom(...LAYOUTS),
    threshold: fc.option(fc.constantFrom(1, 2, 8, 33, Infinity), { freq: 2 }),
    data: fc.constantFrom<DataKind>("normal", "levels", "levels", "huge", "tiny", "special", "mixed"),
    gradSpecial: fc.boolean(),
    invalid: invalidRate <= 0 ? fc.constant<Invalid>("none") : fc.oneof(
      { arbitrary: fc.constant<Invalid>("none"), weight: Math.round(100 * (1 - invalidRate)) },
      { arbitrary: fc.constantFrom(...INVALIDS), weight: Math.round(100 * invalidRate) },
    ),
    seed: fc.integer({ min: 1, max: 0x7fffffff }),
  }).map((r): FuzzCase => {
    const E = r.E;
    const T = Math.max(1, Math.min(r.small ? Math.min(r.tokens, 64) : r.tokens, Math.floor(limits.maxElements / E)));
    const [kLo, kHi] = family?.topk ?? [1, maxK];
    const kMax = Math.max(1, Math.min(E, kHi));
    const kMin = Math.min(kMax, kLo);
    const K = r.kSmall ? kMin + (r.kPick % Math.min(kMax - kMin + 1, 8)) : kMin + (r.kPick % (kMax - kMin + 1));
    const softmax = r.score.startsWith("softmax");
    let groups: [number, number] | null = null;
    if (family === undefined && r.groupPick !== null && r.op === "topk") {
      const valid = validGroups(E, K);
      if (valid.length > 0) groups = valid[r.groupPick % valid.length]!;
    }
    let lead = [T];
    if (r.split > 0) {
      const d = divisors(T);
      const a = d[r.split % d.length]!;
      lead = r.split === 3 ? [a, 1, T / a] : [a, T / a];
    }
    const c: FuzzCase = {
      op: r.op,
      lead,
      E,
      K,
      dtype: r.dtype,
      score: r.score,
      groups,
      bias: softmax || r.op === "aux" ? null : r.bias,
      scale: r.op === "aux" ? null : r.scale,
      layout: r.op === "aux" ? (r.layout === "bitmap_u8" ? "bitmap_u8" : "bytemap") : r.layout,
      threshold: r.threshold,
      data: r.data,
      gradSpecial: r.gradSpecial,
      invalid: "none",
      seed: r.seed,
    };
    if (c.layout === "int16" || c.layout === "out-int16") c.layout = E <= 32767 ? c.layout : "int32";
    c.invalid = applicableInvalid(c, r.invalid);
    return c;
  });
}

// Keeps an invalid argument only where it applies to the case.
function applicableInvalid(c: FuzzCase, v: Invalid): Invalid {
  const dense = c.layout.startsWith("out-");
  switch (v) {
    case "groups":
    case "bias-softmax":
    case "bias-shape":
      return c.op === "topk" ? v : "topk";
    case "out-short":
    case "out-type":
    case "out-alias":
    case "out-dtype":
      return c.op === "topk" && dense ? v : "grad-shape";
    default:
      return v;
  }
}

/** A one-line description of a case, for failure messages. */
export function describeCase(c: FuzzCase): string {
  const shape = `[${[...c.lead, c.E].join(",")}]`;
  const parts = [
    c.op === "aux" ? "aux-scores" : "topk",
    shape,
    `k=${c.K}`,
    c.score,
    c.dtype,
    c.groups ? `G${c.groups[0]}/${c.groups[1]}` : "",
    c.bias ? `bias(${c.bias.kind},${c.bias.dtype})` : "",
    c.scale !== null ? `scale=${c.scale}` : "",
    c.layout,
    c.threshold !== null ? `radix>=${c.threshold}` : "",
    `data=${c.data}`,
    c.gradSpecial ? "grad-special" : "",
    c.invalid !== "none" ? `INVALID:${c.invalid}` : "",
    `seed=${c.seed}`,
  ];
  return parts.filter((p) => p !== "").join(" ");
}

// ---------------------------------------------------------------------------
// Data

const NEG_NAN = new Float32Array(new Uint32Array([0xffc00000]).buffer)[0]!;

/** One logit of a data kind. */
function draw(kind: Exclude<DataKind, "mixed">, rng: Rng, levels: number[]): number {
  switch (kind) {
    case "normal":
      return normal(rng) * 3;
    case "levels":
      return levels[Math.floor(rng() * levels.length)]!;
    case "huge": {
      const u = rng();
      if (u < 0.1) return levels[Math.floor(rng() * levels.length)]!;
      return (rng() < 0.5 ? -1 : 1) * 10 ** (rng() * 38.5); // up to ~3e38
    }
    case "tiny": {
      const u = rng();
      if (u < 0.1) return 0;
      if (u < 0.15) return -0;
      return (rng() < 0.5 ? -1 : 1) * 10 ** (-45 + rng() * 40); // subnormals up to 1e-5
    }
    case "special": {
      const u = rng();
      if (u < 0.06) return NaN;
      if (u < 0.08) return NEG_NAN;
      if (u < 0.12) return Infinity;
      if (u < 0.18) return -Infinity;
      return normal(rng) * 3;
    }
  }
}

/** The logits of a case as float32 values (representable in its dtype). */
export function logitsOf(c: FuzzCase, T: number): Float32Array {
  const rng = mulberry32(c.seed);
  const nLevels = 2 + Math.floor(rng() * 4);
  const levels = Array.from({ length: nLevels }, () => Math.round(normal(rng) * 8) / 4);
  const out = new Float32Array(T * c.E);
  const kinds = ["normal", "levels", "huge", "tiny", "special"] as const;
  for (let t = 0; t < T; t++) {
    const kind = c.data === "mixed" ? kinds[Math.floor(rng() * kinds.length)]! : c.data;
    const row = out.subarray(t * c.E, (t + 1) * c.E);
    // a few whole rows of one value (all NaN, all -Infinity, all equal)
    const whole = rng();
    if (kind === "special" && whole < 0.05) row.fill([NaN, -Infinity, Infinity][Math.floor(rng() * 3)]!);
    else if (whole < 0.03) row.fill(levels[0]!);
    else for (let e = 0; e < c.E; e++) row[e] = draw(kind, rng, levels);
  }
  return roundTo(out, c.dtype);
}

function biasOf(c: FuzzCase): Float32Array | undefined {
  if (c.bias === null) return undefined;
  const rng = mulberry32(c.seed ^ 0x5bd1e995);
  const levels = [0, 0.25, -0.125];
  const b = Float32Array.from({ length: c.E }, () => {
    if (c.bias!.kind === "levels") return levels[Math.floor(rng() * levels.length)]!;
    if (c.bias!.kind === "special") {
      const u = rng();
      if (u < 0.05) return Infinity;
      if (u < 0.1) return -Infinity;
      if (u < 0.13) return NaN;
    }
    return normal(rng) * 0.1;
  });
  return roundTo(b, c.bias.dtype);
}

function gradOf(c: FuzzCase, T: number): Float32Array {
  const rng = mulberry32(c.seed ^ 0x2545f491);
  const g = Float32Array.from({ length: T * c.E }, () => {
    if (c.gradSpecial) {
      const u = rng();
      if (u < 0.02) return NaN;
      if (u < 0.03) return Infinity;
    }
    return normal(rng);
  });
  return roundTo(g, c.op === "aux" ? "float32" : c.dtype);
}

/** The tensors and options of a case, as the library and the reference take them. */
export interface Materialized {
  T: number;
  logits: FloatTensor;
  x: Float32Array;
  bias: Float32Array | undefined;
  grad: FloatTensor;
  gradValues: Float32Array;
  ref: RefTopkOptions;
  topk: TopkOptions;
  aux: AuxScoresOptions;
}

const INDEX_CTOR = { int16: Int16Array, int32: Int32Array, int64: BigInt64Array } as const;

/** Builds a case's tensors and options (including its deliberate error, if any). */
export function materialize(c: FuzzCase): Materialized {
  const T = c.lead.reduce((a, b) => a * b, 1);
  const shape = [...c.lead, c.E];
  const x = logitsOf(c, T);
  const logits = { data: narrowTo(x, c.dtype), shape, dtype: c.dtype } as FloatTensor;
  const bias = biasOf(c);
  const gradValues = gradOf(c, T);
  const gradDtype = c.op === "aux" ? "float32" : c.dtype;
  const grad = { data: narrowTo(gradValues, gradDtype), shape, dtype: gradDtype } as FloatTensor;
  const scoreFunction: ScoreFunction = c.score.startsWith("softmax") ? "softmax" : c.score as ScoreFunction;
  const topk: TopkOptions = { topk: c.K, scoreFunction };
  if (c.score === "softmax-pre") topk.usePreSoftmax = true;
  if (c.groups) [topk.numGroups, topk.groupTopk] = c.groups;
  if (c.scale !== null) topk.scalingFactor = c.scale;
  if (bias) {
    topk.expertBias = { data: narrowTo(bias, c.bias!.dtype), shape: [c.E], dtype: c.bias!.dtype } as FloatTensor;
  }
  if (c.threshold !== null) topk.radixTopkThreshold = c.threshold;
  if (c.layout === "bitmap_u8") topk.routingMapFormat = "bitmap_u8";
  else if (c.layout.startsWith("out-")) {
    topk.indicesOut = new INDEX_CTOR[c.layout.slice(4) as IndexDType](T * c.K) as IndexArray;
  } else if (c.layout !== "bytemap") topk.indexDtype = c.layout as IndexDType;
  const aux: AuxScoresOptions = { topk: c.K, scoreFunction };
  if (c.layout === "bitmap_u8") aux.routingMapFormat = "bitmap_u8";
  if (c.threshold !== null) aux.radixTopkThreshold = c.threshold;
  const ref: RefTopkOptions = {
    topk: c.K,
    scoreFunction,
    usePreSoftmax: c.score === "softmax-pre",
    numGroups: c.groups?.[0],
    groupTopk: c.groups?.[1],
    scalingFactor: c.scale ?? undefined,
    expertBias: bias,
  };
  const m: Materialized = { T, logits, x, bias, grad, gradValues, ref, topk, aux };
  breakArguments(c, m);
  return m;
}

// Applies the case's deliberate error to its arguments.
function breakArguments(c: FuzzCase, m: Materialized): void {
  const { T, E, K } = { T: m.T, E: c.E, K: c.K };
  const o = m.topk;
  switch (c.invalid) {
    case "groups": {
      // a group setting that breaks one of the constraints of SPEC 2.3
      const rng = mulberry32(c.seed);
      for (let i = 0; i < 100; i++) {
        const G = 1 + Math.floor(rng() * Math.min(E + 2, 64));
        const GK = Math.floor(rng() * (G + 2)) - (rng() < 0.1 ? 1 : 0);
        if (GK > 0 && !groupsValid(E, K, G, GK)) {
          [o.numGroups, o.groupTopk] = [G, GK];
          return;
        }
      }
      [o.numGroups, o.groupTopk] = [E + 1, 1];
      return;
    }
    case "topk": {
      const bad = [0, -1, E + 1, 1.5, NaN][c.seed % 5]!;
      o.topk = bad;
      m.aux.topk = bad;
      return;
    }
    case "bias-softmax":
      o.scoreFunction = "softmax";
      o.expertBias = { data: new Float32Array(E), shape: [E], dtype: "float32" };
      delete o.usePreSoftmax;
      return;
    case "bias-shape":
      if (o.scoreFunction === "softmax") o.scoreFunction = "sigmoid";
      delete o.usePreSoftmax;
      o.expertBias = { data: new Float32Array(E + 1), shape: [E + 1], dtype: "float32" };
      return;
    case "out-short":
      o.indicesOut = new INDEX_CTOR[dtypeOfOut(c)](T * K - 1) as IndexArray;
      return;
    case "out-type":
      o.indicesOut = new (c.seed % 2 ? Float32Array : Uint32Array)(T * K) as unknown as IndexArray;
      return;
    case "out-alias": {
      // an index array over the logits' own bytes
      const d = m.logits.data;
      const bytes = Math.min(d.byteLength, T * K * 4);
      o.indicesOut = bytes === T * K * 4
        ? new Int32Array(d.buffer, d.byteOffset, T * K)
        : new Int16Array(d.buffer, d.byteOffset, 1 + (T * K - 1) % (d.byteLength / 2));
      if (o.indicesOut.length !== T * K) o.indicesOut = new Int16Array(d.buffer, d.byteOffset, 1);
      return;
    }
    case "out-dtype": {
      const dt = dtypeOfOut(c);
      o.indexDtype = dt === "int32" ? "int64" : "int32";
      return;
    }
    case "grad-shape":
      m.grad = { ...m.grad, shape: [T * E] };
      return;
    case "grad-dtype":
      // the top-k gradient must have the logits' dtype; the aux-scores gradient must be float32
      m.grad = c.op === "topk" && c.dtype !== "float32"
        ? { data: new Float32Array(T * E).fill(0.5), shape: m.grad.shape, dtype: "float32" }
        : { data: new Uint16Array(T * E), shape: m.grad.shape, dtype: "bfloat16" };
      return;
  }
}

function dtypeOfOut(c: FuzzCase): IndexDType {
  return c.layout.startsWith("out-") ? c.layout.slice(4) as IndexDType : "int32";
}

// ---------------------------------------------------------------------------
// Tolerances and tie classes

/** Relative rounding allowance for E experts: sums of E terms in an order each implementation chooses. */
function base(E: number): number {
  return 2e-6 * Math.max(1, Math.log2(E));
}

/** Extra allowance for values stored in a narrow dtype (one unit in the last place, and float16 subnormals). */
function narrow(dtype: FloatDType): { ulp: number; atol: number } {
  return { ulp: { float32: 0, float16: 2 ** -10, bfloat16: 2 ** -7 }[dtype], atol: dtype === "float16" ? 2 ** -24 : 0 };
}

/**
 * Whether experts a and b tie exactly in every correct float32
 * implementation: the same logit and bias, or scores pinned by saturation
 * or underflow (sigmoid of x >= 20 is 1; of x <= -120 is 0; softmax
 * weights below e^-120 are 0; sqrtsoftplus of x <= -220 is 0), or both
 * selection scores NaN, or the same infinity.
 */
function tieClass(
  score: FuzzCase["score"],
  x: Float32Array,
  bias: Float32Array | undefined,
  r: ArrayLike<number>,
  max: number,
): (a: number, b: number) => boolean {
  return (a, b) => {
    const ra = r[a]!;
    const rb = r[b]!;
    if (Number.isNaN(ra) && Number.isNaN(rb)) return true;
    if (ra !== rb) return false;
    if (!Number.isFinite(ra)) return true;
    const ba = bias?.[a] ?? 0;
    const bb = bias?.[b] ?? 0;
    if (!(ba === bb || (Number.isNaN(ba) && Number.isNaN(bb)))) return false;
    const xa = x[a]!;
    const xb = x[b]!;
    if (xa === xb || (Number.isNaN(xa) && Number.isNaN(xb))) return true;
    switch (score) {
      case "sigmoid":
        return (xa >= 20 && xb >= 20) || (xa <= -120 && xb <= -120);
      case "softmax-pre":
        return xa - max <= -120 && xb - max <= -120;
      case "sqrtsoftplus":
        return xa <= -220 && xb <= -220;
      default:
        return false;
    }
  };
}

/** Whether selection scores a and b are further apart than rounding (relative to the terms' sizes) can blur. */
function separated(ra: number, rb: number, size: number, margin: number): boolean {
  if (Number.isNaN(ra) !== Number.isNaN(rb)) return true; // NaN always ranks last
  if (Number.isNaN(ra)) return false;
  if (ra === rb) return false;
  if (!Number.isFinite(ra) || !Number.isFinite(rb)) return true;
  return Math.abs(ra - rb) > margin * size + 1e-36;
}

/** The top `per` experts of group g (of `size` experts) by selection score, NaN last, ties by index. */
function topMembers(r: ArrayLike<number>, g: number, size: number, per: number): number[] {
  const members = Array.from({ length: size }, (_, i) => g * size + i);
  return members.sort((p, q) => compareRank(r[p]!, p, r[q]!, q)).slice(0, per);
}

/**
 * Whether, around each of the given positions of a ranking, every entry too
 * close to call (`near`) ties exactly (`tie`) with the entry at the position:
 * then every correct implementation orders that stretch the same way.
 */
function bandsTie(
  ranked: readonly number[],
  positions: readonly number[],
  near: (a: number, b: number) => boolean,
  tie: (a: number, b: number) => boolean,
): boolean {
  for (const i of positions) {
    if (i < 0 || i >= ranked.length) continue;
    const a = ranked[i]!;
    for (let j = i + 1; j < ranked.length && near(a, ranked[j]!); j++) if (!tie(a, ranked[j]!)) return false;
    for (let j = i - 1; j >= 0 && near(a, ranked[j]!); j--) if (!tie(a, ranked[j]!)) return false;
  }
  return true;
}

/**
 * Below this sum of activations, a normalisation v = a / (sum + 1e-20) is
 * decided by float32 underflow (the reference flushes sqrtsoftplus below
 * x = -104 and sigmoid below x = -88 to 0, where the library keeps
 * subnormals or uses exp(x / 2)); such tokens' values are not compared.
 */
const UNDERFLOW_SUM = 1e-16;

/** Sum of the activations of some logits, in float64 (NaN counts as large: it propagates either way). */
function activationSum(xs: ArrayLike<number>, score: FuzzCase["score"]): number {
  let sum = 0;
  for (let i = 0; i < xs.length; i++) {
    const v = xs[i]!;
    if (Number.isNaN(v)) return Infinity;
    sum += score === "sigmoid" ? 1 / (1 + Math.exp(-v)) : Math.sqrt(v > 20 ? v : Math.log1p(Math.exp(v)));
  }
  return sum;
}

/** Rank order for validity checks: NaN lowest. */
function rankValue(v: number): number {
  return Number.isNaN(v) ? -Infinity : v;
}

/** Chosen experts of token t from a routing output, sorted ascending. */
function chosenOf(
  route: Uint8Array | IndexArray,
  layout: "bytemap" | "bitmap_u8" | "dense",
  t: number,
  E: number,
  K: number,
): number[] {
  const out: number[] = [];
  if (layout === "bytemap") {
    for (let e = 0; e < E; e++) {
      const v = (route as Uint8Array)[t * E + e]!;
      assert.ok(v === 0 || v === 1, `bytemap[${t}, ${e}] is ${v}, expected 0 or 1`);
      if (v) out.push(e);
    }
  } else if (layout === "bitmap_u8") {
    const w = Math.ceil(E / 8);
    for (let e = 0; e < 8 * w; e++) {
      if (((route as Uint8Array)[t * w + (e >> 3)]! >> (e & 7)) & 1) {
        assert.ok(e < E, `bitmap_u8 row ${t} sets padding bit ${e} (E=${E})`);
        out.push(e);
      }
    }
  } else {
    for (let i = 0; i < K; i++) out.push(Number(route[t * K + i]!));
    out.sort((a, b) => a - b);
  }
  return out;
}

// ---------------------------------------------------------------------------
// The check

/** Tokens whose routing was compared leniently (near ties), over all tokens checked. */
export interface CaseStats {
  tokens: number;
  nearTies: number;
}

/** Runs a case on every router and compares each with the reference (or, for invalid cases, with each other). */
export async function checkCase(routers: ReadonlyArray<[string, Router]>, c: FuzzCase): Promise<CaseStats> {
  const m = materialize(c);
  if (c.invalid !== "none") {
    await checkInvalid(routers, c, m);
    return { tokens: 0, nearTies: 0 };
  }
  let stats: CaseStats = { tokens: 0, nearTies: 0 };
  for (const [name, router] of routers) {
    try {
      stats = c.op === "topk" ? await checkTopk(router, c, m) : await checkAux(router, c, m);
    } catch (e) {
      if (e instanceof Error) e.message = `${name}: ${e.message}`;
      throw e;
    }
    if (m.topk.indicesOut) m.topk.indicesOut = new INDEX_CTOR[dtypeOfOut(c)](m.T * c.K) as IndexArray;
  }
  return stats;
}

/** The error an invalid call throws (or a failure when it throws none). */
async function errorOf(call: () => Promise<unknown>): Promise<Error | null> {
  try {
    await call();
    return null;
  } catch (e) {
    assert.ok(e instanceof Error, `threw a non-Error: ${String(e)}`);
    return e;
  }
}

async function checkInvalid(routers: ReadonlyArray<[string, Router]>, c: FuzzCase, m: Materialized): Promise<void> {
  let first: { name: string; error: Error } | null = null;
  const forwardFails = !c.invalid.startsWith("grad-");
  for (const [name, router] of routers) {
    const out = m.topk.indicesOut;
    const before = out ? new Uint8Array(out.buffer, out.byteOffset, out.byteLength).slice() : null;
    const logitsBefore = new Uint8Array(m.logits.data.buffer).slice();
    let error: Error | null;
    if (forwardFails) {
      error = await errorOf(() =>
        c.op === "topk"
          ? router.fusedTopkWithScoreFunction(m.logits, m.topk)
          : router.fusedComputeScoreForMoEAuxLoss(m.logits, m.aux)
      );
    } else if (c.op === "topk") {
      const r = await router.fusedTopkWithScoreFunction(m.logits, m.topk);
      error = await errorOf(() => router.fusedTopkWithScoreFunctionBackward(r.saved, m.grad));
    } else {
      const r = await router.fusedComputeScoreForMoEAuxLoss(m.logits, m.aux);
      error = await errorOf(() => router.fusedComputeScoreForMoEAuxLossBackward(r.saved, m.grad as Tensor<"float32">));
    }
    assert.ok(error !== null, `${name}: ${c.invalid} was accepted`);
    assert.ok(
      error instanceof TypeError || error instanceof RangeError,
      `${name}: ${c.invalid} threw ${error.constructor.name}: ${error.message}`,
    );
    assert.ok(!error.message.includes("\n") && error.message.length < 400, `${name}: message ${error.message}`);
    if (c.invalid === "groups") {
      assert.ok(
        /numGroups|groupTopk|topk/.test(error.message),
        `${name}: groups error names no argument: ${error.message}`,
      );
    }
    if (c.invalid.startsWith("out-")) assert.match(error.message, /indicesOut|indexDtype/, `${name}: message`);
    if (c.invalid.startsWith("grad-")) assert.match(error.message, /grad/, `${name}: message`);
    if (before && out && forwardFails) {
      assertBitIdentical(new Uint8Array(out.buffer, out.byteOffset, out.byteLength), before, `${name}: indicesOut`);
    }
    assertBitIdentical(new Uint8Array(m.logits.data.buffer), logitsBefore, `${name}: logits after ${c.invalid}`);
    if (first === null) first = { name, error };
    else {
      assert.strictEqual(error.constructor, first.error.constructor, `${name} vs ${first.name}: error class`);
      assert.strictEqual(error.message, first.error.message, `${name} vs ${first.name}: error message`);
    }
  }
}

/** Per-element tolerance: |a - e| <= atol[i] + rtol * |e|. */
function assertWithin(
  actual: Float32Array,
  expected: Float32Array,
  atol: Float32Array | number,
  rtol: number,
  rows: Set<number>,
  E: number,
  label: string,
): void {
  for (const t of rows) {
    const a = actual.subarray(t * E, (t + 1) * E);
    const e = expected.subarray(t * E, (t + 1) * E);
    if (typeof atol === "number") assertClose(a, e, { atol, rtol }, `${label} token ${t}`);
    else {
      for (let i = 0; i < E; i++) {
        assertClose(a[i]!, e[i]!, { atol: atol[t * E + i]!, rtol }, `${label} [${t}, ${i}]`);
      }
    }
  }
}

async function checkTopk(router: Router, c: FuzzCase, m: Materialized): Promise<CaseStats> {
  const { T, x } = m;
  const { E, K, dtype } = c;
  const ref = refTopkForward(x, T, E, m.ref);
  const result = await router.fusedTopkWithScoreFunction(m.logits, m.topk);
  const shape = [...c.lead, E];
  assert.deepStrictEqual([...result.probs.shape], shape, "probs shape");
  assert.strictEqual(result.probs.dtype, dtype, "probs dtype");
  const layout = c.layout === "bytemap" || c.layout === "bitmap_u8" ? c.layout : "dense";
  const route = (layout === "dense" ? result.indices?.data : result.routingMap?.data) as Uint8Array | IndexArray;
  assert.ok(route !== undefined, `${layout} output missing`);
  if (m.topk.indicesOut) assert.strictEqual(route, m.topk.indicesOut, "indicesOut is returned");

  const margin = 4 * base(E);
  const strict = new Set<number>();
  let nearTies = 0;
  for (let t = 0; t < T; t++) {
    const xt = x.subarray(t * E, (t + 1) * E);
    const { scores, selectionScores: r, selection } = routeToken(xt, m.ref);
    let max = -Infinity;
    for (const v of xt) max = Math.max(max, v);
    const tie = tieClass(c.score, xt, m.bias, r, max);
    const size = (e: number) => Math.abs(scores[e]!) + Math.abs(m.bias?.[e] ?? 0);
    const { ranked } = selection;
    const near = (a: number, b: number) => !separated(r[a]!, r[b]!, Math.max(size(a), size(b)), margin);
    // dense outputs promise the order too: every chosen position; maps only the K-th boundary
    const positions = layout === "dense" ? [...Array(K + 1).keys()] : [K - 1, K];
    let ok = bandsTie(ranked, positions, near, tie);
    if (ok && selection.groupScores && selection.rankedGroups && c.groups && c.groups[1] < c.groups[0]) {
      const [G, GK] = c.groups;
      const gs = selection.groupScores;
      const members = (g: number) => topMembers(r, g, E / G, K / GK);
      const groupSize = (g: number) => members(g).reduce((sum, e) => sum + (size(e) || 0), 0);
      // group scores made of members that tie one for one are equal in every implementation
      const sameMembers = (g: number, h: number) => {
        const mg = members(g);
        const mh = members(h);
        return mg.every((e, i) => tie(e, mh[i]!));
      };
      const nearGroups = (g: number, h: number) =>
        !separated(gs[g]!, gs[h]!, Math.max(groupSize(g), groupSize(h)), margin);
      ok = bandsTie(selection.rankedGroups, [GK - 1, GK], nearGroups, sameMembers);
    }
    const got = chosenOf(route, layout, t, E, K);
    const want = Array.from(ref.routing.subarray(t * K, (t + 1) * K)).sort((a, b) => a - b);
    if (ok) {
      strict.add(t);
      assert.deepStrictEqual(got, want, `token ${t}: chosen experts (reference ranking ${ranked.slice(0, K + 1)})`);
      if (layout === "dense") {
        assertArrayEqual(
          (route as IndexArray).subarray(t * K, (t + 1) * K),
          ref.routing.subarray(t * K, (t + 1) * K),
          `token ${t}: dense order`,
        );
      }
    } else {
      nearTies++;
      checkValidSelection(got, r, t, c, margin, size);
    }
  }

  // values of strict tokens, but for normalised sums so small that the reference's own float32
  // underflow (exp below e^-104) decides them
  const values = new Set(strict);
  if (c.score === "sigmoid" || c.score === "sqrtsoftplus") {
    for (const t of strict) {
      const chosen = Array.from(ref.routing.subarray(t * K, (t + 1) * K));
      if (K > 1 && activationSum(chosen.map((e) => x[t * E + e]!), c.score) < UNDERFLOW_SUM) values.delete(t);
    }
  }
  const tol = base(E);
  const nd = narrow(dtype);
  const scale = Math.abs(c.scale ?? 1);
  const probs = widen(result.probs);
  assertWithin(probs, roundTo(ref.probs, dtype), tol * scale + nd.atol, tol + nd.ulp, values, E, "probs");
  const interRows = c.score === "softmax-post" ? strict : new Set(Array.from({ length: T }, (_, t) => t));
  assertWithin(result.intermediate.data as Float32Array, ref.intermediate, tol, tol, interRows, E, "intermediate");
  // probs are exactly zero away from the chosen experts
  for (let t = 0; t < T; t++) {
    const chosen = new Set(chosenOf(route, layout, t, E, K));
    for (let e = 0; e < E; e++) {
      if (!chosen.has(e)) {
        assert.ok(probs[t * E + e] === 0, `probs[${t}, ${e}] = ${probs[t * E + e]} off the chosen set`);
      }
    }
  }

  const grad = await router.fusedTopkWithScoreFunctionBackward(result.saved, m.grad);
  assert.strictEqual(grad.dtype, dtype, "gradLogits dtype");
  assert.deepStrictEqual([...grad.shape], shape, "gradLogits shape");
  const refGrad = refTopkBackward(ref, m.gradValues);
  // NaN policy: an expert that was not chosen gets exactly 0 (but for pre-softmax, where every expert
  // is in the softmax), whatever its logit; the reference's literal 0 * activation'(x) gives NaN there
  // for x = NaN or infinite.
  if (c.score !== "softmax-pre") {
    for (let t = 0; t < T; t++) {
      const chosen = new Set(ref.routing.subarray(t * K, (t + 1) * K));
      for (let e = 0; e < E; e++) if (!chosen.has(e)) refGrad[t * E + e] = 0;
    }
  }
  const atol = topkGradBounds(ref.intermediate, ref.routing, m, c);
  for (let i = 0; i < atol.length; i++) atol[i] = tol * atol[i]! * 8 + nd.atol;
  assertWithin(widen(grad), roundTo(refGrad, dtype), atol, tol + nd.ulp, values, E, "gradLogits");
  result.saved.release();
  return { tokens: T, nearTies };
}

// A chosen set from a near-tie token must still be a top-k within rounding.
function checkValidSelection(
  got: number[],
  r: ArrayLike<number>,
  t: number,
  c: FuzzCase,
  margin: number,
  size: (e: number) => number,
): void {
  const { E, K } = c;
  assert.strictEqual(new Set(got).size, K, `token ${t}: ${got.length} distinct experts chosen, expected ${K}`);
  assert.ok(got.every((e) => Number.isInteger(e) && e >= 0 && e < E), `token ${t}: expert out of range in ${got}`);
  const chosen = new Set(got);
  if (c.groups) {
    const [G, GK] = c.groups;
    const groups = new Set(got.map((e) => Math.floor(e / (E / G))));
    assert.ok(groups.size <= GK, `token ${t}: ${groups.size} groups used, groupTopk ${GK}`);
    return;
  }
  let low = Infinity;
  let lowE = -1;
  for (const e of got) if (rankValue(r[e]!) < low) [low, lowE] = [rankValue(r[e]!), e];
  for (let e = 0; e < E; e++) {
    if (chosen.has(e)) continue;
    const v = rankValue(r[e]!);
    const slack = margin * Math.max(size(e) || 0, size(lowE) || 0) + 1e-36;
    assert.ok(
      v <= low + slack || (v === low),
      `token ${t}: expert ${e} (score ${r[e]}) left out while ${lowE} (score ${r[lowE]}) was chosen`,
    );
  }
}

/**
 * For every element of the top-k gradient, the magnitude of the terms that
 * make it (so that rounding is judged against them, not against a result
 * that may have cancelled): softmax y_i (|g_i| + sum |g y|); normalised
 * sigmoid / sqrtsoftplus (|g_i| / S + sum |g a| / S^2) |activation'|.
 */
function topkGradBounds(inter: Float32Array, routing: Int32Array, m: Materialized, c: FuzzCase): Float32Array {
  const { T } = m;
  const { E, K } = c;
  const scale = Math.abs(c.scale ?? 1);
  const out = new Float32Array(T * E);
  for (let t = 0; t < T; t++) {
    const chosen = Array.from(routing.subarray(t * K, (t + 1) * K));
    const y = inter.subarray(t * E, (t + 1) * E);
    const g = (e: number) => Math.abs(m.gradValues[t * E + e]!) * scale;
    if (c.score.startsWith("softmax")) {
      let d = 0;
      for (const e of chosen) d += g(e) * Math.abs(y[e]!);
      const experts = c.score === "softmax-pre" ? [...Array(E).keys()] : chosen;
      const isChosen = new Set(chosen);
      for (const e of experts) out[t * E + e] = Math.abs(y[e]!) * ((isChosen.has(e) ? g(e) : 0) + d) + 1e-30;
    } else {
      const act = (e: number) => c.score === "sigmoid" ? y[e]! : sqrtSoftplus(y[e]!);
      const deriv = (e: number) => {
        if (c.score === "sigmoid") return Math.abs(y[e]! * (1 - y[e]!));
        const xe = y[e]!;
        return Math.abs((xe > 20 ? 1 : sigmoid(xe)) / (2 * sqrtSoftplus(xe) + 1e-20));
      };
      let S = 1e-20;
      let D = 0;
      for (const e of chosen) {
        S += act(e);
        D += g(e) * Math.abs(act(e));
      }
      for (const e of chosen) {
        const pre = K > 1 ? g(e) / S + D / (S * S) : g(e);
        out[t * E + e] = pre * deriv(e) + 1e-30;
      }
    }
  }
  return out;
}

async function checkAux(router: Router, c: FuzzCase, m: Materialized): Promise<CaseStats> {
  const { T, x } = m;
  const { E, K } = c;
  const scoreFunction = m.aux.scoreFunction;
  const ref = refAuxScoresForward(x, T, E, { topk: K, scoreFunction });
  const result = await router.fusedComputeScoreForMoEAuxLoss(m.logits, m.aux);
  const layout = c.layout === "bitmap_u8" ? "bitmap_u8" : "bytemap";
  const margin = 4 * base(E);
  const strict = new Set<number>();
  let nearTies = 0;
  const values = new Set(Array.from({ length: T }, (_, t) => t));
  for (let t = 0; t < T; t++) {
    const xt = x.subarray(t * E, (t + 1) * E);
    const s = ref.scores.subarray(t * E, (t + 1) * E);
    const ranked = [...Array(E).keys()].sort((a, b) => compareRank(s[a]!, a, s[b]!, b));
    let max = -Infinity;
    for (const v of xt) max = Math.max(max, v);
    const tie = tieClass(scoreFunction === "softmax" ? "softmax-pre" : c.score, xt, undefined, s, max);
    const near = (a: number, b: number) =>
      !separated(s[a]!, s[b]!, Math.max(Math.abs(s[a]!) || 0, Math.abs(s[b]!) || 0), margin);
    const ok = bandsTie(ranked, [K - 1, K], near, tie);
    if (scoreFunction !== "softmax" && activationSum(xt, c.score) < UNDERFLOW_SUM) values.delete(t);
    const got = chosenOf(result.routingMap.data, layout, t, E, K);
    if (ok) {
      strict.add(t);
      const want = Array.from(ref.routing.subarray(t * K, (t + 1) * K)).sort((p, q) => p - q);
      assert.deepStrictEqual(got, want, `token ${t}: chosen experts`);
    } else {
      nearTies++;
      checkValidSelection(got, s, t, { ...c, groups: null }, margin, (e) => Math.abs(s[e]!));
    }
  }
  const tol = base(E);
  const all = new Set(Array.from({ length: T }, (_, t) => t));
  assertWithin(result.scores.data as Float32Array, ref.scores, tol, tol, values, E, "scores");
  assertWithin(result.intermediate.data as Float32Array, ref.intermediate, tol, tol, all, E, "intermediate");
  const grad = await router.fusedComputeScoreForMoEAuxLossBackward(result.saved, m.grad as Tensor<"float32">);
  assert.strictEqual(grad.dtype, c.dtype, "gradLogits dtype");
  const refGrad = refAuxScoresBackward(ref, m.gradValues);
  const bounds = auxGradBounds(ref.intermediate, m, c);
  const nd = narrow(c.dtype);
  for (let i = 0; i < bounds.length; i++) bounds[i] = tol * bounds[i]! * 8 + nd.atol;
  assertWithin(widen(grad), roundTo(refGrad, c.dtype), bounds, tol + nd.ulp, values, E, "gradLogits");
  result.saved.release();
  return { tokens: T, nearTies };
}

function auxGradBounds(inter: Float32Array, m: Materialized, c: FuzzCase): Float32Array {
  const { T } = m;
  const { E } = c;
  const out = new Float32Array(T * E);
  for (let t = 0; t < T; t++) {
    const y = inter.subarray(t * E, (t + 1) * E);
    const g = (e: number) => Math.abs(m.gradValues[t * E + e]!);
    if (c.score.startsWith("softmax")) {
      let d = 0;
      for (let e = 0; e < E; e++) d += g(e) * Math.abs(y[e]!);
      for (let e = 0; e < E; e++) out[t * E + e] = Math.abs(y[e]!) * (g(e) + d) + 1e-30;
    } else {
      const act = (e: number) => c.score === "sigmoid" ? y[e]! : sqrtSoftplus(y[e]!);
      let S = 1e-20;
      let D = 0;
      for (let e = 0; e < E; e++) {
        S += act(e);
        D += g(e) * Math.abs(act(e));
      }
      for (let e = 0; e < E; e++) {
        const xe = y[e]!;
        const deriv = c.score === "sigmoid"
          ? Math.abs(xe * (1 - xe))
          : Math.abs((xe > 20 ? 1 : sigmoid(xe)) / (2 * sqrtSoftplus(xe) + 1e-20));
        out[t * E + e] = (g(e) / S + D / (S * S)) * deriv + 1e-30;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// Running

/** Options of {@linkcode fuzz}. */
export interface FuzzRun {
  routers: ReadonlyArray<[string, Router]>;
  limits: CaseLimits;
  family?: CaseFamily;
  seed: number;
  runs: number;
  /** Called after each case (for progress). */
  onCase?: (i: number, c: FuzzCase, error: Error | null) => void;
  /** Stop at the first failure (default false: run all and count). */
  stopOnFailure?: boolean;
}

/** The result of a fuzz run: counts, near-tie statistics and each failure with its replay line. */
export interface FuzzReport {
  passed: number;
  failed: number;
  tokens: number;
  nearTies: number;
  failures: { index: number; caseSeed: number; description: string; message: string }[];
}

/**
 * The case of index i of a run with base seed `seed`: fast-check draws it
 * from its own seed (seed + i), so one failing case replays alone with
 * `FUZZ_SEED=<seed + i> --runs 1`.
 */
export function caseAt(seed: number, i: number, limits: CaseLimits, family?: CaseFamily): FuzzCase {
  const [c] = fc.sample(caseArbitrary(limits, family), { seed: (seed + i) | 0, numRuns: 1 });
  return c!;
}

/** Runs `runs` cases and reports; never throws for a failing case. */
export async function fuzz(run: FuzzRun): Promise<FuzzReport> {
  const report: FuzzReport = { passed: 0, failed: 0, tokens: 0, nearTies: 0, failures: [] };
  for (let i = 0; i < run.runs; i++) {
    const c = caseAt(run.seed, i, run.limits, run.family);
    let error: Error | null = null;
    try {
      const s = await checkCase(run.routers, c);
      report.tokens += s.tokens;
      report.nearTies += s.nearTies;
      report.passed++;
    } catch (e) {
      error = e instanceof Error ? e : new Error(String(e));
      report.failed++;
      report.failures.push({
        index: i,
        caseSeed: (run.seed + i) | 0,
        description: describeCase(c),
        message: error.message.split("\n").slice(0, 6).join("\n"),
      });
    }
    run.onCase?.(i, c, error);
    if (error && run.stopOnFailure) break;
  }
  return report;
}
