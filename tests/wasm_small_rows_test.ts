/**
 * Small rows in the WebAssembly kernels give the bits of the paths they
 * stand in for. The four-token top-k forward (wasm/assembly/router.ts,
 * forwardLanes: E <= 16, four tokens per vector), and the dense rows that
 * small rows cross the module's boundary as (probs, gradProbs, gradLogits),
 * against the row kernel and the host's gathers and scatters, on every
 * output: probs, the intermediate, the routing output of every format, the
 * saved state, and the gradients. Both run in one process: `lanes: false`
 * keeps a backend on the former path. Configurations are drawn at random
 * over E in [1, 16], K in [1, E], odd token counts, every score function,
 * bias, group limits, scaling, dtype, layout and caller buffers, with data
 * made to hit ties, signed zeros, extremes and non-finite logits (whose
 * groups of four go to the row kernel). And the backward's list of chosen
 * experts, ordered without a sort for one or two ids; and the small-row
 * backward kernel against the host's gather and scatter on saved states
 * drawn at random bit for bit (NaN payloads, ids out of range, short rows).
 *
 * @module
 */
import assert from "node:assert";
import type { FloatDType, FloatTensor, IndexDType, RoutingMapFormat, TopkOptions } from "../mod.ts";
import { planTopk } from "../_validate.ts";
import type { TopkPlan } from "../_validate.ts";
import { instantiateKernels, WasmBackend } from "../wasm/backend.ts";
import { assertBitIdentical, intermediateOf } from "./_assert.ts";
import { mulberry32, normal, normals } from "./_generators.ts";
import type { Rng } from "./_generators.ts";
import { narrowTo, widen } from "./reference.ts";

// mathCheck kinds (see mathCheck in wasm/assembly/router.ts)
const EXP_LUT = 6, EXP_SCALAR = 7;

Deno.test("the four-token kernel's exp gives the bits of NativeMathf.exp for x <= 0 and -inf", async () => {
  const b = await WasmBackend.create({ threads: 1 });
  const bits: number[] = [];
  // a stride through every pattern of x <= 0 (sign bit set, NaN excluded), and +0
  for (let u = 0x80000000; u <= 0xff800000; u += 4093) bits.push(u);
  bits.push(0, 0x80000000, 0xff800000, 0x80000001, 0x807fffff, 0x80800000);
  // around the underflow bound log(2^-150) = 0xc2cff1b4, the overflow-branch bound 88, and the subnormal range
  for (const c of [0xc2cff1b4, 0xc2b00000, 0xc2aeac50, 0xc2b17218, 0xc2ce8ed0]) {
    for (let d = -300; d <= 300; d++) bits.push(c + d);
  }
  const xs = new Float32Array(new Uint32Array(bits).buffer);
  assert.ok(xs.length > 500000, `${xs.length} inputs`);
  assertBitIdentical(b.mathCheck(EXP_LUT, xs), b.mathCheck(EXP_SCALAR, xs), "exp of x <= 0");
  b.dispose();
});

const SCORES = ["softmax-pre", "softmax-post", "sigmoid", "sqrtsoftplus"] as const;
type Score = typeof SCORES[number];
const DTYPES: FloatDType[] = ["float32", "float16", "bfloat16"];
const OUTPUTS: Array<RoutingMapFormat | IndexDType> = ["bytemap", "bitmap_u8", "int16", "int32", "int64"];
// logits that are not finite, NaNs with payloads and signs included (float32 bits)
const SPECIAL_BITS = [0x7fc00000, 0xffc00000, 0x7fc00001, 0x7f800001, 0x7f800000, 0xff800000];
const BITS = new Uint32Array(1);
const FLOAT = new Float32Array(BITS.buffer);

function special(rng: Rng): number {
  BITS[0] = SPECIAL_BITS[Math.floor(rng() * SPECIAL_BITS.length)]!;
  return FLOAT[0]!;
}

function pick<T>(rng: Rng, xs: readonly T[]): T {
  return xs[Math.floor(rng() * xs.length)]!;
}

/** Data kinds: each stresses another part of the kernel. */
const KINDS = ["normal", "ties", "zeros", "extremes", "non-finite", "equal rows"] as const;
type Kind = typeof KINDS[number];

