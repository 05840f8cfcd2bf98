/**
 * The forward's shortened vector routines of the WebAssembly kernels give
 * the same bits as the general ones they stand in for (wasm/assembly/
 * router.ts: vexpNeg for vexp on x <= 0 and NaN, vsigmoidFast for vsigmoid),
 * on a stride through every float32 bit pattern and the special values.
 *
 * @module
 */
import assert from "node:assert";
import { assertBitIdentical } from "./_assert.ts";
import { WasmBackend } from "../wasm/backend.ts";

// mathCheck kinds (see mathCheck in wasm/assembly/router.ts)
const EXP = 0, SIGMOID = 2, EXP_NEG = 4, SIGMOID_FAST = 5, SIGMOID_SAFE = 8;

function inputs(filter: (bits: number) => boolean): Float32Array {
  const bits: number[] = [];
  // a stride through all 2^32 patterns (odd, so every exponent and many mantissas come up)
  for (let b = 0; b < 2 ** 32; b += 65521) if (filter(b)) bits.push(b);
  // edges: zeros, infinities, NaNs with payloads, subnormals, the clamp and subnormal-result boundaries
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (const x of [0, -0, Infinity, -Infinity, -104, -103.97, -87.33, -87.34, -88.72, -100, -150, -1e-45, -1, -0.5]) {
    f[0] = x;
    if (filter(u[0] as number)) bits.push(u[0] as number);
  }
  for (const b of [0x7f800001, 0x7fc00000, 0x7fffffff, 0xff800001, 0xffc00000, 0xffffffff, 0x00000001, 0x807fffff]) {
    if (filter(b)) bits.push(b);
  }
  return new Float32Array(new Uint32Array(bits).buffer);
}

Deno.test("the forward's exp of x <= 0 gives the bits of the general exp, NaN included", async () => {
  const b = await WasmBackend.create({ threads: 1 });
  const negative = (bits: number) => bits >= 0x80000000 || bits === 0 || (bits & 0x7fffffff) > 0x7f800000;
  const xs = inputs(negative);
  assert.ok(xs.length > 30000, `${xs.length} inputs`);
  assertBitIdentical(b.mathCheck(EXP_NEG, xs), b.mathCheck(EXP, xs), "exp of x <= 0");
  b.dispose();
});

Deno.test("the forward's sigmoid gives the bits of the general sigmoid for every kind of input", async () => {
  const b = await WasmBackend.create({ threads: 1 });
  const xs = inputs(() => true);
  assertBitIdentical(b.mathCheck(SIGMOID_FAST, xs), b.mathCheck(SIGMOID, xs), "sigmoid");
  b.dispose();
});

// The grouped sigmoid pass takes sigmoidSafe (no clamps, n by nearest, the lane select as a multiply) for
// tokens whose logits all have |x| <= 86, and the general pass for the others: the two must agree there, bit
// for bit. On the stride and every float32 of [-1, 1] in steps of 2^-16 plus the edges; all 2.2e9 such floats
// with MOE_EXHAUSTIVE=1 (about 45 s).
Deno.test("the forward's short sigmoid gives the bits of its sigmoid wherever |x| <= 86", async () => {
  const b = await WasmBackend.create({ threads: 1 });
  const safe = (bits: number) => {
    const f = new Float32Array(new Uint32Array([bits]).buffer)[0] as number;
    return Math.abs(f) <= 86;
  };
  const check = (xs: Float32Array, label: string) =>
    assertBitIdentical(b.mathCheck(SIGMOID_SAFE, xs), b.mathCheck(SIGMOID_FAST, xs), label);
  if (Deno.env.get("MOE_EXHAUSTIVE") === "1") {
    const limit = 0x42ac0000; // 86.0
    const chunk = new Uint32Array(1 << 22);
    for (const sign of [0, 0x80000000]) {
      for (let start = 0; start <= limit; start += chunk.length) {
        const n = Math.min(chunk.length, limit + 1 - start);
        for (let i = 0; i < n; i++) chunk[i] = (sign | (start + i)) >>> 0;
        check(new Float32Array(chunk.buffer, 0, n), `sigmoidSafe from bits ${sign | start}`);
      }
    }
  } else {
    const xs = inputs(safe);
    assert.ok(xs.length > 30000, `${xs.length} inputs`);
    check(xs, "sigmoidSafe on the stride");
    const edges = [86, -86, 85.99999, -85.99999, 0, -0, 1e-45, -1e-45, 2 ** -126, -(2 ** -126), 0.5, -0.5, 16.635532];
    check(Float32Array.from(edges), "sigmoidSafe on the edges");
    check(Float32Array.from({ length: (1 << 17) + 1 }, (_, i) => -1 + i / 65536), "sigmoidSafe on [-1, 1]");
  }
  b.dispose();
});

// The selection keyed by the logits (selectSigmoidByLogits in wasm/assembly/router.ts) relies on
// |s^(x) - sigmoid(x)| <= 2^-21 for the forward's sigmoid s^; this checks half of that, against float64,
// on the stride and a dense sweep of [-32, 32] (every 2^-12, plus a stride through its bit patterns), or on
// all 2^32 bit patterns with MOE_EXHAUSTIVE=1 (about 10 minutes).
Deno.test("the forward's sigmoid is within 2^-22 of the exact sigmoid", async () => {
  const b = await WasmBackend.create({ threads: 1 });
  const bound = 2 ** -22;
  let worst = 0;
  let worstX = 0;
  const check = (xs: Float32Array) => {
    const s = b.mathCheck(SIGMOID_FAST, xs);
    for (let i = 0; i < xs.length; i++) {
      const x = xs[i] as number;
      if (Number.isNaN(x)) continue;
      const err = Math.abs((s[i] as number) - 1 / (1 + Math.exp(-x)));
      if (!(err <= worst)) [worst, worstX] = [err, x];
    }
  };
  if (Deno.env.get("MOE_EXHAUSTIVE") === "1") {
    const chunk = new Uint32Array(1 << 22);
    for (let start = 0; start < 2 ** 32; start += chunk.length) {
      for (let i = 0; i < chunk.length; i++) chunk[i] = start + i;
      check(new Float32Array(chunk.buffer));
    }
  } else {
    check(inputs(() => true));
    check(Float32Array.from({ length: 64 * 4096 + 1 }, (_, i) => -32 + i / 4096));
    const f = new Float32Array(1);
    const u = new Uint32Array(f.buffer);
    const dense: number[] = [];
    for (let bits = 0; bits < 2 ** 32; bits += 4099) {
      u[0] = bits;
      if (Math.abs(f[0] as number) <= 32) dense.push(f[0] as number);
    }
    check(Float32Array.from(dense));
  }
  assert.ok(worst <= bound, `|s^ - sigmoid| = ${worst} at x = ${worstX}, above 2^-22`);
  b.dispose();
});
