// The per-token kernels: top-k router forward and backward, and the aux-loss
// scores forward and backward (the same kernels in "aux" mode).
//
// Work layout: a workgroup of WG = 128 threads routes RPW = WG / TPR tokens;
// each token (a row of E experts) belongs to a team of TPR threads (a power
// of two, a uniform: one pipeline serves every E). Lane l of a team owns the
// experts e = l, l + TPR, l + 2 TPR, ... (coalesced loads). No thread keeps a
// per-expert array: values are re-read where they were written (the
// intermediate output, a key cache in workgroup memory), so that nothing is
// unrolled by the size of a row and shader compilation stays short.
//
// Workgroup memory is one scratch array `scr` carved into per-row regions
// at offsets the host computes (uniforms): the key cache (when the rows of a
// workgroup fit), the row's chosen-expert bit mask, group scores and flags,
// arg-max slots (naive) or histograms (radix). Team reductions of floats go
// through `red`. Every barrier sits in uniform control flow: rows past the
// end of the batch ("dead" rows) take part in the barriers and skip the work.
//
// Keys are the order-preserving u32 images of the selection scores, as on
// the CPU (wasm/assembly/router.ts): NaN -> KEY_NAN, -0 -> +0, an expert that
// may not be chosen -> KEY_OUT (0). Ordering: key descending, ties to the
// lower expert index, for the group scores, the naive rounds and the radix
// selection alike, so the chosen set (and the dense order) is the CPU's.
import type { ScoreFunction } from "../_types.ts";
import type { RouteFormat } from "../_validate.ts";
import type { FloatDType } from "../_types.ts";
import { MATH_WGSL } from "./_math.ts";
import type { KernelSource, StorageBinding } from "./_shader.ts";

/** Threads per workgroup of the per-token kernels. */
export const WG = 128;
/** 32-bit words of workgroup scratch (with `red`, under WebGPU's default 16 KiB). */
export const SCR_WORDS = 3584;
/** Words of one row's radix region: two 256-bin histograms (then the ranked candidates). */
const RADIX_WORDS = 512;
/** Fewest threads per row for the radix selection (bounds rows per workgroup, hence histograms). */
const RADIX_MIN_TPR = 32;
/** Largest K the radix path ranks for dense indices (candidates fit the row's radix region). */
export const RADIX_MAX_DENSE_K = RADIX_WORDS / 2;

/** What a forward pipeline is specialised on; also its cache key. */
export interface ForwardKey {
  kernel: "forward";
  /** "topk": router forward; "aux": scores for the aux loss (normalised, no bias or groups). */
  op: "topk" | "aux";
  score: ScoreFunction;
  pre: boolean;
  radix: boolean;
  grouped: boolean;
  /** Outputs whose words neighbouring rows or lanes share (odd 16-bit rows, int16 indices, ...) are written with atomics. */
  shared: boolean;
  /** Words of workgroup scratch (a multiple of 32): WGSL zero-fills workgroup memory at every launch, so it is kept small. */
  scr: number;
}
// The dtype, the routing output, the bias, the team size and the scratch
// layout are uniforms, not specialisations: they only change addresses,
// loads and stores, and fewer pipelines compile faster (compilation
// dominates on software adapters).

/** What a backward pipeline is specialised on; also its cache key. */
export interface BackwardKey {
  kernel: "backward";
  op: "topk" | "aux";
  score: ScoreFunction;
  pre: boolean;
  /** 16-bit rows of odd length share words: written with atomics. */
  shared: boolean;
  /** Words of workgroup scratch (a multiple of 32). */
  scr: number;
}

const UNIFORMS = [
  ["T", "u32"],
  ["E", "u32"],
  ["K", "u32"],
  ["G", "u32"],
  ["GK", "u32"],
  ["gsize", "u32"],
  ["per", "u32"],
  ["loPasses", "u32"],
  ["L", "u32"],
  ["scale", "f32"],
  // dt: 0 float32, 1 float16, 2 bfloat16; fmt: 0 bytemap, 1 bitmap_u8, 2 int16, 3 int32, 4 int64
  ["dt", "u32"],
  ["fmt", "u32"],
  ["hasBias", "u32"],
  ["biasDt", "u32"],
  // team size, mask words per row, key cache on/off, scratch offsets
  ["tpr", "u32"],
  ["mw", "u32"],
  ["cached", "u32"],
  ["oMask", "u32"],
  ["oG", "u32"],
  ["oW", "u32"],
] as const;

/** Uniforms every per-token kernel declares. */
export type RowUniforms = Record<(typeof UNIFORMS)[number][0], number>;

