// Aux-loss kernels (SPEC section 4):
//   colsum:   partial[c, j] = sum of probs[t, j] over the rows t of chunk c
//   finish:   loss = (sum_j (sum_c partial[c, j]) * tpe[j]) * constant, narrowed
//   backward: gradProbs[t, j] = g * tpe[j], g = gradLoss * constant
//   tpe:      GPU-resident tokensPerExpert (int32, int64, bfloat16) widened to
//             float32 as the host widens it
// Sums run in a fixed order, so results do not depend on scheduling.
import type { FloatDType, TokensPerExpertDType } from "../_types.ts";
import { f32ToHalf, halfToF32, MATH_WGSL } from "./_math.ts";
import type { KernelSource } from "./_shader.ts";

/** Threads per workgroup of the aux-loss kernels. */
export const AUX_WG = 256;

/** What an aux-loss pipeline is specialised on; also its cache key. */
export type AuxLossKey =
  | { kernel: "auxColsum" | "auxFinish"; dtype: FloatDType }
  | {
    kernel: "auxBackward";
    dtype: FloatDType;
    /** The dtype of a GPU-resident gradLoss read from a binding (absent: gradLoss is folded into the uniform g). */
    gradLoss?: FloatDType;
  }
  | { kernel: "auxTpe"; dtype: Exclude<TokensPerExpertDType, "float32"> };

const UNIFORMS = [
  ["rows", "u32"],
  ["cols", "u32"],
  ["chunkRows", "u32"],
  ["chunks", "u32"],
  ["c0", "u32"],
  ["e0", "u32"],
  ["n", "u32"],
  ["g", "f32"],
] as const;

// Integer to float32 as the host widens tokensPerExpert: Math.fround(Number(v)),
// that is, to nearest (ties to even) at 53 significant bits (a double), then
// at 24. Done on the integer bits: WGSL leaves the rounding of f32(i32)
// to the implementation. A 64-bit value is vec2(lo, hi).
const INT_TO_F32_WGSL = /* wgsl */ `
fn shr64(v: vec2<u32>, d: u32) -> vec2<u32> {
  if (d == 0u) { return v; }
  if (d >= 32u) { return vec2<u32>(v.y >> (d - 32u), 0u); }
  return vec2<u32>((v.x >> d) | (v.y << (32u - d)), v.y >> d);
}
fn msb64(v: vec2<u32>) -> u32 {
  if (v.y != 0u) { return 32u + firstLeadingBit(v.y); }
  return firstLeadingBit(v.x);
}
// v / 2^d rounded to nearest, ties to even (1 <= d < 32): round bit, then sticky bits below it
fn roundShr64(v: vec2<u32>, d: u32) -> vec2<u32> {
  let q = shr64(v, d);
  let roundBit = shr64(v, d - 1u).x & 1u;
  let sticky = (v.x & ((1u << (d - 1u)) - 1u)) != 0u;
  if (roundBit == 1u && (sticky || (q.x & 1u) == 1u)) {
    let lo = q.x + 1u;
    return vec2<u32>(lo, q.y + select(0u, 1u, lo == 0u));
  }
  return q;
}
// a two's complement 64-bit integer (lo, hi) to f32, through a double
fn i64ToF32(lo: u32, hi: u32) -> f32 {
  let neg = (hi >> 31u) == 1u;
  var m = vec2<u32>(lo, hi);
  if (neg) {
    let nlo = ~lo + 1u;
    m = vec2<u32>(nlo, ~hi + select(0u, 1u, nlo == 0u)); // |-2^63| = 2^63 as unsigned
  }
  if (m.x == 0u && m.y == 0u) { return 0.0; }
  var e = 0u; // the value is m * 2^e
  var p = msb64(m);
  if (p > 52u) { m = roundShr64(m, p - 52u); e = p - 52u; p = msb64(m); } // the double
  if (p > 23u) { m = roundShr64(m, p - 23u); e = e + p - 23u; } // the float: m <= 2^24 now
  let r = ldexp(f32(m.x), i32(e)); // exact
  return select(r, -r, neg);
}`;