function logitsOf(rng: Rng, kind: Kind, n: number, E: number): Float32Array {
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    switch (kind) {
      case "normal":
        x[i] = 3 * normal(rng);
        break;
      case "ties": // few distinct values: many equal scores at every selection boundary
        x[i] = Math.floor(rng() * 4) - 2;
        break;
      case "zeros":
        x[i] = pick(rng, [0, -0, 0, -0, 1, -1, 1e-45, -1e-45]);
        break;
      case "extremes": // overflowing differences, saturated sigmoids, subnormals, the softplus switch at 20
        x[i] = pick(rng, [3e38, -3e38, 1e30, -1e30, 100, -100, 89, -104, 20, -20, 1e-40, -1e-40, 0.5]);
        break;
      case "non-finite": // some tokens hold one, and their group of four goes to the row kernel
        x[i] = rng() < 0.03 ? special(rng) : 3 * normal(rng);
        break;
      case "equal rows":
        x[i] = i % E === 0 ? 0.25 : x[i - 1]!;
        break;
    }
  }
  return x;
}

interface Drawn {
  label: string;
  logits: FloatTensor;
  options: TopkOptions;
  /** Pass probs and intermediate buffers holding garbage (written over, not scattered into). */
  buffers?: boolean;
}

/** The options of one call: with fresh caller buffers when the draw asks for them. */
function callOptions(d: Drawn): TopkOptions {
  if (!d.buffers) return d.options;
  const n = d.logits.data.length;
  return {
    ...d.options,
    probsOut: narrowTo(new Float32Array(n).fill(NaN), d.logits.dtype) as FloatTensor["data"],
    intermediateOut: new Float32Array(n).fill(7),
  };
}

function draw(rng: Rng): Drawn {
  const E = 1 + Math.floor(rng() * 16);
  const K = 1 + Math.floor(rng() * E);
  const T = 1 + Math.floor(rng() * 42);
  const score: Score = pick(rng, SCORES);
  const dtype = pick(rng, DTYPES);
  const out = pick(rng, OUTPUTS);
  const kind = pick(rng, KINDS);
  const options: TopkOptions = {
    topk: K,
    scoreFunction: score.startsWith("softmax") ? "softmax" : score as "sigmoid" | "sqrtsoftplus",
  };
  if (score === "softmax-pre") options.usePreSoftmax = true;
  if (rng() < 0.5) options.scalingFactor = pick(rng, [2.5, 0.1, 1.2]);
  let bias = "";
  if (!score.startsWith("softmax") && rng() < 0.6) {
    const b = normals(rng, E, 0.5);
    if (rng() < 0.15) b[Math.floor(rng() * E)] = special(rng); // the whole call takes the row kernel
    options.expertBias = { data: b, shape: [E], dtype: "float32" };
    bias = " bias";
  }
  let groups = "";
  const G = pick(rng, [2, 4]);
  if (E % G === 0 && rng() < 0.15) {
    // group limits stay on the row kernel, with dense probs rows
    const GK = pick(rng, [1, 2].filter((gk) => gk <= G && K % gk === 0 && K / gk <= E / G));
    if (GK !== undefined) {
      options.numGroups = G;
      options.groupTopk = GK;
      groups = ` ${G} groups top-${GK}`;
    }
  }
  if (out === "bytemap" || out === "bitmap_u8") options.routingMapFormat = out;
  else options.indexDtype = out;
  if (rng() < 0.3) options.radixTopkThreshold = pick(rng, [1, K]);
  const x = logitsOf(rng, kind, T * E, E);
  const data = narrowTo(x, dtype);
  const shape = rng() < 0.2 && T % 2 === 0 ? [2, T / 2, E] : [T, E];
  const buffers = rng() < 0.2;
  return {
    label: `T=${T} E=${E} K=${K} ${score}${bias}${groups} ${dtype} ${out} ${kind}${buffers ? " caller buffers" : ""}`,
    logits: { data, shape, dtype } as FloatTensor,
    options,
    buffers,
  };
}

/** Tokens the four-token kernel should take: groups of four whose logits are all finite (none with a bad bias). */
function laneTokensOf(plan: TopkPlan, logits: FloatTensor): number {
  if (plan.E > 16 || plan.groupTopk > 0 || (plan.bias && plan.bias.some((b) => !Number.isFinite(b)))) return 0;
  const x = widen(logits);
  let n = 0;
  for (let t = 0; t + 4 <= plan.T; t += 4) {
    if (x.subarray(t * plan.E, (t + 4) * plan.E).every(Number.isFinite)) n += 4;
  }
  return n;
}

