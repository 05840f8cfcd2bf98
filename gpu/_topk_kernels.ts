// The per-token kernels: top-k router forward and backward, and the aux-loss
// scores forward and backward (which are the same kernels in "aux" mode).
//
// Work layout: a workgroup of WG = 256 threads routes RPW = WG / TPR tokens;
// each token (a row of E experts) belongs to TPR threads, and each thread
// keeps EPT of the row's experts in registers. A thread owns pairs of
// neighbouring experts (one 32-bit word of a 16-bit row), strided by TPR:
//
//   element j of lane l:  e = 2 * (l + (j / 2) * TPR) + (j % 2) - o
//
// where o = 1 when a 16-bit row starts in the middle of a word (t * E odd),
// so that each thread reads and writes whole words; the half words at the two
// ends of such a row are shared with the neighbouring rows and written with
// atomics (and + or on the thread's own half only). Elements outside [0, E)
// (e wraps to 0xffffffff for the leading half) are masked everywhere.
//
// Row reductions go through workgroup memory (a tree over the TPR lanes);
// every barrier sits in uniform control flow: rows past the end of the batch
// ("dead" rows) take part in the barriers and skip the work.
import type { FloatDType, ScoreFunction } from "../_types.ts";
import type { RouteFormat } from "../_validate.ts";
import { MATH_WGSL } from "./_math.ts";
import type { KernelSource, StorageBinding } from "./_shader.ts";

/** Threads per workgroup of the per-token kernels. */
export const WG = 256;
const RADIX_MIN_TPR = 64;

/** What a forward pipeline is specialised on; also its cache key. */
export interface ForwardKey {
  kernel: "forward";
  /** "topk": router forward; "aux": scores for the aux loss (normalised, no bias or groups). */
  op: "topk" | "aux";
  score: ScoreFunction;
  pre: boolean;
  radix: boolean;
  grouped: boolean;
  tpr: number;
  ept: number;
  /** Group slots per row (>= numGroups), 1 without groups. */
  gcap: number;
  /** Candidate slots per row for ranking radix picks (dense output), 1 otherwise. */
  kcap: number;
}
// The dtype, the routing output and the bias are uniforms (P.dt, P.fmt,
// P.hasBias), not specialisations: they only change loads and stores, and
// fewer pipelines compile faster (shader compilation dominates on software
// adapters).

/** What a backward pipeline is specialised on; also its cache key. */
export interface BackwardKey {
  kernel: "backward";
  op: "topk" | "aux";
  score: ScoreFunction;
  pre: boolean;
  tpr: number;
  ept: number;
}

