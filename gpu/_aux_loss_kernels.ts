// Aux-loss kernels (SPEC section 4):
//   colsum:   partial[c, j] = sum of probs[t, j] over the rows t of chunk c
//   finish:   loss = (sum_j (sum_c partial[c, j]) * tpe[j]) * constant, narrowed
//   backward: gradProbs[t, j] = g * tpe[j], g = gradLoss * constant
// Sums run in a fixed order, so results do not depend on scheduling.
import type { FloatDType } from "../_types.ts";
import { f32ToHalf, halfToF32, MATH_WGSL } from "./_math.ts";
import type { KernelSource } from "./_shader.ts";

/** Threads per workgroup of the aux-loss kernels. */
export const AUX_WG = 256;

/** What an aux-loss pipeline is specialised on; also its cache key. */
export interface AuxLossKey {
  kernel: "auxColsum" | "auxFinish" | "auxBackward";
  dtype: FloatDType;
}

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

/** The aux-loss kernel of a key. */
export function auxLossKernel(k: AuxLossKey): KernelSource {
  const half = k.dtype !== "float32";
  const common = { label: `moe-router ${JSON.stringify(k)}`, uniforms: UNIFORMS, consts: {}, workgroupSize: AUX_WG };
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
  return {
    ...common,
    storage: [
      { name: "tpe", elem: "f32", access: "read" },
      { name: "out", elem: half ? "u32" : "f32", access: "read_write" },
    ],
    helpers: MATH_WGSL,
    // one thread per output word (two 16-bit elements, or one f32); e0 = first element of this dispatch
    body: `
  let w = wg * WG + li;
  if (w >= P.n) { return; }
  let e = P.e0 + ${half ? "2u * w" : "w"};
  let v0 = P.g * tpe[e % P.cols];
  ${half ? "let v1 = select(0.0, P.g * tpe[(e + 1u) % P.cols], e + 1u < P.rows * P.cols);" : ""}
  ${store}`,
  };
}
