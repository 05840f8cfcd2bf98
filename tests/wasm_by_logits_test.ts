/**
 * The WebAssembly forward's sigmoid selection keyed by the logits (wasm/
 * assembly/router.ts, selectSigmoidByLogits: sigmoid without groups, K <= 32,
 * no `intermediateOut`) gives the bits of the full pass, which a call with
 * `intermediateOut` takes: probs, the routing output of every format, the
 * intermediate (read on demand from the saved logits), and the gradients.
 * Configurations are drawn at random (E in [17, 300], K in [1, 32], naive
 * and radix selection, every dtype, bias narrow, wide or none, scaling, one
 * and two threads, small
 * chunks), with data made to sit on the argument's margins: near-equal
 * logits under a bias of the same scale, ties, signed zeros, subnormals,
 * huge and infinite logits, and NaN (whose token takes the full pass).
 *
 * @module
 */
import assert from "node:assert";
import { createRouter } from "../mod.ts";
import type { FloatDType, FloatTensor, IndexDType, Router, RoutingMapFormat, TopkOptions } from "../mod.ts";
import { assertBitIdentical, intermediateOf } from "./_assert.ts";
import { mulberry32, normal } from "./_generators.ts";
import type { Rng } from "./_generators.ts";
import { narrowTo, sigmoid } from "./reference.ts";

const DTYPES: FloatDType[] = ["float32", "float16", "bfloat16"];
const OUTPUTS: Array<RoutingMapFormat | IndexDType> = ["bytemap", "bitmap_u8", "int16", "int32", "int64"];

type DataKind = "normal" | "near" | "levels" | "extreme";

const biasTensor = (b: Float32Array): FloatTensor => ({ data: b, shape: [b.length], dtype: "float32" });

function logitOf(kind: DataKind, rng: Rng, base: number): number {
  const u = rng();
  switch (kind) {
    case "normal":
      return normal(rng) * 2;
    case "near":
      // a few ulps around one value: sigmoids that differ by less than the bias does
      return base + Math.floor(u * 16) * 1e-6 * (1 + Math.abs(base));
    case "levels":
      return [-1, 0, 0.5, 2, -0][Math.floor(u * 5)]!;
    case "extreme": {
      const pick = Math.floor(u * 8);
      if (pick === 0) return Infinity;
      if (pick === 1) return -Infinity;
      if (pick === 2) return 1e30 * (rng() - 0.5);
      if (pick === 3) return 1e-42 * (rng() - 0.5);
      if (pick === 4) return -90 - rng() * 20; // sigmoid subnormal
      return normal(rng) * 4;
    }
  }
}

interface Config {
  T: number;
  E: number;
  K: number;
  dtype: FloatDType;
  output: RoutingMapFormat | IndexDType;
  kind: DataKind;
  bias: "none" | "narrow" | "matched" | "wide";
  scale: number | undefined;
  nan: boolean;
  radixTopkThreshold: number;
}

function configOf(rng: Rng): Config {
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(rng() * xs.length)]!;
  const E = 17 + Math.floor(rng() * 284);
  return {
    T: 1 + Math.floor(rng() * 40),
    E,
    K: 1 + Math.floor(rng() * (rng() < 0.5 ? 8 : Math.min(32, E))),
    dtype: pick(DTYPES),
    output: pick(OUTPUTS),
    kind: pick(["normal", "near", "levels", "extreme"] as const),
    bias: pick(["none", "narrow", "matched", "wide"] as const),
    scale: rng() < 0.5 ? undefined : 2.5,
    nan: rng() < 0.15,
    radixTopkThreshold: pick([1, 8, 16, 64]),
  };
}