/** Forward and backward on both backends; every output and the gradients compared bit for bit. */
async function assertSameBits(lanes: WasmBackend, rows: WasmBackend, d: Drawn, rng: Rng): Promise<void> {
  const plan = planTopk(d.logits, callOptions(d));
  const a = await lanes.topkForward(plan, d.logits);
  const b = await rows.topkForward(planTopk(d.logits, callOptions(d)), d.logits);
  assertBitIdentical(a.probs, b.probs, `${d.label}: probs`);
  assertBitIdentical(intermediateOf(a.intermediate), intermediateOf(b.intermediate), `${d.label}: intermediate`);
  assertBitIdentical(a.route, b.route, `${d.label}: routing output`);
  const pa = a.payload as { route: ArrayBufferView; yasc: Float32Array; full: Float32Array | null };
  const pb = b.payload as typeof pa;
  assertBitIdentical(pa.route, pb.route, `${d.label}: saved routing output`);
  assertBitIdentical(pa.yasc, pb.yasc, `${d.label}: saved intermediate at the chosen experts`);
  assert.strictEqual(pa.full === null, pb.full === null, `${d.label}: saved full intermediate`);
  if (pa.full && pb.full) assertBitIdentical(pa.full, pb.full, `${d.label}: saved full intermediate`);
  const g = narrowTo(normals(rng, plan.T * plan.E), plan.dtype);
  const grad = { data: g, shape: d.logits.shape, dtype: plan.dtype } as FloatTensor;
  const ga = await lanes.topkBackward(plan, a.payload, grad);
  const gb = await rows.topkBackward(plan, b.payload, grad);
  assertBitIdentical(ga, gb, `${d.label}: gradient`);
}

Deno.test("small rows four tokens at a time give the row kernel's bits: probs, intermediate, routing, saved state, gradients", async () => {
  const lanes = await WasmBackend.create({ threads: 1 });
  const rows = await WasmBackend.create({ threads: 1, lanes: false });
  const rng = mulberry32(20251128);
  let expected = 0;
  const RUNS = 2000;
  try {
    for (let i = 0; i < RUNS; i++) {
      const d = draw(rng);
      const before = lanes.laneTokens;
      await assertSameBits(lanes, rows, d, rng);
      const want = laneTokensOf(planTopk(d.logits, d.options), d.logits);
      assert.strictEqual(lanes.laneTokens - before, want, `${d.label}: tokens taken four at a time`);
      expected += want;
    }
    assert.strictEqual(rows.laneTokens, 0, "lanes: false runs the row kernel only");
    // most configurations reach the four-token kernel
    assert.ok(expected > RUNS * 10, `${expected} tokens four at a time`);
  } finally {
    lanes.dispose();
    rows.dispose();
  }
});

Deno.test("the four-token kernel gives the row kernel's bits on worker threads and across chunks", async () => {
  const threaded = await WasmBackend.create({ threads: 2 });
  const chunked = await WasmBackend.create({ threads: 1, chunkBytes: 1 << 12 });
  const rows = await WasmBackend.create({ threads: 1, lanes: false });
  const rng = mulberry32(7);
  try {
    // Mixtral's shape and more, big enough to be split across threads (T * E >= 2^18)
    for (
      const [E, K, options] of [
        [8, 2, { scoreFunction: "softmax" }],
        [16, 4, { scoreFunction: "softmax", usePreSoftmax: true }],
        [6, 3, { scoreFunction: "sigmoid", scalingFactor: 2.5 }],
      ] as const
    ) {
      const T = Math.ceil((1 << 18) / E) + 3;
      const x = normals(rng, T * E, 2);
      for (let i = 0; i < 50; i++) x[Math.floor(rng() * x.length)] = special(rng);
      const d: Drawn = {
        label: `T=${T} E=${E} K=${K} ${JSON.stringify(options)}`,
        logits: { data: x, shape: [T, E], dtype: "float32" },
        options: { topk: K, indexDtype: "int32", ...options },
      };
      await assertSameBits(threaded, rows, d, rng);
      await assertSameBits(chunked, rows, d, rng);
    }
    assert.ok(chunked.laneTokens > 0);
  } finally {
    threaded.dispose();
    chunked.dispose();
    rows.dispose();
  }
});

