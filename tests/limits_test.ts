/**
 * Limits: batches are cut into chunks of tokens with results identical to
 * one call (checked on random cases with tiny chunks, so that it is cheap);
 * what cannot fit a backend is refused with an error that states the limit,
 * before any work; sizes never wrap around.
 *
 * The full-size checks (more than 2^31 elements in one call) need several
 * GB of memory and minutes: they run with MOE_ROUTER_HUGE=1 only.
 */

import assert from "node:assert";
import fc from "fast-check";
import { createRouter } from "../mod.ts";
import type { FloatTensor, IndexArray, Router, Tensor, TopkOptions, TopkResult } from "../mod.ts";
import { WasmBackend } from "../wasm/backend.ts";
import { assertBitIdentical } from "./_assert.ts";
import { caseArbitrary, describeCase, materialize } from "./_fuzz.ts";
import { mulberry32, normals } from "./_generators.ts";
import { narrowTo } from "./reference.ts";

/** A wasm router and its backend (to read its memory size). */
async function routerWithBackend(options: { chunkBytes?: number; threads?: number }) {
  const create = WasmBackend.create;
  let backend: WasmBackend | undefined;
  WasmBackend.create = async (o) => (backend = await create.call(WasmBackend, o));
  try {
    const router = await createRouter({ backend: "wasm", ...options });
    assert.ok(backend !== undefined);
    return { router, backend };
  } finally {
    WasmBackend.create = create;
  }
}

function envFlag(name: string): boolean {
  try {
    return Deno.env.get(name) === "1";
  } catch {
    return false;
  }
}

const HUGE = envFlag("MOE_ROUTER_HUGE");

/** Every output of a top-k forward and its backward, as bytes. */
async function topkOutputs(
  router: Router,
  logits: FloatTensor,
  options: TopkOptions,
  grad: FloatTensor,
) {
  const r: TopkResult = await router.fusedTopkWithScoreFunction(logits, options);
  const g = await router.fusedTopkWithScoreFunctionBackward(r.saved, grad);
  return {
    probs: r.probs.data,
    intermediate: r.intermediate.data,
    route: (r.routingMap ?? r.indices)!.data,
    grad: g.data,
  };
}

Deno.test("chunks of tokens (down to one token per chunk) and worker threads give results bit-identical to one call", async () => {
  const whole = await createRouter({ backend: "wasm", threads: 1 });
  const others = new Map<string, Router>();
  const routerFor = async (chunkBytes: number, threads: number) => {
    const key = `${chunkBytes}/${threads}`;
    let r = others.get(key);
    if (r === undefined) others.set(key, r = await createRouter({ backend: "wasm", chunkBytes, threads }));
    return r;
  };
  try {
    await fc.assert(
      fc.asyncProperty(
        caseArbitrary({ maxElements: 1 << 15, invalidRate: 0 }),
        fc.constantFrom(1, 64, 1000, 4096, 1 << 15),
        fc.constantFrom(1, 2),
        async (c, chunkBytes, threads) => {
          const m = materialize(c);
          const chunked = await routerFor(chunkBytes, threads);
          const label = `${describeCase(c)} chunkBytes=${chunkBytes} threads=${threads}`;
          if (c.op === "topk") {
            const fresh = () => m.topk.indicesOut ? { indicesOut: m.topk.indicesOut.slice() as IndexArray } : {};
            const a = await topkOutputs(whole, m.logits, { ...m.topk, ...fresh() }, m.grad);
            const b = await topkOutputs(chunked, m.logits, { ...m.topk, ...fresh() }, m.grad);
            for (const k of ["probs", "intermediate", "route", "grad"] as const) {
              assertBitIdentical(b[k], a[k], `${label}: ${k}`);
            }
          } else {
            const run = async (r: Router) => {
              const s = await r.fusedComputeScoreForMoEAuxLoss(m.logits, m.aux);
              const g = await r.fusedComputeScoreForMoEAuxLossBackward(s.saved, m.grad as Tensor<"float32">);
              return [s.scores.data, s.intermediate.data, s.routingMap.data, g.data];
            };
            const a = await run(whole);
            const b = await run(chunked);
            a.forEach((x, i) => assertBitIdentical(b[i]!, x, `${label}: output ${i}`));
          }
        },
      ),
      { seed: 5150, numRuns: 40 },
    );
  } finally {
    whole.dispose();
    for (const r of others.values()) r.dispose();
  }
});