function inputsOf(c: Config, rng: Rng): { logits: FloatTensor; options: TopkOptions } {
  const { T, E, K } = c;
  const base = normal(rng) * 2;
  const x = new Float32Array(T * E);
  for (let i = 0; i < x.length; i++) x[i] = logitOf(c.kind, rng, base);
  if (c.nan) x[Math.floor(rng() * x.length)] = NaN;
  const options: TopkOptions = { topk: K, scoreFunction: "sigmoid", radixTopkThreshold: c.radixTopkThreshold };
  if (c.scale !== undefined) options.scalingFactor = c.scale;
  if (c.bias !== "none") {
    const b = new Float32Array(E);
    for (let e = 0; e < E; e++) {
      if (c.bias === "narrow") b[e] = normal(rng) * 0.01;
      // a bias that undoes the spread of near-equal sigmoids: selection scores within a few ulps
      else if (c.bias === "matched") b[e] = -sigmoid(x[e]!) + Math.floor(rng() * 4) * 6e-8;
      else b[e] = normal(rng); // too wide for the shortcut: every call takes the full pass
    }
    options.expertBias = biasTensor(b);
  }
  if (c.output === "bytemap" || c.output === "bitmap_u8") options.routingMapFormat = c.output;
  else options.indexDtype = c.output;
  const data = c.dtype === "float32" ? x : narrowTo(x, c.dtype);
  return { logits: { data, shape: [T, E], dtype: c.dtype } as FloatTensor, options };
}

// Runs one configuration with and without intermediateOut and compares every output bit for bit.
async function compare(router: Router, c: Config, rng: Rng, label: string): Promise<void> {
  const { logits, options } = inputsOf(c, rng);
  const keyed = await router.fusedTopkWithScoreFunction(logits, options);
  const full = await router.fusedTopkWithScoreFunction(logits, {
    ...options,
    intermediateOut: new Float32Array(c.T * c.E),
  });
  assertBitIdentical(keyed.probs.data, full.probs.data, `${label}: probs`);
  const route = (r: typeof keyed) => (r.indices ?? r.routingMap)!.data;
  assertBitIdentical(route(keyed), route(full), `${label}: routing output`);
  assertBitIdentical(intermediateOf(keyed.intermediate.data), full.intermediate.data, `${label}: intermediate`);
  const grad = { data: new Float32Array(c.T * c.E).map(() => normal(rng)), shape: [c.T, c.E], dtype: "float32" };
  const g = c.dtype === "float32" ? grad : { ...grad, data: narrowTo(grad.data, c.dtype), dtype: c.dtype };
  const ga = await router.fusedTopkWithScoreFunctionBackward(keyed.saved, g as FloatTensor);
  const gb = await router.fusedTopkWithScoreFunctionBackward(full.saved, g as FloatTensor);
  assertBitIdentical(ga.data, gb.data, `${label}: gradLogits`);
  keyed.saved.release();
  full.saved.release();
}

Deno.test("sigmoid keyed by the logits gives the bits of the full pass", async (t) => {
  const routers: Array<[string, Router]> = [
    ["1 thread", await createRouter({ backend: "wasm", threads: 1 })],
    ["2 threads, small chunks", await createRouter({ backend: "wasm", threads: 2, chunkBytes: 1 << 14 })],
  ];
  const rng = mulberry32(20261128);
  let keyedCalls = 0;
  for (const [name, router] of routers) {
    await t.step(name, async () => {
      for (let i = 0; i < 300; i++) {
        const c = configOf(rng);
        await compare(router, c, rng, `${name} case ${i} ${JSON.stringify(c)}`);
        if (c.bias !== "wide") keyedCalls++;
      }
    });
  }
  assert.ok(keyedCalls > 300, `${keyedCalls} calls could take the shortcut`);
  for (const [, r] of routers) r.dispose();
});