Deno.test("the backward's list of chosen experts orders one or two dense ids like the sort it replaces", async () => {
  // routeList (wasm/assembly/router.ts): ids outside [0, E) dropped, the rest ascending, -1 after them
  const k = await instantiateKernels() as unknown as {
    memory: WebAssembly.Memory;
    heapBase(): number;
    routeList(fmt: number, T: number, E: number, K: number, route: number, list: number, scratch: number): void;
  };
  const E = 8;
  const ids = [-5, -1, 0, 1, 3, 7, 8, 100, 2 ** 31 - 1];
  let rows = 0;
  for (const [fmt, bytes] of [[2, 2], [3, 4], [4, 8]] as const) {
    for (const K of [1, 2, 3]) {
      const combos: number[][] = [[]];
      for (let j = 0; j < K; j++) combos.splice(0, combos.length, ...combos.flatMap((c) => ids.map((x) => [...c, x])));
      const T = combos.length;
      const scratch = Math.ceil(k.heapBase() / 16) * 16;
      const route = scratch + 4096;
      const list = route + T * K * 8 + 64;
      const need = list + T * K * 4 + 64 - k.memory.buffer.byteLength;
      if (need > 0) k.memory.grow(Math.ceil(need / 65536));
      const view = new DataView(k.memory.buffer);
      combos.forEach((c, t) =>
        c.forEach((x, j) => {
          const at = route + (t * K + j) * bytes;
          if (bytes === 2) view.setInt16(at, x, true);
          else if (bytes === 4) view.setInt32(at, x, true);
          else view.setBigInt64(at, BigInt(x), true);
        })
      );
      k.routeList(fmt, T, E, K, route, list, scratch);
      const got = new Int32Array(k.memory.buffer, list, T * K);
      combos.forEach((c, t) => {
        const stored = c.map((x) => bytes === 2 ? (x << 16) >> 16 : x | 0);
        const want = stored.filter((x) => x >= 0 && x < E).sort((a, b) => a - b);
        while (want.length < K) want.push(-1);
        assert.deepStrictEqual([...got.subarray(t * K, (t + 1) * K)], want, `ids ${c} (format ${fmt})`);
        rows++;
      });
    }
  }
  assert.ok(rows > 2000);
});

// ---- the small-row backward kernel (topkBackwardLanes) --------------------------------

/** Random bits of a float: mostly ordinary values, else zeros, subnormals, infinities and NaNs with payloads. */
function floatBits(rng: Rng): number {
  const r = rng();
  if (r < 0.7) {
    FLOAT[0] = 3 * normal(rng);
    return BITS[0]!;
  }
  if (r < 0.8) return pick(rng, [0, 0x80000000, 0x3f800000, 0x00000001, 0x807fffff, 0x00800000]);
  if (r < 0.9) return pick(rng, [0x7f800000, 0xff800000, 0x7f7fffff, 0xff7fffff]);
  return pick(rng, [...SPECIAL_BITS, 0x7fa00000, 0xffffffff, 0x7f800abc]) as number;
}

/** gradProbs of a dtype as raw random bits (float16 and bfloat16 from the bits' high and low halves). */
function gradBits(rng: Rng, dtype: FloatDType, n: number): FloatTensor["data"] {
  if (dtype === "float32") return new Float32Array(Uint32Array.from({ length: n }, () => floatBits(rng)).buffer);
  const half = Uint16Array.from({ length: n }, () => {
    const b = floatBits(rng);
    return rng() < 0.5 ? b >>> 16 : b & 0xffff;
  });
  return dtype === "float16" ? new Float16Array(half.buffer) : half;
}

/** A saved routing output of every format: T rows of the chosen ids (any count, any values for dense ids). */
function routeOf(out: RoutingMapFormat | IndexDType, rows: number[][], E: number, K: number): ArrayBufferView {
  const T = rows.length;
  if (out === "bytemap" || out === "bitmap_u8") {
    const w = out === "bytemap" ? E : Math.ceil(E / 8);
    const m = new Uint8Array(T * w);
    rows.forEach((ids, t) =>
      ids.forEach((e) => {
        if (out === "bytemap") m[t * w + e] = 1;
        else m[t * w + (e >> 3)]! |= 1 << (e & 7);
      })
    );
    return m;
  }
  const flat = rows.flatMap((ids) => ids.slice(0, K));
  if (out === "int16") return Int16Array.from(flat);
  if (out === "int32") return Int32Array.from(flat);
  return BigInt64Array.from(flat, (v) => BigInt(v));
}

