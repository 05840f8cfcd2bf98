// moe-router CPU kernels (AssemblyScript, compiled to WebAssembly with SIMD).
//
// The host (wasm/backend.ts) owns the layout of linear memory; every kernel
// takes pointers into it. One call processes a chunk of tokens (a top-k
// forward shown; each worker thread gets its own scratch and intermediate):
//
//   __heap_base
//   +-----------+------+--------+--------------+--------+--------+--------+-------+--------+
//   | scratch   | bias | logits | intermediate | vals   | list   | yasc   | route | probs  |
//   | (x thread)| [E4] | [T, E] | [T, E] f32   | [T, K] | [T, K] | [T, K] | [T,.] | [T, E] |
//   |           |      |        | (x thread)   |        |        |        |       |        |
//   +-----------+------+--------+--------------+--------+--------+--------+-------+--------+
//
// (route: none for int32 indices, which are the list; probs: small E only)
//
// scratch holds one token's working rows, each rounded up to 16 lanes, so
// that SIMD loops run over whole vectors; pad lanes get neutral values
// (logits -inf, keys 0, masks 0) wherever a loop could read them. Every
// region starts 16-byte aligned and ends with 16 bytes of slack: a vector
// load or store at a row's last element may reach past it, into the next
// row (rewritten when that row comes) or the slack, never another region.

// ---- codes shared with the host (wasm/backend.ts) --------------------------
const SCORE_SOFTMAX: i32 = 0;
const SCORE_SIGMOID: i32 = 1;
const SCORE_SQRTSOFTPLUS: i32 = 2;

const DT_F32: i32 = 0;
const DT_F16: i32 = 1;
const DT_BF16: i32 = 2;

const ROUTE_BYTEMAP: i32 = 0;
const ROUTE_BITMAP: i32 = 1;
const ROUTE_I16: i32 = 2;
const ROUTE_I32: i32 = 3;
const ROUTE_I64: i32 = 4;

// ---- numerical constants ----------------------------------------------------
const EPS: f32 = 1e-20; // keeps normalisation denominators away from 0
const SOFTPLUS_LINEAR: f32 = 20.0; // softplus(x) == x in float32 above this
const RADIX_BITS: i32 = 8;
const RADIX_BINS: i32 = 1 << RADIX_BITS;

// Keys: the order-preserving u32 image of a float32 selection score.
// Numbers map to keys >= 0x007FFFFF (-inf); NaN maps to KEY_NAN so that it
// ranks below every number; KEY_OUT marks experts that may not be chosen
// (already taken, or outside the kept groups). Larger key = chosen first.
const KEY_OUT: u32 = 0;
const KEY_NAN: u32 = 1;

@inline function roundUp4(n: i32): i32 {
  return (n + 3) & ~3;
}

@inline function roundUp16(n: i32): i32 {
  return (n + 15) & ~15;
}

// ---- scratch layout ----------------------------------------------------------
// top-k forward: X [E16] f32 widened logits | S [E16] f32 scores | KEY [E16]
// u32 | HIST: radix histogram or block maxima | CHOSEN [2 K4] | VAL [K4] f32 |
// GROUP [3 G4] | TOPV (lane lists) | CAND [E16] candidates | TOPS (the fused
// pass's lane lists, 2 vectors per group) | COMP [32] i64 composites | IROW
// [E16] f32, the token's intermediate row where the host makes the
// intermediate itself (hostInter: no [T, E] region to stream out).
// The dense backward reuses the first rows as G, Y, M and A.

/** Bytes of scratch one token needs; the host reserves this once per call. */
export function scratchBytes(E: i32, K: i32, G: i32): i32 {
  const row = roundUp16(E) << 2; // X, S, KEY (topk) or G, Y, M, A (backward)
  const k4 = roundUp4(K) << 2; // CHOSEN (2x), VAL
  const g4 = roundUp4(G) << 2; // GROUP (2x)
  const tops = roundUp4(max(G, 1)) << 5; // lane lists of the fused pass
  // + IROW [E16] (+ slack): the intermediate row where the host makes the intermediate itself
  return 5 * row + max(RADIX_BINS << 2, roundUp16(E)) + 3 * k4 + 3 * g4 + 5 * k4 + 64 + tops + 272 + 64;
}

/** First free byte of linear memory: the host lays out its regions above it. */
export function heapBase(): usize {
  return (__heap_base + 15) & ~15;
}

// ---- float16 / bfloat16 conversion -----------------------------------------

@inline function f16ToF32(h: u32): f32 {
  const sign = (h & 0x8000) << 16;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e == 0) {
    // zero or subnormal: m * 2^-24
    const v = <f32>m * 5.9604644775390625e-8;
    return sign ? -v : v;
  }
  if (e == 31) return reinterpret<f32>(sign | 0x7f800000 | (m << 13));
  return reinterpret<f32>(sign | ((e + 112) << 23) | (m << 13));
}

// Round to nearest, ties to even; overflow goes to infinity, NaN stays NaN.
@inline function f32ToF16(f: f32): u16 {
  const x = reinterpret<u32>(f);
  const sign = (x >> 16) & 0x8000;
  const e = <i32>((x >> 23) & 0xff);
  let m = x & 0x7fffff;
  if (e == 0xff) return <u16>(sign | 0x7c00 | (m ? 0x200 : 0));
  const he = e - 112;
  if (he >= 31) return <u16>(sign | 0x7c00);
  if (he <= 0) {
    if (he < -10) return <u16>sign;
    m |= 0x800000;
    const shift = <u32>(14 - he);
    const half: u32 = 1 << (shift - 1);
    let r = m >> shift;
    const rem = m & ((half << 1) - 1);
    if (rem > half || (rem == half && (r & 1))) r++;
    return <u16>(sign | r);
  }
  let r = (<u32>he << 10) | (m >> 13);
  const rem = m & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++; // a carry rolls into the exponent: correct
  return <u16>(sign | r);
}