Deno.test("sigmoid keyed by the logits is taken where it applies, and only there", async () => {
  const { WasmBackend } = await import("../wasm/backend.ts");
  const { planTopk } = await import("../_validate.ts");
  const b = await WasmBackend.create({ threads: 1 });
  const rng = mulberry32(7);
  const x = new Float32Array(64 * 256).map(() => normal(rng));
  const logits: FloatTensor = { data: x, shape: [64, 256], dtype: "float32" };
  const keyed = (options: TopkOptions) => {
    const before = b.logitsKeyedCalls;
    return b.topkForward(planTopk(logits, options), logits).then(() => b.logitsKeyedCalls - before);
  };
  const narrow = biasTensor(new Float32Array(256).map(() => normal(rng) * 0.01));
  assert.strictEqual(await keyed({ topk: 8, scoreFunction: "sigmoid", expertBias: narrow }), 1, "DSv3 without groups");
  assert.strictEqual(await keyed({ topk: 4, scoreFunction: "sigmoid" }), 1, "no bias");
  assert.strictEqual(
    await keyed({ topk: 8, scoreFunction: "sigmoid", numGroups: 8, groupTopk: 4, expertBias: narrow }),
    0,
    "groups take the full pass",
  );
  assert.strictEqual(await keyed({ topk: 32, scoreFunction: "sigmoid" }), 1, "K = 32 (radix)");
  assert.strictEqual(await keyed({ topk: 12, scoreFunction: "sigmoid", radixTopkThreshold: 64 }), 1, "K = 12 (naive)");
  assert.strictEqual(await keyed({ topk: 33, scoreFunction: "sigmoid" }), 0, "K > 32");
  assert.strictEqual(await keyed({ topk: 8, scoreFunction: "sqrtsoftplus" }), 0, "sqrtsoftplus");
  const wide = biasTensor(new Float32Array(256).map(() => normal(rng)));
  assert.strictEqual(await keyed({ topk: 8, scoreFunction: "sigmoid", expertBias: wide }), 0, "a wide bias");
  assert.strictEqual(
    await keyed({ topk: 8, scoreFunction: "sigmoid", intermediateOut: new Float32Array(64 * 256) }),
    0,
    "intermediateOut",
  );
  b.dispose();
});

Deno.test("small calls before and after a call that starts the workers give the one-thread bits", async () => {
  // worker instances start with the first big call and write the module's data segments into the shared memory
  // again: anything the kernels keep in static memory must survive that (a table of logits filled on first use did
  // not: after a big grouped call, which starts the workers but never fills it, a small call read zeros)
  const one = await createRouter({ backend: "wasm", threads: 1 });
  const two = await createRouter({ backend: "wasm", threads: 2 });
  const rng = mulberry32(99);
  const E = 255; // pad lanes past E: what a zeroed threshold would have let in
  const bias = biasTensor(new Float32Array(E).map(() => normal(rng) * 0.01));
  // 1000 x 255 stays on the calling thread (below MIN_PARALLEL_ELEMENTS); 4096 x 255 starts the workers
  const calls: Array<[number, Partial<TopkOptions>]> = [
    [1000, {}],
    [4096, { numGroups: 5, groupTopk: 2 }],
    [1000, {}],
    [4096, {}],
    [1000, {}],
  ];
  for (const [i, [T, extra]] of calls.entries()) {
    const logits: FloatTensor = {
      data: new Float32Array(T * E).map(() => normal(rng)),
      shape: [T, E],
      dtype: "float32",
    };
    const options: TopkOptions = { topk: 8, scoreFunction: "sigmoid", expertBias: bias, indexDtype: "int32", ...extra };
    const a = await one.fusedTopkWithScoreFunction(logits, options);
    const b = await two.fusedTopkWithScoreFunction(logits, options);
    assertBitIdentical(b.indices!.data, a.indices!.data, `call ${i} (T = ${T}): indices`);
    assertBitIdentical(b.probs.data, a.probs.data, `call ${i} (T = ${T}): probs`);
    a.saved.release();
    b.saved.release();
  }
  one.dispose();
  two.dispose();
});