Deno.test("the small-row backward kernel gives the bits of the host's gather and scatter: every format, dtype, score function, odd T, NaN payloads", async () => {
  const lanes = await WasmBackend.create({ threads: 1 });
  const rows = await WasmBackend.create({ threads: 1, lanes: false });
  const rng = mulberry32(20251129);
  const RUNS = 4000;
  let tokens = 0;
  try {
    for (let i = 0; i < RUNS; i++) {
      const E = 1 + Math.floor(rng() * 16);
      const K = 1 + Math.floor(rng() * E);
      const T = 1 + Math.floor(rng() * 42);
      const score = pick(rng, ["softmax", "sigmoid", "sqrtsoftplus"] as const);
      const dtype = pick(rng, DTYPES);
      const out = pick(rng, OUTPUTS);
      const options: TopkOptions = { topk: K, scoreFunction: score };
      if (out === "bytemap" || out === "bitmap_u8") options.routingMapFormat = out;
      else options.indexDtype = out;
      if (rng() < 0.5) options.scalingFactor = pick(rng, [2.5, 0.1, 1.2, -3]);
      const grad = { data: gradBits(rng, dtype, T * E), shape: [T, E], dtype } as FloatTensor;
      const plan = planTopk(grad, options);
      // chosen ids: usually K distinct experts in any order; at times fewer (rows padded with -1), and for
      // dense ids some outside [0, E) or repeated
      const odd = rng() < 0.2;
      const chosen = Array.from({ length: T }, () => {
        const ids = Array.from({ length: E }, (_, e) => e).sort(() => rng() - 0.5).slice(0, K);
        if (!odd) return ids;
        if (out === "bytemap" || out === "bitmap_u8") return ids.slice(0, Math.floor(rng() * (K + 1)));
        return ids.map((e) => rng() < 0.3 ? pick(rng, [-1, -32768, E, E + 7, 1 << 20, ids[0]!]) : e);
      });
      const route = routeOf(out, chosen, E, K);
      if (odd && out === "bytemap") {
        // any nonzero byte marks a chosen expert
        const m = route as Uint8Array;
        m.forEach((v, i) => v && (m[i] = pick(rng, [1, 2, 0x80, 0xff])));
      }
      if (odd && out === "bitmap_u8" && E % 8) {
        // the padding bits past expert E - 1 are ignored
        const m = route as Uint8Array;
        const w = Math.ceil(E / 8);
        for (let t = 0; t < T; t++) m[t * w + w - 1]! |= 0xff << (E % 8);
      }
      const payload = {
        route,
        yasc: new Float32Array(Uint32Array.from({ length: T * K }, () => floatBits(rng)).buffer),
        full: null,
      };
      const label = `T=${T} E=${E} K=${K} ${score} ${dtype} ${out}${odd ? " odd ids" : ""} scale ${plan.scale}`;
      const a = await lanes.topkBackward(plan, payload, grad);
      const b = await rows.topkBackward(plan, payload, grad);
      assertBitIdentical(a, b, `${label}: gradient`);
      // a caller buffer holding garbage is written over, every element
      const buf = narrowTo(new Float32Array(T * E).fill(NaN), dtype) as FloatTensor["data"];
      assertBitIdentical(await lanes.topkBackward(plan, payload, grad, buf), b, `${label}: gradient into a buffer`);
      tokens += T;
    }
    assert.ok(tokens > RUNS * 15, `${tokens} tokens`);
  } finally {
    lanes.dispose();
    rows.dispose();
  }
});

Deno.test("the small-row backward kernel gives the same gradient whatever the routing format", async () => {
  const b = await WasmBackend.create({ threads: 1 });
  const rng = mulberry32(11);
  try {
    for (let i = 0; i < 500; i++) {
      const E = 1 + Math.floor(rng() * 16);
      const K = 1 + Math.floor(rng() * E);
      const T = 1 + Math.floor(rng() * 23);
      const dtype = pick(rng, DTYPES);
      const score = pick(rng, ["softmax", "sigmoid", "sqrtsoftplus"] as const);
      const grad = { data: gradBits(rng, dtype, T * E), shape: [T, E], dtype } as FloatTensor;
      const chosen = Array.from(
        { length: T },
        () => Array.from({ length: E }, (_, e) => e).sort(() => rng() - 0.5).slice(0, K),
      );
      const yasc = new Float32Array(Uint32Array.from({ length: T * K }, () => floatBits(rng)).buffer);
      let first: FloatTensor["data"] | null = null;
      for (const out of OUTPUTS) {
        const options: TopkOptions = { topk: K, scoreFunction: score };
        if (out === "bytemap" || out === "bitmap_u8") options.routingMapFormat = out;
        else options.indexDtype = out;
        const g = await b.topkBackward(
          planTopk(grad, options),
          { route: routeOf(out, chosen, E, K), yasc, full: null },
          grad,
        );
        if (first === null) first = g;
        else assertBitIdentical(g, first, `T=${T} E=${E} K=${K} ${score} ${dtype}: ${out} against bytemap`);
      }
    }
  } finally {
    b.dispose();
  }
});