Deno.test("a token too big for WebAssembly memory is refused with an error that states the limit, before any work", async (t) => {
  // Zeroed typed arrays are not backed by memory until written: these big inputs cost nothing.
  for (
    const [threads, E, limit] of [
      [1, 2 ** 29, 4 * 2 ** 30 - 65536], // one thread: the 4 GiB of wasm32
      [2, 2 ** 25, 2 ** 30], // worker threads: the shared memory's maximum
    ] as const
  ) {
    await t.step(`${threads} thread(s), E = 2^${Math.log2(E)} bfloat16`, async () => {
      const { router, backend } = await routerWithBackend({ threads });
      try {
        const before = backend.memoryBytes;
        const x = { data: new Uint16Array(E), shape: [1, E], dtype: "bfloat16" } as const;
        for (
          const [name, call] of [
            ["top-k", () => router.fusedTopkWithScoreFunction(x, { topk: 1, scoreFunction: "sigmoid" })],
            ["aux scores", () => router.fusedComputeScoreForMoEAuxLoss(x, { topk: 1, scoreFunction: "sigmoid" })],
          ] as const
        ) {
          await assert.rejects(call, (e: Error) => {
            assert.ok(e instanceof RangeError, `${name}: ${e.constructor.name}: ${e.message}`);
            // the memory's limit, or the kernels' per-token limit of 32-bit offsets, whichever bites first
            assert.match(e.message, new RegExp(`limit of (${limit}|${2 ** 31 - 1}) bytes`), name);
            assert.match(e.message, /fusedTopkWithScoreFunction|fusedComputeScoreForMoEAuxLoss/, name);
            return true;
          });
        }
        assert.strictEqual(backend.memoryBytes, before, "memory did not grow");
      } finally {
        router.dispose();
      }
    });
  }
});

// The kernels address one token's scratch with 32-bit offsets; the host computes the layout in
// float64 and refuses what they could not address (it once wrapped at E >= 2^27).
Deno.test({
  name: "experts counts whose scratch space passes 2^31 bytes are refused with the limit, not wrapped",
  async fn(t) {
    for (const [threads, E] of [[2, 2 ** 27], [1, 2 ** 27]] as const) {
      await t.step(`${threads} thread(s), E = 2^${Math.log2(E)} bfloat16`, async () => {
        const { router } = await routerWithBackend({ threads });
        try {
          const x = { data: new Uint16Array(E), shape: [1, E], dtype: "bfloat16" } as const;
          await assert.rejects(
            () => router.fusedTopkWithScoreFunction(x, { topk: 1, scoreFunction: "sigmoid" }),
            (e: Error) => e instanceof RangeError && /limit of \d+ bytes/.test(e.message),
          );
        } finally {
          router.dispose();
        }
      });
    }
  },
});

Deno.test("sizes beyond what a number or an array can hold are refused, never wrapped", async (t) => {
  const router = await createRouter({ backend: "wasm" });
  const x = { data: new Float32Array(8), shape: [2, 4], dtype: "float32" } as const;
  try {
    await t.step("a shape whose element count passes 2^53 or does not match the data", async () => {
      for (const shape of [[2 ** 30, 2 ** 30, 4], [2 ** 32 + 2, 4], [2 ** 53, 4], [1, 2 ** 31 + 8]]) {
        await assert.rejects(
          () => router.fusedTopkWithScoreFunction({ ...x, shape }, { topk: 1, scoreFunction: "sigmoid" }),
          (e: Error) => e instanceof TypeError && /shape|length/.test(e.message),
          `shape [${shape}]`,
        );
      }
    });
    await t.step("options at 32-bit boundaries", async () => {
      for (
        const [o, re] of [[{ topk: 2 ** 32 + 1 }, /topk/], [{ numGroups: 2 ** 32 + 4, groupTopk: 1 }, /numGroups/], [{
          numGroups: 2,
          groupTopk: 2 ** 31,
        }, /groupTopk/]] as const
      ) {
        await assert.rejects(
          () => router.fusedTopkWithScoreFunction(x, { topk: 1, scoreFunction: "sigmoid", ...o }),
          (e: Error) => e instanceof RangeError && re.test(e.message),
          JSON.stringify(o),
        );
      }
      // a threshold beyond 2^31 means "never radix"; a chunk size beyond memory means "one chunk"
      const a = await router.fusedTopkWithScoreFunction(x, {
        topk: 2,
        scoreFunction: "sigmoid",
        indexDtype: "int32",
        radixTopkThreshold: 2 ** 40,
      });
      const big = await createRouter({ backend: "wasm", chunkBytes: 2 ** 53 });
      try {
        const b = await big.fusedTopkWithScoreFunction(x, { topk: 2, scoreFunction: "sigmoid", indexDtype: "int32" });
        assertBitIdentical(b.indices!.data, a.indices!.data, "indices");
      } finally {
        big.dispose();
      }
    });
  } finally {
    router.dispose();
  }
});