/** The aux-loss kernel of a key. */
export function auxLossKernel(k: AuxLossKey): KernelSource {
  const common = { label: `moe-router ${JSON.stringify(k)}`, uniforms: UNIFORMS, consts: {}, workgroupSize: AUX_WG };
  if (k.kernel === "auxTpe") {
    const value = k.dtype === "bfloat16"
      ? "bitcast<f32>(((src[j >> 1u] >> ((j & 1u) * 16u)) & 0xffffu) << 16u)"
      : k.dtype === "int32"
      ? "i64ToF32(src[j], select(0u, 0xffffffffu, i32(src[j]) < 0))"
      : "i64ToF32(src[2u * j], src[2u * j + 1u])";
    return {
      ...common,
      storage: [
        { name: "src", elem: "u32", access: "read" },
        { name: "dst", elem: "f32", access: "read_write" },
      ],
      helpers: INT_TO_F32_WGSL,
      // one thread per column: n = columns
      body: `
  let j = wg * WG + li;
  if (j >= P.n) { return; }
  dst[j] = ${value};`,
    };
  }
  const half = k.dtype !== "float32";
  if (k.kernel === "auxColsum") {
    const load = half ? halfToF32(k.dtype as "float16", "(probs[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu") : "probs[i]";
    return {
      ...common,
      storage: [
        { name: "probs", elem: half ? "u32" : "f32", access: "read" },
        { name: "partial", elem: "f32", access: "read_write" },
      ],
      helpers: MATH_WGSL,
      // workgroup wg: column block wg % n (n = column blocks of WG), chunk wg / n of chunkRows rows
      // (rows are local to this dispatch; c0 is its first chunk in the partial sums)
      body: `
  let j = (wg % P.n) * WG + li;
  let c = wg / P.n;
  if (j >= P.cols || c >= P.chunks) { return; }
  var acc = 0.0;
  let r1 = min(P.rows, (c + 1u) * P.chunkRows);
  for (var r = c * P.chunkRows; r < r1; r = r + 1u) {
    let i = r * P.cols + j;
    acc = acc + ${load};
  }
  partial[(P.c0 + c) * P.cols + j] = acc;`,
    };
  }
  if (k.kernel === "auxFinish") {
    const store = half ? f32ToHalf(k.dtype as "float16", "v") : "bitcast<u32>(v)";
    return {
      ...common,
      storage: [
        { name: "partial", elem: "f32", access: "read" },
        { name: "tpe", elem: "f32", access: "read" },
        { name: "loss", elem: "u32", access: "read_write" },
      ],
      helpers: `${MATH_WGSL}\nvar<workgroup> red: array<f32, WG>;`,
      // one workgroup: column sums over the chunks, times tpe, reduced over the columns
      body: `
  var acc = 0.0;
  for (var j = li; j < P.cols; j = j + WG) {
    var cs = 0.0;
    for (var c = 0u; c < P.chunks; c = c + 1u) { cs = cs + partial[c * P.cols + j]; }
    acc = acc + cs * tpe[j];
  }
  red[li] = acc;
  for (var s = WG / 2u; s > 0u; s = s >> 1u) {
    workgroupBarrier();
    if (li < s) { red[li] = red[li] + red[li + s]; }
  }
  if (li == 0u) {
    let v = red[0] * P.g;
    loss[0] = ${store};
  }`,
    };
  }
  const store = half
    ? `out[w] = ${f32ToHalf(k.dtype as "float16", "v0")} | (${f32ToHalf(k.dtype as "float16", "v1")} << 16u);`
    : "out[w] = v0;";
  // g = gradLoss * constant: a uniform, or (GPU-resident gradLoss) its first element, widened, times the uniform constant
  const gl = k.kernel === "auxBackward" ? k.gradLoss ?? null : null;
  const g = gl === null
    ? "P.g"
    : gl === "float32"
    ? "(bitcast<f32>(gradLoss[0]) * P.g)"
    : `(${halfToF32(gl, "gradLoss[0] & 0xffffu")} * P.g)`;
  return {
    ...common,
    storage: [
      { name: "tpe", elem: "f32", access: "read" },
      { name: "out", elem: half ? "u32" : "f32", access: "read_write" },
      ...(gl === null ? [] : [{ name: "gradLoss", elem: "u32", access: "read" as const }]),
    ],
    helpers: MATH_WGSL,
    // one thread per output word (two 16-bit elements, or one f32); e0 = first element of this dispatch
    body: `
  let w = wg * WG + li;
  if (w >= P.n) { return; }
  let g = ${g};
  let e = P.e0 + ${half ? "2u * w" : "w"};
  let v0 = g * tpe[e % P.cols];
  ${half ? "let v1 = select(0.0, g * tpe[(e + 1u) % P.cols], e + 1u < P.rows * P.cols);" : ""}
  ${store}`,
  };
}