function nextPow2(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/** Threads per row and elements per thread for E experts (16-bit rows may start mid-word). */
export function rowLayout(E: number, half: boolean, minTpr = 1, tprAtLeast = 1): { tpr: number; ept: number } {
  const slots = Math.ceil((E + (half ? 1 : 0)) / 2);
  const tpr = Math.min(WG, Math.max(minTpr, tprAtLeast, nextPow2(Math.ceil(slots / 4))));
  return { tpr, ept: 2 * nextPow2(Math.ceil(slots / tpr)) };
}

/** Bytes of workgroup memory a forward pipeline declares. */
export function forwardSharedBytes(k: Pick<ForwardKey, "tpr" | "ept" | "radix" | "grouped" | "gcap" | "kcap">): number {
  const rpw = WG / k.tpr;
  let n = WG * 4; // red
  if (!k.radix) n += rpw * 6 * 4; // wbest, widx
  n += rpw * maskWords(k) * 4;
  if (k.grouped) n += rpw * k.gcap * 16;
  if (k.radix) n += rpw * (512 + 16) * 4 + rpw * (k.kcap * 8 + 4);
  return n;
}

function maskWords(k: { tpr: number; ept: number }): number {
  return Math.max(1, Math.ceil((k.tpr * k.ept) / 32));
}

/**
 * Picks the forward pipeline for a call: the row layout, and the selection
 * algorithm (radix when K >= threshold, as on the CPU; the two give the same
 * set and order, so naive stands in for radix where the radix ranking would
 * not fit workgroup memory).
 */
export function forwardKey(
  p: {
    op: "topk" | "aux";
    score: ScoreFunction;
    pre: boolean;
    dtype: FloatDType;
    E: number;
    K: number;
    G: number;
    grouped: boolean;
    radixThreshold: number;
  },
  sharedLimit: number,
): ForwardKey {
  const half = p.dtype !== "float32";
  let radix = p.K >= p.radixThreshold;
  for (;;) {
    let tprAtLeast = 1;
    for (;;) {
      const { tpr, ept } = rowLayout(p.E, half, radix ? RADIX_MIN_TPR : 1, tprAtLeast);
      const key: ForwardKey = {
        kernel: "forward",
        op: p.op,
        score: p.score,
        pre: p.op === "topk" && p.pre,
        radix,
        grouped: p.grouped,
        tpr,
        ept,
        gcap: p.grouped ? nextPow2(p.G) : 1,
        kcap: radix ? nextPow2(p.K) : 1,
      };
      if (forwardSharedBytes(key) <= sharedLimit) return key;
      if (tpr >= WG) break;
      tprAtLeast = tpr * 2;
    }
    if (radix) {
      radix = false;
      continue;
    }
    throw new RangeError(
      `numGroups=${p.G} needs more workgroup memory than this device has (${sharedLimit} bytes) for E=${p.E}`,
    );
  }
}

/** The backward pipeline for a call. */
export function backwardKey(
  p: { op: "topk" | "aux"; score: ScoreFunction; pre: boolean; dtype: FloatDType; E: number },
): BackwardKey {
  const { tpr, ept } = rowLayout(p.E, p.dtype !== "float32");
  return { kernel: "backward", op: p.op, score: p.score, pre: p.op === "topk" && p.pre, tpr, ept };
}

const FORWARD_UNIFORMS = [
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
] as const;

/** Codes of the dtype uniform. */
export const DT_CODE: Record<FloatDType, number> = { float32: 0, float16: 1, bfloat16: 2 };
/** Codes of the routing-output uniform. */
export const FMT_CODE: Record<RouteFormat, number> = { bytemap: 0, bitmap_u8: 1, int16: 2, int32: 3, int64: 4 };

/** Uniforms every per-token kernel declares (unused ones are 0). */
export type RowUniforms = Record<(typeof FORWARD_UNIFORMS)[number][0], number>;

// Row helpers common to the per-token kernels: element index, reductions.
function rowHelpers(tpr: number, vec2: boolean): string {
  return /* wgsl */ `
const TPR: u32 = ${tpr}u;
const RPW: u32 = WG / TPR;
const NONE: u32 = 0xffffffffu;
var<workgroup> red: array<f32, WG>;
${vec2 ? "var<workgroup> red2: array<vec2<f32>, WG>;" : ""}

// expert of element j of a lane (see the layout note in _topk_kernels.ts)
fn elem(lane: u32, j: u32, o: u32) -> u32 { return 2u * (lane + (j >> 1u) * TPR) + (j & 1u) - o; }

// sum of v over the lanes of a row, in a fixed order: up to 32 lanes each
// thread adds the row's values in lane order (two barriers); beyond, a tree
fn rowSum(v: f32, li: u32, lane: u32) -> f32 {
  workgroupBarrier();
  red[li] = v;
  workgroupBarrier();
  if (TPR <= 32u) {
    var acc = red[li - lane];
    for (var i = 1u; i < TPR; i = i + 1u) { acc = acc + red[li - lane + i]; }
    return acc;
  }
  for (var s = TPR / 2u; s > 0u; s = s >> 1u) {
    if (lane < s) { red[li] = red[li] + red[li + s]; }
    workgroupBarrier();
  }
  return red[li - lane];
}

// max of v over the lanes of a row (same scheme)
fn rowMax(v: f32, li: u32, lane: u32) -> f32 {
  workgroupBarrier();
  red[li] = v;
  workgroupBarrier();
  if (TPR <= 32u) {
    var acc = red[li - lane];
    for (var i = 1u; i < TPR; i = i + 1u) { acc = max(acc, red[li - lane + i]); }
    return acc;
  }
  for (var s = TPR / 2u; s > 0u; s = s >> 1u) {
    if (lane < s) { red[li] = max(red[li], red[li + s]); }
    workgroupBarrier();
  }
  return red[li - lane];
}
${
    vec2
      ? `
fn rowSum2(v: vec2<f32>, li: u32, lane: u32) -> vec2<f32> {
  workgroupBarrier();
  red2[li] = v;
  workgroupBarrier();
  if (TPR <= 32u) {
    var acc = red2[li - lane];
    for (var i = 1u; i < TPR; i = i + 1u) { acc = acc + red2[li - lane + i]; }
    return acc;
  }
  for (var s = TPR / 2u; s > 0u; s = s >> 1u) {
    if (lane < s) { red2[li] = red2[li] + red2[li + s]; }
    workgroupBarrier();
  }
  return red2[li - lane];
}`
      : ""
  }
`;
}

// WGSL loading element i of a float input of dtype P.dt held as u32 words.
function loadFn(buf: string): string {
  return /* wgsl */ `
fn load_${buf}(i: u32) -> f32 {
  if (P.dt == 0u) { return bitcast<f32>(${buf}[i]); }
  let h = (${buf}[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
  if (P.dt == 1u) { return f16ToF32(h); }
  return bitcast<f32>(h << 16u);
}`;
}

// WGSL storing the pair (v0 at element e0, v1 at e0 + 1) of a lane-owned slot
// into an output of dtype P.dt: float32 word by word, 16-bit as one word
// (atomics on the half of a word shared with a neighbouring row).
function storeFn(buf: string): string {
  return /* wgsl */ `
fn toHalf(v: f32) -> u32 {
  if (P.dt == 1u) { return f32ToF16(v); }
  return f32ToBf16(v);
}
fn store_${buf}(base: u32, e0: u32, ok0: bool, ok1: bool, v0: f32, v1: f32) {
  if (P.dt == 0u) {
    if (ok0) { atomicStore(&${buf}[base + e0], bitcast<u32>(v0)); }
    if (ok1) { atomicStore(&${buf}[base + e0 + 1u], bitcast<u32>(v1)); }
    return;
  }
  let w = (base + e0) >> 1u;
  let bits = toHalf(v0) | (toHalf(v1) << 16u);
  if (ok0 && ok1) { atomicStore(&${buf}[w], bits); }
  else if (ok0) { atomicAnd(&${buf}[w], 0xffff0000u); atomicOr(&${buf}[w], bits & 0xffffu); }
  else if (ok1) { atomicAnd(&${buf}[w], 0x0000ffffu); atomicOr(&${buf}[w], bits & 0xffff0000u); }
}`;
}

/** The forward kernel (top-k router, or aux-loss scores) for a key. */
export function forwardKernel(k: ForwardKey): KernelSource {
  const { op, score, pre, radix, grouped, tpr, ept, gcap, kcap } = k;
  const aux = op === "aux";
  const bias = !aux;
  const softmax = score === "softmax";
  const post = softmax && !pre && !aux;
  const mw = maskWords(k);
  const storage: StorageBinding[] = [
    { name: "logits", elem: "u32", access: "read" },
    { name: "probs", elem: aux ? "f32" : "atomic<u32>", access: "read_write" },
    { name: "inter", elem: "f32", access: "read_write" },
    { name: "route", elem: "atomic<u32>", access: "read_write" },
    { name: "bias", elem: "f32", access: "read" },
  ];

  const helpers = `${MATH_WGSL}${rowHelpers(tpr, false)}${loadFn("logits")}${aux ? "" : storeFn("probs")}
const EPT: u32 = ${ept}u;
${
    radix
      ? ""
      : "var<workgroup> wbest: array<atomic<u32>, RPW * 3u>;\nvar<workgroup> widx: array<atomic<u32>, RPW * 3u>;"
  }
const MASKW: u32 = ${mw}u;
var<workgroup> selMask: array<atomic<u32>, RPW * MASKW>;
${
    grouped
      ? `const GCAP: u32 = ${gcap}u;
var<workgroup> gbest: array<atomic<u32>, RPW * GCAP>;
var<workgroup> gidx: array<atomic<u32>, RPW * GCAP>;
var<workgroup> gsum: array<f32, RPW * GCAP>;
var<workgroup> gkeep: array<u32, RPW * GCAP>;`
      : ""
  }
${
    radix
      ? `var<workgroup> hist: array<atomic<u32>, RPW * 512u>;
var<workgroup> csum: array<u32, RPW * 16u>;`
      : ""
  }
${
    radix
      ? `const KCAP: u32 = ${kcap}u;
var<workgroup> candKey: array<u32, RPW * KCAP>;
var<workgroup> candLo: array<u32, RPW * KCAP>;
var<workgroup> ccount: array<atomic<u32>, RPW>;`
      : ""
  }
`;

  // ---- load and score -------------------------------------------------------
  let body = /* wgsl */ `
  let row = li / TPR;
  let lane = li % TPR;
  let t = wg * RPW + row;
  let live = t < P.T;
  let E = P.E;
  let base = t * E;
  let o = select(0u, base & 1u, P.dt != 0u);
  var s: array<f32, EPT>;    // scores (post softmax: the logits), later the values
  var key: array<u32, EPT>;  // selection keys; 0 = may not be chosen
  var rank: array<u32, EPT>; // position among the chosen (NONE: not chosen)
  ${bias || grouped ? "var r: array<f32, EPT>;   // selection scores s + bias" : ""}

  // init: workgroup scratch of this row
  for (var i = lane; i < MASKW; i = i + TPR) { atomicStore(&selMask[row * MASKW + i], 0u); }
  ${radix ? "if (lane == 0u) { atomicStore(&ccount[row], 0u); }" : ""}

  // load: widen the token's logits
  for (var j = 0u; j < EPT; j = j + 1u) {
    let e = elem(lane, j, o);
    s[j] = 0.0;
    if (live && e < E) { s[j] = load_logits(base + e); }
  }
`;
  if (softmax && (pre || aux)) {
    body += `
  // score: softmax over all experts, max-subtracted so that exp never overflows
  var m = negInf();
  for (var j = 0u; j < EPT; j = j + 1u) { if (live && elem(lane, j, o) < E) { m = max(m, s[j]); } }
  m = rowMax(m, li, lane);
  var z = 0.0;
  for (var j = 0u; j < EPT; j = j + 1u) {
    if (live && elem(lane, j, o) < E) { s[j] = mexp(s[j] - m); z = z + s[j]; }
  }
  z = rowSum(z, li, lane);
  for (var j = 0u; j < EPT; j = j + 1u) {
    let e = elem(lane, j, o);
    if (live && e < E) { s[j] = s[j] / z; inter[base + e] = s[j]; }
  }
`;
  } else if (!softmax) {
    body += `
  // score: ${score}; the intermediate keeps ${score === "sigmoid" ? "sigmoid(x)" : "the raw logits"}
  for (var j = 0u; j < EPT; j = j + 1u) {
    let e = elem(lane, j, o);
    if (live && e < E) {
      ${
      score === "sigmoid"
        ? "s[j] = msigmoid(s[j]);\n      inter[base + e] = s[j];"
        : "inter[base + e] = s[j];\n      s[j] = msqrtsoftplus(s[j]);"
    }
    }
  }
`;
    if (aux) {
      body += `
  // aux: normalise over every expert, a / (sum(a) + eps)
  var z = 0.0;
  for (var j = 0u; j < EPT; j = j + 1u) { if (live && elem(lane, j, o) < E) { z = z + s[j]; } }
  z = rowSum(z, li, lane) + EPS;
  for (var j = 0u; j < EPT; j = j + 1u) { s[j] = s[j] / z; }
`;
    }
  }
  if (aux) {
    body += `
  // write: the aux scores (float32)
  for (var j = 0u; j < EPT; j = j + 1u) {
    let e = elem(lane, j, o);
    if (live && e < E) { probs[base + e] = s[j]; }
  }
`;
  }

  // ---- keys and group limit ------------------------------------------------------
  const rOf = bias || grouped ? "r[j]" : "s[j]";
  body += `
  // keys of the selection scores${bias ? " r = s + bias" : ""}
  for (var j = 0u; j < EPT; j = j + 1u) {
    let e = elem(lane, j, o);
    key[j] = KEY_OUT;
    ${bias || grouped ? "r[j] = s[j];" : ""}
    if (live && e < E) {
      ${bias ? "if (P.hasBias != 0u) { r[j] = s[j] + bias[e]; }" : ""}
      key[j] = keyOf(${rOf});
    }
  }
`;
  if (grouped) {
    body += `
  // group limit: a group's score is the sum of its top (K / GK) selection
  // scores added in descending order (per rounds of a per-group arg-max);
  // the GK best groups are kept (ties: lower group), the others excluded.
  for (var g = lane; g < GCAP; g = g + TPR) {
    atomicStore(&gbest[row * GCAP + g], 0u);
    atomicStore(&gidx[row * GCAP + g], NONE);
    gsum[row * GCAP + g] = 0.0;
  }
  workgroupBarrier();
  for (var round = 0u; round < P.per; round = round + 1u) {
    for (var j = 0u; j < EPT; j = j + 1u) {
      if (key[j] != KEY_OUT) { atomicMax(&gbest[row * GCAP + elem(lane, j, o) / P.gsize], key[j]); }
    }
    workgroupBarrier();
    for (var j = 0u; j < EPT; j = j + 1u) {
      let e = elem(lane, j, o);
      let gs = row * GCAP + e / P.gsize;
      if (key[j] != KEY_OUT && key[j] == atomicLoad(&gbest[gs])) { atomicMin(&gidx[gs], e); }
    }
    workgroupBarrier();
    for (var j = 0u; j < EPT; j = j + 1u) {
      let e = elem(lane, j, o);
      let gs = row * GCAP + e / P.gsize;
      if (key[j] != KEY_OUT && e == atomicLoad(&gidx[gs])) { gsum[gs] = gsum[gs] + r[j]; key[j] = KEY_OUT; }
    }
    workgroupBarrier();
    for (var g = lane; g < GCAP; g = g + TPR) {
      atomicStore(&gbest[row * GCAP + g], 0u);
      atomicStore(&gidx[row * GCAP + g], NONE);
    }
    workgroupBarrier();
  }
  // rank the groups: kept when fewer than GK groups rank above
  for (var g = lane; g < P.G; g = g + TPR) {
    let kg = keyOf(gsum[row * GCAP + g]);
    var above = 0u;
    for (var h = 0u; h < P.G; h = h + 1u) {
      let kh = keyOf(gsum[row * GCAP + h]);
      if (kh > kg || (kh == kg && h < g)) { above = above + 1u; }
    }
    gkeep[row * GCAP + g] = select(0u, 1u, above < P.GK);
  }
  workgroupBarrier();
  for (var j = 0u; j < EPT; j = j + 1u) {
    let e = elem(lane, j, o);
    key[j] = KEY_OUT;
    if (live && e < E && gkeep[row * GCAP + e / P.gsize] != 0u) { key[j] = keyOf(r[j]); }
  }
`;
  }

  // ---- selection ----------------------------------------------------------------
  if (!radix) {
    body += `
  // select (naive): K rounds of arg-max over the row, ties to the lower
  // index; each round is an atomicMax of the keys, then an atomicMin of the
  // indices holding it. Three slots rotate so that a slot is reset two
  // barriers before its next use. O(K * E / TPR) per thread.
  var bk = 0u;
  var bi = NONE;
  for (var j = 0u; j < EPT; j = j + 1u) {
    rank[j] = NONE;
    if (key[j] > bk) { bk = key[j]; bi = elem(lane, j, o); }
  }
  if (lane == 0u) {
    for (var q = 0u; q < 2u; q = q + 1u) { atomicStore(&wbest[row * 3u + q], 0u); atomicStore(&widx[row * 3u + q], NONE); }
  }
  workgroupBarrier();
  for (var k = 0u; k < P.K; k = k + 1u) {
    let slot = row * 3u + k % 3u;
    if (bk != 0u) { atomicMax(&wbest[slot], bk); }
    workgroupBarrier();
    if (bk != 0u && bk == atomicLoad(&wbest[slot])) { atomicMin(&widx[slot], bi); }
    workgroupBarrier();
    let win = atomicLoad(&widx[slot]);
    if (lane == 0u) {
      let nx = row * 3u + (k + 2u) % 3u;
      atomicStore(&wbest[nx], 0u);
      atomicStore(&widx[nx], NONE);
    }
    if (bk != 0u && win == bi) {
      bk = 0u;
      bi = NONE;
      for (var j = 0u; j < EPT; j = j + 1u) {
        if (key[j] != KEY_OUT && elem(lane, j, o) == win) { rank[j] = k; key[j] = KEY_OUT; }
        if (key[j] > bk) { bk = key[j]; bi = elem(lane, j, o); }
      }
    }
  }
`;
  } else {
    body += `
  // select (radix): find the K-th largest of the composite (key, E-1-e) with
  // 8-bit histogram passes, four over the key bits, then loPasses over the
  // inverted index (so ties go to the lower index); the picks are the
  // elements at or above it: exactly K. Histograms are double-buffered so a
  // pass needs two barriers. O(E / TPR) per thread and pass, whatever K.
  for (var i = lane; i < 512u; i = i + TPR) { atomicStore(&hist[row * 512u + i], 0u); }
  workgroupBarrier();
  var prefix = 0u;
  var pmask = 0u;
  var lprefix = 0u;
  var lmask = 0u;
  var need = P.K;
  let npass = 4u + P.loPasses;
  for (var p = 0u; p < npass; p = p + 1u) {
    let hb = row * 512u + (p & 1u) * 256u;
    let inKey = p < 4u;
    let shift = select(((P.loPasses + 3u) - p) * 8u, 24u - 8u * p, inKey);
    for (var j = 0u; j < EPT; j = j + 1u) {
      let e = elem(lane, j, o);
      if (live && e < E) {
        let lo = E - 1u - e;
        var hit = (key[j] & pmask) == prefix;
        var digit = (key[j] >> shift) & 255u;
        if (!inKey) { hit = key[j] == prefix && (lo & lmask) == lprefix; digit = (lo >> shift) & 255u; }
        if (hit) { atomicAdd(&hist[hb + digit], 1u); }
      }
    }
    workgroupBarrier();
    let nb = row * 512u + ((p + 1u) & 1u) * 256u;
    for (var i = lane; i < 256u; i = i + TPR) { atomicStore(&hist[nb + i], 0u); }
    for (var c = lane; c < 16u; c = c + TPR) {
      var n = 0u;
      for (var b = 0u; b < 16u; b = b + 1u) { n = n + atomicLoad(&hist[hb + c * 16u + b]); }
      csum[row * 16u + c] = n;
    }
    workgroupBarrier();
    // scan from the top bin down to the one holding the need-th element
    var c = 15u;
    loop {
      let n = csum[row * 16u + c];
      if (n >= need || c == 0u) { break; }
      need = need - n;
      c = c - 1u;
    }
    var bin = c * 16u + 15u;
    loop {
      let n = atomicLoad(&hist[hb + bin]);
      if (n >= need || bin == c * 16u) { break; }
      need = need - n;
      bin = bin - 1u;
    }
    if (inKey) { prefix = prefix | (bin << shift); pmask = pmask | (255u << shift); }
    else { lprefix = lprefix | (bin << shift); lmask = lmask | (255u << shift); }
  }
  for (var j = 0u; j < EPT; j = j + 1u) {
    let e = elem(lane, j, o);
    rank[j] = NONE;
    if (live && e < E && (key[j] > prefix || (key[j] == prefix && E - 1u - e >= lprefix))) { rank[j] = 0u; }
  }
`;
    {
      body += `
  // rank the picks (key descending, then index ascending) for the dense output
  if (P.fmt >= 2u) {
  for (var j = 0u; j < EPT; j = j + 1u) {
    if (rank[j] != NONE) {
      let at = atomicAdd(&ccount[row], 1u);
      candKey[row * KCAP + at] = key[j];
      candLo[row * KCAP + at] = E - 1u - elem(lane, j, o);
    }
  }
  workgroupBarrier();
  for (var j = 0u; j < EPT; j = j + 1u) {
    if (rank[j] != NONE) {
      let lo = E - 1u - elem(lane, j, o);
      var above = 0u;
      for (var i = 0u; i < P.K; i = i + 1u) {
        let ck = candKey[row * KCAP + i];
        if (ck > key[j] || (ck == key[j] && candLo[row * KCAP + i] > lo)) { above = above + 1u; }
      }
      rank[j] = above;
    }
  }
  }
`;
    }
  }

  // ---- values and outputs -------------------------------------------------------------
  if (!aux) {
    if (post) {
      body += `
  // values: softmax over the K chosen logits, max-subtracted
  var m = negInf();
  for (var j = 0u; j < EPT; j = j + 1u) { if (rank[j] != NONE) { m = max(m, s[j]); } }
  m = rowMax(m, li, lane);
  var z = 0.0;
  for (var j = 0u; j < EPT; j = j + 1u) { if (rank[j] != NONE) { s[j] = mexp(s[j] - m); z = z + s[j]; } }
  z = rowSum(z, li, lane);
  for (var j = 0u; j < EPT; j = j + 1u) { if (rank[j] != NONE) { s[j] = s[j] / z; } }
`;
    } else if (!softmax) {
      body += `
  // values: the unbiased scores of the chosen, normalised when K > 1: v / (sum(v) + eps)
  if (P.K > 1u) {
    var z = 0.0;
    for (var j = 0u; j < EPT; j = j + 1u) { if (rank[j] != NONE) { z = z + s[j]; } }
    z = rowSum(z, li, lane) + EPS;
    for (var j = 0u; j < EPT; j = j + 1u) { s[j] = s[j] / z; }
  }
`;
    }
    body += `
  // write: probs = c * v at the chosen experts, 0 elsewhere${
      post ? "; intermediate: the K-way softmax, -inf elsewhere" : ""
    }
  for (var j = 0u; j < EPT; j = j + 2u) {
    let e0 = elem(lane, j, o);
    let ok0 = live && e0 < E;
    let ok1 = live && e0 + 1u < E; // e0 = 0xffffffff: e0 + 1 is expert 0
    let v0 = select(0.0, s[j] * P.scale, rank[j] != NONE);
    let v1 = select(0.0, s[j + 1u] * P.scale, rank[j + 1u] != NONE);
    store_probs(base, e0, ok0, ok1, v0, v1);
    ${
      post
        ? `if (ok0) { inter[base + e0] = select(negInf(), s[j], rank[j] != NONE); }
    if (ok1) { inter[base + e0 + 1u] = select(negInf(), s[j + 1u], rank[j + 1u] != NONE); }`
        : ""
    }
  }
`;
  }

  body += `
  // write: dense indices, position = rank (key descending, ties by lower index)
  if (P.fmt >= 2u) {
    for (var j = 0u; j < EPT; j = j + 1u) {
      if (rank[j] != NONE) {
        let e = elem(lane, j, o);
        let pos = t * P.K + rank[j];
        if (P.fmt == 2u) {
          let w = pos >> 1u;
          if ((pos & 1u) == 0u) { atomicAnd(&route[w], 0xffff0000u); atomicOr(&route[w], e); }
          else { atomicAnd(&route[w], 0x0000ffffu); atomicOr(&route[w], e << 16u); }
        } else if (P.fmt == 3u) {
          atomicStore(&route[pos], e);
        } else {
          atomicStore(&route[2u * pos], e);
          atomicStore(&route[2u * pos + 1u], 0u);
        }
      }
    }
  }

  // write: the routing map, one word at a time from the row's bit mask (words
  // shared with a neighbouring row: and + or on this row's bytes only)
  if (P.fmt < 2u) {
    for (var j = 0u; j < EPT; j = j + 1u) {
      if (rank[j] != NONE) {
        let e = elem(lane, j, o);
        atomicOr(&selMask[row * MASKW + (e >> 5u)], 1u << (e & 31u));
      }
    }
  }
  workgroupBarrier();
  if (live && P.fmt < 2u) {
    let bitmap = P.fmt == 1u;
    let len = select(E, P.L, bitmap);
    let rb = t * len;
    for (var w = (rb >> 2u) + lane; w <= ((rb + len - 1u) >> 2u); w = w + TPR) {
      var val = 0u;
      var msk = 0u;
      for (var b = 0u; b < 4u; b = b + 1u) {
        let at = 4u * w + b;
        if (at >= rb && at < rb + len) {
          let i = at - rb;
          msk = msk | (255u << (8u * b));
          var byte = (atomicLoad(&selMask[row * MASKW + (i >> 2u)]) >> ((i & 3u) * 8u)) & 255u;
          if (!bitmap) { byte = (atomicLoad(&selMask[row * MASKW + (i >> 5u)]) >> (i & 31u)) & 1u; }
          val = val | (byte << (8u * b));
        }
      }
      if (msk == 0xffffffffu) { atomicStore(&route[w], val); }
      else { atomicAnd(&route[w], ~msk); atomicOr(&route[w], val); }
    }
  }
`;

  return {
    label: `moe-router ${JSON.stringify(k)}`,
    uniforms: FORWARD_UNIFORMS,
    storage,
    consts: {},
    helpers,
    body,
    workgroupSize: WG,
  };
}

/** The backward kernel (top-k router, or aux-loss scores) for a key. */
export function backwardKernel(k: BackwardKey): KernelSource {
  const { op, score, pre, tpr, ept } = k;
  const aux = op === "aux";
  const mw = maskWords(k);
  const storage: StorageBinding[] = [
    { name: "grad", elem: "u32", access: "read" },
    { name: "inter", elem: "f32", access: "read" },
    { name: "route", elem: "u32", access: "read" },
    { name: "out", elem: "atomic<u32>", access: "read_write" },
  ];
  const helpers = `${MATH_WGSL}${rowHelpers(tpr, true)}${aux ? "" : loadFn("grad")}${storeFn("out")}
const EPT: u32 = ${ept}u;
const MASKW: u32 = ${mw}u;
var<workgroup> selMask: array<atomic<u32>, RPW * MASKW>;

// whether expert e of row t is in its routing output (bytemap or bitmap; dense went to selMask)
fn chosen(t: u32, row: u32, base: u32, e: u32) -> bool {
  if (P.fmt == 0u) { return ((route[(base + e) >> 2u] >> (((base + e) & 3u) * 8u)) & 255u) != 0u; }
  if (P.fmt == 1u) {
    let b = t * P.L + (e >> 3u);
    return ((route[b >> 2u] >> ((b & 3u) * 8u + (e & 7u))) & 1u) != 0u;
  }
  return ((atomicLoad(&selMask[row * MASKW + (e >> 5u)]) >> (e & 31u)) & 1u) != 0u;
}

// expert id at position pos of the dense indices (NONE when it cannot be one)
fn denseIndex(pos: u32) -> u32 {
  if (P.fmt == 2u) { return (route[pos >> 1u] >> ((pos & 1u) * 16u)) & 0xffffu; } // negative int16: >= 32768, out of range
  if (P.fmt == 3u) { return route[pos]; }
  return select(NONE, route[2u * pos], route[2u * pos + 1u] == 0u);
}
`;
  const chosenOf = aux ? "true" : "chosen(t, row, base, e)";

  let body = /* wgsl */ `
  let row = li / TPR;
  let lane = li % TPR;
  let t = wg * RPW + row;
  let live = t < P.T;
  let E = P.E;
  let base = t * E;
  let o = select(0u, base & 1u, P.dt != 0u);
  var g: array<f32, EPT>;  // gradient
  var y: array<f32, EPT>;  // saved intermediate
  var c: array<bool, EPT>; // chosen
`;
  if (!aux) {
    body += `
  // load: the chosen set from dense indices, as a bit mask of the row
  if (P.fmt >= 2u) {
    for (var i = lane; i < MASKW; i = i + TPR) { atomicStore(&selMask[row * MASKW + i], 0u); }
    workgroupBarrier();
    if (live) {
      for (var q = lane; q < P.K; q = q + TPR) {
        let e = denseIndex(t * P.K + q);
        if (e < E) { atomicOr(&selMask[row * MASKW + (e >> 5u)], 1u << (e & 31u)); }
      }
    }
    workgroupBarrier();
  }
`;
  }
  body += `
  // load: g = gradProbs${aux ? "" : " * c"} on the chosen experts, the intermediate y
  for (var j = 0u; j < EPT; j = j + 1u) {
    let e = elem(lane, j, o);
    g[j] = 0.0;
    y[j] = 0.0;
    c[j] = false;
    if (live && e < E) {
      c[j] = ${chosenOf};
      y[j] = inter[base + e];
      if (c[j]) { g[j] = ${aux ? "bitcast<f32>(grad[base + e])" : "load_grad(base + e) * P.scale"}; }
    }
  }
`;
  if (score === "softmax") {
    body += `
  // softmax backward: g_i = y_i * (g_i - sum_chosen(g * y))${
      pre || aux ? " for every expert" : " on the chosen (y is -inf elsewhere)"
    }
  var d = 0.0;
  for (var j = 0u; j < EPT; j = j + 1u) { if (c[j]) { d = d + g[j] * y[j]; } }
  d = rowSum(d, li, lane);
  for (var j = 0u; j < EPT; j = j + 1u) {
    ${pre || aux ? "g[j] = y[j] * (g[j] - d);" : "g[j] = select(0.0, y[j] * (g[j] - d), c[j]);"}
  }
`;
  } else {
    body += `
  // activations a: ${score === "sigmoid" ? "the saved sigmoid" : "sqrtsoftplus recomputed from the saved logits"}
  var a: array<f32, EPT>;
  for (var j = 0u; j < EPT; j = j + 1u) { a[j] = ${score === "sigmoid" ? "y[j]" : "msqrtsoftplus(y[j])"}; }
  if (${aux ? "true" : "P.K > 1u"}) {
    // normalisation backward: g_i = g_i / S - D / S^2, S = sum(a) + eps, D = sum(g * a) over the chosen
    var sd = vec2<f32>(0.0, 0.0);
    for (var j = 0u; j < EPT; j = j + 1u) { if (c[j]) { sd = sd + vec2<f32>(a[j], g[j] * a[j]); } }
    sd = rowSum2(sd, li, lane);
    let S = sd.x + EPS;
    let Dq = sd.y / (S * S);
    for (var j = 0u; j < EPT; j = j + 1u) { g[j] = select(0.0, g[j] / S - Dq, c[j]); }
  }
  // activation backward: ${
      score === "sigmoid"
        ? "g *= y * (1 - y)"
        : "g *= sigmoid(x) / (2 * a + eps); above x = 20 softplus is the identity (derivative 1)"
    }
  for (var j = 0u; j < EPT; j = j + 1u) {
    ${
      score === "sigmoid"
        ? "g[j] = g[j] * (y[j] * (1.0 - y[j]));"
        : "let sg = select(msigmoid(y[j]), 1.0, !isNan(y[j]) && y[j] > SOFTPLUS_LINEAR);\n    g[j] = g[j] * (sg / (2.0 * a[j] + EPS));"
    }
  }
`;
  }
  body += `
  // write: gradLogits in the logits dtype
  for (var j = 0u; j < EPT; j = j + 2u) {
    let e0 = elem(lane, j, o);
    let ok0 = live && e0 < E;
    let ok1 = live && e0 + 1u < E; // e0 = 0xffffffff: e0 + 1 is expert 0
    let v0 = g[j];
    let v1 = g[j + 1u];
    store_out(base, e0, ok0, ok1, v0, v1);
  }
`;
  return {
    label: `moe-router ${JSON.stringify(k)}`,
    uniforms: FORWARD_UNIFORMS,
    storage,
    consts: {},
    helpers,
    body,
    workgroupSize: WG,
  };
}