/** Codes of the dtype uniform. */
export const DT_CODE: Record<FloatDType, number> = { float32: 0, float16: 1, bfloat16: 2 };
/** Codes of the routing-output uniform. */
export const FMT_CODE: Record<RouteFormat, number> = { bytemap: 0, bitmap_u8: 1, int16: 2, int32: 3, int64: 4 };

function nextPow2(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/** A row layout: team size, and the scratch regions (uniform values). */
export interface RowLayout {
  /** Scratch words the layout uses, rounded up to 32 (a pipeline key field). */
  scr: number;
  tpr: number;
  rpw: number;
  mw: number;
  cached: number;
  oMask: number;
  oG: number;
  oW: number;
}

/**
 * The team size and scratch layout of a forward (or, with `backward`, a
 * backward) call: about 8 experts per lane; the key cache when the
 * workgroup's rows fit the scratch; fewer rows per workgroup when the
 * per-row regions do not fit; a RangeError where even one row does not.
 */
export function rowLayout(
  p: { E: number; G: number; grouped: boolean; radix: boolean; backward?: boolean },
): RowLayout {
  const { E } = p;
  const mw = Math.ceil(E / 32);
  let tpr = Math.min(WG, nextPow2(Math.ceil(E / 8)));
  if (p.radix) tpr = Math.max(tpr, RADIX_MIN_TPR);
  const perRow = (cached: boolean) =>
    (cached ? E : 0) + mw + (p.backward ? 0 : (p.grouped ? 2 * p.G : 0) + (p.radix ? RADIX_WORDS + 17 : 6));
  for (; tpr <= WG; tpr *= 2) {
    const rpw = WG / tpr;
    for (const cached of p.backward ? [false] : [true, false]) {
      if (rpw * perRow(cached) > SCR_WORDS) continue;
      const oMask = cached ? rpw * E : 0;
      const oG = oMask + rpw * mw;
      const oW = oG + (p.grouped ? rpw * 2 * p.G : 0);
      const scr = Math.min(SCR_WORDS, Math.max(32, Math.ceil((rpw * perRow(cached)) / 32) * 32));
      return { scr, tpr, rpw, mw, cached: cached ? 1 : 0, oMask, oG, oW };
    }
  }
  throw new RangeError(
    `the webgpu backend handles rows of up to ${
      32 * (SCR_WORDS - (p.radix ? RADIX_WORDS + 17 : 6) - (p.grouped ? 2 * p.G : 0))
    } experts${p.grouped ? ` with numGroups=${p.G}` : ""}, got numExperts=${E}; use the wasm backend`,
  );
}

// A reduction of v over the lanes of a team (tpr threads of one row) through
// the workgroup array `buf`, combining with `op`: up to 32 lanes each thread
// combines the team's values in lane order (a fixed order, so sums are the
// same on every lane); beyond, a tree. Barriers stay in uniform control flow.
function teamReduce(name: string, type: string, buf: string, op: (a: string, b: string) => string): string {
  return `fn ${name}(v: ${type}, li: u32, lane: u32) -> ${type} {
  workgroupBarrier();
  ${buf}[li] = v;
  workgroupBarrier();
  if (P.tpr <= 32u) {
    var acc = ${buf}[li - lane];
    for (var i = 1u; i < P.tpr; i = i + 1u) { acc = ${op("acc", `${buf}[li - lane + i]`)}; }
    return acc;
  }
  for (var s = P.tpr / 2u; s > 0u; s = s >> 1u) {
    if (lane < s) { ${buf}[li] = ${op(`${buf}[li]`, `${buf}[li + s]`)}; }
    workgroupBarrier();
  }
  return ${buf}[li - lane];
}`;
}

// Row helpers common to the per-token kernels: team reductions, scratch access.
const ROW_WGSL = /* wgsl */ `
const NONE: u32 = 0xffffffffu;
var<workgroup> red: array<f32, WG>;
var<workgroup> scr: array<atomic<u32>, SCR>;

fn sget(i: u32) -> u32 { return atomicLoad(&scr[i]); }
fn sset(i: u32, v: u32) { atomicStore(&scr[i], v); }
fn maskBit(mo: u32, e: u32) -> bool { return ((sget(mo + (e >> 5u)) >> (e & 31u)) & 1u) != 0u; }

// sum of v over the lanes of a team, in a fixed order: up to 32 lanes each
// thread adds the team's values in lane order; beyond, a tree
${teamReduce("rowSum", "f32", "red", (a, b) => `${a} + ${b}`)}
// max of v over the lanes of a team (same scheme)
${teamReduce("rowMax", "f32", "red", (a, b) => `max(${a}, ${b})`)}


// the float of element i of an input of dtype P.dt held as u32 words
fn widen(w: u32, i: u32) -> f32 {
  if (P.dt == 0u) { return bitcast<f32>(w); }
  let h = (w >> ((i & 1u) * 16u)) & 0xffffu;
  if (P.dt == 1u) { return f16ToF32(h); }
  return bitcast<f32>(h << 16u);
}

fn toHalf(v: f32) -> u32 {
  if (P.dt == 1u) { return f32ToF16(v); }
  return f32ToBf16(v);
}
`;

// WGSL storing into an output of u32 words: atomics where neighbouring rows
// (or lanes) share words, plain stores otherwise (atomic stores to storage
// memory are much slower on some GPUs). merge keeps the bits of \`keep\`.
function outputFns(buf: string, atomic: boolean): string {
  return atomic
    ? `fn put_${buf}(i: u32, v: u32) { atomicStore(&${buf}[i], v); }
fn merge_${buf}(i: u32, keep: u32, bits: u32) { atomicAnd(&${buf}[i], keep); atomicOr(&${buf}[i], bits); }`
    : `fn put_${buf}(i: u32, v: u32) { ${buf}[i] = v; }
fn merge_${buf}(i: u32, keep: u32, bits: u32) { ${buf}[i] = (${buf}[i] & keep) | bits; }`;
}

// WGSL writing one row of a float output (dtype P.dt) held as atomic u32
// words, the value of expert `e` being `value(e)`: float32 word by word;
// 16-bit as whole words, with and + or on the half of a word shared with the
// neighbouring row (a row may start or end mid-word).
function writeRow(buf: string, value: (e: string) => string): string {
  return /* wgsl */ `
    if (P.dt == 0u) {
      for (var e = lane; e < E; e = e + tpr) { put_${buf}(base + e, bitcast<u32>(${value("e")})); }
    } else {
      let w0 = base >> 1u;
      let w1 = (base + E - 1u) >> 1u;
      for (var w = w0 + lane; w <= w1; w = w + tpr) {
        let e0 = 2u * w - base; // 0xffffffff when the row starts mid-word
        let ok0 = 2u * w >= base;
        let ok1 = e0 + 1u < E;
        var bits = 0u;
        if (ok0) { bits = toHalf(${value("e0")}); }
        if (ok1) { bits = bits | (toHalf(${value("e0 + 1u")}) << 16u); }
        if (ok0 && ok1) { put_${buf}(w, bits); }
        else if (ok0) { merge_${buf}(w, 0xffff0000u, bits); }
        else { merge_${buf}(w, 0x0000ffffu, bits); }
      }
    }`;
}

/** The forward kernel (top-k router, or aux-loss scores) for a key. */
export function forwardKernel(k: ForwardKey): KernelSource {
  const { op, score, pre, radix, grouped } = k;
  const aux = op === "aux";
  const softmax = score === "softmax";
  const post = softmax && !pre && !aux;
  const storage: StorageBinding[] = [
    { name: "logits", elem: "u32", access: "read" },
    { name: "probs", elem: aux ? "f32" : k.shared ? "atomic<u32>" : "u32", access: "read_write" },
    { name: "inter", elem: "f32", access: "read_write" },
    { name: "route", elem: k.shared ? "atomic<u32>" : "u32", access: "read_write" },
    { name: "bias", elem: "u32", access: "read" },
  ];

  // the selection key of expert e of the row at `base`, recomputed from what
  // the score phase wrote (the key cache holds the same values)
  let rawKey: string;
  if (aux) rawKey = "keyOf(probs[base + e])";
  else if (post) rawKey = "keyOf(xAt(base + e))";
  else if (softmax) rawKey = "keyOf(inter[base + e])";
  else if (score === "sigmoid") rawKey = "keyOf(inter[base + e] + biasAt(e))";
  else rawKey = "keyOf(msqrtsoftplus(inter[base + e]) + biasAt(e))";

  const helpers = `${MATH_WGSL}
const SCR: u32 = ${k.scr}u;
${ROW_WGSL}
fn xAt(i: u32) -> f32 { return widen(logits[i >> select(0u, 1u, P.dt != 0u)], i); }
fn biasAt(e: u32) -> f32 {
  if (P.hasBias == 0u) { return 0.0; }
  if (P.biasDt == 0u) { return bitcast<f32>(bias[e]); }
  let h = (bias[e >> 1u] >> ((e & 1u) * 16u)) & 0xffffu;
  if (P.biasDt == 1u) { return f16ToF32(h); }
  return bitcast<f32>(h << 16u);
}
fn rawKey(base: u32, e: u32) -> u32 { return ${rawKey}; }
${aux ? "" : outputFns("probs", k.shared)}
${outputFns("route", k.shared)}
// the key of expert e: from the cache (rows at scr[row * E]) or recomputed
fn keyAt(row: u32, base: u32, e: u32) -> u32 {
  if (P.cached != 0u) { return sget(row * P.E + e); }
  return rawKey(base, e);
}
// the key, or KEY_OUT once chosen${grouped ? " or outside the kept groups" : ""}
fn liveKey(row: u32, base: u32, e: u32) -> u32 {
  if (maskBit(P.oMask + row * P.mw, e)) { return KEY_OUT; }
  ${grouped ? "if (sget(P.oG + (row * 2u + 1u) * P.G + e / P.gsize) == 0u) { return KEY_OUT; }" : ""}
  return keyAt(row, base, e);
}
// a dense index at position pos of the route
fn writeIndex(pos: u32, e: u32) {
  if (P.fmt == 2u) {
    let w = pos >> 1u;
    if ((pos & 1u) == 0u) { merge_route(w, 0xffff0000u, e); }
    else { merge_route(w, 0x0000ffffu, e << 16u); }
  } else if (P.fmt == 3u) {
    put_route(pos, e);
  } else {
    put_route(2u * pos, e);
    put_route(2u * pos + 1u, 0u);
  }
}
`;

  // ---- layout and scratch init --------------------------------------------------
  let body = /* wgsl */ `
  let tpr = P.tpr;
  let row = li / tpr;
  let lane = li % tpr;
  let t = wg * (WG / tpr) + row;
  let live = t < P.T;
  let E = P.E;
  let base = t * E;
  let mo = P.oMask + row * P.mw;
  let cache = row * E;
  for (var i = lane; i < P.mw; i = i + tpr) { sset(mo + i, 0u); }
`;

  // ---- score --------------------------------------------------------------------
  if (softmax && (pre || aux)) {
    body += `
  // score: softmax over all experts, max-subtracted so that exp never overflows
  var ms = negInf();
  if (live) { for (var e = lane; e < E; e = e + tpr) { ms = max(ms, xAt(base + e)); } }
  ms = rowMax(ms, li, lane);
  var zs = 0.0;
  if (live) { for (var e = lane; e < E; e = e + tpr) { zs = zs + mexp(xAt(base + e) - ms); } }
  zs = rowSum(zs, li, lane);
  if (live) {
    for (var e = lane; e < E; e = e + tpr) {
      let s = mexp(xAt(base + e) - ms) / zs;
      inter[base + e] = s;
      ${aux ? "probs[base + e] = s;" : ""}
      if (P.cached != 0u) { sset(cache + e, keyOf(s)); }
    }
  }
`;
  } else if (aux) {
    body += `
  // score: ${score}, normalised over every expert: a / (sum(a) + eps); the
  // intermediate keeps ${score === "sigmoid" ? "sigmoid(x)" : "the raw logits"}
  var z = 0.0;
  if (live) {
    for (var e = lane; e < E; e = e + tpr) {
      let x = xAt(base + e);
      ${
      score === "sigmoid"
        ? "let a = msigmoid(x);\n      inter[base + e] = a;"
        : "let a = msqrtsoftplus(x);\n      inter[base + e] = x;"
    }
      z = z + a;
    }
  }
  z = rowSum(z, li, lane) + EPS;
  if (live) {
    for (var e = lane; e < E; e = e + tpr) {
      let s = ${score === "sigmoid" ? "inter[base + e]" : "msqrtsoftplus(inter[base + e])"} / z;
      probs[base + e] = s;
      if (P.cached != 0u) { sset(cache + e, keyOf(s)); }
    }
  }
`;
  } else if (post) {
    body += `
  // score: post softmax selects on the logits themselves
  if (live && P.cached != 0u) { for (var e = lane; e < E; e = e + tpr) { sset(cache + e, keyOf(xAt(base + e))); } }
`;
  } else {
    body += `
  // score: ${score}; the intermediate keeps ${score === "sigmoid" ? "sigmoid(x)" : "the raw logits"}; keys of s + bias
  if (live) {
    for (var e = lane; e < E; e = e + tpr) {
      let x = xAt(base + e);
      ${
      score === "sigmoid"
        ? "let s = msigmoid(x);\n      inter[base + e] = s;"
        : "let s = msqrtsoftplus(x);\n      inter[base + e] = x;"
    }
      if (P.cached != 0u) { sset(cache + e, keyOf(s + biasAt(e))); }
    }
  }
`;
  }
  body += `
  storageBarrier();
  workgroupBarrier();
`;

  // ---- group limit -----------------------------------------------------------------
  if (grouped) {
    body += `
  // group limit: a group's score is the sum of its top (K / GK) selection
  // scores, added in descending order (one thread per group, each pick the
  // best key strictly below the last in (key desc, index asc) order); the
  // GK best groups are kept (ties: lower group), the others excluded.
  let gs = P.oG + row * 2u * P.G;
  if (live) {
    for (var g = lane; g < P.G; g = g + tpr) {
      var sum = 0.0;
      var pk = NONE;
      var pi = 0u;
      for (var r = 0u; r < P.per; r = r + 1u) {
        var bk = 0u;
        var bi = NONE;
        for (var e = g * P.gsize; e < (g + 1u) * P.gsize; e = e + 1u) {
          let kk = keyAt(row, base, e);
          let below = r == 0u || kk < pk || (kk == pk && e > pi);
          if (below && (bi == NONE || kk > bk)) { bk = kk; bi = e; }
        }
        sum = sum + floatOfKey(bk);
        pk = bk;
        pi = bi;
      }
      sset(gs + g, keyOf(sum));
    }
  }
  workgroupBarrier();
  if (live) {
    for (var g = lane; g < P.G; g = g + tpr) {
      let kg = sget(gs + g);
      var above = 0u;
      for (var h = 0u; h < P.G; h = h + 1u) {
        let kh = sget(gs + h);
        if (kh > kg || (kh == kg && h < g)) { above = above + 1u; }
      }
      sset(gs + P.G + g, select(0u, 1u, above < P.GK));
    }
  }
  workgroupBarrier();
`;
  }

  // value of a chosen expert before normalisation (v), used by the sums and the write
  const vOf = aux
    ? ""
    : post
    ? "mexp(xAt(base + e) - m)"
    : softmax
    ? "inter[base + e]"
    : score === "sigmoid"
    ? "inter[base + e]"
    : "msqrtsoftplus(inter[base + e])";

  // ---- selection ----------------------------------------------------------------------
  if (!radix) {
    body += `
  // select (naive): K rounds of arg-max over the team, ties to the lower
  // index; each lane keeps its own best (rescanned only when it wins); a
  // round is an atomicMax of the keys, then an atomicMin of the indices that
  // hold it. Three slots rotate so that a slot is reset two barriers before
  // its next use. The winner marks the mask, writes its dense index at the
  // round's position and adds its value to the lane's part of the sum.
  let wo = P.oW + row * 6u;
  var bk = 0u;
  var bi = NONE;
  if (live) { for (var e = lane; e < E; e = e + tpr) { let kk = liveKey(row, base, e); if (kk > bk) { bk = kk; bi = e; } } }
  if (lane == 0u) { sset(wo, 0u); sset(wo + 1u, 0u); sset(wo + 3u, NONE); sset(wo + 4u, NONE); }
  ${post ? "var m = 0.0;" : ""}
  var zpart = 0.0;
  workgroupBarrier();
  for (var k = 0u; k < P.K; k = k + 1u) {
    let slot = wo + k % 3u;
    if (bk != 0u) { atomicMax(&scr[slot], bk); }
    workgroupBarrier();
    let wk = sget(slot);
    if (bk != 0u && bk == wk) { atomicMin(&scr[slot + 3u], bi); }
    workgroupBarrier();
    let win = sget(slot + 3u);
    if (lane == 0u) { let nx = wo + (k + 2u) % 3u; sset(nx, 0u); sset(nx + 3u, NONE); }
    ${post ? "if (k == 0u) { m = floatOfKey(wk); } // the largest chosen logit" : ""}
    if (bk != 0u && win == bi) {
      let e = bi;
      atomicOr(&scr[mo + (e >> 5u)], 1u << (e & 31u));
      if (P.fmt >= 2u) { writeIndex(t * P.K + k, e); }
      ${aux ? "" : `zpart = zpart + ${vOf};`}
      bk = 0u;
      bi = NONE;
      for (var j = lane; j < E; j = j + tpr) { let kk = liveKey(row, base, j); if (kk > bk) { bk = kk; bi = j; } }
    }
  }
`;
  } else {
    body += `
  // select (radix): find the K-th largest of the composite (key, E-1-e) with
  // 8-bit histogram passes, four over the key bits, then loPasses over the
  // inverted index (so ties go to the lower index); the picks are the
  // elements at or above it: exactly K. Histograms are double-buffered so a
  // pass needs two barriers. O(E / TPR) per lane and pass, whatever K.
  let ho = P.oW + row * ${RADIX_WORDS + 17}u;
  let co = ho + ${RADIX_WORDS}u;
  for (var i = lane; i < ${RADIX_WORDS}u; i = i + tpr) { sset(ho + i, 0u); }
  if (lane == 0u) { sset(co + 16u, 0u); }
  workgroupBarrier();
  var prefix = 0u;
  var pmask = 0u;
  var lprefix = 0u;
  var lmask = 0u;
  var need = P.K;
  let npass = 4u + P.loPasses;
  for (var p = 0u; p < npass; p = p + 1u) {
    let hb = ho + (p & 1u) * 256u;
    let inKey = p < 4u;
    let shift = select(((P.loPasses + 3u) - p) * 8u, 24u - 8u * p, inKey);
    if (live) {
      for (var e = lane; e < E; e = e + tpr) {
        let kk = liveKey(row, base, e);
        let lo = E - 1u - e;
        var hit = (kk & pmask) == prefix;
        var digit = (kk >> shift) & 255u;
        if (!inKey) { hit = kk == prefix && (lo & lmask) == lprefix; digit = (lo >> shift) & 255u; }
        if (hit) { atomicAdd(&scr[hb + digit], 1u); }
      }
    }
    workgroupBarrier();
    let nb = ho + ((p + 1u) & 1u) * 256u;
    for (var i = lane; i < 256u; i = i + tpr) { sset(nb + i, 0u); }
    for (var c = lane; c < 16u; c = c + tpr) {
      var n = 0u;
      for (var b = 0u; b < 16u; b = b + 1u) { n = n + sget(hb + c * 16u + b); }
      sset(co + c, n);
    }
    workgroupBarrier();
    // scan from the top bin down to the one holding the need-th element
    var c = 15u;
    loop {
      let n = sget(co + c);
      if (n >= need || c == 0u) { break; }
      need = need - n;
      c = c - 1u;
    }
    var bin = c * 16u + 15u;
    loop {
      let n = sget(hb + bin);
      if (n >= need || bin == c * 16u) { break; }
      need = need - n;
      bin = bin - 1u;
    }
    if (inKey) { prefix = prefix | (bin << shift); pmask = pmask | (255u << shift); }
    else { lprefix = lprefix | (bin << shift); lmask = lmask | (255u << shift); }
  }
  workgroupBarrier(); // every lane has scanned the last histogram: its region is free
  // the picks: mark the mask; dense output: list them (key, E-1-e) for ranking
  if (live) {
    for (var e = lane; e < E; e = e + tpr) {
      let kk = liveKey(row, base, e);
      if (kk > prefix || (kk == prefix && E - 1u - e >= lprefix)) {
        atomicOr(&scr[mo + (e >> 5u)], 1u << (e & 31u));
        if (P.fmt >= 2u) {
          let at = atomicAdd(&scr[co + 16u], 1u);
          sset(ho + 2u * at, kk);
          sset(ho + 2u * at + 1u, E - 1u - e);
        }
      }
    }
  }
  workgroupBarrier();
  // rank the picks (key descending, then index ascending) for the dense output
  if (live && P.fmt >= 2u) {
    for (var i = lane; i < P.K; i = i + tpr) {
      let kk = sget(ho + 2u * i);
      let lo = sget(ho + 2u * i + 1u);
      var above = 0u;
      for (var j = 0u; j < P.K; j = j + 1u) {
        let ck = sget(ho + 2u * j);
        if (ck > kk || (ck == kk && sget(ho + 2u * j + 1u) > lo)) { above = above + 1u; }
      }
      writeIndex(t * P.K + above, E - 1u - lo);
    }
  }
`;
    if (!aux) {
      body += `
  // sums over the picks
  ${
        post
          ? "var m = negInf();\n  if (live) { for (var e = lane; e < E; e = e + tpr) { if (maskBit(mo, e)) { m = max(m, xAt(base + e)); } } }\n  m = rowMax(m, li, lane);"
          : ""
      }
  var zpart = 0.0;
  if (live) { for (var e = lane; e < E; e = e + tpr) { if (maskBit(mo, e)) { zpart = zpart + ${vOf}; } } }
`;
    }
  }

  // ---- values and outputs ----------------------------------------------------------------
  if (!aux) {
    if (post) {
      body += `
  // values: softmax over the K chosen logits (max-subtracted): y = exp(x - m) / z
  let z = rowSum(zpart, li, lane);
`;
    } else if (!softmax) {
      body += `
  // values: the unbiased scores of the chosen, normalised when K > 1: v / (sum(v) + eps)
  var z = rowSum(zpart, li, lane) + EPS;
  if (P.K == 1u) { z = 1.0; }
`;
    } else {
      body += `
  let z = 1.0; // pre softmax: the values are the scores
`;
    }
    body += `
  workgroupBarrier();
  // write: probs = c * v at the chosen experts, 0 elsewhere${
      post ? "; intermediate: the K-way softmax, -inf elsewhere" : ""
    }
  if (live) {
${writeRow("probs", (e) => `probValue(base, mo, ${e}, ${post ? "m" : "0.0"}, z)`)}
    ${
      post
        ? "for (var e = lane; e < E; e = e + tpr) { inter[base + e] = select(negInf(), mexp(xAt(base + e) - m) / z, maskBit(mo, e)); }"
        : ""
    }
  }
`;
  } else {
    body += `
  workgroupBarrier();
`;
  }

  body += `
  // write: the routing map, one word at a time from the row's bit mask (words
  // shared with a neighbouring row: and + or on this row's bytes only)
  if (live && P.fmt < 2u) {
    let bitmap = P.fmt == 1u;
    let len = select(E, P.L, bitmap);
    let rb = t * len;
    for (var w = (rb >> 2u) + lane; w <= ((rb + len - 1u) >> 2u); w = w + tpr) {
      var val = 0u;
      var msk = 0u;
      for (var b = 0u; b < 4u; b = b + 1u) {
        let at = 4u * w + b;
        if (at >= rb && at < rb + len) {
          let i = at - rb;
          msk = msk | (255u << (8u * b));
          var byte = (sget(mo + (i >> 2u)) >> ((i & 3u) * 8u)) & 255u;
          if (!bitmap) { byte = (sget(mo + (i >> 5u)) >> (i & 31u)) & 1u; }
          val = val | (byte << (8u * b));
        }
      }
      if (msk == 0xffffffffu) { put_route(w, val); }
      else { merge_route(w, ~msk, val); }
    }
  }
`;

  // the row's value function for the probs write (needs m, z, mo, base in scope: a closure by text)
  const probAt = aux ? "" : `
fn probValue(base: u32, mo: u32, e: u32, m: f32, z: f32) -> f32 {
  if (!maskBit(mo, e)) { return 0.0; }
  return P.scale * (${vOf} / z);
}`;

  return {
    label: `moe-router ${JSON.stringify(k)}`,
    uniforms: UNIFORMS,
    storage,
    consts: {},
    helpers: helpers + probAt,
    body,
    workgroupSize: WG,
  };
}

/** The backward kernel (top-k router, or aux-loss scores) for a key. */
export function backwardKernel(k: BackwardKey): KernelSource {
  const { op, score, pre } = k;
  const aux = op === "aux";
  const storage: StorageBinding[] = [
    { name: "grad", elem: "u32", access: "read" },
    { name: "inter", elem: "f32", access: "read" },
    { name: "route", elem: "u32", access: "read" },
    { name: "out", elem: k.shared ? "atomic<u32>" : "u32", access: "read_write" },
  ];
  const gOf = aux
    ? "bitcast<f32>(grad[base + e])"
    : "widen(grad[(base + e) >> select(0u, 1u, P.dt != 0u)], base + e) * P.scale";
  // a = the activation of sigmoid / sqrtsoftplus from the saved y
  const aOf = score === "sigmoid" ? "y" : "msqrtsoftplus(y)";
  const dense = score === "softmax" && (pre || aux); // every expert gets a gradient
  let gradOf: string;
  if (score === "softmax") {
    gradOf = `
  let y = inter[base + e];
  if (!chosen(t, mo, base, e)) { ${dense ? "return y * (0.0 - d.x);" : "return 0.0;"} }
  return y * (${gOf} - d.x);`;
  } else {
    gradOf = `
  if (!chosen(t, mo, base, e)) { return 0.0; }
  let y = inter[base + e];
  let a = ${aOf};
  var g = ${gOf};
  if (${aux ? "true" : "P.K > 1u"}) { g = g / d.x - d.y; }
  ${
      score === "sigmoid"
        ? "return g * (y * (1.0 - y));"
        : "let sg = select(msigmoid(y), 1.0, !isNan(y) && y > SOFTPLUS_LINEAR);\n  return g * (sg / (2.0 * a + EPS));"
    }`;
  }
  const helpers = `${MATH_WGSL}
const SCR: u32 = ${k.scr}u;
${ROW_WGSL}
var<workgroup> red2: array<vec2<f32>, WG>;
${outputFns("out", k.shared)}
${teamReduce("rowSum2", "vec2<f32>", "red2", (a, b) => `${a} + ${b}`)}

// whether expert e of row t is in its routing output (maps read in place; dense went to the mask)
fn chosen(t: u32, mo: u32, base: u32, e: u32) -> bool {${
    aux ? "\n  return true;\n}" : `
  if (P.fmt == 0u) { return ((route[(base + e) >> 2u] >> (((base + e) & 3u) * 8u)) & 255u) != 0u; }
  if (P.fmt == 1u) {
    let b = t * P.L + (e >> 3u);
    return ((route[b >> 2u] >> ((b & 3u) * 8u + (e & 7u))) & 1u) != 0u;
  }
  return maskBit(mo, e);
}`
  }

// expert id at position pos of the dense indices (NONE when it cannot be one)
fn denseIndex(pos: u32) -> u32 {
  if (P.fmt == 2u) { return (route[pos >> 1u] >> ((pos & 1u) * 16u)) & 0xffffu; } // negative int16: >= 32768, out of range
  if (P.fmt == 3u) { return route[pos]; }
  return select(NONE, route[2u * pos], route[2u * pos + 1u] == 0u);
}

// the gradient of logit e; d = the row's sums (${
    score === "softmax" ? "x: sum of g * y over the chosen" : "x: S = sum(a) + eps, y: D / S^2"
  })
fn gradValue(t: u32, mo: u32, base: u32, e: u32, d: vec2<f32>) -> f32 {${gradOf}
}
`;

  let body = /* wgsl */ `
  let tpr = P.tpr;
  let row = li / tpr;
  let lane = li % tpr;
  let t = wg * (WG / tpr) + row;
  let live = t < P.T;
  let E = P.E;
  let base = t * E;
  let mo = P.oMask + row * P.mw;
`;
  if (!aux) {
    body += `
  // load: the chosen set from dense indices, as the row's bit mask (the
  // barriers stay outside branches: llvmpipe hangs on some uniform branches
  // around loops)
  for (var i = lane; i < P.mw; i = i + tpr) { sset(mo + i, 0u); }
  workgroupBarrier();
  if (live && P.fmt >= 2u) {
    for (var q = lane; q < P.K; q = q + tpr) {
      let e = denseIndex(t * P.K + q);
      if (e < E) { atomicOr(&scr[mo + (e >> 5u)], 1u << (e & 31u)); }
    }
  }
  workgroupBarrier();
`;
  }
  if (score === "softmax") {
    body += `
  // softmax backward: g_i = y_i * (g_i - d), d = sum over the chosen of g * y${
      dense ? " (every expert: g = 0 where not chosen)" : " (chosen only; y is -inf elsewhere)"
    }
  var acc = 0.0;
  if (live) { for (var e = lane; e < E; e = e + tpr) { if (chosen(t, mo, base, e)) { acc = acc + ${gOf} * inter[base + e]; } } }
  let d = vec2<f32>(rowSum(acc, li, lane), 0.0);
`;
  } else {
    body += `
  // normalisation backward: g_i = g_i / S - D / S^2, S = sum(a) + eps, D = sum(g * a) over the chosen;
  // then the activation backward: ${
      score === "sigmoid"
        ? "g *= y * (1 - y)"
        : "g *= sigmoid(x) / (2 * a + eps) (above x = 20 softplus is the identity: derivative 1)"
    }
  var acc = vec2<f32>(0.0, 0.0);
  if (live) {
    for (var e = lane; e < E; e = e + tpr) {
      if (chosen(t, mo, base, e)) { let y = inter[base + e]; let a = ${aOf}; acc = acc + vec2<f32>(a, ${gOf} * a); }
    }
  }
  let sd = rowSum2(acc, li, lane);
  let S = sd.x + EPS;
  let d = vec2<f32>(S, sd.y / (S * S));
`;
  }
  body += `
  // write: gradLogits in the logits dtype${dense ? "" : " (0 where not chosen)"}
  if (live) {
${writeRow("out", (e) => `gradValue(t, mo, base, ${e}, d)`)}
  }
`;
  return {
    label: `moe-router ${JSON.stringify(k)}`,
    uniforms: UNIFORMS,
    storage,
    consts: {},
    helpers,
    body,
    workgroupSize: WG,
  };
}