Deno.test("the intermediate read back from the saved logits (sigmoid with groups, sqrtsoftplus) has the kernel's bits", async () => {
  // Without intermediateOut, sigmoid's and sqrtsoftplus's intermediate is
  // computed on read from the state's copy of the logits (intermediateOf);
  // with it, the kernel's own pass writes it. Both, bit for bit, on logits
  // with every extreme (NaN, infinities, subnormal sigmoids), every dtype,
  // with and without groups, on one thread and on workers (batches big
  // enough to be cut into pieces).
  const routers: Array<[string, Router]> = [
    ["1 thread", await createRouter({ backend: "wasm", threads: 1 })],
    ["2 threads", await createRouter({ backend: "wasm", threads: 2 })],
  ];
  const rng = mulberry32(7);
  try {
    for (const [name, router] of routers) {
      for (const score of ["sigmoid", "sqrtsoftplus"] as const) {
        for (const dtype of DTYPES) {
          for (const [T, grouped] of [[37, true], [1100, true], [600, false]] as const) {
            const E = 256;
            const x = new Float32Array(T * E);
            for (let i = 0; i < x.length; i++) x[i] = logitOf(i % 3 === 0 ? "extreme" : "normal", rng, 0);
            x[5] = NaN;
            const logits = { data: dtype === "float32" ? x : narrowTo(x, dtype), shape: [T, E], dtype } as FloatTensor;
            const options: TopkOptions = { topk: 8, scoreFunction: score, expertBias: biasTensor(new Float32Array(E)) };
            if (grouped) Object.assign(options, { numGroups: 8, groupTopk: 4 });
            const lazy = await router.fusedTopkWithScoreFunction(logits, options);
            const full = await router.fusedTopkWithScoreFunction(logits, {
              ...options,
              intermediateOut: new Float32Array(T * E),
            });
            const label = `${name} ${score} ${dtype} ${T}x${E}${grouped ? " grouped" : ""}`;
            assertBitIdentical(
              intermediateOf(lazy.intermediate.data),
              full.intermediate.data,
              `${label}: intermediate`,
            );
            assertBitIdentical(lazy.probs.data, full.probs.data, `${label}: probs`);
            lazy.saved.release();
            full.saved.release();
          }
        }
      }
    }
  } finally {
    for (const [, r] of routers) r.dispose();
  }
});

Deno.test("sigmoid keyed by the logits: a call's theta is not taken from an earlier call's bias", async () => {
  // The kernel keeps theta (the logit threshold) per bucket of T0 for one
  // call, since it depends on the call's bias margin. Same logits, a narrow
  // bias first (a tight theta), then a wide one that lifts expert 10 (logit
  // 1, bias +0.3: score 1.03 against 0.88 for the top logit) into the top 2:
  // a theta left from the first call would never key expert 10.
  const T = 64;
  const E = 64;
  const x = new Float32Array(T * E);
  const rng = mulberry32(11);
  for (let t = 0; t < T; t++) {
    for (let e = 0; e < E; e++) x[t * E + e] = -1 + 0.1 * rng();
    x[t * E + 3] = 2;
    x[t * E + 7] = 1.9;
    x[t * E + 10] = 1;
  }
  const logits: FloatTensor = { data: x, shape: [T, E], dtype: "float32" };
  const narrow = new Float32Array(E).map((_, e) => e * 1e-7);
  const wide = new Float32Array(E);
  wide[10] = 0.3;
  for (const threads of [1, 2]) {
    const router = await createRouter({ backend: "wasm", threads });
    try {
      for (const bias of [narrow, wide, narrow, wide]) {
        const options: TopkOptions = {
          topk: 2,
          scoreFunction: "sigmoid",
          expertBias: biasTensor(bias),
          indexDtype: "int32",
        };
        const keyed = await router.fusedTopkWithScoreFunction(logits, options);
        const full = await router.fusedTopkWithScoreFunction(logits, {
          ...options,
          intermediateOut: new Float32Array(T * E),
        });
        assertBitIdentical(keyed.indices!.data, full.indices!.data, `threads ${threads}: indices`);
        assertBitIdentical(keyed.probs.data, full.probs.data, `threads ${threads}: probs`);
        const first = keyed.indices!.data as Int32Array;
        assert.deepStrictEqual([...first.subarray(0, 2)], bias === wide ? [10, 3] : [3, 7]);
        keyed.saved.release();
        full.saved.release();
      }
    } finally {
      router.dispose();
    }
  }
});
