// WGSL math shared by the kernels. The transcendental functions are the
// polynomials of the CPU kernels (wasm/assembly/router.ts), written in the
// same operation order, so that both backends compute the same scores up to
// the rounding of the GPU's division and square root (WGSL does not promise
// correct rounding for those). NaN and infinities are tested on the bits:
// WGSL lets compilers assume float comparisons never see NaN.

/** WGSL helpers: float classification, exp, log1p, the score functions, keys, 16-bit floats. */
export const MATH_WGSL = /* wgsl */ `
const EPS: f32 = 1e-20;            // keeps normalisation denominators away from 0
const SOFTPLUS_LINEAR: f32 = 20.0; // softplus(x) == x in float32 above this
const KEY_OUT: u32 = 0u;           // an expert that may not be chosen
const KEY_NAN: u32 = 1u;           // NaN ranks below every number
const NEG_INF: u32 = 0xff800000u;

fn isNan(x: f32) -> bool { return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u; }
// through a var: Chrome's WGSL compiler refuses infinities made from constants
fn negInf() -> f32 { var bits = NEG_INF; return bitcast<f32>(bits); }

// exp(x): x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), exp(r) by
// a degree-6 minimax polynomial, then scaled by 2^n through the exponent bits.
// Below -87.3 the result is 0, above 88.37 it is +inf; NaN propagates.
fn mexp(x: f32) -> f32 {
  if (isNan(x)) { return x; }
  if (x > 88.37) { var inf = 0x7f800000u; return bitcast<f32>(inf); }
  if (x < -87.33654475) { return 0.0; }
  let n = round(x * 1.44269504088896341);
  var r = x - n * 0.693359375;
  r = r - n * -2.12194440e-4;
  var p: f32 = 1.9875691500e-4;
  p = p * r + 1.3981999507e-3;
  p = p * r + 8.3334519073e-3;
  p = p * r + 4.1665795894e-2;
  p = p * r + 1.6666665459e-1;
  p = p * r + 5.0000001201e-1;
  p = ((p * r) * r + r) + 1.0;
  return p * bitcast<f32>(u32(i32(n) + 127) << 23u);
}

// log(w) for finite w >= 1: w = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// log(m) = t - t^2/2 + t^3 * P(t) with t = m - 1, e * ln2 added in two parts.
fn mlogGe1(w: f32) -> f32 {
  let bits = bitcast<u32>(w);
  var e = i32(bits >> 23u) - 127;
  var m = bitcast<f32>((bits & 0x007fffffu) | 0x3f800000u);
  if (m > 1.41421356237) { m = m * 0.5; e = e + 1; }
  let t = m - 1.0;
  let ef = f32(e);
  let z = t * t;
  var p: f32 = 7.0376836292e-2;
  p = p * t + -1.1514610310e-1;
  p = p * t + 1.1676998740e-1;
  p = p * t + -1.2420140846e-1;
  p = p * t + 1.4249322787e-1;
  p = p * t + -1.6668057665e-1;
  p = p * t + 2.0000714765e-1;
  p = p * t + -2.4999993993e-1;
  p = p * t + 3.3333331174e-1;
  var y = (p * t) * z;
  y = y + ef * -2.12194440e-4;
  y = y - z * 0.5;
  return (t + y) + ef * 0.693359375;
}

// log1p(u) for u >= 0: with w = 1 + u (rounded), log(w) * u / (w - 1) corrects
// the rounding of w; where w == 1, log1p(u) = u to float32 precision.
fn mlog1p(u: f32) -> f32 {
  if (isNan(u) || bitcast<u32>(u) == 0x7f800000u) { return u; }
  let w = u + 1.0;
  let d = w - 1.0;
  if (d == 0.0) { return u; }
  return mlogGe1(w) * (u / d);
}

// sigmoid(x) = 1 / (1 + exp(-x))
fn msigmoid(x: f32) -> f32 { return 1.0 / (1.0 + mexp(-x)); }

// softplus(x) = log1p(exp(x)), and exactly x above 20 (float32 identity, no overflow)
fn msoftplus(x: f32) -> f32 {
  // NaN by its bits: the H200's compiler folds (u + 1) - 1 to u in mlog1p,
  // which turned NaN into a large finite score
  if (isNan(x)) { return x; }
  if (x > SOFTPLUS_LINEAR) { return x; }
  return mlog1p(mexp(x));
}

// sqrtsoftplus(x) = sqrt(softplus(x)); 0 and +inf are passed through: GPUs
// may compute sqrt(v) as v * inversesqrt(v), which is NaN for both (the
// H200 ranked +inf logits as NaN before this)
fn msqrtsoftplus(x: f32) -> f32 {
  // below -16, softplus(x) = exp(x) (1 - exp(x) / 2 ...) and sqrt of it is exp(x / 2) within 3e-8 relative (the
  // WebAssembly kernels take exp(x / 2) below -20, log1p above); this keeps x from log1p where 1 + exp(x) rounds
  // to 1 (below -16.6), whose (1 + u) - 1 the GPU compiler folds to u: log(1) * (u / u) = 0 (llvmpipe, x = -22.5
  // and x = -17)
  if (x < -16.0) { return mexp(x * 0.5); }
  let sp = msoftplus(x);
  let bits = bitcast<u32>(sp);
  if (bits == 0u || bits == 0x7f800000u) { return sp; }
  return sqrt(sp);
}

// Order-preserving u32 image of a selection score: NaN -> KEY_NAN (below every
// number, -inf included), -0 -> the key of +0 (equal values, equal keys).
fn keyOf(r: f32) -> u32 {
  if (isNan(r)) { return KEY_NAN; }
  var b = bitcast<u32>(r);
  if (b == 0x80000000u) { b = 0u; }
  if ((b >> 31u) != 0u) { return ~b; }
  return b | 0x80000000u;
}

// the selection score a key stands for (-0 comes back as +0, NaN as NaN)
fn floatOfKey(k: u32) -> f32 {
  if (k == KEY_NAN) { var nan = 0x7fc00000u; return bitcast<f32>(nan); } // a var: Chrome refuses NaN constants
  return bitcast<f32>(select(~k, k ^ 0x80000000u, (k & 0x80000000u) != 0u));
}

// float16 bits -> f32 (exact, subnormals included)
fn f16ToF32(h: u32) -> f32 {
  let sign = (h & 0x8000u) << 16u;
  let e = (h >> 10u) & 0x1fu;
  let m = h & 0x3ffu;
  if (e == 0u) {
    let v = f32(m) * 5.9604644775390625e-8; // m * 2^-24
    return bitcast<f32>(bitcast<u32>(v) | sign);
  }
  if (e == 31u) { return bitcast<f32>(sign | 0x7f800000u | (m << 13u)); }
  return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

// f32 -> float16 bits, round to nearest even; overflow to infinity, NaN stays NaN
fn f32ToF16(f: f32) -> u32 {
  let x = bitcast<u32>(f);
  let sign = (x >> 16u) & 0x8000u;
  let e = i32((x >> 23u) & 0xffu);
  var m = x & 0x7fffffu;
  if (e == 0xff) { return sign | 0x7c00u | select(0u, 0x200u, m != 0u); }
  let he = e - 112;
  if (he >= 31) { return sign | 0x7c00u; }
  if (he <= 0) {
    if (he < -10) { return sign; }
    m = m | 0x800000u;
    let shift = u32(14 - he);
    let half = 1u << (shift - 1u);
    var r = m >> shift;
    let rem = m & ((half << 1u) - 1u);
    if (rem > half || (rem == half && (r & 1u) != 0u)) { r = r + 1u; }
    return sign | r;
  }
  var r = (u32(he) << 10u) | (m >> 13u);
  let rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u) != 0u)) { r = r + 1u; } // a carry into the exponent is correct
  return sign | r;
}

// f32 -> bfloat16 bits, round to nearest even, NaN kept quiet
fn f32ToBf16(f: f32) -> u32 {
  let x = bitcast<u32>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) { return (x >> 16u) | 0x40u; }
  return (x + 0x7fffu + ((x >> 16u) & 1u)) >> 16u;
}
`;

/** WGSL that widens one 16-bit value (`h`, in the low bits) of the float dtype `dt` to f32. */
export function halfToF32(dt: "float16" | "bfloat16", h: string): string {
  return dt === "float16" ? `f16ToF32(${h})` : `bitcast<f32>((${h}) << 16u)`;
}

/** WGSL that narrows an f32 expression to the 16 bits of `dt`. */
export function f32ToHalf(dt: "float16" | "bfloat16", v: string): string {
  return dt === "float16" ? `f32ToF16(${v})` : `f32ToBf16(${v})`;
}