Deno.test({
  name: "batches of more than 2^31 elements run in chunks with exact results (MOE_ROUTER_HUGE=1; GBs of memory)",
  ignore: !HUGE,
  async fn(t) {
    const router = await createRouter({ backend: "wasm" });
    try {
      await t.step("aux loss over [2^21 + 1, 1024] bfloat16 probs", async () => {
        const rows = 2 ** 21 + 1;
        const cols = 1024;
        const probs = new Uint16Array(rows * cols); // zero pages until written
        // 1, 2 and 3 (bfloat16) at the first element, at element 2^31 and at the last one
        probs[0] = 0x3f80;
        probs[2 ** 31] = 0x4000;
        probs[rows * cols - 1] = 0x4040;
        const started = performance.now();
        const { loss } = await router.fusedMoEAuxLoss(
          { data: probs, shape: [rows, cols], dtype: "bfloat16" },
          { data: new Float32Array(cols).fill(1), shape: [cols], dtype: "float32" },
          { totalNumTokens: 1, numExperts: 1, topk: 1, coeff: 1 },
        );
        console.log(`aux loss over ${rows * cols} elements: ${((performance.now() - started) / 1000).toFixed(1)} s`);
        assert.strictEqual(loss.data[0], 0x40c0, "loss = 6 (bfloat16 bits 0x40c0)");
      });
      await t.step("top-k forward over [2^15 + 2, 2^16] bfloat16 logits", async () => {
        const T = 2 ** 15 + 2;
        const E = 2 ** 16;
        const x = new Uint16Array(T * E);
        // the last token's expert E-1, the one at element 2^31 + 5, and token 0's expert 3 stand out
        const one = 0x3f80;
        x[3] = one;
        x[2 ** 31 + 5] = one;
        x[T * E - 1] = one;
        const started = performance.now();
        const r = await router.fusedTopkWithScoreFunction({ data: x, shape: [T, E], dtype: "bfloat16" }, {
          topk: 1,
          scoreFunction: "sigmoid",
          indexDtype: "int32",
        });
        console.log(`top-k over ${T * E} elements: ${((performance.now() - started) / 1000).toFixed(1)} s`);
        const idx = r.indices!.data as Int32Array;
        assert.strictEqual(idx[0], 3);
        assert.strictEqual(idx[2 ** 15], 5, "token 2^15, whose row starts at element 2^31");
        assert.strictEqual(idx[T - 1], E - 1);
        assert.strictEqual(idx[1], 0, "an all-zero token picks expert 0");
        r.saved.release();
      });
    } finally {
      router.dispose();
    }
  },
});

Deno.test("the sparse backward gathers gradProbs by slices of rows: bits of one token per chunk, NaNs included", async () => {
  const whole = await createRouter({ backend: "wasm", threads: 1 });
  const single = await createRouter({ backend: "wasm", threads: 1, chunkBytes: 1 });
  const rng = mulberry32(77);
  try {
    // E = 300: a slice is 109 rows of float32 (218 of 16-bit floats); E = 40000: a row is more than a slice
    for (const [T, E, K] of [[700, 300, 6], [3, 40000, 4]] as const) {
      for (const dtype of ["float32", "float16", "bfloat16"] as const) {
        const logits = { data: narrowTo(normals(rng, T * E), dtype), shape: [T, E], dtype } as FloatTensor;
        const grad = { data: narrowTo(normals(rng, T * E), dtype), shape: [T, E], dtype } as FloatTensor;
        const options: TopkOptions = { topk: K, scoreFunction: "sigmoid", indexDtype: "int32" };
        // NaNs with payloads here and there, and at a chosen expert of every third token
        const bits = dtype === "float32" ? new Uint32Array(grad.data.buffer) : new Uint16Array(grad.data.buffer);
        const nan = dtype === "float32" ? 0x7fc00abc : dtype === "float16" ? 0x7e5b : 0x7fc5;
        for (let i = 0; i < bits.length; i += 97) bits[i] = nan;
        const ids = (await whole.fusedTopkWithScoreFunction(logits, options)).indices!.data as Int32Array;
        for (let t = 0; t < T; t += 3) bits[t * E + ids[t * K + (t % K)]!] = nan;
        const a = await topkOutputs(whole, logits, options, grad);
        const b = await topkOutputs(single, logits, options, grad);
        assertBitIdentical(a.grad, b.grad, `${T}x${E} top-${K} ${dtype}: gradient`);
        const g = dtype === "float32" ? new Uint32Array(a.grad.buffer) : new Uint16Array(a.grad.buffer);
        const isNaN = dtype === "float32"
          ? (v: number) => (v & 0x7f800000) === 0x7f800000 && (v & 0x7fffff) !== 0
          : dtype === "float16"
          ? (v: number) => (v & 0x7c00) === 0x7c00 && (v & 0x3ff) !== 0
          : (v: number) => (v & 0x7f80) === 0x7f80 && (v & 0x7f) !== 0;
        assert.ok(g.some(isNaN), `${T}x${E} ${dtype}: the NaNs reach the gradient`);
      }
    }
  } finally {
    whole.dispose();
    single.dispose();
  }
});