@inline function f32ToBF16(f: f32): u16 {
  const x = reinterpret<u32>(f);
  if ((x & 0x7fffffff) > 0x7f800000) return <u16>((x >> 16) | 0x40); // quiet NaN
  return <u16>((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

@inline function loadAs(ptr: usize, i: i32, dt: i32): f32 {
  if (dt == DT_F32) return load<f32>(ptr + (<usize>i << 2));
  const h = <u32>load<u16>(ptr + (<usize>i << 1));
  return dt == DT_F16 ? f16ToF32(h) : reinterpret<f32>(h << 16);
}

@inline function storeAs(ptr: usize, i: i32, dt: i32, v: f32): void {
  if (dt == DT_F32) store<f32>(ptr + (<usize>i << 2), v);
  else store<u16>(ptr + (<usize>i << 1), dt == DT_F16 ? f32ToF16(v) : f32ToBF16(v));
}

@inline function dtBytes(dt: i32): i32 {
  return dt == DT_F32 ? 4 : 2;
}

// Widens one row of E logits into dst[E4]; pad lanes get -inf (they vanish
// from softmax sums and are never selected).
function widenRow(src: usize, dt: i32, E: i32, dst: usize): void {
  if (dt == DT_F32) {
    memory.copy(dst, src, <usize>E << 2);
  } else if (dt == DT_BF16) {
    let i = 0;
    // body: 4 lanes = 4 consecutive bf16 values shifted into the high half
    for (; i + 4 <= E; i += 4) {
      const w = v128.load64_zero(src + (<usize>i << 1));
      v128.store(dst + (<usize>i << 2), i32x4.shl(i32x4.extend_low_i16x8_u(w), 16));
    }
    for (; i < E; i++) store<f32>(dst + (<usize>i << 2), reinterpret<f32>(<u32>load<u16>(src + (<usize>i << 1)) << 16));
  } else {
    for (let i = 0; i < E; i++) store<f32>(dst + (<usize>i << 2), f16ToF32(<u32>load<u16>(src + (<usize>i << 1))));
  }
  for (let i = E; i < roundUp4(E); i++) store<f32>(dst + (<usize>i << 2), -Infinity);
}

function narrowRow(src: usize, E: i32, dt: i32, dst: usize): void {
  if (dt == DT_F32) {
    memory.copy(dst, src, <usize>E << 2);
    return;
  }
  for (let i = 0; i < E; i++) storeAs(dst, i, dt, load<f32>(src + (<usize>i << 2)));
}

// ---- vector math --------------------------------------------------------------

// Vector constants live in a table in linear memory: V8 rebuilds a v128.const
// from immediates on every use (several instructions), a load is one.
const VCONST = memory.data<f32>([
  -104.0, -104.0, -104.0, -104.0, // EXP_LO
  89.0, 89.0, 89.0, 89.0, // EXP_HI
  12583039.0, 12583039.0, 12583039.0, 12583039.0, // EXP_SHIFT: 1.5 * 2^23 + 127
  1.4426950408889634, 1.4426950408889634, 1.4426950408889634, 1.4426950408889634, // LOG2E
  0.693359375, 0.693359375, 0.693359375, 0.693359375, // LN2_HI
  -0.00021219444, -0.00021219444, -0.00021219444, -0.00021219444, // LN2_LO
  0.0013718281406909227, 0.0013718281406909227, 0.0013718281406909227, 0.0013718281406909227, // EXP_P0
  0.008364567533135414, 0.008364567533135414, 0.008364567533135414, 0.008364567533135414, // EXP_P1
  0.04166866093873978, 0.04166866093873978, 0.04166866093873978, 0.04166866093873978, // EXP_P2
  0.16666559875011444, 0.16666559875011444, 0.16666559875011444, 0.16666559875011444, // EXP_P3
  0.5, 0.5, 0.5, 0.5, // EXP_P4
  1.0, 1.0, 1.0, 1.0, // ONE
  0.5, 0.5, 0.5, 0.5, // HALF
  2.0, 2.0, 2.0, 2.0, // TWO
  20.0, 20.0, 20.0, 20.0, // SOFTPLUS_LIN
  1e-20, 1e-20, 1e-20, 1e-20, // EPS_V
  Infinity, Infinity, Infinity, Infinity, // INF
  1.41421356237, 1.41421356237, 1.41421356237, 1.41421356237, // SQRT2
  7.0376836292e-2, 7.0376836292e-2, 7.0376836292e-2, 7.0376836292e-2, // LOG_P0
  -1.1514610310e-1, -1.1514610310e-1, -1.1514610310e-1, -1.1514610310e-1, // LOG_P1
  1.1676998740e-1, 1.1676998740e-1, 1.1676998740e-1, 1.1676998740e-1, // LOG_P2
  -1.2420140846e-1, -1.2420140846e-1, -1.2420140846e-1, -1.2420140846e-1, // LOG_P3
  1.4249322787e-1, 1.4249322787e-1, 1.4249322787e-1, 1.4249322787e-1, // LOG_P4
  -1.6668057665e-1, -1.6668057665e-1, -1.6668057665e-1, -1.6668057665e-1, // LOG_P5
  2.0000714765e-1, 2.0000714765e-1, 2.0000714765e-1, 2.0000714765e-1, // LOG_P6
  -2.4999993993e-1, -2.4999993993e-1, -2.4999993993e-1, -2.4999993993e-1, // LOG_P7
  3.3333331174e-1, 3.3333331174e-1, 3.3333331174e-1, 3.3333331174e-1, // LOG_P8
  reinterpret<f32>(<u32>127), reinterpret<f32>(<u32>127), reinterpret<f32>(<u32>127), reinterpret<f32>(<u32>127), // I127
  reinterpret<f32>(<u32>0x3f800000), reinterpret<f32>(<u32>0x3f800000), reinterpret<f32>(<u32>0x3f800000), reinterpret<f32>(<u32>0x3f800000), // ONE_BITS
  reinterpret<f32>(<u32>0x007fffff), reinterpret<f32>(<u32>0x007fffff), reinterpret<f32>(<u32>0x007fffff), reinterpret<f32>(<u32>0x007fffff), // MANT_MASK
  reinterpret<f32>(<u32>0x80000000), reinterpret<f32>(<u32>0x80000000), reinterpret<f32>(<u32>0x80000000), reinterpret<f32>(<u32>0x80000000), // SIGN_BIT
  reinterpret<f32>(<u32>1), reinterpret<f32>(<u32>1), reinterpret<f32>(<u32>1), reinterpret<f32>(<u32>1), // KEY_NAN_V
  reinterpret<f32>(<u32>0), reinterpret<f32>(<u32>1), reinterpret<f32>(<u32>2), reinterpret<f32>(<u32>3), // IOTA
  -Infinity, -Infinity, -Infinity, -Infinity, // NEG_INF
  reinterpret<f32>(<u32>0xc1800000), reinterpret<f32>(<u32>0xc1800000), reinterpret<f32>(<u32>0xc1800000), reinterpret<f32>(<u32>0xc1800000), // EXP_N125: -125 << 23
  -86.0, -86.0, -86.0, -86.0, // SIG_SAFE
  reinterpret<f32>(<u32>0x01000000), reinterpret<f32>(<u32>0x01000000), reinterpret<f32>(<u32>0x01000000), reinterpret<f32>(<u32>0x01000000), // EXP_MIN_SCALE: (-125 + 127) << 23
  reinterpret<f32>(<u32>0), reinterpret<f32>(<u32>0), reinterpret<f32>(<u32>0), reinterpret<f32>(<u32>0xffffffff), // TIE1
  reinterpret<f32>(<u32>0), reinterpret<f32>(<u32>0), reinterpret<f32>(<u32>0xffffffff), reinterpret<f32>(<u32>0xffffffff), // TIE2
  reinterpret<f32>(<u32>0), reinterpret<f32>(<u32>0xffffffff), reinterpret<f32>(<u32>0xffffffff), reinterpret<f32>(<u32>0xffffffff), // TIE3
]);
@inline function EXP_LO(): v128 { return v128.load(VCONST + 0); }
@inline function EXP_HI(): v128 { return v128.load(VCONST + 16); }
@inline function EXP_SHIFT(): v128 { return v128.load(VCONST + 32); }
@inline function LOG2E(): v128 { return v128.load(VCONST + 48); }
@inline function LN2_HI(): v128 { return v128.load(VCONST + 64); }
@inline function LN2_LO(): v128 { return v128.load(VCONST + 80); }
@inline function EXP_P0(): v128 { return v128.load(VCONST + 96); }
@inline function EXP_P1(): v128 { return v128.load(VCONST + 112); }
@inline function EXP_P2(): v128 { return v128.load(VCONST + 128); }
@inline function EXP_P3(): v128 { return v128.load(VCONST + 144); }
@inline function EXP_P4(): v128 { return v128.load(VCONST + 160); }
@inline function ONE(): v128 { return v128.load(VCONST + 176); }
@inline function HALF(): v128 { return v128.load(VCONST + 192); }
@inline function TWO(): v128 { return v128.load(VCONST + 208); }
@inline function SOFTPLUS_LIN(): v128 { return v128.load(VCONST + 224); }
@inline function EPS_V(): v128 { return v128.load(VCONST + 240); }
@inline function INF(): v128 { return v128.load(VCONST + 256); }
@inline function SQRT2(): v128 { return v128.load(VCONST + 272); }
@inline function LOG_P0(): v128 { return v128.load(VCONST + 288); }
@inline function LOG_P1(): v128 { return v128.load(VCONST + 304); }
@inline function LOG_P2(): v128 { return v128.load(VCONST + 320); }
@inline function LOG_P3(): v128 { return v128.load(VCONST + 336); }
@inline function LOG_P4(): v128 { return v128.load(VCONST + 352); }
@inline function LOG_P5(): v128 { return v128.load(VCONST + 368); }
@inline function LOG_P6(): v128 { return v128.load(VCONST + 384); }
@inline function LOG_P7(): v128 { return v128.load(VCONST + 400); }
@inline function LOG_P8(): v128 { return v128.load(VCONST + 416); }
@inline function I127(): v128 { return v128.load(VCONST + 432); }
@inline function ONE_BITS(): v128 { return v128.load(VCONST + 448); }
@inline function MANT_MASK(): v128 { return v128.load(VCONST + 464); }
@inline function SIGN_BIT(): v128 { return v128.load(VCONST + 480); }
@inline function KEY_NAN_V(): v128 { return v128.load(VCONST + 496); }
@inline function IOTA(): v128 { return v128.load(VCONST + 512); }
@inline function NEG_INF(): v128 { return v128.load(VCONST + 528); }
@inline function EXP_N125(): v128 { return v128.load(VCONST + 544); }
@inline function SIG_SAFE(): v128 { return v128.load(VCONST + 560); }
@inline function EXP_MIN_SCALE(): v128 { return v128.load(VCONST + 576); }
// lanes j >= 4 - q: rotated by q lanes (lane j reads lane (j + q) & 3), the lanes that read an earlier lane
@inline function TIE1(): v128 { return v128.load(VCONST + 592); }
@inline function TIE2(): v128 { return v128.load(VCONST + 608); }
@inline function TIE3(): v128 { return v128.load(VCONST + 624); }

// exp(r) of the reduced argument, shared by vexp and vexpNeg: t is the
// shifter sum (EXP_SHIFT + n = 1.5 * 2^23 + 127 + n, n = round(xc / ln2));
// r = xc - n*ln2 in two parts (Cody-Waite), then expOfReduced.
@inline function expReduced(xc: v128, t: v128): v128 {
  const n = f32x4.sub(t, EXP_SHIFT());
  let r = f32x4.sub(xc, f32x4.mul(n, LN2_HI()));
  r = f32x4.sub(r, f32x4.mul(n, LN2_LO()));
  return expOfReduced(r);
}

// exp(r) for |r| <= ln2/2: 1 + r + r^2 q(r), q of degree 4 (a degree-6
// polynomial), its coefficients (EXP_P0..P4) fitted by minimax for this form
// (scripts/fit_exp.py). In float32 it is within 0.81 ulp of exp(r), as close
// as Cephes' degree-7 polynomial (the fit's own error is 1e-9 relative,
// below the evaluation's roundings), in two steps fewer: the sigmoid pass
// runs it on every logit.
@inline function expOfReduced(r: v128): v128 {
  let p = EXP_P0();
  p = f32x4.add(f32x4.mul(p, r), EXP_P1());
  p = f32x4.add(f32x4.mul(p, r), EXP_P2());
  p = f32x4.add(f32x4.mul(p, r), EXP_P3());
  p = f32x4.add(f32x4.mul(p, r), EXP_P4());
  return f32x4.add(f32x4.add(f32x4.mul(f32x4.mul(p, r), r), r), ONE());
}

// exp(x) on 4 lanes, about 1 ulp over the whole float32 range, subnormal
// results included: x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite split of
// ln2), exp(r) by expOfReduced's polynomial, then times 2^n. n is rounded
// by the shifter trick (adding 1.5 * 2^23 leaves n in the low mantissa
// bits; the shifter also adds 127, the exponent bias, for vexpNeg), and
// 2^n is applied as 2^(n >> 1) * 2^(n - (n >> 1)), two normal
// factors for n in [-150, 128], so results below 2^-126 come out subnormal
// rather than 0 and results above FLT_MAX overflow to inf. x is clamped to
// [-104, 89] first (pmin / pmax: one instruction each; NaN in x propagates);
// below -104 the result is 0.
@inline function vexp(x: v128): v128 {
  const lo = EXP_LO();
  const xc = f32x4.pmax(f32x4.pmin(x, EXP_HI()), lo);
  const t = f32x4.add(f32x4.mul(xc, LOG2E()), EXP_SHIFT());
  const p = expReduced(xc, t);
  const ni = i32x4.sub(t, EXP_SHIFT()); // the integer n, from the bits
  const n1 = i32x4.shr_s(ni, 1);
  const s1 = i32x4.shl(i32x4.add(n1, I127()), 23);
  const s2 = i32x4.shl(i32x4.add(i32x4.sub(ni, n1), I127()), 23);
  const y = f32x4.mul(f32x4.mul(p, s1), s2);
  return v128.andnot(y, f32x4.lt(x, lo));
}

// log(w) on 4 lanes for w >= 1 (finite): w = m * 2^e with m in
// [sqrt(1/2), sqrt(2)), log(m) = t - t^2/2 + t^3 * P(t) with t = m - 1, and
// e * ln2 added in two parts (0.693359375 - 2.12194440e-4) for precision.
@inline function vlogGe1(w: v128): v128 {
  const bits = w;
  let e = i32x4.sub(i32x4.shr_u(bits, 23), I127());
  let m = v128.or(v128.and(bits, MANT_MASK()), ONE_BITS());
  // move m from [1, 2) to [sqrt(1/2), sqrt(2)) so that t stays small
  const big = f32x4.gt(m, SQRT2());
  m = v128.bitselect(f32x4.mul(m, HALF()), m, big);
  e = i32x4.sub(e, big); // big lanes are -1: e + 1
  const t = f32x4.sub(m, ONE());
  const ef = f32x4.convert_i32x4_s(e);
  const z = f32x4.mul(t, t);
  let p = LOG_P0();
  p = f32x4.add(f32x4.mul(p, t), LOG_P1());
  p = f32x4.add(f32x4.mul(p, t), LOG_P2());
  p = f32x4.add(f32x4.mul(p, t), LOG_P3());
  p = f32x4.add(f32x4.mul(p, t), LOG_P4());
  p = f32x4.add(f32x4.mul(p, t), LOG_P5());
  p = f32x4.add(f32x4.mul(p, t), LOG_P6());
  p = f32x4.add(f32x4.mul(p, t), LOG_P7());
  p = f32x4.add(f32x4.mul(p, t), LOG_P8());
  let y = f32x4.mul(f32x4.mul(p, t), z);
  y = f32x4.add(y, f32x4.mul(ef, LN2_LO()));
  y = f32x4.sub(y, f32x4.mul(z, HALF()));
  return f32x4.add(f32x4.add(t, y), f32x4.mul(ef, LN2_HI()));
}

// log1p(u) for u >= 0: with w = 1 + u (rounded), log1p(u) = log(w) * u / (w - 1)
// corrects the rounding of w; where w == 1, log1p(u) = u to float32 precision.
@inline function vlog1p(u: v128): v128 {
  const w = f32x4.add(u, ONE());
  const d = f32x4.sub(w, ONE());
  const one = f32x4.eq(d, f32x4.splat(0));
  const l = f32x4.mul(vlogGe1(w), f32x4.div(u, v128.bitselect(ONE(), d, one)));
  const y = v128.bitselect(u, l, one);
  return v128.bitselect(u, y, f32x4.eq(u, INF()));
}

// sigmoid(x) = 1 / (1 + exp(-x)) for x >= 0, and exp(x) / (1 + exp(x))
// below, so that exp never overflows and tiny sigmoids keep their
// (subnormal) values instead of collapsing to 0: one division of the
// numerator chosen by the sign (correctly rounded, and a step shorter
// than e times 1 / (1 + e)).
@inline function vsigmoid(x: v128): v128 {
  const e = vexp(f32x4.neg(f32x4.abs(x)));
  return f32x4.div(v128.bitselect(ONE(), e, f32x4.ge(x, f32x4.splat(0))), f32x4.add(ONE(), e));
}

// exp(x) for x <= 0 (or NaN), bit for bit vexp(x) there, in fewer steps:
// no upper clamp (never reached); no final mask, since the clamped x = -104
// already gives +0 (n = -150, and p * 2^-150 < 2^-150 rounds to 0); and 2^n
// as 2^max(n, -125) * 2^(n - max(n, -125)). As in vexp, the first product
// is exact (a normal number) and the second rounds once, so both give the
// correctly rounded p * 2^n. Where every n >= -125 (x above about -86.6:
// nearly always) the second factor is 1, and the first is the shifter's
// bits shifted: t = 1.5 * 2^23 + 127 + n, so t << 23 == (n + 127) << 23, the
// float 2^n (for n < -125 the bits wrap to below 2^-125's, and the general
// steps run).
@inline function vexpNeg(x: v128): v128 {
  const xc = f32x4.pmax(x, EXP_LO());
  const t = f32x4.add(f32x4.mul(xc, LOG2E()), EXP_SHIFT());
  const p = expReduced(xc, t);
  const sb = i32x4.shl(t, 23);
  if (!v128.any_true(i32x4.lt_s(sb, EXP_MIN_SCALE()))) return f32x4.mul(p, sb);
  const nb = i32x4.shl(i32x4.sub(t, EXP_SHIFT()), 23); // n << 23
  const a = i32x4.max_s(nb, EXP_N125()); // max(n, -125) << 23
  const s1 = i32x4.add(a, ONE_BITS()); // 2^max(n, -125)
  const s2 = i32x4.add(i32x4.sub(nb, a), ONE_BITS()); // 2^(n - max(n, -125))
  return f32x4.mul(f32x4.mul(p, s1), s2);
}

// vsigmoid, bit for bit, on vexpNeg: -|x| is x with the sign bit set, and
// the numerator goes by the sign bit instead of x >= 0, as pmax(e, 0 or 1):
// e where the sign is set, else 1 (e <= 1; x = -0 gives e = 1 either way;
// a NaN e is kept, and the division returns it as vsigmoid's does).
@inline function vsigmoidFast(x: v128): v128 {
  return sigmoidOfExp(x, vexpNeg(v128.or(x, SIGN_BIT())));
}

// sqrtsoftplus(x) = sqrt(softplus(x)), softplus(x) = log1p(exp(x)):
//   above 20, softplus(x) is x (the float32 identity; no exp overflow);
//   below -20, softplus(x) = exp(x) (1 + O(exp(x))), so the result is
//   exp(x / 2), which stays a normal float long after exp(x) would have
//   gone subnormal and lost its digits.
@inline function vsqrtsoftplus(x: v128): v128 {
  const tiny = f32x4.lt(x, f32x4.neg(SOFTPLUS_LIN()));
  const e = vexp(v128.bitselect(f32x4.mul(x, HALF()), x, tiny));
  const y = f32x4.sqrt(v128.bitselect(x, vlog1p(e), f32x4.gt(x, SOFTPLUS_LIN())));
  return v128.bitselect(e, y, tiny);
}

@inline function hsum(v: v128): f32 {
  return (f32x4.extract_lane(v, 0) + f32x4.extract_lane(v, 1)) + (f32x4.extract_lane(v, 2) + f32x4.extract_lane(v, 3));
}

@inline function hmax(v: v128): f32 {
  return max(max(f32x4.extract_lane(v, 0), f32x4.extract_lane(v, 1)), max(f32x4.extract_lane(v, 2), f32x4.extract_lane(v, 3)));
}

/**
 * Test hook: applies one vector routine (0 exp, 1 log1p, 2 sigmoid, 3 sqrtsoftplus, 4 exp of x <= 0,
 * 5 the forward's sigmoid, 6 the four-token kernel's exp of x <= 0, 7 the scalar NativeMathf.exp, 8 the
 * forward's sigmoid for |x| <= 86: sigmoidSafe) to n
 * floats in place.
 */
export function mathCheck(kind: i32, ptr: usize, n: i32): void {
  for (let i = 0; i < n; i += 4) {
    const p = ptr + (<usize>i << 2);
    const x = v128.load(p);
    if (kind == 7) {
      for (let j = 0; j < 4; j++) store<f32>(p + (<usize>j << 2), NativeMathf.exp(load<f32>(p + (<usize>j << 2))));
      continue;
    }
    let y: v128;
    if (kind == 0) y = vexp(x);
    else if (kind == 1) y = vlog1p(x);
    else if (kind == 2) y = vsigmoid(x);
    else if (kind == 3) y = vsqrtsoftplus(x);
    else if (kind == 4) y = vexpNeg(x);
    else if (kind == 6) y = vexpLut(x);
    else if (kind == 8) y = sigmoidSafe(x); // vsigmoidFast's bits where |x| <= 86 (sigmoidPassSafe)
    else y = vsigmoidFast(x);
    v128.store(p, y);
  }
}

// ---- scores -------------------------------------------------------------------

// Scores of one row: s = softmax(x) | sigmoid(x) | sqrtsoftplus(x), over E4
// lanes (pad lanes hold -inf logits and produce 0 scores).
function scoreRow(X: usize, E4: i32, fn: i32, S: usize): void {
  if (fn == SCORE_SOFTMAX) {
    // softmax = exp(x - max) / sum; max-subtracted so exp never overflows
    let mv = f32x4.splat(-Infinity);
    for (let i = 0; i < E4; i += 4) mv = f32x4.max(mv, v128.load(X + (<usize>i << 2)));
    const m = f32x4.splat(hmax(mv));
    let sv = f32x4.splat(0);
    for (let i = 0; i < E4; i += 4) {
      const e = vexp(f32x4.sub(v128.load(X + (<usize>i << 2)), m));
      v128.store(S + (<usize>i << 2), e);
      sv = f32x4.add(sv, e);
    }
    const sum = f32x4.splat(hsum(sv));
    for (let i = 0; i < E4; i += 4) {
      const p = S + (<usize>i << 2);
      v128.store(p, f32x4.div(v128.load(p), sum));
    }
  } else if (fn == SCORE_SIGMOID) {
    for (let i = 0; i < E4; i += 4) {
      v128.store(S + (<usize>i << 2), vsigmoid(v128.load(X + (<usize>i << 2))));
    }
  } else {
    for (let i = 0; i < E4; i += 4) {
      v128.store(S + (<usize>i << 2), vsqrtsoftplus(v128.load(X + (<usize>i << 2))));
    }
  }
}

// ---- keys and selection ----------------------------------------------------------

@inline function keyOf(r: f32): u32 {
  if (r != r) return KEY_NAN;
  const b = reinterpret<u32>(r + 0.0); // -0 + 0 = +0: equal values, equal keys
  return b >> 31 ? ~b : b | 0x80000000;
}

// keys of 4 selection scores (see keyOf)
@inline function vkey(r: v128): v128 {
  const z = f32x4.add(r, f32x4.splat(0)); // -0 + 0 = +0
  const k = v128.xor(z, v128.or(i32x4.shr_s(z, 31), SIGN_BIT()));
  return v128.bitselect(KEY_NAN_V(), k, f32x4.ne(z, z));
}

// the selection score a key stands for (-0 comes back as +0, NaN as NaN)
@inline function floatOfKey(k: u32): f32 {
  if (k == KEY_NAN) return NaN;
  return reinterpret<f32>(k & 0x80000000 ? k ^ 0x80000000 : ~k);
}

// lanes of the vector at i that hold experts (i + lane < E)
@inline function inRow(i: i32, E: i32): v128 {
  return i32x4.lt_s(i32x4.add(IOTA(), i32x4.splat(i)), i32x4.splat(E));
}

// keys of E values (lanes: 4 consecutive experts); pad lanes get KEY_OUT
function keysOf(R: usize, E: i32, KEY: usize): void {
  const E4 = roundUp4(E);
  for (let i = 0; i < E4; i += 4) v128.store(KEY + (<usize>i << 2), vkey(v128.load(R + (<usize>i << 2))));
  for (let i = E; i < roundUp16(E); i++) store<u32>(KEY + (<usize>i << 2), KEY_OUT);
}

// Inserts (idx, k) into the descending list CK/CI of n entries, after every
// entry whose key is >= k (so equal keys stay in index order); the last entry
// drops out.
@inline function insertTop(CI: usize, CK: usize, n: i32, idx: i32, k: u32): void {
  let p = n - 1;
  while (p > 0) {
    const above = load<u32>(CK + (<usize>(p - 1) << 2));
    if (above >= k) break;
    store<u32>(CK + (<usize>p << 2), above);
    store<i32>(CI + (<usize>p << 2), load<i32>(CI + (<usize>(p - 1) << 2)));
    p--;
  }
  store<u32>(CK + (<usize>p << 2), k);
  store<i32>(CI + (<usize>p << 2), idx);
}

// naive top-n of KEY[from, to): one scan that keeps the n best (key, index)
// pairs in order (key descending, ties by lower index: a later equal key
// never displaces an earlier one). The same set and order as n rounds of
// arg-max with masking, and O(n * E) at worst like it, but a vector of 4 keys
// that does not beat the current n-th best (the common case once the list
// fills) costs one compare. Entries that stay KEY_OUT are never listed while
// n allowed keys exist, which the callers guarantee.
function selectScan(KEY: usize, from: i32, to: i32, n: i32, CI: usize, CK: usize): void {
  for (let j = 0; j < n; j++) store<u32>(CK + (<usize>j << 2), KEY_OUT);
  const last = CK + (<usize>(n - 1) << 2);
  let thr: u32 = KEY_OUT; // key of the n-th best so far
  let i = from;
  for (; i < to && (i & 3) != 0; i++) {
    const k = load<u32>(KEY + (<usize>i << 2));
    if (k > thr) { insertTop(CI, CK, n, i, k); thr = load<u32>(last); }
  }
  // body: lanes hold keys i .. i+3 (KEY is 16-byte aligned)
  let tv = i32x4.splat(thr);
  for (; i + 4 <= to; i += 4) {
    const v = v128.load(KEY + (<usize>i << 2));
    if (!v128.any_true(i32x4.gt_u(v, tv))) continue;
    for (let l = 0; l < 4; l++) {
      const k = load<u32>(KEY + (<usize>(i + l) << 2));
      if (k > thr) { insertTop(CI, CK, n, i + l, k); thr = load<u32>(last); }
    }
    tv = i32x4.splat(thr);
  }
  for (; i < to; i++) {
    const k = load<u32>(KEY + (<usize>i << 2));
    if (k > thr) { insertTop(CI, CK, n, i, k); thr = load<u32>(last); }
  }
}

// radix top-K. Phases: (0) for K <= RADIX_FILTER_K, a filter: per-lane
// sorted lists of depth D = ceil(K / 4) (branch-free max / min) give T0,
// the smallest of the lanes' D-th keys; at least 4 * D >= K keys are >= T0,
// so the top K are among the keys >= T0, which are listed in index order in
// CAND (typically K to 2K of them); larger K take every key as a candidate.
// (1) find the K-th largest candidate key T by 32 / RADIX_BITS histogram
// passes over the candidates that share the prefix found so far, keeping
// `need` = how many keys equal to T belong to the top K; (2) gather, in
// index order, every key > T and the first `need` keys == T (tie rule: lower
// index wins); (3) sort the K picks by key descending (stable, so equal keys
// stay in index order). O(E) per pass, independent of K; counters are u32 and
// count at most E keys, so they cannot overflow.
const RADIX_FILTER_K = 32;

// Up to this many filtered candidates, the radix passes give way to rank
// counting (O(c^2) compares, 2 per vector op, cheaper than 4 histogram passes).
const RANK_MAX = 64;

// The top K of the c candidates listed in CAND (c >= K) into CHOSEN, best
// first, by counting each one's rank on 64-bit composites (key high,
// 0x7fffffff - index low: key descending, ties by lower index, the radix
// path's set and order). COMP: room for c + 1 i64 (the histogram's space).
function rankCandidates(KEY: usize, CAND: usize, c: i32, K: i32, COMP: usize, CHOSEN: usize): void {
  for (let j = 0; j < c; j++) {
    const i = load<i32>(CAND + (<usize>j << 2));
    const k = load<u32>(KEY + (<usize>i << 2));
    store<i64>(COMP + (<usize>j << 3), (<i64><i32>(k ^ 0x80000000) << 32) | <i64>(0x7fffffff - i));
  }
  store<i64>(COMP + (<usize>c << 3), i64.MIN_VALUE); // pads an odd count
  const nv = (c + 1) >> 1;
  for (let j = 0; j < c; j++) {
    const cj = i64x2.splat(load<i64>(COMP + (<usize>j << 3)));
    let a0 = f32x4.splat(0);
    let a1 = f32x4.splat(0);
    let v = 0;
    for (; v + 2 <= nv; v += 2) {
      const p = COMP + (<usize>v << 4);
      a0 = i64x2.add(a0, i64x2.gt_s(v128.load(p), cj));
      a1 = i64x2.add(a1, i64x2.gt_s(v128.load(p, 16), cj));
    }
    if (v < nv) a0 = i64x2.add(a0, i64x2.gt_s(v128.load(COMP + (<usize>v << 4)), cj));
    const acc = i64x2.add(a0, a1);
    const rank = -<i32>(i64x2.extract_lane(acc, 0) + i64x2.extract_lane(acc, 1));
    store<i32>(CHOSEN + (<usize>min(rank, K) << 2), load<i32>(CAND + (<usize>j << 2)));
  }
}

// The filter's per-lane sorted lists, `depth` deep (a constant: the lists
// live in registers), over KEY[0, E4); returns level D - 1 (D <= depth):
// each lane's D-th largest key.
// A key with K keys >= it: the smallest of the per-lane ceil(K / 4)-th largest (K <= 32).
@inline function laneBound(KEY: usize, E4: i32, K: i32): u32 {
  const D = (K + 3) >> 2;
  return hminU(D <= 2 ? laneLists(KEY, E4, D, 2) : D <= 4 ? laneLists(KEY, E4, D, 4) : laneLists(KEY, E4, D, 8));
}

@inline function laneLists(KEY: usize, E4: i32, D: i32, depth: i32): v128 {
  const z = f32x4.splat(0);
  let l0 = z, l1 = z, l2 = z, l3 = z, l4 = z, l5 = z, l6 = z, l7 = z;
  for (let i = 0; i < E4; i += 4) {
    let v = v128.load(KEY + (<usize>i << 2));
    let m = l0; l0 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
    m = l1; l1 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
    if (depth > 2) {
      m = l2; l2 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
      m = l3; l3 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
    }
    if (depth > 4) {
      m = l4; l4 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
      m = l5; l5 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
      m = l6; l6 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
      l7 = i32x4.max_u(l7, v);
    }
  }
  if (D == 1) return l0;
  if (D == 2) return l1;
  if (D == 3) return l2;
  if (D == 4) return l3;
  if (D == 5) return l4;
  if (D == 6) return l5;
  if (D == 7) return l6;
  return l7;
}

function selectRadix(KEY: usize, E: i32, K: i32, HIST: usize, CHOSEN: usize, CAND: usize, LANES: usize): void {
  const E4 = roundUp4(E);
  let c = E;
  let listed = false;
  if (K <= RADIX_FILTER_K) {
    const T0 = laneBound(KEY, E4, K);
    c = collectAbove(KEY, 0, E4, T0, CAND, 0);
    listed = true;
  }
  selectRadixOf(KEY, K, HIST, CHOSEN, listed ? CAND : 0, c);
}

// Phases 1-3 of selectRadix over the c experts listed in CAND (in index
// order, the top K among them), or over experts 0 .. c - 1 when CAND is 0.
function selectRadixOf(KEY: usize, K: i32, HIST: usize, CHOSEN: usize, CAND: usize, c: i32): void {
  const listed = CAND != 0;
  if (listed && c <= RANK_MAX) {
    rankCandidates(KEY, CAND, c, K, HIST, CHOSEN);
    return;
  }
  let prefix: u32 = 0;
  let mask: u32 = 0;
  let need = K;
  for (let shift = 32 - RADIX_BITS; shift >= 0; shift -= RADIX_BITS) {
    zeroWords(HIST, RADIX_BINS);
    for (let j = 0; j < c; j++) {
      const k = load<u32>(KEY + (<usize>(listed ? load<i32>(CAND + (<usize>j << 2)) : j) << 2));
      if ((k & mask) == prefix) {
        const h = HIST + (<usize>((k >> shift) & (RADIX_BINS - 1)) << 2);
        store<u32>(h, load<u32>(h) + 1);
      }
    }
    let bin = RADIX_BINS - 1;
    for (; bin > 0; bin--) {
      const n = <i32>load<u32>(HIST + (<usize>bin << 2));
      if (n >= need) break;
      need -= n;
    }
    prefix |= <u32>bin << shift;
    mask |= <u32>(RADIX_BINS - 1) << shift;
  }
  const T = prefix;
  let n = 0;
  for (let j = 0; j < c && n < K; j++) {
    const i = listed ? load<i32>(CAND + (<usize>j << 2)) : j;
    const k = load<u32>(KEY + (<usize>i << 2));
    if (k > T || (k == T && need > 0)) {
      if (k == T) need--;
      store<i32>(CHOSEN + (<usize>n << 2), i);
      n++;
    }
  }
  // insertion sort by key descending; K is the number of picks
  for (let a = 1; a < K; a++) {
    const ia = load<i32>(CHOSEN + (<usize>a << 2));
    const ka = load<u32>(KEY + (<usize>ia << 2));
    let b = a - 1;
    while (b >= 0) {
      const ib = load<i32>(CHOSEN + (<usize>b << 2));
      if (load<u32>(KEY + (<usize>ib << 2)) >= ka) break;
      store<i32>(CHOSEN + (<usize>(b + 1) << 2), ib);
      b--;
    }
    store<i32>(CHOSEN + (<usize>(b + 1) << 2), ia);
  }
}

// CHOSEN needs room for 2 * K4 entries: indices, then the naive scan's keys.
// KEY must be zero-padded to a multiple of 16; HIST holds max(RADIX_BINS, E16 / 4) words.
// CAND: E16 words; LANES: ceil(K / 4) vectors (radix only).
function selectTopK(
  KEY: usize, E: i32, K: i32, radix: bool, HIST: usize, CHOSEN: usize, built: bool, CAND: usize, LANES: usize,
): void {
  if (radix) selectRadix(KEY, E, K, HIST, CHOSEN, CAND, LANES);
  else selectNaive(KEY, E, K, HIST, CHOSEN, built);
}

@inline function hmaxU(v: v128): u32 {
  const a = i32x4.max_u(v, i32x4.shuffle(v, v, 2, 3, 0, 1));
  return max(<u32>i32x4.extract_lane(a, 0), <u32>i32x4.extract_lane(a, 1));
}

// naive top-K: K rounds of arg-max, each taking the winner out (key ->
// KEY_OUT), so picks come in order: key descending, ties by lower index.
// Two levels make a round cheap: BM holds, per block of 16 keys, the
// lane-wise max of its 4 vectors (see popMax). O(K * E / 16) vector ops.
// `built`: BM is already up to date (the group limit made it).
function selectNaive(KEY: usize, E: i32, K: i32, BM: usize, CHOSEN: usize, built: bool): void {
  const nb = roundUp16(E) >> 4;
  if (!built) buildBlockMax(KEY, 0, nb, BM);
  for (let k = 0; k < K; k++) store<i32>(CHOSEN + (<usize>k << 2), popMax(KEY, BM, 0, nb, 0));
}

function buildBlockMax(KEY: usize, b0: i32, b1: i32, BM: usize): void {
  for (let b = b0; b < b1; b++) v128.store(BM + (<usize>b << 4), blockMax(KEY + (<usize>b << 6)));
}

// One arg-max round over the blocks [b0, b1): the largest key over their
// maxima, the first block holding it, the first key equal to it in that
// block; the key is taken out (KEY_OUT) and the block's maximum refreshed.
// Returns the expert index; writes the key to keyOut when it is not 0.
function popMax(KEY: usize, BM: usize, b0: i32, b1: i32, keyOut: usize): i32 {
  // two accumulators: the max_u chain is the bound
  let m0 = i32x4.splat(0);
  let m1 = i32x4.splat(0);
  let b = b0;
  for (; b + 2 <= b1; b += 2) {
    m0 = i32x4.max_u(m0, v128.load(BM + (<usize>b << 4)));
    m1 = i32x4.max_u(m1, v128.load(BM + (<usize>b << 4), 16));
  }
  if (b < b1) m0 = i32x4.max_u(m0, v128.load(BM + (<usize>b << 4)));
  const top = hmaxU(i32x4.max_u(m0, m1));
  const best = i32x4.splat(top);
  b = b0;
  while (!v128.any_true(i32x4.eq(v128.load(BM + (<usize>b << 4)), best))) b++;
  const blk = KEY + (<usize>b << 6);
  let at = b << 4;
  for (let j = 0; j < 4; j++) {
    const hit = i32x4.bitmask(i32x4.eq(v128.load(blk + (<usize>j << 4)), best));
    if (hit) {
      at += (j << 2) + ctz(hit);
      break;
    }
  }
  store<u32>(KEY + (<usize>at << 2), KEY_OUT);
  v128.store(BM + (<usize>b << 4), blockMax(blk));
  if (keyOut) store<u32>(keyOut, top);
  return at;
}

@inline function blockMax(p: usize): v128 {
  return i32x4.max_u(i32x4.max_u(v128.load(p), v128.load(p, 16)), i32x4.max_u(v128.load(p, 32), v128.load(p, 48)));
}

// Zeroes n 32-bit words; a plain loop, since V8's memory.fill is a call out
// of wasm that costs more than the stores for rows this short.
function zeroWords(p: usize, n: i32): void {
  let i = 0;
  for (; i + 4 <= n; i += 4) v128.store(p + (<usize>i << 2), f32x4.splat(0));
  for (; i < n; i++) store<u32>(p + (<usize>i << 2), 0);
}

// Largest `per` keys of KEY[from, from + size) in descending order, into
// OUT[per]. Lanes of a vector run 4 interleaved sorted lists (TOPV[per]
// vectors, branch-free max/min insertion); the 4 * per lane winners hold
// the group's top `per`, picked out at the end. Needs from and size to be
// multiples of 4; other groups take the scalar scan.
function groupTop(KEY: usize, from: i32, size: i32, per: i32, TOPV: usize, OUT: usize, CI: usize, CK: usize): void {
  if (((from | size) & 3) != 0) {
    selectScan(KEY, from, from + size, per, CI, CK);
    for (let j = 0; j < per; j++) store<u32>(OUT + (<usize>j << 2), load<u32>(CK + (<usize>j << 2)));
    return;
  }
  for (let j = 0; j < per; j++) v128.store(TOPV + (<usize>j << 4), f32x4.splat(0));
  for (let i = from; i < from + size; i += 4) {
    let v = v128.load(KEY + (<usize>i << 2));
    for (let j = 0; j < per; j++) {
      const p = TOPV + (<usize>j << 4);
      const m = v128.load(p);
      v128.store(p, i32x4.max_u(m, v));
      v = i32x4.min_u(m, v);
    }
  }
  // pick the top `per` of the 4 * per lane winners, largest first
  const n = per << 2;
  for (let j = 0; j < per; j++) {
    let best: u32 = 0;
    let at = 0;
    for (let c = 0; c < n; c++) {
      const k = load<u32>(TOPV + (<usize>c << 2));
      if (k > best) { best = k; at = c; }
    }
    store<u32>(TOPV + (<usize>at << 2), 0);
    store<u32>(OUT + (<usize>j << 2), best);
  }
}

// ---- fast naive path: threshold filter ----------------------------------------
//
// For K <= 8 without groups, and for groups of a multiple of 4 experts with
// K / GK <= 2, the top K come from a filter instead of K arg-max rounds:
// (1) per-lane top-2 lists (4 lanes x 2 keys, branch-free max / min, kept
// by the fused score pass) give a lower bound T0 of the K-th largest allowed
// key, since at least K distinct allowed keys are >= T0; (2) one scan, in
// index order, lists every allowed key >= T0; (3) the list is ordered
// (orderCandidates). Same set and order as the arg-max rounds (key
// descending, ties by lower index); typically K to 2K keys pass the filter.
// See selectFastTops.

// per-lane top-2 of KEY[from, to) (multiples of 4) into P[0] (first) and P[1] (second)
@inline function laneTop2(KEY: usize, from: i32, to: i32, P: usize): void {
  let m1 = i32x4.splat(0);
  let m2 = i32x4.splat(0);
  for (let i = from; i < to; i += 4) {
    const v = v128.load(KEY + (<usize>i << 2));
    m2 = i32x4.max_u(m2, i32x4.min_u(m1, v));
    m1 = i32x4.max_u(m1, v);
  }
  v128.store(P, m1);
  v128.store(P, m2, 16);
}

@inline function hminU(v: v128): u32 {
  const a = i32x4.min_u(v, i32x4.shuffle(v, v, 2, 3, 0, 1));
  return min(<u32>i32x4.extract_lane(a, 0), <u32>i32x4.extract_lane(a, 1));
}

// Whether the fast path applies to this shape (see above).
@inline function fastNaive(E: i32, K: i32, G: i32, GK: i32): bool {
  if (GK > 0) return K / GK <= 2 && ((E / G) & 3) == 0;
  return K <= 8;
}

// Group limit: a group's score is the sum of its top (K / GK) selection
// scores, added in descending order; the GK best groups are kept (equal
// scores: lower group index), every expert outside them is taken out.
// Groups of a multiple of 16 experts use the block maxima BM (arg-max rounds
// whose picks are put back afterwards); then a dropped group is taken out by
// zeroing its block maxima when the naive selection follows (returns true:
// BM is built), or its keys when the radix selection does. Other group sizes
// use the per-lane lists of groupTop.
// Scratch: CHOSEN (2 * K4 entries), GROUP (G4), TOPV (K / GK vectors + keys).
function limitGroups(
  KEY: usize, E: i32, K: i32, G: i32, GK: i32, radix: bool,
  CHOSEN: usize, GROUP: usize, TOPV: usize, BM: usize,
): bool {
  const size = E / G;
  const per = K / GK;
  const CK = CHOSEN + (<usize>roundUp4(K) << 2);
  const OUT = TOPV + (<usize>per << 4);
  const blocks = (size & 15) == 0;
  const bs = size >> 4;
  if (blocks) buildBlockMax(KEY, 0, roundUp16(E) >> 4, BM);
  for (let g = 0; g < G; g++) {
    if (blocks) {
      for (let j = 0; j < per; j++) {
        store<i32>(CHOSEN + (<usize>j << 2), popMax(KEY, BM, g * bs, (g + 1) * bs, OUT + (<usize>j << 2)));
      }
      for (let j = 0; j < per; j++) {
        store<u32>(KEY + (<usize>load<i32>(CHOSEN + (<usize>j << 2)) << 2), load<u32>(OUT + (<usize>j << 2)));
      }
      buildBlockMax(KEY, g * bs, (g + 1) * bs, BM);
    } else {
      groupTop(KEY, g * size, size, per, TOPV, OUT, CHOSEN, CK);
    }
    let sum: f32 = 0;
    for (let j = 0; j < per; j++) sum += floatOfKey(load<u32>(OUT + (<usize>j << 2)));
    store<u32>(GROUP + (<usize>g << 2), keyOf(sum));
  }
  // keep GK groups: take each best group out by marking it KEY_OUT; the
  // groups still holding a key afterwards are the dropped ones
  for (let j = 0; j < GK; j++) {
    let best: u32 = 0;
    let at = 0;
    for (let g = 0; g < G; g++) {
      const k = load<u32>(GROUP + (<usize>g << 2));
      if (k > best) { best = k; at = g; }
    }
    store<u32>(GROUP + (<usize>at << 2), KEY_OUT);
  }
  const viaBlocks = blocks && !radix;
  for (let g = 0; g < G; g++) {
    if (load<u32>(GROUP + (<usize>g << 2)) == KEY_OUT) continue;
    if (viaBlocks) zeroWords(BM + (<usize>(g * bs) << 4), bs << 2);
    else zeroWords(KEY + (<usize>(g * size) << 2), size);
  }
  return viaBlocks;
}

// Up to 16 ids (ids[0, K)) in ascending order: dst[place] gets the id, or,
// with `from`, the 32-bit word from[id]. Each id's place is counted, 4 ids
// a vector: how many ids are smaller, or (unless the caller knows them
// `distinct`) equal at an earlier position; pad lanes hold i32.MAX. No
// branch depends on the ids, where an insertion sort's inner loop would
// mispredict about once an id. ids needs 16 readable bytes past its K ids.
@inline function placeAscending(ids: usize, K: i32, distinct: bool, from: usize, dst: usize, idsDst: usize = 0): void {
  const big = i32x4.splat(i32.MAX_VALUE);
  const c0 = v128.bitselect(v128.load(ids), big, inRow(0, K));
  const c1 = K > 4 ? v128.bitselect(v128.load(ids, 16), big, inRow(4, K)) : big;
  const c2 = K > 8 ? v128.bitselect(v128.load(ids, 32), big, inRow(8, K)) : big;
  const c3 = K > 12 ? v128.bitselect(v128.load(ids, 48), big, inRow(12, K)) : big;
  const p0 = IOTA(), p1 = i32x4.add(p0, i32x4.splat(4)), p2 = i32x4.add(p0, i32x4.splat(8)), p3 = i32x4.add(p0, i32x4.splat(12));
  for (let k = 0; k < K; k++) {
    const e = load<i32>(ids + (<usize>k << 2));
    const ev = i32x4.splat(e), kv = i32x4.splat(k);
    let c = i32x4.add(i32x4.add(i32x4.lt_s(c0, ev), i32x4.lt_s(c1, ev)), i32x4.add(i32x4.lt_s(c2, ev), i32x4.lt_s(c3, ev)));
    if (!distinct) {
      const t01 = i32x4.add(v128.and(i32x4.eq(c0, ev), i32x4.lt_s(p0, kv)), v128.and(i32x4.eq(c1, ev), i32x4.lt_s(p1, kv)));
      const t23 = i32x4.add(v128.and(i32x4.eq(c2, ev), i32x4.lt_s(p2, kv)), v128.and(i32x4.eq(c3, ev), i32x4.lt_s(p3, kv)));
      c = i32x4.add(c, i32x4.add(t01, t23));
    }
    const h = i32x4.add(c, i32x4.shuffle(c, c, 2, 3, 0, 1));
    const place = <usize>(-(i32x4.extract_lane(h, 0) + i32x4.extract_lane(h, 1))) << 2;
    store<i32>(dst + place, from ? load<i32>(from + (<usize>e << 2)) : e);
    if (idsDst) store<i32>(idsDst + place, e);
  }
}

// ---- top-k forward: the fused score pass ------------------------------------------
//
// One pass over a token's experts computes, per vector of 4 experts: the
// score s (kept where the values are read later), the intermediate, the
// selection score r = s + bias, its key, and (when `track`) per-lane top-2
// lists of the keys of each group, which the fast selection starts from.
// Keys are computed without the NaN case (KEY_NAN): NaN lanes are flagged
// instead, and a token that has any is keyed again by fixKeys (rare). For
// every score function but post-softmax, s >= +0 or NaN, so r is never -0
// (-0 needs two -0 addends) and needs no -0 -> +0 step.

const PASS_SIGMOID: i32 = 0; // s = sigmoid(x), intermediate = s
const PASS_SQRTSOFTPLUS: i32 = 1; // s = sqrtsoftplus(x) into S, intermediate = x
const PASS_PRE: i32 = 2; // s = intermediate / sum (the exps are in the intermediate already)
const PASS_POST: i32 = 3; // keys of x itself

// The score of the vector at byte offset o, stored where the pass keeps it.
@inline function passScore(kind: i32, src: usize, irow: usize, S: usize, o: usize, sum: v128): v128 {
  if (kind == PASS_SIGMOID) {
    const s = vsigmoidFast(v128.load(src + o));
    v128.store(irow + o, s);
    return s;
  }
  if (kind == PASS_SQRTSOFTPLUS) {
    const x = v128.load(src + o);
    const s = vsqrtsoftplus(x);
    v128.store(irow + o, x);
    v128.store(S + o, s);
    return s;
  }
  if (kind == PASS_PRE) {
    const s = f32x4.div(v128.load(irow + o), sum);
    v128.store(irow + o, s);
    return s;
  }
  return f32x4.add(v128.load(src + o), f32x4.splat(0)); // post: -0 + 0 = +0
}

// The fused pass over one token (see above); returns whether a selection
// score was NaN (then KEY and the lane lists need fixKeys). Groups: `ngroups`
// runs of `gsize` experts (gsize a multiple of 4), or one run of the whole
// row; lane lists go to TOPS (first, second: 2 vectors per group).
@inline function fusedPass(
  kind: i32, hasBias: bool, track: bool,
  src: usize, E: i32, irow: usize, S: usize, KEY: usize, bias: usize, sum: v128,
  ngroups: i32, gsize: i32, TOPS: usize,
): bool {
  let nan = f32x4.splat(0);
  let g0 = 0;
  for (let g = 0; g < ngroups; g++) {
    const end = min(g0 + gsize, E);
    let m1 = f32x4.splat(0);
    let m2 = f32x4.splat(0);
    let i = g0;
    // body: lanes hold experts i .. i+3
    for (; i + 4 <= end; i += 4) {
      const o = <usize>i << 2;
      const s = passScore(kind, src, irow, S, o, sum);
      const r = hasBias ? f32x4.add(s, v128.load(bias + o)) : s;
      const k = hasBias || kind == PASS_POST ? v128.xor(r, v128.or(i32x4.shr_s(r, 31), SIGN_BIT())) : v128.or(r, SIGN_BIT());
      nan = v128.or(nan, f32x4.ne(r, r));
      v128.store(KEY + o, k);
      if (track) {
        m2 = i32x4.max_u(m2, i32x4.min_u(m1, k));
        m1 = i32x4.max_u(m1, k);
      }
    }
    // tail: the row's last, partial vector; lanes past E get KEY_OUT
    if (i < end) {
      const o = <usize>i << 2;
      const inside = inRow(i, E);
      const s = passScore(kind, src, irow, S, o, sum);
      const r = hasBias ? f32x4.add(s, v128.load(bias + o)) : s;
      const k = hasBias || kind == PASS_POST ? v128.xor(r, v128.or(i32x4.shr_s(r, 31), SIGN_BIT())) : v128.or(r, SIGN_BIT());
      nan = v128.or(nan, v128.and(f32x4.ne(r, r), inside));
      const kk = v128.and(k, inside);
      v128.store(KEY + o, kk);
      if (track) {
        m2 = i32x4.max_u(m2, i32x4.min_u(m1, kk));
        m1 = i32x4.max_u(m1, kk);
      }
    }
    if (track) {
      v128.store(TOPS + (<usize>g << 5), m1);
      v128.store(TOPS + (<usize>g << 5), m2, 16);
    }
    g0 += gsize;
  }
  return v128.any_true(nan);
}

// fusedPass for sigmoid (PASS_SIGMOID) on rows of whole vectors, in fewer
// steps, for tokens whose logits all have |x| <= 86: returns false when one
// has not (or is NaN), and the caller runs fusedPass instead, which writes
// everything again. The same bits as vsigmoidFast, since for those x:
//   * vexpNeg's -|x| needs no clamp at -104, and its n >= -125 (the scale
//     2^n is the one multiply);
//   * n and the scale come from the shifter as in vexpNeg (n + 127 >= 2);
//   * the numerator is vsigmoidFast's (sigmoidOfExp);
// and no selection score is NaN when the bias has none (the caller checks),
// so there is no NaN flag. (mathCheck 8 against 5: equal bits on every
// float32 x with |x| <= 86.)
@inline function sigmoidSafe(x: v128): v128 {
  return sigmoidSafeN(x, v128.or(x, SIGN_BIT()));
}
@inline function sigmoidSafeN(x: v128, xn: v128): v128 {
  const t = shifted(xn);
  return sigmoidOfExp(x, expPoly(expArg(xn, t), t));
}

// sigmoidSafe's exp(-|x|), first steps: the shifter's sum t (see vexpNeg), then
// r = xn - n * ln2 (Cody-Waite)
@inline function shifted(xn: v128): v128 {
  return f32x4.add(f32x4.mul(xn, LOG2E()), EXP_SHIFT());
}
@inline function expArg(xn: v128, t: v128): v128 {
  const n = f32x4.sub(t, EXP_SHIFT());
  const r = f32x4.sub(xn, f32x4.mul(n, LN2_HI()));
  return f32x4.sub(r, f32x4.mul(n, LN2_LO()));
}

// then the polynomial of expReduced, times 2^n (n >= -125)
@inline function expPoly(r: v128, t: v128): v128 {
  return f32x4.mul(expOfReduced(r), i32x4.shl(t, 23));
}

// and sigmoid(x) from e = exp(-|x|) (see vsigmoidFast)
@inline function sigmoidOfExp(x: v128, e: v128): v128 {
  const one = ONE();
  return f32x4.div(f32x4.pmax(e, v128.andnot(one, i32x4.shr_s(x, 31))), f32x4.add(one, e));
}

// the key of r = s + bias (see fusedPass: r is never -0 or, here, NaN)
@inline function passKey(hasBias: bool, s: v128, bias: usize, o: usize): v128 {
  const r = hasBias ? f32x4.add(s, v128.load(bias + o)) : s;
  return hasBias ? v128.xor(r, v128.or(i32x4.shr_s(r, 31), SIGN_BIT())) : v128.or(r, SIGN_BIT());
}

// Whether sigmoidSafe applies to every lane seen, from the lane-wise signed
// maximum of the bits of xn = -|x| (larger for a larger |x|, and largest
// for NaN): |x| <= 86.
@inline function sigmoidSafeAll(mx: v128): bool {
  return !v128.any_true(i32x4.gt_s(mx, SIG_SAFE()));
}

// The pass of sigmoidSafe over a row (E a multiple of 4; runs as in fusedPass).
@inline function sigmoidPassSafe(
  hasBias: bool, track: bool,
  src: usize, irow: usize, KEY: usize, bias: usize, ngroups: i32, gsize: i32, TOPS: usize,
): bool {
  let mx = SIGN_BIT();
  let g0 = 0;
  for (let g = 0; g < ngroups; g++) {
    const end = g0 + gsize;
    let m1 = f32x4.splat(0);
    let m2 = f32x4.splat(0);
    for (let i = g0; i < end; i += 4) {
      const o = <usize>i << 2;
      const x = v128.load(src + o);
      const xn = v128.or(x, SIGN_BIT()); // -|x|
      mx = i32x4.max_s(mx, xn);
      const s = sigmoidSafeN(x, xn);
      v128.store(irow + o, s);
      const k = passKey(hasBias, s, bias, o);
      v128.store(KEY + o, k);
      if (track) {
        m2 = i32x4.max_u(m2, i32x4.min_u(m1, k));
        m1 = i32x4.max_u(m1, k);
      }
    }
    if (track) {
      v128.store(TOPS + (<usize>g << 5), m1);
      v128.store(TOPS + (<usize>g << 5), m2, 16);
    }
    g0 += gsize;
  }
  return sigmoidSafeAll(mx);
}

// sigmoidPassSafe where the row and its runs are multiples of 8 experts, two
// vectors a step, software-pipelined in three stages: a step finishes the
// two vectors at i (stage C: d, s, key, lane lists), takes the two at i + 8
// through the polynomial (B), and the two at i + 16 through the reduction
// (A). The chain from a logit to its key is long (about 80 cycles of
// latency) and the processor's window holds only a few vectors of it; here
// each step's work is three independent chains. (The stages reading past
// the row read its last two vectors again.)
@inline function sigmoidPassPiped(
  hasBias: bool, track: bool,
  src: usize, E: i32, irow: usize, KEY: usize, bias: usize, gsize: i32, TOPS: usize,
): bool {
  const last = E - 8;
  // prologue: the first two vectors through A and B, the next two through A
  let xB0 = v128.load(src);
  let xB1 = v128.load(src, 16);
  let xn0 = v128.or(xB0, SIGN_BIT()), xn1 = v128.or(xB1, SIGN_BIT());
  let mx = i32x4.max_s(xn0, xn1);
  let tA0 = shifted(xn0), tA1 = shifted(xn1);
  let eB0 = expPoly(expArg(xn0, tA0), tA0);
  let eB1 = expPoly(expArg(xn1, tA1), tA1);
  const a = <usize>min(8, last) << 2;
  let xA0 = v128.load(src + a);
  let xA1 = v128.load(src + a, 16);
  xn0 = v128.or(xA0, SIGN_BIT());
  xn1 = v128.or(xA1, SIGN_BIT());
  mx = i32x4.max_s(mx, i32x4.max_s(xn0, xn1));
  tA0 = shifted(xn0);
  tA1 = shifted(xn1);
  let rA0 = expArg(xn0, tA0), rA1 = expArg(xn1, tA1);
  let top1 = f32x4.splat(0);
  let top2 = f32x4.splat(0);
  let gEnd = gsize;
  let T = TOPS;
  for (let i = 0; i < E; i += 8) {
    const o = <usize>i << 2;
    // A: the two at i + 16
    const on = <usize>min(i + 16, last) << 2;
    const y0 = v128.load(src + on);
    const y1 = v128.load(src + on, 16);
    const yn0 = v128.or(y0, SIGN_BIT()), yn1 = v128.or(y1, SIGN_BIT());
    mx = i32x4.max_s(mx, i32x4.max_s(yn0, yn1));
    const t0 = shifted(yn0), t1 = shifted(yn1);
    const r0 = expArg(yn0, t0), r1 = expArg(yn1, t1);
    // B: the two at i + 8
    const e0 = expPoly(rA0, tA0);
    const e1 = expPoly(rA1, tA1);
    // C: the two at i
    const s0 = sigmoidOfExp(xB0, eB0);
    v128.store(irow + o, s0);
    const k0 = passKey(hasBias, s0, bias, o);
    v128.store(KEY + o, k0);
    const s1 = sigmoidOfExp(xB1, eB1);
    v128.store(irow + o, s1, 16);
    const k1 = passKey(hasBias, s1, bias + 16, o);
    v128.store(KEY + o, k1, 16);
    if (track) {
      top2 = i32x4.max_u(top2, i32x4.min_u(top1, k0));
      top1 = i32x4.max_u(top1, k0);
      top2 = i32x4.max_u(top2, i32x4.min_u(top1, k1));
      top1 = i32x4.max_u(top1, k1);
      if (i + 8 == gEnd) {
        v128.store(T, top1);
        v128.store(T, top2, 16);
        top1 = f32x4.splat(0);
        top2 = f32x4.splat(0);
        T += 32;
        gEnd += gsize;
      }
    }
    xB0 = xA0;
    xB1 = xA1;
    eB0 = e0;
    eB1 = e1;
    xA0 = y0;
    xA1 = y1;
    rA0 = r0;
    rA1 = r1;
    tA0 = t0;
    tA1 = t1;
  }
  return sigmoidSafeAll(mx);
}

// Whether any of n floats is NaN.
function anyNaN(p: usize, n: i32): bool {
  for (let i = 0; i < n; i++) {
    const v = load<f32>(p + (<usize>i << 2));
    if (v != v) return true;
  }
  return false;
}

// Keys again, NaN case included, from the selection scores of the row
// (R, plus bias when given), and the lane lists from them (rare: a token
// with a NaN selection score).
function fixKeys(R: usize, bias: usize, E: i32, KEY: usize, track: bool, ngroups: i32, gsize: i32, TOPS: usize): void {
  const E4 = roundUp4(E);
  for (let i = 0; i < E4; i += 4) {
    const o = <usize>i << 2;
    let r = v128.load(R + o);
    if (bias) r = f32x4.add(r, v128.load(bias + o));
    v128.store(KEY + o, vkey(r));
  }
  if (E & 3) {
    const last = E4 - 4;
    const p = KEY + (<usize>last << 2);
    v128.store(p, v128.and(v128.load(p), inRow(last, E)));
  }
  if (!track) return;
  for (let g = 0; g < ngroups; g++) {
    const from = g * gsize;
    laneTop2(KEY, from, min(from + gsize, E4), TOPS + (<usize>g << 5));
  }
}

// ---- top-k forward: fast selection from the lane lists --------------------------------
//
// The fast naive path (see fastNaive) without a second look at every key:
// the lane lists of the fused pass give the bound T0 (and, with groups, the
// group scores); the keys >= T0 of the allowed experts are listed in index
// order (typically K to 2K of them) and ordered by orderCandidates.

// Group stage, 4 groups per vector (lane j: group b + j): group scores (the
// sum of the top `per` keys' values, largest first) and bounds (the per-th
// key), from the per-lane top-2 lists; then each group's rank (how many
// groups beat it: a higher score, or an equal one at a lower index), the
// kept groups (rank < GK) and T0, the smallest bound of a kept group.
// GKEEP gets -1 (kept) or 0 per group. Needs TOPS zero-padded to G4 groups.
function rankGroups(G: i32, GK: i32, per: i32, TOPS: usize, GKEY: usize, GBOUND: usize, GKEEP: usize): u32 {
  for (let b = 0; b < G; b += 4) {
    const T = TOPS + (<usize>b << 5);
    // firsts of groups b .. b+3, as pairs of lanes (0, 2) and (1, 3): P the
    // larger, L the smaller of each pair
    const a0 = v128.load(T), a1 = v128.load(T, 32), a2 = v128.load(T, 64), a3 = v128.load(T, 96);
    const t0 = i32x4.shuffle(a0, a1, 0, 4, 1, 5), t2 = i32x4.shuffle(a0, a1, 2, 6, 3, 7); // groups b, b+1
    const t1 = i32x4.shuffle(a2, a3, 0, 4, 1, 5), t3 = i32x4.shuffle(a2, a3, 2, 6, 3, 7); // groups b+2, b+3
    const p01 = i32x4.max_u(t0, t2), l01 = i32x4.min_u(t0, t2);
    const p23 = i32x4.max_u(t1, t3), l23 = i32x4.min_u(t1, t3);
    const pc = i32x4.shuffle(p01, p23, 0, 1, 4, 5), pd = i32x4.shuffle(p01, p23, 2, 3, 6, 7);
    const top = i32x4.max_u(pc, pd);
    let bound = top;
    let sum = vfloatOfKey(top);
    if (per == 2) {
      const lc = i32x4.shuffle(l01, l23, 0, 1, 4, 5), ld = i32x4.shuffle(l01, l23, 2, 3, 6, 7);
      // second of the firsts: the smaller winner of the two pairs, or the larger loser
      const second = i32x4.max_u(i32x4.min_u(pc, pd), i32x4.max_u(lc, ld));
      // largest of the seconds
      const s0 = v128.load(T, 16), s1 = v128.load(T, 48), s2 = v128.load(T, 80), s3 = v128.load(T, 112);
      const u01 = i32x4.max_u(i32x4.shuffle(s0, s1, 0, 4, 1, 5), i32x4.shuffle(s0, s1, 2, 6, 3, 7));
      const u23 = i32x4.max_u(i32x4.shuffle(s2, s3, 0, 4, 1, 5), i32x4.shuffle(s2, s3, 2, 6, 3, 7));
      const m2 = i32x4.max_u(i32x4.shuffle(u01, u23, 0, 1, 4, 5), i32x4.shuffle(u01, u23, 2, 3, 6, 7));
      bound = i32x4.max_u(second, m2);
      sum = f32x4.add(sum, vfloatOfKey(bound));
    }
    const o = <usize>b << 2;
    v128.store(GKEY + o, v128.and(vkey(sum), inRow(b, G))); // groups past G: KEY_OUT
    v128.store(GBOUND + o, bound);
  }
  // ranks, with keys as signed numbers (key ^ 0x80000000) for one-instruction compares: the groups of
  // each vector of 4 against those of each vector in turn, rotated lane by lane (groups past G hold
  // KEY_OUT, which beats no group)
  let t0 = i32x4.splat(-1);
  const gk = i32x4.splat(GK);
  for (let b = 0; b < G; b += 4) {
    const o = <usize>b << 2;
    const kb = v128.xor(v128.load(GKEY + o), SIGN_BIT());
    let rank = i32x4.splat(0);
    for (let c = 0; c < G; c += 4) {
      const kc = v128.xor(v128.load(GKEY + (<usize>c << 2)), SIGN_BIT());
      const k1 = i32x4.shuffle(kc, kc, 1, 2, 3, 0);
      const k2 = i32x4.shuffle(kc, kc, 2, 3, 0, 1);
      const k3 = i32x4.shuffle(kc, kc, 3, 0, 1, 2);
      if (c == b) {
        // the other lanes of the same vector: an equal key beats from a lower lane
        const b1 = v128.or(i32x4.gt_s(k1, kb), v128.and(i32x4.eq(k1, kb), TIE1()));
        const b2 = v128.or(i32x4.gt_s(k2, kb), v128.and(i32x4.eq(k2, kb), TIE2()));
        const b3 = v128.or(i32x4.gt_s(k3, kb), v128.and(i32x4.eq(k3, kb), TIE3()));
        rank = i32x4.sub(rank, i32x4.add(b1, i32x4.add(b2, b3)));
      } else if (c < b) {
        // lower groups: beat with an equal key; 4 less the ones kb beats strictly
        const w = i32x4.add(i32x4.add(i32x4.gt_s(kb, kc), i32x4.gt_s(kb, k1)), i32x4.add(i32x4.gt_s(kb, k2), i32x4.gt_s(kb, k3)));
        rank = i32x4.add(rank, i32x4.add(w, i32x4.splat(4)));
      } else {
        const w = i32x4.add(i32x4.add(i32x4.gt_s(kc, kb), i32x4.gt_s(k1, kb)), i32x4.add(i32x4.gt_s(k2, kb), i32x4.gt_s(k3, kb)));
        rank = i32x4.sub(rank, w);
      }
    }
    const kept = v128.and(i32x4.lt_s(rank, gk), inRow(b, G));
    v128.store(GKEEP + o, kept);
    t0 = i32x4.min_u(t0, v128.or(v128.load(GBOUND + o), v128.not(kept)));
  }
  return hminU(t0);
}

// the selection score a key stands for, 4 lanes (see floatOfKey; KEY_NAN
// gives some NaN, which only ever feeds a sum that is keyed again)
@inline function vfloatOfKey(k: v128): v128 {
  return v128.xor(k, v128.or(v128.not(i32x4.shr_s(k, 31)), SIGN_BIT()));
}

// The lanes of a 4-bit mask (bit j: lane j) in lane order, then 0s: the
// branch-free compaction of collectAbove (an expert's id is the vector's
// first id plus its lane).
const COMPACT = memory.data<i32>([
  0, 0, 0, 0, // 0000
  0, 0, 0, 0, // 1000
  1, 0, 0, 0, // 0100
  0, 1, 0, 0, // 1100
  2, 0, 0, 0, // 0010
  0, 2, 0, 0, // 1010
  1, 2, 0, 0, // 0110
  0, 1, 2, 0, // 1110
  3, 0, 0, 0, // 0001
  0, 3, 0, 0, // 1001
  1, 3, 0, 0, // 0101
  0, 1, 3, 0, // 1101
  2, 3, 0, 0, // 0011
  0, 2, 3, 0, // 1011
  1, 2, 3, 0, // 0111
  0, 1, 2, 3, // 1111
]);

// Appends to CAND, in index order, the experts of [from, to) (multiples of
// 4) whose key is >= T0; returns the new count. Each vector's hits are
// compacted (their lanes from COMPACT, plus the vector's first id) and
// stored whole (up to 3 lanes past the new count are scratch), so no branch
// depends on the keys.
@inline function collectAbove(KEY: usize, from: i32, to: i32, T0: u32, CAND: usize, n: i32): i32 {
  const t = i32x4.splat(T0);
  for (let i = from; i < to; i += 4) {
    const v = v128.load(KEY + (<usize>i << 2));
    // keys >= T0: max_u(v, t) == v
    const hits = i32x4.bitmask(i32x4.eq(i32x4.max_u(v, t), v));
    v128.store(CAND + (<usize>n << 2), i32x4.add(v128.load(COMPACT + (<usize>hits << 4)), i32x4.splat(i)));
    n += <i32>popcnt(hits);
  }
  return n;
}

// The best K of the n candidates (experts listed in CAND, n >= K) into
// CHOSEN, best first (key descending, ties by lower index). Up to 32
// candidates: each one's rank is counted on 64-bit composites (key high,
// 0x7fffffff - index low: one signed compare orders both), 8, 16 or 32 at
// a time, and the candidate stored at slot min(rank, K) (slot K is scratch:
// no branch on the rank); beyond 32 (many equal keys) the ordered insertion
// of insertTop. COMP: 32 i64; CHOSEN: K + 1 words.
function orderCandidates(KEY: usize, CAND: usize, n: i32, K: i32, COMP: usize, CHOSEN: usize): void {
  if (n > 16 && n <= 32) {
    for (let j = 0; j < n; j++) {
      const i = load<i32>(CAND + (<usize>j << 2));
      const k = load<u32>(KEY + (<usize>i << 2));
      store<i64>(COMP + (<usize>j << 3), (<i64><i32>(k ^ 0x80000000) << 32) | <i64>(0x7fffffff - i));
    }
    for (let j = n; j < 32; j++) store<i64>(COMP + (<usize>j << 3), i64.MIN_VALUE);
    for (let j = 0; j < n; j++) {
      const cj = i64x2.splat(load<i64>(COMP + (<usize>j << 3)));
      let a0 = i64x2.gt_s(v128.load(COMP), cj), a1 = i64x2.gt_s(v128.load(COMP, 16), cj);
      for (let q: usize = 32; q < 256; q += 32) {
        a0 = i64x2.add(a0, i64x2.gt_s(v128.load(COMP + q), cj));
        a1 = i64x2.add(a1, i64x2.gt_s(v128.load(COMP + q, 16), cj));
      }
      const acc = i64x2.add(a0, a1);
      const rank = -<i32>(i64x2.extract_lane(acc, 0) + i64x2.extract_lane(acc, 1));
      store<i32>(CHOSEN + (<usize>min(rank, K) << 2), load<i32>(CAND + (<usize>j << 2)));
    }
    return;
  }
  if (n > 16) {
    const CK = CHOSEN + (<usize>roundUp4(K) << 2);
    for (let j = 0; j < K; j++) store<u32>(CK + (<usize>j << 2), KEY_OUT);
    const last = CK + (<usize>(K - 1) << 2);
    for (let j = 0; j < n; j++) {
      const i = load<i32>(CAND + (<usize>j << 2));
      const k = load<u32>(KEY + (<usize>i << 2));
      if (k > load<u32>(last)) insertTop(CHOSEN, CK, K, i, k);
    }
    return;
  }
  for (let j = 0; j < n; j++) {
    const i = load<i32>(CAND + (<usize>j << 2));
    const k = load<u32>(KEY + (<usize>i << 2));
    store<i64>(COMP + (<usize>j << 3), (<i64><i32>(k ^ 0x80000000) << 32) | <i64>(0x7fffffff - i));
  }
  for (let j = n; j < 16; j++) store<i64>(COMP + (<usize>j << 3), i64.MIN_VALUE);
  const c0 = v128.load(COMP), c1 = v128.load(COMP, 16), c2 = v128.load(COMP, 32), c3 = v128.load(COMP, 48);
  if (n <= 8) {
    for (let j = 0; j < n; j++) {
      const cj = i64x2.splat(load<i64>(COMP + (<usize>j << 3)));
      const acc = i64x2.add(
        i64x2.add(i64x2.gt_s(c0, cj), i64x2.gt_s(c1, cj)),
        i64x2.add(i64x2.gt_s(c2, cj), i64x2.gt_s(c3, cj)),
      );
      const rank = -<i32>(i64x2.extract_lane(acc, 0) + i64x2.extract_lane(acc, 1));
      store<i32>(CHOSEN + (<usize>min(rank, K) << 2), load<i32>(CAND + (<usize>j << 2)));
    }
    return;
  }
  const c4 = v128.load(COMP, 64), c5 = v128.load(COMP, 80), c6 = v128.load(COMP, 96), c7 = v128.load(COMP, 112);
  for (let j = 0; j < n; j++) {
    const cj = i64x2.splat(load<i64>(COMP + (<usize>j << 3)));
    const acc = i64x2.add(
      i64x2.add(i64x2.add(i64x2.gt_s(c0, cj), i64x2.gt_s(c1, cj)), i64x2.add(i64x2.gt_s(c2, cj), i64x2.gt_s(c3, cj))),
      i64x2.add(i64x2.add(i64x2.gt_s(c4, cj), i64x2.gt_s(c5, cj)), i64x2.add(i64x2.gt_s(c6, cj), i64x2.gt_s(c7, cj))),
    );
    const rank = -<i32>(i64x2.extract_lane(acc, 0) + i64x2.extract_lane(acc, 1));
    store<i32>(CHOSEN + (<usize>min(rank, K) << 2), load<i32>(CAND + (<usize>j << 2)));
  }
}

// Fast naive top-K (see fastNaive) from the lane lists TOPS of the fused
// pass: T0 from them (with groups: the group stage of rankGroups), the
// candidates >= T0 of the allowed experts, then their order. Same set and
// order as K rounds of arg-max. Scratch: GROUP (3 * G4 words), CAND (E4
// words), COMP (16 i64).
function selectFastTops(
  KEY: usize, E: i32, K: i32, G: i32, GK: i32, TOPS: usize, CHOSEN: usize, GROUP: usize, CAND: usize, COMP: usize,
): void {
  let n = 0;
  if (GK == 0) {
    const T0 = K <= 4 ? hminU(v128.load(TOPS)) : hminU(v128.load(TOPS, 16));
    // keys of pad lanes (KEY_OUT) are never candidates; every expert's key is >= KEY_NAN
    n = collectAbove(KEY, 0, roundUp4(E), max(T0, KEY_NAN), CAND, 0);
  } else {
    const G4 = roundUp4(G);
    for (let g = G; g < G4; g++) {
      v128.store(TOPS + (<usize>g << 5), f32x4.splat(0));
      v128.store(TOPS + (<usize>g << 5), f32x4.splat(0), 16);
    }
    const GBOUND = GROUP + (<usize>G4 << 2);
    const GKEEP = GBOUND + (<usize>G4 << 2);
    const T0 = rankGroups(G, GK, K / GK, TOPS, GROUP, GBOUND, GKEEP);
    // the kept groups listed in index order (a store per group, the count
    // advanced by its flag), then visited: GK of them, a loop whose branch
    // does not depend on the keys
    const size = E / G;
    let m = 0;
    for (let g = 0; g < G; g++) {
      store<i32>(GBOUND + (<usize>m << 2), g);
      m -= load<i32>(GKEEP + (<usize>g << 2)); // -1 when kept
    }
    for (let j = 0; j < GK; j++) {
      const g = load<i32>(GBOUND + (<usize>j << 2));
      n = collectAbove(KEY, g * size, (g + 1) * size, T0, CAND, n);
    }
  }
  orderCandidates(KEY, CAND, n, K, COMP, CHOSEN);
}

// ---- top-k forward: sigmoid from the logits' order -----------------------------
//
// sigmoid is increasing, and a bias moves the selection scores r = s + b by
// at most B = max(b) - min(b); so an expert whose logit is far enough below
// the K-th largest cannot be chosen, and its sigmoid is never needed. One
// pass keys the logits and keeps per-lane top-2 lists, whose bound T0 has K
// logits >= it (as in selectFastTops); T0 gives a logit threshold theta with
// sigmoid(theta) <= s^(T0) - c, and only the logits >= theta get the exact
// sigmoid (vsigmoidFast: the same bits as the full pass), r and key; they
// are ordered by orderCandidates, as in selectFastTops. Why the chosen set
// and order are those of the full pass: with |s^ - sigmoid| <= DELTA
// (checked on every float32 in tests/wasm_math_test.ts) and each float32 add
// of a bias off by at most RHO = 2^-23 (1 + max|b|), an expert e with
// x_e <= theta has
//   r_e <= sigmoid(theta) + DELTA + max(b) + RHO
//       <= s^(T0) - c + DELTA + max(b) + RHO + (rounding of s^ - c)
//        < sigmoid(T0) - DELTA + min(b) - RHO <= r_j
// for each of the K experts j with x_j >= T0, since c > B + 3 DELTA + 2 RHO
// plus that rounding. So K experts beat e strictly, and the chosen K are
// among the keyed experts, with the full pass's keys. theta = logit(tau),
// tau = s^(T0) - c, computed in float32 and lowered (see thetaKey). (A
// table of logits in a static region would not do: each worker's instance
// writes the module's data segments into the shared memory again when it
// starts, zeros included.)

const SIG_DELTA: f64 = 4.76837158203125e-7; // 2^-21: every float32 x gives |s^ - sigmoid| < 2^-22 (wasm_math_test)

// The bias's margin c (see above) for a call, or -1 where the shortcut does
// not apply (a bias that is not finite, or too wide to rule experts out).
function sigmoidMargin(bias: usize, E: i32): f32 {
  let lo: f64 = 0, hi: f64 = 0, big: f64 = 0;
  if (bias) {
    lo = Infinity;
    hi = -Infinity;
    for (let e = 0; e < E; e++) {
      const b = <f64>load<f32>(bias + (<usize>e << 2));
      if (!isFinite(b)) return -1;
      lo = min(lo, b);
      hi = max(hi, b);
      big = max(big, abs(b));
    }
  }
  const rho = (1 + big) * 1.1920928955078125e-7; // 2^-23
  const c = (hi - lo + 4 * SIG_DELTA + 4 * rho + 9.5367431640625e-7) * (1 + 9.5367431640625e-7);
  return c < 0.5 ? <f32>c : -1;
}

// One pass over a token's logits: their keys into XK (pad lanes 0) and,
// into TOPS, a vector whose smallest lane is a key with K logits at or above
// it (logitKeysPairs up to K = 8, else logitKeysLists). Returns whether a
// logit is NaN (the token then takes the full pass).
@inline function logitKeysPass(src: usize, E: i32, K: i32, XK: usize, TOPS: usize): bool {
  return K <= 8 ? logitKeysPairs(src, E, K, XK, TOPS) : logitKeysLists(src, E, K, XK, TOPS);
}

// The keys of the logits x of experts i .. i + 3, also stored at XK; lanes
// past E (the row's last, partial vector) get key 0.
@inline function logitKey(x: v128, i: i32, E: i32, XK: usize): v128 {
  const v = v128.xor(x, v128.or(i32x4.shr_s(x, 31), SIGN_BIT()));
  const k = i + 4 > E ? v128.and(v, inRow(i, E)) : v;
  v128.store(XK + (<usize>i << 2), k);
  return k;
}

// The NaN lanes of that vector within the row.
@inline function logitNaN(x: v128, i: i32, E: i32): v128 {
  const bad = f32x4.ne(x, x);
  return i + 4 > E ? v128.and(bad, inRow(i, E)) : bad;
}

// logitKeysPass for K <= 8: the vectors go in turn to two sets of per-lane
// top-2 lists (the cost of one set: 2 max / min per vector), 8 lanes of 16
// experts' logits each. T0 is the K-th largest of the 16 listed keys: they
// are 16 distinct experts' keys (or pad keys 0, below every logit), so K
// experts have a logit key >= T0. That is tighter than the smallest lane's
// 2nd largest (the bound of one set of 4 lanes), which about 14 experts
// reach on DeepSeek-V3-like rows against about 9 here: fewer candidates.
@inline function logitKeysPairs(src: usize, E: i32, K: i32, XK: usize, TOPS: usize): bool {
  const z = f32x4.splat(0);
  let nan = z;
  let a0 = z, a1 = z, b0 = z, b1 = z;
  for (let i = 0; i < E; i += 8) {
    const x = v128.load(src + (<usize>i << 2));
    let v = logitKey(x, i, E, XK);
    nan = v128.or(nan, logitNaN(x, i, E));
    let m = a0; a0 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
    a1 = i32x4.max_u(a1, v);
    if (i + 4 >= E) break;
    // the next vector, into the second set
    const y = v128.load(src + (<usize>i << 2), 16);
    let w = logitKey(y, i + 4, E, XK);
    nan = v128.or(nan, logitNaN(y, i + 4, E));
    m = b0; b0 = i32x4.max_u(m, w); w = i32x4.min_u(m, w);
    b1 = i32x4.max_u(b1, w);
  }
  v128.store(TOPS, i32x4.splat(kthOf16(a0, a1, b0, b1, K)));
  return v128.any_true(nan);
}

// sum of gt_s(w, v) over the 4 rotations of v: minus how many lanes of v are below each lane of w
@inline function belowRot(w: v128, v: v128): v128 {
  return i32x4.add(
    i32x4.add(i32x4.gt_s(w, v), i32x4.gt_s(w, i32x4.shuffle(v, v, 1, 2, 3, 0))),
    i32x4.add(i32x4.gt_s(w, i32x4.shuffle(v, v, 2, 3, 0, 1)), i32x4.gt_s(w, i32x4.shuffle(v, v, 3, 0, 1, 2))),
  );
}

// The K-th largest (K <= 16, with repeats) of the 16 keys in v0 .. v3: the
// largest key w with 16 - K or fewer keys below it (at least K keys are >= w).
function kthOf16(v0: v128, v1: v128, v2: v128, v3: v128, K: i32): u32 {
  // signed compares on sign-flipped keys order them as unsigned
  const s0 = v128.xor(v0, SIGN_BIT()), s1 = v128.xor(v1, SIGN_BIT());
  const s2 = v128.xor(v2, SIGN_BIT()), s3 = v128.xor(v3, SIGN_BIT());
  const lim = i32x4.splat(K - 17); // -below > K - 17  <=>  below <= 16 - K
  let best = f32x4.splat(0);
  let c = i32x4.add(i32x4.add(belowRot(s0, s0), belowRot(s0, s1)), i32x4.add(belowRot(s0, s2), belowRot(s0, s3)));
  best = i32x4.max_u(best, v128.and(v0, i32x4.gt_s(c, lim)));
  c = i32x4.add(i32x4.add(belowRot(s1, s0), belowRot(s1, s1)), i32x4.add(belowRot(s1, s2), belowRot(s1, s3)));
  best = i32x4.max_u(best, v128.and(v1, i32x4.gt_s(c, lim)));
  c = i32x4.add(i32x4.add(belowRot(s2, s0), belowRot(s2, s1)), i32x4.add(belowRot(s2, s2), belowRot(s2, s3)));
  best = i32x4.max_u(best, v128.and(v2, i32x4.gt_s(c, lim)));
  c = i32x4.add(i32x4.add(belowRot(s3, s0), belowRot(s3, s1)), i32x4.add(belowRot(s3, s2), belowRot(s3, s3)));
  best = i32x4.max_u(best, v128.and(v3, i32x4.gt_s(c, lim)));
  return hmaxU(best);
}

// logitKeysPass for K <= 32: per-lane lists 8 deep (as laneLists), whose
// ceil(K / 4)-th largest keys have K logits at or above the smallest.
@inline function logitKeysLists(src: usize, E: i32, K: i32, XK: usize, TOPS: usize): bool {
  const z = f32x4.splat(0);
  let nan = z;
  let l0 = z, l1 = z, l2 = z, l3 = z, l4 = z, l5 = z, l6 = z, l7 = z;
  for (let i = 0; i < E; i += 4) {
    const x = v128.load(src + (<usize>i << 2));
    let v = logitKey(x, i, E, XK);
    nan = v128.or(nan, logitNaN(x, i, E));
    let m = l0; l0 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
    m = l1; l1 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
    m = l2; l2 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
    m = l3; l3 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
    m = l4; l4 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
    m = l5; l5 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
    m = l6; l6 = i32x4.max_u(m, v); v = i32x4.min_u(m, v);
    l7 = i32x4.max_u(l7, v);
  }
  const D = (K + 3) >> 2;
  v128.store(TOPS, D == 1 ? l0 : D == 2 ? l1 : D == 3 ? l2 : D == 4 ? l3 : D == 5 ? l4 : D == 6 ? l5 : D == 7 ? l6 : l7);
  return v128.any_true(nan);
}

// The threshold key of a logit key T0 (K logits >= it): the key of theta =
// logit(tau), tau = s^(x) - c, lowered by 1e-5 (1 + |theta|), far more than
// the float32 errors of w = tau / (1 - tau) (1 - tau is exact from 0.5 up)
// and of its log, so that sigmoid(theta) <= tau; or 1 (below every logit)
// where tau is below 2^-20 or x is not a number (a pad key).
@inline function thetaKey(T0: u32, c: f32): u32 {
  const tau = f32x4.sub(vsigmoidFast(vfloatOfKey(i32x4.splat(T0))), f32x4.splat(c));
  const one = ONE();
  const w = f32x4.div(tau, f32x4.sub(one, tau));
  // log(w) = -log(1 / w) below 1 (vlogGe1 takes w >= 1)
  const big = f32x4.ge(w, one);
  const l = vlogGe1(v128.bitselect(w, f32x4.div(one, w), big));
  const theta = v128.bitselect(l, f32x4.neg(l), big);
  const low = f32x4.sub(theta, f32x4.mul(f32x4.splat(1e-5), f32x4.add(one, f32x4.abs(theta))));
  const key = v128.xor(low, v128.or(i32x4.shr_s(low, 31), SIGN_BIT()));
  return f32x4.extract_lane(tau, 0) >= <f32>9.5367431640625e-7 ? <u32>i32x4.extract_lane(key, 0) : KEY_NAN;
}

// The exact sigmoid, selection score and key of the experts CAND[from, to):
// s into SR, the key into KEY (as fusedPass writes them). Lanes past `to`
// repeat CAND[from]. Returns the smallest key among the keyed experts whose
// logit key is >= T0 (0xffffffff where there is none): a duplicated lane is
// one of those experts again, so it never changes the minimum.
@inline function keyCandidates(
  src: usize, bias: usize, CAND: usize, from: i32, to: i32, SR: usize, KEY: usize, T0: u32, cut: bool,
): u32 {
  const first = i32x4.splat(load<i32>(CAND + (<usize>from << 2)));
  const t0 = i32x4.splat(T0);
  let low = i32x4.splat(-1);
  for (let j = from; j < to; j += 4) {
    const ids = v128.bitselect(v128.load(CAND + (<usize>j << 2)), first, inRow(j, to));
    const o0 = <usize>i32x4.extract_lane(ids, 0) << 2, o1 = <usize>i32x4.extract_lane(ids, 1) << 2;
    const o2 = <usize>i32x4.extract_lane(ids, 2) << 2, o3 = <usize>i32x4.extract_lane(ids, 3) << 2;
    let x = f32x4.splat(load<f32>(src + o0));
    x = f32x4.replace_lane(x, 1, load<f32>(src + o1));
    x = f32x4.replace_lane(x, 2, load<f32>(src + o2));
    x = f32x4.replace_lane(x, 3, load<f32>(src + o3));
    const sv = vsigmoidFast(x);
    let k: v128;
    if (bias) {
      let b = f32x4.splat(load<f32>(bias + o0));
      b = f32x4.replace_lane(b, 1, load<f32>(bias + o1));
      b = f32x4.replace_lane(b, 2, load<f32>(bias + o2));
      b = f32x4.replace_lane(b, 3, load<f32>(bias + o3));
      const r = f32x4.add(sv, b);
      k = v128.xor(r, v128.or(i32x4.shr_s(r, 31), SIGN_BIT()));
    } else {
      k = v128.or(sv, SIGN_BIT());
    }
    store<f32>(SR + o0, f32x4.extract_lane(sv, 0));
    store<f32>(SR + o1, f32x4.extract_lane(sv, 1));
    store<f32>(SR + o2, f32x4.extract_lane(sv, 2));
    store<f32>(SR + o3, f32x4.extract_lane(sv, 3));
    store<u32>(KEY + o0, i32x4.extract_lane(k, 0));
    store<u32>(KEY + o1, i32x4.extract_lane(k, 1));
    store<u32>(KEY + o2, i32x4.extract_lane(k, 2));
    store<u32>(KEY + o3, i32x4.extract_lane(k, 3));
    if (!cut) continue;
    // lanes whose logit key (as logitKeysPass makes it) is >= T0 take part in the minimum
    const xk = v128.xor(x, v128.or(i32x4.shr_s(x, 31), SIGN_BIT()));
    low = i32x4.min_u(low, v128.bitselect(k, i32x4.splat(-1), i32x4.eq(i32x4.max_u(xk, t0), xk)));
  }
  return hminU(low);
}

// thetaKey (a sigmoid, a log and three divisions in a row: about a sixth of
// a DeepSeek-V3 token's time) is taken from a cache of the call, by T0's
// bucket (its key's top 16 bits, 7 bits of mantissa: 1/128 of T0 or finer).
// The bucket's lowest key L = T0 & 0xffff0000 is <= T0, so K logits are
// >= L too: L is as good a bound as T0 for the argument above, and
// thetaKey(L) (what the cache holds, whoever computed it first) a valid
// threshold for every T0 of the bucket, at most a bucket looser. (L may be
// the key of no number, below -inf's: thetaKey then keys every expert.)
// THC: thMask + 1 slots of (bucket + 1, thetaKey), direct-mapped by the
// bucket's low bits, zeroed when the call starts (c is the call's).
@inline function cachedTheta(T0: u32, c: f32, THC: usize, thMask: u32): u32 {
  const bucket = T0 >> 16;
  const slot = THC + (<usize>(bucket & thMask) << 3);
  if (load<u32>(slot) == bucket + 1) return load<u32>(slot, 4);
  const th = thetaKey(bucket << 16, c);
  store<u32>(slot, bucket + 1);
  store<u32>(slot, th, 4);
  return th;
}

// The margin c of a forward call whose sigmoid selection may go by the
// logits (selectSigmoidByLogits), or -1: sigmoid, no groups, K <= 32 (the
// lane lists' reach), rows past SMALL_E (so not the four-token kernel
// either), and a bias that leaves room (sigmoidMargin).
function logitsMargin(E: i32, K: i32, GK: i32, fn: i32, bias: usize): f32 {
  if (fn != SCORE_SIGMOID || GK > 0 || K > RADIX_FILTER_K || E <= SMALL_E) return -1;
  return sigmoidMargin(bias, E);
}

/**
 * Whether topkForward, asked to (hostInter), skips the intermediate: its
 * sigmoid selection goes by the logits, which leaves the intermediate row
 * written at the chosen experts only. The host then gets the intermediate
 * from intermediateOf. bias: as topkForward's, already in memory.
 */
export function forwardByLogits(E: i32, K: i32, GK: i32, fn: i32, bias: usize): bool {
  return logitsMargin(E, K, GK, fn, bias) >= 0;
}

/**
 * The intermediate of n logits of dtype dt at src into dst (f32), bit for
 * bit what the forward's full pass writes: sigmoid's s (vsigmoidFast), or
 * (sqrtsoftplus) the logits widened. Vectors may reach 3 elements past n at
 * both ends' regions.
 */
export function intermediateOf(fn: i32, src: usize, dt: i32, n: i32, dst: usize): void {
  if (dt != DT_F32) {
    widenRow(src, dt, n, dst);
    src = dst;
  }
  if (fn != SCORE_SIGMOID) {
    if (src != dst) memory.copy(dst, src, <usize>n << 2);
    return;
  }
  for (let i = 0; i < n; i += 4) {
    const o = <usize>i << 2;
    v128.store(dst + o, vsigmoidFast(v128.load(src + o)));
  }
}

// Selection of a sigmoid token from its logits (see above), into CHOSEN, the
// keyed experts' s into SR: the top K of the keyed experts by the naive
// algorithm's ordering (orderCandidates) or the radix algorithm's
// (selectRadixOf), the same set and order. Needs no groups, K <= 32 and every
// logit a number. With groups, keying each group's experts above its own
// theta (for the group scores) and then the kept groups' above theta cost
// more than the full pass saved (DeepSeek-V3: 0.96x, bench/kernel_ab.ts), so
// grouped calls take the full pass. Scratch: XK [E16] (the logits' keys, with
// TOPS from logitKeysPass), HIST, CAND, COMP as the full pass's selection.
function selectSigmoidByLogits(
  src: usize, bias: usize, c: f32, E: i32, K: i32, radix: bool, XK: usize, KEY: usize, SR: usize, TOPS: usize,
  HIST: usize, CHOSEN: usize, CAND: usize, COMP: usize, THC: usize, thMask: u32,
): void {
  // K experts have a logit >= T0 (see logitKeysPass)
  const T0 = hminU(v128.load(TOPS));
  // the threshold is capped at T0 so that the candidates hold every expert with a logit >= T0 whatever
  // thetaKey's rounding (it is below T0 anyway)
  let n = collectAbove(XK, 0, roundUp4(E), min(THC ? cachedTheta(T0, c, THC, thMask) : thetaKey(T0, c), T0), CAND, 0);
  // Second, exact cut: the candidates with a logit >= T0 are K or more experts, now with their exact keys,
  // so R, the smallest of those keys, has K experts at or above it. A candidate whose key is below R is
  // beaten strictly (on the key alone, whatever the indices) by K experts and is not chosen; and every
  // expert that ranks above a kept one has a key at least as large, so it is kept too: the top K of the
  // kept candidates are the top K of all, in the same order, by either ordering below. This is exact
  // (keys compared, no error bound), and removes most of what the bias margin c let in.
  // Without a bias c is a few ulps and the candidates are about those at or above T0 already: no cut.
  if (bias) {
    const R = keyCandidates(src, bias, CAND, 0, n, SR, KEY, T0, true);
    let m = 0;
    for (let j = 0; j < n; j++) {
      const i = load<i32>(CAND + (<usize>j << 2));
      store<i32>(CAND + (<usize>m << 2), i);
      m += <i32>(load<u32>(KEY + (<usize>i << 2)) >= R);
    }
    n = m;
  } else {
    keyCandidates(src, 0, CAND, 0, n, SR, KEY, T0, false);
  }
  if (radix) selectRadixOf(KEY, K, HIST, CHOSEN, CAND, n);
  else orderCandidates(KEY, CAND, n, K, COMP, CHOSEN);
}

// ---- top-k forward: small rows ---------------------------------------------------
//
// Up to SMALL_E experts without groups (Mixtral: 8, top-2), the filter's
// data-dependent branches (a hit loop per vector, an insertion per
// candidate) mispredict about once per candidate, which costs more than the
// whole score pass. Instead each expert's rank (how many experts beat it: a
// larger key, or an equal key at a lower index) is counted branch-free, E
// compares per vector of 4, and the experts are placed by rank: the same set
// and order as K rounds of arg-max.

const SMALL_E: i32 = 16;

// Top K of KEY[0, E) into CHOSEN, best first. RANKED: E4 words (every
// expert by rank; pad lanes, whose key KEY_OUT every expert beats, all go
// to RANKED[E]: the pad lanes exist only when E < E4).
function selectSmall(KEY: usize, E: i32, K: i32, RANKED: usize, CHOSEN: usize): void {
  const E4 = roundUp4(E);
  for (let b = 0; b < E4; b += 4) {
    // keys as signed numbers (key ^ 0x80000000) for one-instruction compares
    const kb = v128.xor(v128.load(KEY + (<usize>b << 2)), SIGN_BIT());
    const ib = i32x4.add(IOTA(), i32x4.splat(b));
    let rank = i32x4.splat(0);
    for (let j = 0; j < E; j++) {
      const kj = i32x4.splat(load<i32>(KEY + (<usize>j << 2)) ^ 0x80000000);
      const beats = v128.or(i32x4.gt_s(kj, kb), v128.and(i32x4.eq(kj, kb), i32x4.gt_s(ib, i32x4.splat(j))));
      rank = i32x4.sub(rank, beats);
    }
    store<i32>(RANKED + (<usize>i32x4.extract_lane(rank, 0) << 2), b);
    store<i32>(RANKED + (<usize>i32x4.extract_lane(rank, 1) << 2), b + 1);
    store<i32>(RANKED + (<usize>i32x4.extract_lane(rank, 2) << 2), b + 2);
    store<i32>(RANKED + (<usize>i32x4.extract_lane(rank, 3) << 2), b + 3);
  }
  for (let k = 0; k < K; k++) store<i32>(CHOSEN + (<usize>k << 2), load<i32>(RANKED + (<usize>k << 2)));
}

// ---- routing output ------------------------------------------------------------

@inline function routeRowBytes(fmt: i32, E: i32, K: i32): i32 {
  if (fmt == ROUTE_BYTEMAP) return E;
  if (fmt == ROUTE_BITMAP) return (E + 7) >> 3;
  if (fmt == ROUTE_I16) return K << 1;
  if (fmt == ROUTE_I32) return K << 2;
  return K << 3;
}

function writeRoute(fmt: i32, E: i32, K: i32, CHOSEN: usize, out: usize): void {
  if (fmt == ROUTE_BYTEMAP || fmt == ROUTE_BITMAP) {
    // short rows: plain stores (memory.fill is a call into the engine, a
    // fixed cost per token that dominates at small E)
    const n = <usize>routeRowBytes(fmt, E, K);
    if (n <= 64) {
      let i: usize = 0;
      for (; i + 8 <= n; i += 8) store<u64>(out + i, 0);
      for (; i < n; i++) store<u8>(out + i, 0);
    } else {
      memory.fill(out, 0, n);
    }
    for (let k = 0; k < K; k++) {
      const e = load<i32>(CHOSEN + (<usize>k << 2));
      if (fmt == ROUTE_BYTEMAP) store<u8>(out + <usize>e, 1);
      else {
        const p = out + <usize>(e >> 3);
        store<u8>(p, <u8>(<i32>load<u8>(p) | (<i32>1 << (e & 7))));
      }
    }
    return;
  }
  if (fmt == ROUTE_I32) {
    let k = 0;
    for (; k + 4 <= K; k += 4) v128.store(out + (<usize>k << 2), v128.load(CHOSEN + (<usize>k << 2)));
    for (; k < K; k++) store<i32>(out + (<usize>k << 2), load<i32>(CHOSEN + (<usize>k << 2)));
    return;
  }
  for (let k = 0; k < K; k++) {
    const e = load<i32>(CHOSEN + (<usize>k << 2));
    if (fmt == ROUTE_I16) store<i16>(out + (<usize>k << 1), <i16>e);
    else if (fmt == ROUTE_I32) store<i32>(out + (<usize>k << 2), e);
    else store<i64>(out + (<usize>k << 3), <i64>e);
  }
}

// Expands one token's routing output into a 0/1 float mask M[E4].
function readRoute(fmt: i32, E: i32, K: i32, route: usize, M: usize): void {
  const E4 = roundUp4(E);
  if (fmt == ROUTE_BYTEMAP || fmt == ROUTE_BITMAP) {
    for (let e = 0; e < E; e++) {
      const on = fmt == ROUTE_BYTEMAP ? load<u8>(route + <usize>e) != 0 : ((load<u8>(route + <usize>(e >> 3)) >> (e & 7)) & 1) != 0;
      store<f32>(M + (<usize>e << 2), on ? 1.0 : 0.0);
    }
    for (let e = E; e < E4; e++) store<f32>(M + (<usize>e << 2), 0);
    return;
  }
  memory.fill(M, 0, <usize>E4 << 2);
  for (let k = 0; k < K; k++) {
    let e: i32;
    if (fmt == ROUTE_I16) e = <i32>load<i16>(route + (<usize>k << 1));
    else if (fmt == ROUTE_I32) e = load<i32>(route + (<usize>k << 2));
    else e = <i32>load<i64>(route + (<usize>k << 3));
    if (e >= 0 && e < E) store<f32>(M + (<usize>e << 2), 1.0);
  }
}

// ---- top-k router forward ---------------------------------------------------------

/**
 * Forward of the top-k router for T tokens (SPEC section 2). Writes, per
 * token: the K chosen experts in selection order (list, i32) with their
 * probs (vals, logits dtype) — the host scatters them into the dense probs,
 * which are 0 elsewhere, or, when probs != 0, the kernel writes the dense
 * rows there itself (see scatterRows; vals are then not always written); the
 * intermediate row (f32); the routing output; and the intermediate at the
 * chosen experts in ascending expert order (yasc, f32), all that the sparse
 * backward needs (yasc = 0: not written, no backward to come; calls the
 * four-token kernel may take need it). bias = 0: none. For int32 indices, route may be list
 * itself (the same values). lanes: small rows may take the four-token
 * kernel (see forwardLanes; same bits); false keeps every token on the row
 * kernel (a test hook). hostInter: the host makes the intermediate itself
 * (from the logits, or post-softmax's from the routing output), so the row
 * kernel need not write it: sigmoid may then go by the logits (see
 * forwardByLogits), and post-softmax leaves the row out. asc (0: none; the
 * row kernel only): the chosen experts in ascending order (T x K i32), the
 * order of yasc, which spares the sparse backward reading them back from
 * the routing output. Returns how many tokens the four-token kernel took.
 */
export function topkForward(
  logits: usize, dt: i32, T: i32, E: i32, K: i32,
  fn: i32, pre: bool, G: i32, GK: i32, scale: f32, bias: usize,
  fmt: i32, radixThreshold: i32,
  vals: usize, list: usize, yasc: usize, inter: usize, route: usize, scratch: usize,
  probs: usize, lanes: bool, hostInter: bool, asc: usize,
): i32 {
  if (lanes && lanesApply(E, GK, bias)) {
    return forwardLanes(
      logits, dt, T, E, K, fn, pre, G, GK, scale, bias, fmt, radixThreshold, vals, list, yasc, inter, route, scratch, probs,
    );
  }
  forwardRows(
    logits, dt, T, E, K, fn, pre, G, GK, scale, bias, fmt, radixThreshold, vals, list, yasc, inter, route, scratch, hostInter,
    asc,
  );
  if (probs) scatterRows(list, vals, T, E, K, dt, probs);
  return 0;
}

/**
 * Dense rows [T, E] (logits dtype: probs, gradLogits) from compact ones
 * (list: T x K expert ids, vals: T x K values): zeroed, then each token's K
 * values stored at their experts (ids < 0: none), bit for bit what a
 * scatter on the host gives. Rows of a few vectors (small E) cost the host
 * less to copy out dense than to scatter into.
 */
export function scatterRows(list: usize, vals: usize, T: i32, E: i32, K: i32, dt: i32, rows: usize): void {
  const inB = <usize>dtBytes(dt);
  zeroBytes(rows, <usize>T * <usize>E * inB);
  for (let t = 0; t < T; t++) {
    const row = rows + <usize>t * <usize>E * inB;
    for (let c = t * K, end = c + K; c < end; c++) {
      const e = load<i32>(list + (<usize>c << 2));
      if (e < 0) continue;
      if (dt == DT_F32) store<u32>(row + (<usize>e << 2), load<u32>(vals + (<usize>c << 2)));
      else store<u16>(row + (<usize>e << 1), load<u16>(vals + (<usize>c << 1)));
    }
  }
}

// Zeroes n bytes (n even), whole vectors first; no store reaches past the end.
function zeroBytes(p: usize, n: usize): void {
  const z = f32x4.splat(0);
  let i: usize = 0;
  for (; i + 16 <= n; i += 16) v128.store(p + i, z);
  if (i + 8 <= n) {
    store<u64>(p + i, 0);
    i += 8;
  }
  if (i + 4 <= n) {
    store<u32>(p + i, 0);
    i += 4;
  }
  if (i < n) store<u16>(p + i, 0);
}

// The row kernel: one token at a time, every shape and option.
function forwardRows(
  logits: usize, dt: i32, T: i32, E: i32, K: i32,
  fn: i32, pre: bool, G: i32, GK: i32, scale: f32, bias: usize,
  fmt: i32, radixThreshold: i32,
  vals: usize, list: usize, yasc: usize, inter: usize, route: usize, scratch: usize, hostInter: bool,
  asc: usize,
): void {
  const E4 = roundUp4(E);
  const E16 = roundUp16(E);
  const rowF = <usize>E16 << 2;
  const X = scratch;
  const S = X + rowF;
  const KEY = S + rowF; // E16 keys: the naive selection reads whole blocks of 16
  const HIST = KEY + rowF; // radix histogram, or the naive selection's block maxima
  const CHOSEN = HIST + <usize>max(RADIX_BINS << 2, E16);
  const VAL = CHOSEN + (<usize>(2 * roundUp4(K)) << 2); // CHOSEN doubles as (index, key) pairs in limitGroups
  const GROUP = VAL + (<usize>roundUp4(K) << 2); // 3 * G4 words
  const TOPV = GROUP + (<usize>(3 * roundUp4(G)) << 2); // K / GK vectors, then K / GK keys
  const CAND = TOPV + (<usize>(5 * roundUp4(K)) << 2); // E16 words
  const TOPS = CAND + rowF + 64; // lane lists of the fused pass: 2 vectors per group
  const COMP = TOPS + (<usize>roundUp4(max(G, 1)) << 5); // 32 i64
  const IROW = COMP + 272;
  const radix = K >= radixThreshold;
  const inB = <usize>dtBytes(dt);
  const routeB = <usize>routeRowBytes(fmt, E, K);
  const grouped = GK > 0;
  // the fast selection starts from the fused pass's lane lists: one run per group, or the whole row
  const track = !radix && fastNaive(E, K, G, GK);
  // small rows without groups: ranks counted branch-free (see selectSmall)
  const small = track && !grouped && E <= SMALL_E;
  const ngroups = grouped ? G : 1;
  const gsize = grouped ? E / G : E4;
  const zero = f32x4.splat(0);

  const softPost = fn == SCORE_SOFTMAX && !pre;
  // sigmoid selection from the logits' order (see selectSigmoidByLogits), where the caller does not need the
  // whole intermediate: margin >= 0
  const margin = hostInter ? logitsMargin(E, K, GK, fn, bias) : <f32>-1;
  // its theta cache (see cachedTheta) lives in X, which only a row of another dtype than float32 needs:
  // up to 256 slots of 2 words, a power of 2 that fits (E16 >= 32 words)
  let THC: usize = 0;
  let thMask: u32 = 0;
  if (margin >= 0 && dt == DT_F32) {
    THC = X;
    thMask = (1 << min(8, 30 - <i32>clz(<u32>E16))) - 1; // slots: largest power of 2 <= min(256, E16 / 2)
    zeroWords(X, <i32>(thMask + 1) << 1);
  }
  // sigmoid's short pass applies (see sigmoidPassSafe): whole vectors, no NaN in the bias; pipelined where
  // the row and its runs are pairs of vectors
  const sigSafe = fn == SCORE_SIGMOID && (E & 3) == 0 && !(bias && anyNaN(bias, E));
  const piped = (E & 7) == 0 && (gsize & 7) == 0;
  for (let t = 0; t < T; t++) {
    const tt = <usize>t * <usize>E;
    const irow = hostInter ? IROW : inter + (tt << 2);
    // load: float32 rows are read in place (the vector past the row end reads
    // the next row or the region's slack, masked below); others widen into X
    let src = logits + tt * inB;
    if (dt != DT_F32) {
      widenRow(src, dt, E, X);
      src = X;
    }
    // score + keys, one fused pass per vector of 4 experts: s (kept for the
    // values), the intermediate row, r = s + bias and its key. Vectors that
    // cross the row end write into the next row's space (rewritten when that
    // row comes) or the slack; their pad lanes get KEY_OUT.
    let Sx = S;
    let nan = false;
    let picked = false;
    if (margin >= 0 && !logitKeysPass(src, E, K, S, TOPS)) {
      // the logits' keys go to S (free: sigmoid's s is kept in the intermediate row)
      selectSigmoidByLogits(src, bias, margin, E, K, radix, S, KEY, irow, TOPS, HIST, CHOSEN, CAND, COMP, THC, thMask);
      picked = true;
      Sx = irow;
    } else if (fn == SCORE_SOFTMAX && pre) {
      // softmax: max, exp(x - max) and sum, then divide (in the keyed pass)
      let mv = NEG_INF();
      for (let i = 0; i < E4; i += 4) {
        let x = v128.load(src + (<usize>i << 2));
        if (i + 4 > E) x = v128.bitselect(x, NEG_INF(), inRow(i, E));
        mv = f32x4.pmax(mv, x);
      }
      const m = f32x4.splat(hmax(mv));
      let sv = f32x4.splat(0);
      for (let i = 0; i < E4; i += 4) {
        let x = v128.load(src + (<usize>i << 2));
        if (i + 4 > E) x = v128.bitselect(x, NEG_INF(), inRow(i, E));
        const e = vexp(f32x4.sub(x, m));
        v128.store(irow + (<usize>i << 2), e);
        sv = f32x4.add(sv, e);
      }
      const sum = f32x4.splat(hsum(sv));
      nan = track
        ? fusedPass(PASS_PRE, false, true, src, E, irow, S, KEY, 0, sum, ngroups, gsize, TOPS)
        : fusedPass(PASS_PRE, false, false, src, E, irow, S, KEY, 0, sum, 1, E4, TOPS);
      Sx = irow;
    } else if (fn == SCORE_SOFTMAX) {
      // post: selection on x itself
      nan = track
        ? fusedPass(PASS_POST, false, true, src, E, irow, S, KEY, 0, zero, ngroups, gsize, TOPS)
        : fusedPass(PASS_POST, false, false, src, E, irow, S, KEY, 0, zero, 1, E4, TOPS);
      Sx = src;
    } else if (fn == SCORE_SIGMOID) {
      // sigmoid: the intermediate is s
      if (bias) {
        if (!(sigSafe && (piped
          ? track
            ? sigmoidPassPiped(true, true, src, E, irow, KEY, bias, gsize, TOPS)
            : sigmoidPassPiped(true, false, src, E, irow, KEY, bias, E, TOPS)
          : track
            ? sigmoidPassSafe(true, true, src, irow, KEY, bias, ngroups, gsize, TOPS)
            : sigmoidPassSafe(true, false, src, irow, KEY, bias, 1, E4, TOPS)))) {
          nan = track
            ? fusedPass(PASS_SIGMOID, true, true, src, E, irow, S, KEY, bias, zero, ngroups, gsize, TOPS)
            : fusedPass(PASS_SIGMOID, true, false, src, E, irow, S, KEY, bias, zero, 1, E4, TOPS);
        }
      } else {
        if (!(sigSafe && (piped
          ? track
            ? sigmoidPassPiped(false, true, src, E, irow, KEY, 0, gsize, TOPS)
            : sigmoidPassPiped(false, false, src, E, irow, KEY, 0, E, TOPS)
          : track
            ? sigmoidPassSafe(false, true, src, irow, KEY, 0, ngroups, gsize, TOPS)
            : sigmoidPassSafe(false, false, src, irow, KEY, 0, 1, E4, TOPS)))) {
          nan = track
            ? fusedPass(PASS_SIGMOID, false, true, src, E, irow, S, KEY, 0, zero, ngroups, gsize, TOPS)
            : fusedPass(PASS_SIGMOID, false, false, src, E, irow, S, KEY, 0, zero, 1, E4, TOPS);
        }
      }
      Sx = irow;
    } else {
      // sqrtsoftplus: the intermediate is x, s goes to S
      if (bias) {
        nan = track
          ? fusedPass(PASS_SQRTSOFTPLUS, true, true, src, E, irow, S, KEY, bias, zero, ngroups, gsize, TOPS)
          : fusedPass(PASS_SQRTSOFTPLUS, true, false, src, E, irow, S, KEY, bias, zero, 1, E4, TOPS);
      } else {
        nan = track
          ? fusedPass(PASS_SQRTSOFTPLUS, false, true, src, E, irow, S, KEY, 0, zero, ngroups, gsize, TOPS)
          : fusedPass(PASS_SQRTSOFTPLUS, false, false, src, E, irow, S, KEY, 0, zero, 1, E4, TOPS);
      }
      Sx = S;
    }
    if (nan) fixKeys(Sx, fn == SCORE_SOFTMAX ? 0 : bias, E, KEY, track, ngroups, gsize, TOPS);
    for (let i = E4; i < E16; i += 4) v128.store(KEY + (<usize>i << 2), f32x4.splat(0));
    // select: group limit, then top-K (naive or radix: identical sets)
    if (picked) {
      // done above
    } else if (small) {
      selectSmall(KEY, E, K, CAND, CHOSEN);
    } else if (track) {
      selectFastTops(KEY, E, K, G, GK, TOPS, CHOSEN, GROUP, CAND, COMP);
    } else {
      const built = grouped && limitGroups(KEY, E, K, G, GK, radix, CHOSEN, GROUP, TOPV, HIST);
      selectTopK(KEY, E, K, radix, HIST, CHOSEN, built, CAND, TOPV);
    }

    // post-process: values of the chosen experts
    if (softPost) {
      // softmax over the K chosen logits, max-subtracted
      let m: f32 = -Infinity;
      for (let k = 0; k < K; k++) m = max(m, load<f32>(Sx + (<usize>load<i32>(CHOSEN + (<usize>k << 2)) << 2)));
      // exp(x - m) 4 at a time where every lane is <= 0 (vexpLut: NativeMathf.exp's bits there), else one by
      // one (NaN, or m infinite); then summed in selection order
      const mv = f32x4.splat(m);
      let k = 0;
      for (; k + 4 <= K; k += 4) {
        const c = CHOSEN + (<usize>k << 2);
        let x = f32x4.splat(load<f32>(Sx + (<usize>load<i32>(c) << 2)));
        x = f32x4.replace_lane(x, 1, load<f32>(Sx + (<usize>load<i32>(c, 4) << 2)));
        x = f32x4.replace_lane(x, 2, load<f32>(Sx + (<usize>load<i32>(c, 8) << 2)));
        x = f32x4.replace_lane(x, 3, load<f32>(Sx + (<usize>load<i32>(c, 12) << 2)));
        const d = f32x4.sub(x, mv);
        if (!i32x4.all_true(f32x4.le(d, f32x4.splat(0)))) break;
        v128.store(VAL + (<usize>k << 2), vexpLut(d));
      }
      for (; k < K; k++) {
        const v = NativeMathf.exp(load<f32>(Sx + (<usize>load<i32>(CHOSEN + (<usize>k << 2)) << 2)) - m);
        store<f32>(VAL + (<usize>k << 2), v);
      }
      let sum: f32 = 0;
      for (let k = 0; k < K; k++) sum += load<f32>(VAL + (<usize>k << 2));
      divideVals(VAL, K, sum);
    } else {
      // the unbiased score, taken directly (summed in selection order); sigmoid / sqrtsoftplus normalise when K > 1
      let sum: f32 = 0;
      for (let k = 0; k < K; k++) {
        const v = load<f32>(Sx + (<usize>load<i32>(CHOSEN + (<usize>k << 2)) << 2));
        store<f32>(VAL + (<usize>k << 2), v);
        sum += v;
      }
      if (fn != SCORE_SOFTMAX && K > 1) {
        divideVals(VAL, K, sum + EPS);
      }
    }

    // write: probs = c * v at the chosen experts, as (list, vals) pairs; whole
    // vectors only within the token's K entries (the next token's may belong
    // to another thread)
    const tk = <usize>t * <usize>K;
    const lrow = list + (tk << 2);
    let k = 0;
    if (dt == DT_F32) {
      const vrow = vals + (tk << 2);
      const c = f32x4.splat(scale);
      for (; k + 4 <= K; k += 4) {
        const o = <usize>k << 2;
        v128.store(lrow + o, v128.load(CHOSEN + o));
        v128.store(vrow + o, f32x4.mul(v128.load(VAL + o), c));
      }
    }
    for (; k < K; k++) {
      store<i32>(lrow + (<usize>k << 2), load<i32>(CHOSEN + (<usize>k << 2)));
      storeAs(vals + tk * inB, k, dt, load<f32>(VAL + (<usize>k << 2)) * scale);
    }
    // write: intermediate (post-softmax: -inf but at the chosen experts, the
    // -inf left out where the host makes the intermediate itself; the others
    // were written by the score pass)
    if (softPost) {
      if (!hostInter) for (let i = 0; i < E4; i += 4) v128.store(irow + (<usize>i << 2), NEG_INF());
      for (let k = 0; k < K; k++) store<f32>(irow + (<usize>load<i32>(CHOSEN + (<usize>k << 2)) << 2), load<f32>(VAL + (<usize>k << 2)));
    }
    writeRoute(fmt, E, K, CHOSEN, route + <usize>t * routeB);
    // write: the intermediate at the chosen experts, in ascending expert
    // order: placed by counted ranks up to 16 chosen, else through a bit set
    // of the chosen over E (in a local up to 64 experts, else in KEY, free
    // now), read out word by word
    if (!yasc) continue; // no backward to come (routing alone)
    const yrow = yasc + (tk << 2);
    const arow = asc ? asc + (tk << 2) : 0;
    if (K <= 16) {
      placeAscending(CHOSEN, K, true, irow, yrow, arow);
      continue;
    }
    if (E <= 64) {
      let bits: u64 = 0;
      for (let k = 0; k < K; k++) bits |= <u64>1 << <u64>load<i32>(CHOSEN + (<usize>k << 2));
      let c = 0;
      while (bits) {
        const e = <i32>ctz(bits);
        store<f32>(yrow + (<usize>c << 2), load<f32>(irow + (<usize>e << 2)));
        if (arow) store<i32>(arow + (<usize>c << 2), e);
        c++;
        bits &= bits - 1;
      }
      continue;
    }
    const nw = (E + 63) >> 6;
    for (let w = 0; w < nw; w++) store<u64>(KEY + (<usize>w << 3), 0);
    for (let k = 0; k < K; k++) {
      const e = load<i32>(CHOSEN + (<usize>k << 2));
      const p = KEY + (<usize>(e >> 6) << 3);
      store<u64>(p, load<u64>(p) | (<u64>1 << <u64>(e & 63)));
    }
    let c = 0;
    for (let w = 0; w < nw; w++) {
      let bits = load<u64>(KEY + (<usize>w << 3));
      while (bits) {
        const e = (w << 6) + <i32>ctz(bits);
        store<f32>(yrow + (<usize>c << 2), load<f32>(irow + (<usize>e << 2)));
        if (arow) store<i32>(arow + (<usize>c << 2), e);
        c++;
        bits &= bits - 1;
      }
    }
  }
}

// VAL[0, K) /= d. Below 4 values, scalar: a vector load right after the
// scalar stores of the values would wait for them (no store forwarding).
@inline function divideVals(VAL: usize, K: i32, d: f32): void {
  if (K < 4) {
    for (let k = 0; k < K; k++) store<f32>(VAL + (<usize>k << 2), load<f32>(VAL + (<usize>k << 2)) / d);
    return;
  }
  const dv = f32x4.splat(d);
  for (let k = 0; k < K; k += 4) {
    const p = VAL + (<usize>k << 2);
    v128.store(p, f32x4.div(v128.load(p), dv));
  }
}

// ---- top-k forward: four tokens at a time -------------------------------------------
//
// Up to LANES_E experts without a group limit (Mixtral: 8, top-2), a row is
// two vectors at most, and the row kernel spends its time on horizontal
// steps: maxima, sums and ranks across lanes, one scalar store per value.
// Here a vector holds one expert of four tokens instead (lane j: token
// t + j): four rows are loaded and transposed, and the scores, the
// selection, the values and the writes run lane-wise. Each element goes
// through the row kernel's own float operations, in its order, so that
// every output has the row kernel's bits:
//   * scores: the same vexp, vsigmoidFast, vsqrtsoftplus and bias add per
//     element; the softmax sum formed as the row kernel forms it
//     (scoreLanes);
//   * selection: on the selection scores as floats, which order like their
//     keys when none is NaN (-0 and +0 compare equal, as their keys are);
//     ties go to the lower expert (selectLanes);
//   * values: the same sums, in selection order, and divisions; the exp of
//     post-softmax is the scalar NativeMathf.exp, bit for bit (vexpLut).
// NaN is what this cannot follow (keys order it below every number, and
// the bits of a NaN result can depend on the order of operands), so the
// kernel takes a group of four tokens only when all their logits are
// finite, and a bias only when it is finite: then no NaN can arise (scores
// are finite, post-softmax's exp arguments are <= 0, softmax sums are
// >= 1). Other groups, and the last T % 4 tokens, go to the row kernel.

const LANES_E: i32 = 16;

// Whether the four-token kernel takes a call: small rows, no group limit,
// no bias or a finite one.
function lanesApply(E: i32, GK: i32, bias: usize): bool {
  if (E > LANES_E || GK > 0) return false;
  if (bias) {
    for (let e = 0; e < E; e++) {
      const b = load<f32>(bias + (<usize>e << 2));
      if (b - b != 0) return false; // infinity or NaN: b - b is NaN
    }
  }
  return true;
}

// exp(x) of AssemblyScript's NativeMathf.exp (expf_lut, after musl: x / ln2
// = k / 32 + r / 32, 2^(k / 32) from a table, a cubic in r, all in float64,
// rounded once to float32), 2 lanes at a time, bit for bit, for x <= 0 and
// -inf: below -103.97 (0xc2cff1b4) the result is 0, as there. EXP2F_TAB is
// the scalar routine's table (tab[i] = bits of 2^(i / 32) - (i << 47)).
const EXP2F_TAB = memory.data<u64>([
  0x3FF0000000000000, 0x3FEFD9B0D3158574, 0x3FEFB5586CF9890F, 0x3FEF9301D0125B51,
  0x3FEF72B83C7D517B, 0x3FEF54873168B9AA, 0x3FEF387A6E756238, 0x3FEF1E9DF51FDEE1,
  0x3FEF06FE0A31B715, 0x3FEEF1A7373AA9CB, 0x3FEEDEA64C123422, 0x3FEECE086061892D,
  0x3FEEBFDAD5362A27, 0x3FEEB42B569D4F82, 0x3FEEAB07DD485429, 0x3FEEA47EB03A5585,
  0x3FEEA09E667F3BCD, 0x3FEE9F75E8EC5F74, 0x3FEEA11473EB0187, 0x3FEEA589994CCE13,
  0x3FEEACE5422AA0DB, 0x3FEEB737B0CDC5E5, 0x3FEEC49182A3F090, 0x3FEED503B23E255D,
  0x3FEEE89F995AD3AD, 0x3FEEFF76F2FB5E47, 0x3FEF199BDD85529C, 0x3FEF3720DCEF9069,
  0x3FEF5818DCFBA487, 0x3FEF7C97337B9B5F, 0x3FEFA4AFA2A490DA, 0x3FEFD0765B6E4540,
]);
// float64 pairs: 32 / ln2, the rounding shifter 1.5 * 2^52, the cubic's C0, C1, C2 (scaled by 32^-3, 32^-2, 32^-1), 1
const VCONST_D = memory.data<f64>([
  reinterpret<f64>(0x3FF71547652B82FE) * 32, reinterpret<f64>(0x3FF71547652B82FE) * 32,
  reinterpret<f64>(0x4338000000000000), reinterpret<f64>(0x4338000000000000),
  reinterpret<f64>(0x3FAC6AF84B912394) / 32 / 32 / 32, reinterpret<f64>(0x3FAC6AF84B912394) / 32 / 32 / 32,
  reinterpret<f64>(0x3FCEBFCE50FAC4F3) / 32 / 32, reinterpret<f64>(0x3FCEBFCE50FAC4F3) / 32 / 32,
  reinterpret<f64>(0x3FE62E42FF0C52D6) / 32, reinterpret<f64>(0x3FE62E42FF0C52D6) / 32,
  1.0, 1.0,
]);
const EXP_UNDER: f32 = reinterpret<f32>(<u32>0xC2CFF1B4); // log(2^-150): below it, 0

// expf_lut's float64 steps on 2 lanes (xd: x widened)
@inline function expLutHalf(xd: v128): v128 {
  const shift = v128.load(VCONST_D, 16);
  const z = f64x2.mul(v128.load(VCONST_D), xd);
  const kd = f64x2.add(z, shift);
  const r = f64x2.sub(z, f64x2.sub(kd, shift));
  // 2^(k / 32): table entry k % 32, plus k << 47 (k: the low bits of kd)
  const i0 = <usize>(<i32>i64x2.extract_lane(kd, 0) & 31) << 3;
  const i1 = <usize>(<i32>i64x2.extract_lane(kd, 1) & 31) << 3;
  const tab = v128.load64_lane(EXP2F_TAB + i1, v128.load64_zero(EXP2F_TAB + i0), 1);
  const s = i64x2.add(tab, i64x2.shl(kd, 47));
  const zz = f64x2.add(f64x2.mul(v128.load(VCONST_D, 32), r), v128.load(VCONST_D, 48));
  let y = f64x2.add(f64x2.mul(v128.load(VCONST_D, 64), r), v128.load(VCONST_D, 80));
  y = f64x2.add(y, f64x2.mul(zz, f64x2.mul(r, r)));
  return f64x2.mul(y, s);
}

@inline function vexpLut(x: v128): v128 {
  const lo = f32x4.demote_f64x2_zero(expLutHalf(f64x2.promote_low_f32x4(x)));
  const hi = f32x4.demote_f64x2_zero(expLutHalf(f64x2.promote_low_f32x4(i32x4.shuffle(x, x, 2, 3, 2, 3))));
  return v128.andnot(i32x4.shuffle(lo, hi, 0, 1, 4, 5), f32x4.lt(x, f32x4.splat(EXP_UNDER)));
}

// 4x4 transpose: rows a, b, c, d -> columns, stored at o0 .. o3
@inline function transpose4(a: v128, b: v128, c: v128, d: v128, o0: usize, o1: usize, o2: usize, o3: usize): void {
  const t0 = i32x4.shuffle(a, b, 0, 4, 1, 5), t1 = i32x4.shuffle(a, b, 2, 6, 3, 7);
  const t2 = i32x4.shuffle(c, d, 0, 4, 1, 5), t3 = i32x4.shuffle(c, d, 2, 6, 3, 7);
  v128.store(o0, i32x4.shuffle(t0, t2, 0, 1, 4, 5));
  v128.store(o1, i32x4.shuffle(t0, t2, 2, 3, 6, 7));
  v128.store(o2, i32x4.shuffle(t1, t3, 0, 1, 4, 5));
  v128.store(o3, i32x4.shuffle(t1, t3, 2, 3, 6, 7));
}

// load: four rows of E logits (row j: token t + j, float16 / bfloat16
// widened into X4 first) into XT[E4] vectors, XT[e] = expert e of the four
// tokens; vectors of experts >= E hold whatever follows a row and are never
// read. Returns whether every logit is finite.
@inline function loadLanes(src: usize, dt: i32, E: i32, X4: usize, XT: usize): bool {
  let rows = src;
  let stride = <usize>E << 2;
  if (dt != DT_F32) {
    const rowE4 = <usize>roundUp4(E) << 2;
    for (let j = 0; j < 4; j++) widenRow(src + (<usize>(j * E) << 1), dt, E, X4 + <usize>j * rowE4);
    rows = X4;
    stride = rowE4;
  }
  let bad = f32x4.splat(0); // lanes: x - x, NaN for an infinity or a NaN
  for (let q = 0; q < E; q += 4) {
    const p = rows + (<usize>q << 2);
    const a = v128.load(p), b = v128.load(p + stride), c = v128.load(p + 2 * stride), d = v128.load(p + 3 * stride);
    const nf = f32x4.add(f32x4.add(f32x4.sub(a, a), f32x4.sub(b, b)), f32x4.add(f32x4.sub(c, c), f32x4.sub(d, d)));
    bad = v128.or(bad, v128.and(nf, inRow(q, E)));
    const o = XT + (<usize>q << 4);
    transpose4(a, b, c, d, o, o + 16, o + 32, o + 48);
  }
  return !v128.any_true(bad);
}

// score: ST[e] = s for pre-softmax, sigmoid and sqrtsoftplus (post-softmax
// selects on the logits themselves), and RT[e] = s + bias with a bias.
// Pre-softmax's sum is the row kernel's: lane l of its vector sum adds
// experts l, l + 4, l + 8, l + 12 to 0 in this order (here: s0 .. s3), then
// (l0 + l1) + (l2 + l3). The row maximum may differ from the row kernel's
// in the sign of a zero, which changes no x - max (x - max can differ only
// where it is 0, and exp gives 1 for either zero).
@inline function scoreLanes(fn: i32, pre: bool, E: i32, XT: usize, ST: usize, bias: usize, RT: usize): void {
  if (fn == SCORE_SOFTMAX) {
    if (!pre) return;
    let m = v128.load(XT);
    for (let e = 1; e < E; e++) m = f32x4.pmax(m, v128.load(XT + (<usize>e << 4)));
    const zero = f32x4.splat(0);
    let s0 = zero, s1 = zero, s2 = zero, s3 = zero;
    for (let q = 0; q < E; q += 4) {
      s0 = f32x4.add(s0, expLane(XT, ST, q, m));
      if (q + 1 < E) s1 = f32x4.add(s1, expLane(XT, ST, q + 1, m));
      if (q + 2 < E) s2 = f32x4.add(s2, expLane(XT, ST, q + 2, m));
      if (q + 3 < E) s3 = f32x4.add(s3, expLane(XT, ST, q + 3, m));
    }
    const sum = f32x4.add(f32x4.add(s0, s1), f32x4.add(s2, s3));
    for (let e = 0; e < E; e++) {
      const p = ST + (<usize>e << 4);
      v128.store(p, f32x4.div(v128.load(p), sum));
    }
    return;
  }
  for (let e = 0; e < E; e++) {
    const o = <usize>e << 4;
    const x = v128.load(XT + o);
    const s = fn == SCORE_SIGMOID ? vsigmoidFast(x) : vsqrtsoftplus(x);
    v128.store(ST + o, s);
    if (bias) v128.store(RT + o, f32x4.add(s, f32x4.splat(load<f32>(bias + (<usize>e << 2)))));
  }
}

// exp(x - m) of expert e into ST[e], returned
@inline function expLane(XT: usize, ST: usize, e: i32, m: v128): v128 {
  const o = <usize>e << 4;
  const y = vexp(f32x4.sub(v128.load(XT + o), m));
  v128.store(ST + o, y);
  return y;
}

// select: the top K of the four tokens by R[e] (no NaN, no infinity),
// lane-wise, in selection order: CV[k] the expert of rank k, BV[k] its R.
// Rank: R descending, ties by lower expert. K = 1: one arg-max scan; K = 2:
// a two-deep insertion scan; more: K rounds of arg-max, each after taking
// the previous winner out (W: E4 vectors). In the scans a later expert
// replaces the best so far only with a strictly larger score, which keeps
// ties in index order (pmax(b, r) is exactly r > b ? r : b), and experts
// come in increasing order, so a new index is max(old, e). BV holds the
// bits of R at the chosen experts, but for the second of K = 2, which may
// be an equal score of another expert: a zero of the other sign at most,
// and only -0 logits (post-softmax) have one (scores are >= +0), where a
// zero's sign changes no value (see valueLanes).
@inline function selectLanes(R: usize, E: i32, K: i32, W: usize, CV: usize, BV: usize): void {
  if (K == 1) {
    let b = v128.load(R);
    let c = i32x4.splat(0);
    for (let e = 1; e < E; e++) {
      const r = v128.load(R + (<usize>e << 4));
      c = v128.bitselect(i32x4.splat(e), c, f32x4.gt(r, b));
      b = f32x4.pmax(b, r);
    }
    v128.store(CV, c);
    v128.store(BV, b);
    return;
  }
  if (K == 2) {
    const r0 = v128.load(R), r1 = v128.load(R, 16);
    const one = i32x4.splat(1);
    const g = f32x4.gt(r1, r0);
    let b1 = f32x4.pmax(r0, r1), b2 = v128.bitselect(r0, r1, g);
    let c1 = v128.and(g, one), c2 = v128.andnot(one, g);
    for (let e = 2; e < E; e++) {
      const r = v128.load(R + (<usize>e << 4));
      const g1 = f32x4.gt(r, b1);
      const ev = i32x4.splat(e);
      c2 = v128.bitselect(c1, i32x4.max_s(c2, v128.and(ev, f32x4.gt(r, b2))), g1);
      c1 = i32x4.max_s(c1, v128.and(ev, g1));
      b2 = f32x4.pmax(b2, f32x4.pmin(b1, r));
      b1 = f32x4.pmax(b1, r);
    }
    v128.store(CV, c1);
    v128.store(CV, c2, 16);
    v128.store(BV, b1);
    v128.store(BV, b2, 16);
    return;
  }
  // K rounds of the arg-max scan over W, a copy of R from which each round
  // takes the previous winner out (-inf: every R is finite, so it loses to
  // all the others)
  let taken = i32x4.splat(-1);
  let src = R;
  for (let k = 0; k < K; k++) {
    let b = NEG_INF();
    let c = i32x4.splat(0);
    for (let e = 0; e < E; e++) {
      const o = <usize>e << 4;
      const ev = i32x4.splat(e);
      const w = v128.bitselect(NEG_INF(), v128.load(src + o), i32x4.eq(taken, ev));
      v128.store(W + o, w);
      c = i32x4.max_s(c, v128.and(ev, f32x4.gt(w, b)));
      b = f32x4.pmax(b, w);
    }
    v128.store(CV + (<usize>k << 4), c);
    v128.store(BV + (<usize>k << 4), b);
    taken = c;
    src = W;
  }
}

// A[c] lane by lane: the bits of vector A[c_j] in lane j (c_j < E)
@inline function gatherLanes(A: usize, E: i32, c: v128): v128 {
  let v = i32x4.splat(0);
  for (let e = 0; e < E; e++) v = v128.or(v, v128.and(i32x4.eq(c, i32x4.splat(e)), v128.load(A + (<usize>e << 4))));
  return v;
}

// post-process: the values of the chosen experts, lane-wise, into BV (the
// row kernel's steps element for element), and the intermediate at them
// into YV. With a bias, the values are the unbiased scores, from ST.
@inline function valueLanes(fn: i32, pre: bool, E: i32, K: i32, bias: usize, XT: usize, ST: usize, CV: usize, BV: usize, YV: usize): void {
  if (bias) {
    for (let k = 0; k < K; k++) {
      const o = <usize>k << 4;
      v128.store(BV + o, gatherLanes(ST, E, v128.load(CV + o)));
    }
  }
  if (fn == SCORE_SOFTMAX && !pre) {
    // softmax over the K chosen logits, max-subtracted. The maximum is the
    // first chosen logit up to the sign of a zero, which changes no x - max
    // but a zero one, whose exp is 1 either way: the first's exp is exactly 1.
    const m = v128.load(BV);
    let sum = ONE(); // 0 + 1
    v128.store(BV, sum);
    for (let k = 1; k < K; k++) {
      const p = BV + (<usize>k << 4);
      const v = vexpLut(f32x4.sub(v128.load(p), m));
      v128.store(p, v);
      sum = f32x4.add(sum, v);
    }
    for (let k = 0; k < K; k++) {
      const o = <usize>k << 4;
      const v = f32x4.div(v128.load(BV + o), sum);
      v128.store(BV + o, v);
      v128.store(YV + o, v);
    }
    return;
  }
  // the intermediate holds s (sqrtsoftplus: x); sigmoid and sqrtsoftplus
  // normalise when K > 1, by the sum in selection order
  let sum = f32x4.splat(0);
  for (let k = 0; k < K; k++) {
    const o = <usize>k << 4;
    const v = v128.load(BV + o);
    v128.store(YV + o, fn == SCORE_SQRTSOFTPLUS ? gatherLanes(XT, E, v128.load(CV + o)) : v);
    sum = f32x4.add(sum, v);
  }
  if (fn != SCORE_SOFTMAX && K > 1) {
    const d = f32x4.add(sum, EPS_V());
    for (let k = 0; k < K; k++) {
      const p = BV + (<usize>k << 4);
      v128.store(p, f32x4.div(v128.load(p), d));
    }
  }
}

// Four rows of E floats (row j at out + j * E * 4) from the lane-wise
// vectors A[E4]. Quads go last to first, and rows in order within a quad,
// so that a vector reaching past a row's end (into the next row, or past
// the fourth row into the next group's, rewritten when that group comes)
// is overwritten by the right values.
function storeRows(A: usize, E: i32, out: usize): void {
  const row = <usize>E << 2;
  for (let q = roundUp4(E) - 4; q >= 0; q -= 4) {
    const p = A + (<usize>q << 4);
    const o = out + (<usize>q << 2);
    transpose4(v128.load(p), v128.load(p, 16), v128.load(p, 32), v128.load(p, 48), o, o + row, o + 2 * row, o + 3 * row);
  }
}

// rows[j][c_j] = v_j (bits) for the four rows of n 32-bit words at rows (lane j: row j)
@inline function scatterLanes(rows: usize, n: i32, c: v128, v: v128): void {
  const row = <usize>n << 2;
  store<i32>(rows + (<usize>i32x4.extract_lane(c, 0) << 2), i32x4.extract_lane(v, 0));
  store<i32>(rows + row + (<usize>i32x4.extract_lane(c, 1) << 2), i32x4.extract_lane(v, 1));
  store<i32>(rows + 2 * row + (<usize>i32x4.extract_lane(c, 2) << 2), i32x4.extract_lane(v, 2));
  store<i32>(rows + 3 * row + (<usize>i32x4.extract_lane(c, 3) << 2), i32x4.extract_lane(v, 3));
}

// The [token][k] rows of K 32-bit values a token (out: 4 rows of K) from
// the lane-wise vectors A[K] ([k][token]), times c when scaled: shuffles
// for K <= 2, 4x4 transposes of 4 values a token, then one by one.
@inline function tokenRows(A: usize, K: i32, out: usize, c: v128, scaled: bool): void {
  const a0 = scaled ? f32x4.mul(v128.load(A), c) : v128.load(A);
  if (K == 1) {
    v128.store(out, a0);
    return;
  }
  if (K == 2) {
    const a1 = scaled ? f32x4.mul(v128.load(A, 16), c) : v128.load(A, 16);
    v128.store(out, i32x4.shuffle(a0, a1, 0, 4, 1, 5));
    v128.store(out, i32x4.shuffle(a0, a1, 2, 6, 3, 7), 16);
    return;
  }
  const row = <usize>K << 2;
  let k = 0;
  for (; k + 4 <= K; k += 4) {
    const p = A + (<usize>k << 4), o = out + (<usize>k << 2);
    let v0 = v128.load(p), v1 = v128.load(p, 16), v2 = v128.load(p, 32), v3 = v128.load(p, 48);
    if (scaled) {
      v0 = f32x4.mul(v0, c);
      v1 = f32x4.mul(v1, c);
      v2 = f32x4.mul(v2, c);
      v3 = f32x4.mul(v3, c);
    }
    transpose4(v0, v1, v2, v3, o, o + row, o + 2 * row, o + 3 * row);
  }
  for (; k < K; k++) {
    const v = v128.load(A + (<usize>k << 4));
    scatterLanes(out, K, i32x4.splat(k), scaled ? f32x4.mul(v, c) : v);
  }
}

// write: the outputs of four tokens (pointers at the group's first token):
// list and probs (c * value, logits dtype) in selection order (and the
// dense probs rows when probs != 0), the routing output, the intermediate
// rows, and the intermediate at the chosen experts in ascending expert
// order (yasc). Lane-wise results go from [k][token] to the outputs'
// [token][k] by shuffles (float32, K <= 2) or lane by lane.
@inline function writeLanes(
  fn: i32, pre: bool, dt: i32, E: i32, K: i32, scale: f32, fmt: i32,
  XT: usize, ST: usize, W: usize, CV: usize, BV: usize, YV: usize,
  vals: usize, list: usize, yasc: usize, inter: usize, route: usize, routeB: usize, probs: usize,
): void {
  if (dt == DT_F32) {
    const c = f32x4.splat(scale);
    tokenRows(CV, K, list, c, false);
    if (probs) {
      // dense probs instead of vals (nothing reads those then): the four
      // rows are 4 * E floats, E vectors
      for (let i = 0; i < E; i++) v128.store(probs + (<usize>i << 4), f32x4.splat(0));
      for (let k = 0; k < K; k++) {
        const o = <usize>k << 4;
        scatterLanes(probs, E, v128.load(CV + o), f32x4.mul(v128.load(BV + o), c));
      }
    } else {
      tokenRows(BV, K, vals, c, true);
    }
  } else {
    for (let j = 0; j < 4; j++) {
      for (let k = 0; k < K; k++) {
        const o = (<usize>k << 4) + (<usize>j << 2);
        const at = j * K + k;
        store<i32>(list + (<usize>at << 2), load<i32>(CV + o));
        storeAs(vals, at, dt, load<f32>(BV + o) * scale);
      }
    }
    if (probs) scatterRows(list, vals, 4, E, K, dt, probs);
  }
  // route: int32 indices are the list (4 * K of them: K vectors; the host may pass the list itself)
  if (fmt == ROUTE_I32) {
    if (route != list) for (let k = 0; k < K; k++) v128.store(route + (<usize>k << 4), v128.load(list + (<usize>k << 4)));
  } else {
    for (let j = 0; j < 4; j++) writeRoute(fmt, E, K, list + (<usize>(j * K) << 2), route + <usize>j * routeB);
  }
  // intermediate: post-softmax -inf but at the chosen experts (the four
  // rows are 4 * E floats: E vectors); else s (sqrtsoftplus: x)
  if (fn == SCORE_SOFTMAX && !pre) {
    for (let i = 0; i < E; i++) v128.store(inter + (<usize>i << 4), NEG_INF());
    for (let k = 0; k < K; k++) {
      const o = <usize>k << 4;
      scatterLanes(inter, E, v128.load(CV + o), v128.load(BV + o));
    }
  } else {
    storeRows(fn == SCORE_SQRTSOFTPLUS ? XT : ST, E, inter);
  }
  // yasc: the intermediate at the chosen experts, lower expert first
  if (K == 1) {
    v128.store(yasc, v128.load(YV));
  } else if (K == 2) {
    const c0 = v128.load(CV), c1 = v128.load(CV, 16);
    const y0 = v128.load(YV), y1 = v128.load(YV, 16);
    const lo = i32x4.lt_s(c0, c1);
    const a = v128.bitselect(y0, y1, lo), b = v128.bitselect(y1, y0, lo);
    v128.store(yasc, i32x4.shuffle(a, b, 0, 4, 1, 5));
    v128.store(yasc, i32x4.shuffle(a, b, 2, 6, 3, 7), 16);
  } else {
    // each chosen expert's place: how many chosen experts are below it
    for (let k = 0; k < K; k++) {
      const ck = v128.load(CV + (<usize>k << 4));
      let n = i32x4.splat(0);
      for (let h = 0; h < K; h++) n = i32x4.sub(n, i32x4.lt_s(v128.load(CV + (<usize>h << 4)), ck));
      v128.store(W + (<usize>k << 4), n);
    }
    for (let j = 0; j < 4; j++) {
      for (let k = 0; k < K; k++) {
        const o = (<usize>k << 4) + (<usize>j << 2);
        store<f32>(yasc + (<usize>(j * K + load<i32>(W + o)) << 2), load<f32>(YV + o));
      }
    }
  }
}

// The four-token kernel (see above); topkForward's arguments. Scratch, in
// vectors (16 bytes): XT, ST, RT, W: E4 each (logits, scores, selection
// scores, work vectors of select and write), CV, BV, YV: K each (chosen
// experts, their values, their intermediate), then X4: 4 rows of E4
// floats. At most 80 * E4 + 48 * K <= 2048 bytes: within scratchBytes(E,
// K, G) for E <= 16 (1616 + 32 * K4 and more).
function forwardLanes(
  logits: usize, dt: i32, T: i32, E: i32, K: i32,
  fn: i32, pre: bool, G: i32, GK: i32, scale: f32, bias: usize,
  fmt: i32, radixThreshold: i32,
  vals: usize, list: usize, yasc: usize, inter: usize, route: usize, scratch: usize, probs: usize,
): i32 {
  const vecs = <usize>roundUp4(E) << 4;
  const XT = scratch;
  const ST = XT + vecs;
  const RT = ST + vecs;
  const W = RT + vecs;
  const CV = W + vecs;
  const BV = CV + (<usize>K << 4);
  const YV = BV + (<usize>K << 4);
  const X4 = YV + (<usize>K << 4);
  const inB = <usize>dtBytes(dt);
  const routeB = <usize>routeRowBytes(fmt, E, K);
  // selection scores: the logits (post-softmax), s + bias, or s
  const R = fn == SCORE_SOFTMAX && !pre ? XT : bias ? RT : ST;
  let t = 0;
  let taken = 0;
  for (; t + 4 <= T; t += 4) {
    const tE = <usize>t * <usize>E;
    const tK = <usize>t * <usize>K;
    const src = logits + tE * inB;
    const vrow = vals + tK * inB, lrow = list + (tK << 2), yrow = yasc + (tK << 2);
    const irow = inter + (tE << 2), rrow = route + <usize>t * routeB;
    const prow = probs ? probs + tE * inB : 0;
    if (!loadLanes(src, dt, E, X4, XT)) {
      // a logit that is not finite: these four tokens take the row kernel
      forwardRows(src, dt, 4, E, K, fn, pre, G, GK, scale, bias, fmt, radixThreshold, vrow, lrow, yrow, irow, rrow, scratch, false, 0);
      if (probs) scatterRows(lrow, vrow, 4, E, K, dt, prow);
      continue;
    }
    scoreLanes(fn, pre, E, XT, ST, bias, RT);
    selectLanes(R, E, K, W, CV, BV);
    valueLanes(fn, pre, E, K, bias, XT, ST, CV, BV, YV);
    writeLanes(fn, pre, dt, E, K, scale, fmt, XT, ST, W, CV, BV, YV, vrow, lrow, yrow, irow, rrow, routeB, prow);
    taken += 4;
  }
  if (t < T) {
    const tE = <usize>t * <usize>E;
    const tK = <usize>t * <usize>K;
    forwardRows(
      logits + tE * inB, dt, T - t, E, K, fn, pre, G, GK, scale, bias, fmt, radixThreshold,
      vals + tK * inB, list + (tK << 2), yasc + (tK << 2), inter + (tE << 2), route + <usize>t * routeB, scratch, false, 0,
    );
    if (probs) scatterRows(list + (tK << 2), vals + tK * inB, T - t, E, K, dt, probs + tE * inB);
  }
  return taken;
}

// The K expert ids at src (i32) in ascending order, into dst: ranks counted
// up to 32 ids (up to 16 in registers), else a byte mask of E (MASK: E16
// bytes) scanned 16 at a time. src needs room for K4 ids (past 16 ids the
// pad lanes are written) and 16 readable bytes past its K ids.
function ascending(src: usize, K: i32, E: i32, MASK: usize, dst: usize): void {
  if (K <= 16) {
    placeAscending(src, K, false, 0, dst);
    return;
  }
  if (K <= 32) {
    // each id's place counted, 4 ids a vector: how many ids are smaller, or
    // equal at an earlier position; no branch depends on the ids, which an
    // insertion sort's inner loop does. Lanes past K get i32.MAX (never
    // smaller than an id).
    const K4 = roundUp4(K);
    for (let k = K; k < K4; k++) store<i32>(src + (<usize>k << 2), i32.MAX_VALUE);
    for (let k = 0; k < K; k++) {
      const e = load<i32>(src + (<usize>k << 2));
      const ev = i32x4.splat(e), kv = i32x4.splat(k);
      let c = i32x4.splat(0);
      let p = IOTA();
      for (let q = 0; q < K4; q += 4) {
        const v = v128.load(src + (<usize>q << 2));
        c = i32x4.add(c, v128.or(i32x4.lt_s(v, ev), v128.and(i32x4.eq(v, ev), i32x4.lt_s(p, kv))));
        p = i32x4.add(p, i32x4.splat(4));
      }
      const h = i32x4.add(c, i32x4.shuffle(c, c, 2, 3, 0, 1));
      store<i32>(dst + (<usize>(-(i32x4.extract_lane(h, 0) + i32x4.extract_lane(h, 1))) << 2), e);
    }
    return;
  }
  const E16 = roundUp16(E);
  memory.fill(MASK, 0, <usize>E16);
  for (let k = 0; k < K; k++) store<u8>(MASK + <usize>load<i32>(src + (<usize>k << 2)), 1);
  maskToList(MASK, E16, K, dst);
}

// Ascending positions of the nonzero bytes of MASK[0, n) (n a multiple of
// 16), at most K of them, into dst; returns how many.
function maskToList(MASK: usize, n: i32, K: i32, dst: usize): i32 {
  let c = 0;
  for (let i = 0; i < n && c < K; i += 16) {
    let hits = i8x16.bitmask(i8x16.ne(v128.load(MASK + <usize>i), i8x16.splat(0)));
    while (hits && c < K) {
      store<i32>(dst + (<usize>c << 2), i + ctz(hits));
      c++;
      hits &= hits - 1;
    }
  }
  return c;
}

// Dense index k of a routing row (int16, int32 or int64), as i32
@inline function readId(fmt: i32, row: usize, k: i32): i32 {
  if (fmt == ROUTE_I16) return <i32>load<i16>(row + (<usize>k << 1));
  if (fmt == ROUTE_I32) return load<i32>(row + (<usize>k << 2));
  return <i32>load<i64>(row + (<usize>k << 3));
}

/**
 * The chosen experts of each token, ascending, from a routing output of any
 * format (bytemap, bitmap_u8, dense indices), into list (T x K, i32); rows
 * that hold fewer than K experts are padded with -1. MASK: scratch of E16
 * bytes.
 */
export function routeList(fmt: i32, T: i32, E: i32, K: i32, route: usize, list: usize, scratch: usize): void {
  const routeB = <usize>routeRowBytes(fmt, E, K);
  for (let t = 0; t < T; t++) routeRowList(fmt, E, K, route + <usize>t * routeB, list + ((<usize>t * <usize>K) << 2), scratch);
}

// One routing row's chosen experts, ascending, -1 after them, into dst (K
// i32): routeList's row (scratch: E16 + 4 K bytes).
function routeRowList(fmt: i32, E: i32, K: i32, row: usize, dst: usize, scratch: usize): void {
  let c = 0;
  if (fmt == ROUTE_BYTEMAP) {
    // whole vectors of 16 bytes, then the row's tail
    let i = 0;
    for (; i + 16 <= E && c < K; i += 16) {
      let hits = i8x16.bitmask(i8x16.ne(v128.load(row + <usize>i), i8x16.splat(0)));
      while (hits && c < K) {
        store<i32>(dst + (<usize>c << 2), i + ctz(hits));
        c++;
        hits &= hits - 1;
      }
    }
    for (; i < E && c < K; i++) {
      if (load<u8>(row + <usize>i)) {
        store<i32>(dst + (<usize>c << 2), i);
        c++;
      }
    }
  } else if (fmt == ROUTE_BITMAP) {
    const nb = (E + 7) >> 3;
    for (let b = 0; b < nb && c < K; b++) {
      let bits = <i32>load<u8>(row + <usize>b);
      while (bits && c < K) {
        const e = (b << 3) + ctz(bits);
        if (e < E) {
          store<i32>(dst + (<usize>c << 2), e);
          c++;
        }
        bits &= bits - 1;
      }
    }
  } else if (K <= 2) {
    // one or two ids: ordered by min / max, not by the sort's loop, whose
    // branch would go either way at random (ids outside [0, E) dropped)
    const a = readId(fmt, row, 0);
    const x = <u32>a < <u32>E ? a : -1;
    if (K == 1) {
      store<i32>(dst, x);
    } else {
      const b = readId(fmt, row, 1);
      const y = <u32>b < <u32>E ? b : -1;
      const both = x >= 0 && y >= 0;
      store<i32>(dst, both ? min(x, y) : max(x, y));
      store<i32>(dst, both ? max(x, y) : -1, 4);
    }
    c = K;
  } else {
    // dense ids -> i32 (ids outside [0, E) are dropped), then ascending
    const ids = scratch + <usize>roundUp16(E);
    let n = 0;
    for (let k = 0; k < K; k++) {
      const e = readId(fmt, row, k);
      if (e >= 0 && e < E) {
        store<i32>(ids + (<usize>n << 2), e);
        n++;
      }
    }
    ascending(ids, n, E, scratch, dst);
    c = n;
  }
  for (; c < K; c++) store<i32>(dst + (<usize>c << 2), -1);
}

/**
 * The sparse backward's gather: gv[t K + k] = element list[t K + k] of row
 * t of grad (T rows of E elements of logits dtype, copied in by the host),
 * as raw bits (NaN payloads kept), 0 where the id is < 0. The host copies
 * the rows in slices that stay in cache for this (a sequential copy and
 * reads from cache cost less than reading K scattered elements of each row
 * of the caller's array, each from memory).
 */
export function gatherChosen(grad: usize, dt: i32, T: i32, E: i32, K: i32, list: usize, gv: usize): void {
  const wide = dt == DT_F32;
  const rowB = <usize>E << (wide ? 2 : 1);
  for (let t = 0; t < T; t++) {
    const row = grad + <usize>t * rowB;
    for (let c = t * K, end = c + K; c < end; c++) {
      const e = load<i32>(list + (<usize>c << 2));
      if (wide) store<u32>(gv + (<usize>c << 2), e < 0 ? 0 : load<u32>(row + (<usize>e << 2)));
      else store<u16>(gv + (<usize>c << 1), e < 0 ? 0 : load<u16>(row + (<usize>e << 1)));
    }
  }
}

/**
 * Sparse backward of the top-k router (SPEC section 3) for every score
 * function but pre-softmax: only the K chosen experts of a token get a
 * gradient, so it runs on compact rows, in ascending expert order: gv (the
 * gradProbs at the chosen experts, logits dtype), yv (the saved
 * intermediate there, f32) -> outv (gradLogits there, logits dtype). The
 * host gathers and scatters. A, DA: scratch of T * K4 f32 each.
 */
export function topkBackwardSparse(
  dt: i32, T: i32, K: i32, fn: i32, scale: f32, gv: usize, yv: usize, outv: usize, A: usize, DA: usize,
): void {
  const n = T * K;
  const n4 = roundUp4(n);
  // activations a and the activation derivative, 4 lanes of the compact
  // rows at a time (the vector past the end reads the region's slack)
  if (fn != SCORE_SOFTMAX) {
    for (let i = 0; i < n4; i += 4) {
      const o = <usize>i << 2;
      const y = v128.load(yv + o);
      const a = fn == SCORE_SIGMOID ? y : vsqrtsoftplus(y);
      v128.store(A + o, a);
      v128.store(DA + o, activationDerivative(fn, y, a));
    }
  }
  for (let t = 0; t < T; t++) {
    const b = t * K;
    if (fn == SCORE_SOFTMAX) {
      // post-softmax: g_i = y_i * (g_i - sum(g * y)) over the chosen
      let d: f32 = 0;
      for (let k = 0; k < K; k++) d += loadAs(gv, b + k, dt) * scale * load<f32>(yv + (<usize>(b + k) << 2));
      for (let k = 0; k < K; k++) {
        const y = load<f32>(yv + (<usize>(b + k) << 2));
        storeAs(outv, b + k, dt, y * (loadAs(gv, b + k, dt) * scale - d));
      }
      continue;
    }
    if (K > 1) {
      // normalisation backward: g_i = g_i / S - D / S^2, S = sum(a) + eps, D = sum(g * a)
      let sa: f32 = 0;
      let ga: f32 = 0;
      for (let k = 0; k < K; k++) {
        const a = load<f32>(A + (<usize>(b + k) << 2));
        sa += a;
        ga += loadAs(gv, b + k, dt) * scale * a;
      }
      const S = sa + EPS;
      const D = ga / (S * S);
      for (let k = 0; k < K; k++) {
        const g = (loadAs(gv, b + k, dt) * scale) / S - D;
        storeAs(outv, b + k, dt, g * load<f32>(DA + (<usize>(b + k) << 2)));
      }
    } else {
      storeAs(outv, b, dt, loadAs(gv, b, dt) * scale * load<f32>(DA + (<usize>b << 2)));
    }
  }
}

// ---- top-k router backward: small rows, four tokens at a time ---------------------
//
// Up to LANES_E experts, the sparse backward's steps run in one pass over
// the dense rows, four tokens per vector (lane j: token t + j; vector k:
// each token's k-th chosen expert, ascending): the chosen experts from the
// routing output (routeRowList's; one or two dense ids lane-wise), the
// saved intermediate there, gradProbs gathered there, topkBackwardSparse's
// arithmetic, and gradLogits scattered into zeroed rows. Each lane goes
// through topkBackwardSparse's float operations for its token, operands in
// the same order (sums over k from 0 in k order, the same vector routines
// for the activations, the same conversions), so every bit is the same,
// NaN payloads included: scalar and vector float instructions pick a NaN
// operand alike.

/**
 * The sparse backward (topkBackwardSparse, every score function but
 * pre-softmax) of E <= LANES_E experts on dense rows: grad (gradProbs,
 * logits dtype), the routing output (any format) and yasc (the saved
 * intermediate at the chosen experts, T x K f32, ascending expert order)
 * -> out (gradLogits, logits dtype, every row written). Scratch: 64 K + 4
 * K4 + E16 + 4 K bytes (vectors IDS, YV, GV, DA: K each; one token's list,
 * K4 i32; routeRowList's scratch).
 */
export function topkBackwardLanes(
  grad: usize, dt: i32, T: i32, E: i32, K: i32, fn: i32, scale: f32,
  fmt: i32, route: usize, yasc: usize, out: usize, scratch: usize,
): void {
  // copies for top-2 (Mixtral's) in float32 and bfloat16 with the dtype and
  // K as constants: the loops over k unroll, their vectors stay in
  // registers, and the dtype's branches go (f32 kernel 1.22-1.5x in a
  // same-process A/B of the kernel alone; the same bits, the code being the
  // same; each copy adds about 2.8 KB to the module)
  if (dt == DT_F32 && K == 2) backwardLanes(grad, DT_F32, T, E, 2, fn, scale, fmt, route, yasc, out, scratch);
  else if (dt == DT_BF16 && K == 2) backwardLanes(grad, DT_BF16, T, E, 2, fn, scale, fmt, route, yasc, out, scratch);
  else backwardLanes(grad, dt, T, E, K, fn, scale, fmt, route, yasc, out, scratch);
}

// topkBackwardLanes' body, inlined into each of its copies
@inline function backwardLanes(
  grad: usize, dt: i32, T: i32, E: i32, K: i32, fn: i32, scale: f32,
  fmt: i32, route: usize, yasc: usize, out: usize, scratch: usize,
): void {
  const K16 = <usize>K << 4;
  const IDS = scratch;
  const YV = IDS + K16;
  const GV = YV + K16;
  const DA = GV + K16;
  const ROW = DA + K16;
  const RS = ROW + (<usize>roundUp4(K) << 2);
  const inB = <usize>dtBytes(dt);
  const rowB = <usize>E * inB;
  const routeB = <usize>routeRowBytes(fmt, E, K);
  const c = f32x4.splat(scale);
  const zero = f32x4.splat(0);
  const quick = K <= 2 && (fmt == ROUTE_I16 || fmt == ROUTE_I32 || fmt == ROUTE_I64);
  const map = fmt == ROUTE_BYTEMAP || fmt == ROUTE_BITMAP;
  for (let t = 0; t < T; t += 4) {
    const n = min(4, T - t);
    const g0 = grad + <usize>t * rowB;
    const o0 = out + <usize>t * rowB;
    const yrow = yasc + ((<usize>t * <usize>K) << 2);
    // load: the chosen experts and the intermediate there; missing tokens
    // (past T) get none (-1)
    if (quick && n == 4) {
      quickIds(fmt, E, K, route + <usize>t * routeB, yrow, IDS, YV);
    } else {
      for (let j = 0; j < 4; j++) {
        if (j >= n) {
          // past T: none
        } else if (map) {
          // ascending ids, lowest bit first, -1 once the set runs out
          let bits = mapBits(fmt, E, route + <usize>(t + j) * routeB);
          for (let k = 0; k < K; k++) {
            store<i32>(ROW + (<usize>k << 2), bits ? <i32>ctz(bits) : -1);
            bits &= bits - 1;
          }
        } else {
          routeRowList(fmt, E, K, route + <usize>(t + j) * routeB, ROW, RS);
        }
        for (let k = 0; k < K; k++) {
          const at = (<usize>k << 4) + (<usize>j << 2);
          store<i32>(IDS + at, j < n ? load<i32>(ROW + (<usize>k << 2)) : -1);
          store<u32>(YV + at, j < n ? load<u32>(yrow + (<usize>(j * K + k) << 2)) : 0);
        }
      }
    }
    // gradProbs at the chosen experts (0 for none), widened
    for (let k = 0; k < K; k++) {
      const o = <usize>k << 4;
      v128.store(GV + o, gatherAt(g0, rowB, v128.load(IDS + o), dt));
    }
    // backward of the compact rows, into GV
    if (fn == SCORE_SOFTMAX) {
      // post-softmax: g_i = y_i * (g_i - sum(g * y)) over the chosen
      let d = zero;
      for (let k = 0; k < K; k++) {
        const o = <usize>k << 4;
        d = f32x4.add(d, f32x4.mul(f32x4.mul(v128.load(GV + o), c), v128.load(YV + o)));
      }
      for (let k = 0; k < K; k++) {
        const o = <usize>k << 4;
        v128.store(GV + o, f32x4.mul(v128.load(YV + o), f32x4.sub(f32x4.mul(v128.load(GV + o), c), d)));
      }
    } else {
      // activations a and their derivatives (one vector routine for both
      // branches: the module stays smaller)
      let sa = zero;
      let ga = zero;
      for (let k = 0; k < K; k++) {
        const o = <usize>k << 4;
        const y = v128.load(YV + o);
        const a = fn == SCORE_SIGMOID ? y : vsqrtsoftplus(y);
        v128.store(DA + o, activationDerivative(fn, y, a));
        sa = f32x4.add(sa, a);
        ga = f32x4.add(ga, f32x4.mul(f32x4.mul(v128.load(GV + o), c), a));
      }
      if (K > 1) {
        // normalisation backward: g_i = g_i / S - D / S^2, S = sum(a) + eps, D = sum(g * a)
        const S = f32x4.add(sa, EPS_V());
        const D = f32x4.div(ga, f32x4.mul(S, S));
        for (let k = 0; k < K; k++) {
          const o = <usize>k << 4;
          const g = f32x4.sub(f32x4.div(f32x4.mul(v128.load(GV + o), c), S), D);
          v128.store(GV + o, f32x4.mul(g, v128.load(DA + o)));
        }
      } else {
        v128.store(GV, f32x4.mul(f32x4.mul(v128.load(GV), c), v128.load(DA)));
      }
    }
    // write: zeroed rows, then each token's K gradients at its experts, in k order
    zeroBytes(o0, <usize>n * rowB);
    for (let k = 0; k < K; k++) {
      const o = <usize>k << 4;
      scatterAt(o0, rowB, v128.load(IDS + o), v128.load(GV + o), dt);
    }
  }
}

// routeRowList's one or two dense ids (int16, int32 or int64) of four
// tokens at rows, lane-wise, into IDS (K vectors), and their saved
// intermediate at yrow into YV (K vectors): ids outside [0, E) become -1
// (int64 ids as their low 32 bits, as readId takes them); two valid ids go
// min first, one valid id first, -1 after it.
@inline function quickIds(fmt: i32, E: i32, K: i32, rows: usize, yrow: usize, IDS: usize, YV: usize): void {
  let a = i32x4.splat(0);
  let b = a;
  if (fmt == ROUTE_I32) {
    const v0 = v128.load(rows);
    if (K == 1) {
      a = v0;
    } else {
      const v1 = v128.load(rows, 16);
      a = i32x4.shuffle(v0, v1, 0, 2, 4, 6);
      b = i32x4.shuffle(v0, v1, 1, 3, 5, 7);
    }
  } else if (fmt == ROUTE_I16) {
    if (K == 1) {
      a = i32x4.extend_low_i16x8_s(v128.load64_zero(rows));
    } else {
      const v = v128.load(rows);
      const w = i16x8.shuffle(v, v, 0, 2, 4, 6, 1, 3, 5, 7);
      a = i32x4.extend_low_i16x8_s(w);
      b = i32x4.extend_high_i16x8_s(w);
    }
  } else {
    const v0 = v128.load(rows);
    const v1 = v128.load(rows, 16);
    if (K == 1) {
      a = i32x4.shuffle(v0, v1, 0, 2, 4, 6);
    } else {
      // low words: [t0 a, t1 a, t0 b, t1 b] and the same of tokens 2, 3
      const p = i32x4.shuffle(v0, v1, 0, 4, 2, 6);
      const q = i32x4.shuffle(v128.load(rows, 32), v128.load(rows, 48), 0, 4, 2, 6);
      a = i32x4.shuffle(p, q, 0, 1, 4, 5);
      b = i32x4.shuffle(p, q, 2, 3, 6, 7);
    }
  }
  const none = i32x4.splat(-1);
  const vE = i32x4.splat(E);
  const x = v128.bitselect(a, none, i32x4.lt_u(a, vE));
  const y0 = v128.load(yrow);
  if (K == 1) {
    v128.store(IDS, x);
    v128.store(YV, y0);
    return;
  }
  const y = v128.bitselect(b, none, i32x4.lt_u(b, vE));
  const both = v128.and(i32x4.ge_s(x, i32x4.splat(0)), i32x4.ge_s(y, i32x4.splat(0)));
  v128.store(IDS, v128.bitselect(i32x4.min_s(x, y), i32x4.max_s(x, y), both));
  v128.store(IDS, v128.bitselect(i32x4.max_s(x, y), none, both), 16);
  const y1 = v128.load(yrow, 16);
  v128.store(YV, i32x4.shuffle(y0, y1, 0, 2, 4, 6));
  v128.store(YV, i32x4.shuffle(y0, y1, 1, 3, 5, 7), 16);
}

// routeRowList's experts of a routing-map row (bytemap or bitmap_u8) of E
// <= LANES_E experts as a bit set (bit e: expert e chosen), in a few
// instructions rather than a loop over the row's bytes: ctz then walks them
// in ascending order. A bytemap row is read as one vector: the 16 bytes of
// slack past each host region keep the load in bounds.
@inline function mapBits(fmt: i32, E: i32, row: usize): u32 {
  const bits = fmt == ROUTE_BYTEMAP
    ? <u32>i8x16.bitmask(i8x16.ne(v128.load(row), i8x16.splat(0)))
    : (E > 8 ? <u32>load<u16>(row) : <u32>load<u8>(row));
  return bits & ((<u32>1 << <u32>E) - 1);
}

// Row e of each of four rows (row j at g0 + j * rowB; logits dtype, widened
// as loadAs does), e from the lanes of ids; 0 where e < 0.
@inline function gatherAt(g0: usize, rowB: usize, ids: v128, dt: i32): v128 {
  let v = f32x4.splat(0);
  v = f32x4.replace_lane(v, 0, gatherOne(g0, i32x4.extract_lane(ids, 0), dt));
  v = f32x4.replace_lane(v, 1, gatherOne(g0 + rowB, i32x4.extract_lane(ids, 1), dt));
  v = f32x4.replace_lane(v, 2, gatherOne(g0 + 2 * rowB, i32x4.extract_lane(ids, 2), dt));
  return f32x4.replace_lane(v, 3, gatherOne(g0 + 3 * rowB, i32x4.extract_lane(ids, 3), dt));
}

@inline function gatherOne(row: usize, e: i32, dt: i32): f32 {
  return e < 0 ? 0 : loadAs(row, e, dt);
}

// gatherAt's counterpart: lane j of v stored (narrowed as storeAs does)
// at element e of row j, e from the lanes of ids; nothing where e < 0.
@inline function scatterAt(o0: usize, rowB: usize, ids: v128, v: v128, dt: i32): void {
  scatterOne(o0, i32x4.extract_lane(ids, 0), f32x4.extract_lane(v, 0), dt);
  scatterOne(o0 + rowB, i32x4.extract_lane(ids, 1), f32x4.extract_lane(v, 1), dt);
  scatterOne(o0 + 2 * rowB, i32x4.extract_lane(ids, 2), f32x4.extract_lane(v, 2), dt);
  scatterOne(o0 + 3 * rowB, i32x4.extract_lane(ids, 3), f32x4.extract_lane(v, 3), dt);
}

@inline function scatterOne(row: usize, e: i32, x: f32, dt: i32): void {
  if (e >= 0) storeAs(row, e, dt, x);
}

// ---- top-k router backward -------------------------------------------------------

/**
 * Backward of the top-k router (SPEC section 3): gradLogits from gradProbs,
 * the saved intermediate and the routing output of any format.
 */
export function topkBackward(
  grad: usize, dt: i32, T: i32, E: i32, K: i32,
  fn: i32, pre: bool, scale: f32,
  inter: usize, fmt: i32, route: usize, out: usize, scratch: usize,
): void {
  const E4 = roundUp4(E);
  const rowF = <usize>E4 << 2;
  const Gr = scratch; // gradient row
  const Y = Gr + rowF; // saved intermediate row (pad lanes 0)
  const M = Y + rowF; // chosen mask, 1.0 / 0.0
  const A = M + rowF; // activations of sigmoid / sqrtsoftplus
  const inB = <usize>dtBytes(dt);
  const routeB = <usize>routeRowBytes(fmt, E, K);
  const zero = f32x4.splat(0);
  const c = f32x4.splat(scale);

  for (let t = 0; t < T; t++) {
    const tt = <usize>t * <usize>E;
    // load: mask from the routing output, g = gradProbs * c on chosen experts
    readRoute(fmt, E, K, route + <usize>t * routeB, M);
    widenRow(grad + tt * inB, dt, E, Gr);
    memory.copy(Y, inter + (tt << 2), <usize>E << 2);
    for (let i = E; i < E4; i++) store<f32>(Y + (<usize>i << 2), 0);
    for (let i = 0; i < E4; i += 4) {
      const o = <usize>i << 2;
      const m = f32x4.ne(v128.load(M + o), zero);
      v128.store(Gr + o, v128.and(f32x4.mul(v128.load(Gr + o), c), m));
    }

    if (fn == SCORE_SOFTMAX) {
      // softmax backward: g_i = y_i * (g_i - sum_chosen(g * y)); post: chosen only
      let dv = zero;
      for (let i = 0; i < E4; i += 4) {
        const o = <usize>i << 2;
        const m = f32x4.ne(v128.load(M + o), zero);
        dv = f32x4.add(dv, v128.and(f32x4.mul(v128.load(Gr + o), v128.load(Y + o)), m));
      }
      const d = f32x4.splat(hsum(dv));
      for (let i = 0; i < E4; i += 4) {
        const o = <usize>i << 2;
        let g = f32x4.mul(v128.load(Y + o), f32x4.sub(v128.load(Gr + o), d));
        // post: unchosen experts hold -inf in y and get no gradient
        if (!pre) g = v128.and(g, f32x4.ne(v128.load(M + o), zero));
        v128.store(Gr + o, g);
      }
    } else {
      // activations a: sigmoid saved in y; sqrtsoftplus recomputed from the saved logits
      for (let i = 0; i < E4; i += 4) {
        const o = <usize>i << 2;
        const y = v128.load(Y + o);
        v128.store(A + o, fn == SCORE_SIGMOID ? y : vsqrtsoftplus(y));
      }
      if (K > 1) {
        // normalisation backward: g_i = g_i / S - D / S^2, S = sum(a) + eps, D = sum(g * a)
        let sv = zero;
        let dv = zero;
        for (let i = 0; i < E4; i += 4) {
          const o = <usize>i << 2;
          const m = f32x4.ne(v128.load(M + o), zero);
          const a = v128.and(v128.load(A + o), m);
          sv = f32x4.add(sv, a);
          dv = f32x4.add(dv, f32x4.mul(v128.load(Gr + o), a));
        }
        const s = hsum(sv) + EPS;
        const S = f32x4.splat(s);
        const D = f32x4.splat(hsum(dv) / (s * s));
        for (let i = 0; i < E4; i += 4) {
          const o = <usize>i << 2;
          const m = f32x4.ne(v128.load(M + o), zero);
          v128.store(Gr + o, v128.and(f32x4.sub(f32x4.div(v128.load(Gr + o), S), D), m));
        }
      }
      activationBackward(fn, Y, A, Gr, E4);
    }
    narrowRow(Gr, E, dt, out + tt * inB);
  }
}

// Activation backward in place on G[E4]:
//   sigmoid: g *= y * (1 - y) with y the saved sigmoid;
//   sqrtsoftplus: g *= sigmoid(x) / (2 * a + eps), a = sqrtsoftplus(x);
//   above x = 20 softplus is the identity, so its derivative is 1, not sigmoid(x).
function activationBackward(fn: i32, Y: usize, A: usize, Gr: usize, E4: i32): void {
  for (let i = 0; i < E4; i += 4) {
    const o = <usize>i << 2;
    v128.store(Gr + o, f32x4.mul(v128.load(Gr + o), activationDerivative(fn, v128.load(Y + o), v128.load(A + o))));
  }
}

// d activation / dx from the saved y (sigmoid: y = sigmoid(x); sqrtsoftplus:
// y = x) and a = the activation.
@inline function activationDerivative(fn: i32, y: v128, a: v128): v128 {
  if (fn == SCORE_SIGMOID) return f32x4.mul(y, f32x4.sub(ONE(), y));
  const sg = v128.bitselect(ONE(), vsigmoid(y), f32x4.gt(y, SOFTPLUS_LIN()));
  return f32x4.div(sg, f32x4.add(f32x4.mul(TWO(), a), EPS_V()));
}

// ---- aux-loss scores ---------------------------------------------------------------

/**
 * Scores for the aux loss (SPEC section 4): softmax, or the activation
 * normalised over all E experts; top-K routing map; intermediate.
 */
export function auxScoresForward(
  logits: usize, dt: i32, T: i32, E: i32, K: i32, fn: i32, fmt: i32, radixThreshold: i32,
  scores: usize, inter: usize, route: usize, scratch: usize,
): void {
  const E4 = roundUp4(E);
  const rowF = <usize>roundUp16(E) << 2;
  const X = scratch;
  const S = X + rowF;
  const KEY = S + 2 * rowF;
  const HIST = KEY + rowF;
  const CHOSEN = HIST + <usize>max(RADIX_BINS << 2, roundUp16(E));
  const inB = <usize>dtBytes(dt);
  const routeB = <usize>routeRowBytes(fmt, E, K);
  const radix = K >= radixThreshold;
  for (let t = 0; t < T; t++) {
    const tt = <usize>t * <usize>E;
    widenRow(logits + tt * inB, dt, E, X);
    scoreRow(X, E4, fn, S);
    const irow = inter + (tt << 2);
    memory.copy(irow, fn == SCORE_SQRTSOFTPLUS ? X : S, <usize>E << 2);
    if (fn != SCORE_SOFTMAX) {
      // normalise over every expert: a / (sum(a) + eps); pad lanes hold 0
      let sv = f32x4.splat(0);
      for (let i = 0; i < E4; i += 4) sv = f32x4.add(sv, v128.load(S + (<usize>i << 2)));
      const d = f32x4.splat(hsum(sv) + EPS);
      for (let i = 0; i < E4; i += 4) {
        const p = S + (<usize>i << 2);
        v128.store(p, f32x4.div(v128.load(p), d));
      }
    }
    memory.copy(scores + (tt << 2), S, <usize>E << 2);
    keysOf(S, E, KEY);
    selectTopK(KEY, E, K, radix, HIST, CHOSEN, false, S + rowF, CHOSEN + (<usize>(2 * roundUp4(K)) << 2));
    writeRoute(fmt, E, K, CHOSEN, route + <usize>t * routeB);
  }
}

/** Backward of the aux-loss scores: gradLogits (logits dtype) from gradScores (f32). */
export function auxScoresBackward(
  grad: usize, T: i32, E: i32, fn: i32, inter: usize, dt: i32, out: usize, scratch: usize,
): void {
  const E4 = roundUp4(E);
  const rowF = <usize>E4 << 2;
  const Gr = scratch;
  const Y = Gr + rowF;
  const A = Y + rowF;
  const zero = f32x4.splat(0);
  for (let t = 0; t < T; t++) {
    const tt = <usize>t * <usize>E;
    memory.copy(Gr, grad + (tt << 2), <usize>E << 2);
    memory.copy(Y, inter + (tt << 2), <usize>E << 2);
    for (let i = E; i < E4; i++) {
      store<f32>(Gr + (<usize>i << 2), 0);
      store<f32>(Y + (<usize>i << 2), fn == SCORE_SQRTSOFTPLUS ? -Infinity : 0);
    }
    if (fn == SCORE_SOFTMAX) {
      // g_i = y_i * (g_i - sum(g * y))
      let dv = zero;
      for (let i = 0; i < E4; i += 4) {
        const o = <usize>i << 2;
        dv = f32x4.add(dv, f32x4.mul(v128.load(Gr + o), v128.load(Y + o)));
      }
      const d = f32x4.splat(hsum(dv));
      for (let i = 0; i < E4; i += 4) {
        const o = <usize>i << 2;
        v128.store(Gr + o, f32x4.mul(v128.load(Y + o), f32x4.sub(v128.load(Gr + o), d)));
      }
    } else {
      // normalisation over all experts, then the activation
      let sv = zero;
      let dv = zero;
      for (let i = 0; i < E4; i += 4) {
        const o = <usize>i << 2;
        const y = v128.load(Y + o);
        const a = fn == SCORE_SIGMOID ? y : vsqrtsoftplus(y);
        v128.store(A + o, a);
        sv = f32x4.add(sv, a);
        dv = f32x4.add(dv, f32x4.mul(v128.load(Gr + o), a));
      }
      const s = hsum(sv) + EPS;
      const S = f32x4.splat(s);
      const D = f32x4.splat(hsum(dv) / (s * s));
      for (let i = 0; i < E4; i += 4) {
        const o = <usize>i << 2;
        v128.store(Gr + o, f32x4.sub(f32x4.div(v128.load(Gr + o), S), D));
      }
      activationBackward(fn, Y, A, Gr, E4);
    }
    narrowRow(Gr, E, dt, out + tt * <usize>dtBytes(dt));
  }
}

// ---- aux loss -----------------------------------------------------------------------

/**
 * Adds the column sums of probs [rows, cols] into COLSUM[cols] (f32; the
 * host zeroes it once, so chunks of rows add up exactly like one call).
 */
export function auxLossColumns(probs: usize, dt: i32, rows: i32, cols: i32, colsum: usize): void {
  const b = <usize>dtBytes(dt);
  for (let t = 0; t < rows; t++) {
    const row = probs + <usize>t * <usize>cols * b;
    if (dt == DT_F32) {
      let j = 0;
      for (; j + 4 <= cols; j += 4) {
        const o = <usize>j << 2;
        v128.store(colsum + o, f32x4.add(v128.load(colsum + o), v128.load(row + o)));
      }
      for (; j < cols; j++) store<f32>(colsum + (<usize>j << 2), load<f32>(colsum + (<usize>j << 2)) + load<f32>(row + (<usize>j << 2)));
    } else {
      for (let j = 0; j < cols; j++) store<f32>(colsum + (<usize>j << 2), load<f32>(colsum + (<usize>j << 2)) + loadAs(row, j, dt));
    }
  }
}

/** sum_j COLSUM[j] * tpe[j], in column order (tpe: f32 [cols]). */
export function auxLossDot(cols: i32, tpe: usize, colsum: usize): f32 {
  let total: f32 = 0;
  for (let j = 0; j < cols; j++) total += load<f32>(colsum + (<usize>j << 2)) * load<f32>(tpe + (<usize>j << 2));
  return total;
}

/** gradProbs[t, j] = g * tpe[j] (g already holds gradLoss times the constant). */
export function auxLossBackward(g: f32, rows: i32, cols: i32, tpe: usize, dt: i32, out: usize, scratch: usize): void {
  for (let j = 0; j < cols; j++) store<f32>(scratch + (<usize>j << 2), g * load<f32>(tpe + (<usize>j << 2)));
  const b = <usize>dtBytes(dt);
  for (let t = 0; t < rows; t++) narrowRow(scratch, cols, dt, out + <usize>t * <usize>cols * b);
}
