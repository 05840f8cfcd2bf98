/**
 * Leaks: many forward+backward calls keep memory flat. WebAssembly: the
 * module's linear memory (pages) does not change after the first calls, and
 * process RSS stays within a bound. WebGPU: GPU buffers created minus
 * destroyed (counted on a device the test owns) stop growing after the
 * first calls, and dispose() destroys them all.
 *
 * CI runs a scaled-down version; MOE_LEAK_WASM_CALLS and MOE_LEAK_GPU_CALLS
 * set the full counts (100000 and 10000).
 */

import assert from "node:assert";
import { createRouter } from "../mod.ts";
import type { FloatTensor, Router, Tensor, TopkOptions } from "../mod.ts";
import { WasmBackend } from "../wasm/backend.ts";
import { mulberry32, normals } from "./_generators.ts";
import { countedDevice } from "./_gpu.ts";

function envCount(name: string, fallback: number): number {
  try {
    return Number(Deno.env.get(name) ?? "") || fallback;
  } catch {
    return fallback;
  }
}

const WASM_CALLS = envCount("MOE_LEAK_WASM_CALLS", 2000);
const GPU_CALLS = envCount("MOE_LEAK_GPU_CALLS", 100);
/** RSS may move with the garbage collector's moods; a leak of even 100 bytes per call passes it at 100,000 calls. */
const RSS_BOUND = 64 * 2 ** 20;

const hasGpu = await (async () => {
  try {
    return (await navigator.gpu?.requestAdapter()) != null;
  } catch {
    return false;
  }
})();

const MiB = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;

/** The calls of one round: top-k forward+backward in three layouts, aux scores forward+backward. */
function round(T: number, E: number, seed: number) {
  const rng = mulberry32(seed);
  const logits: FloatTensor = { data: normals(rng, T * E), shape: [T, E], dtype: "float32" };
  const grad: FloatTensor = { data: normals(rng, T * E), shape: [T, E], dtype: "float32" };
  const bias: FloatTensor = { data: normals(rng, E, 0.1), shape: [E], dtype: "float32" };
  const variants: TopkOptions[] = [
    { topk: 8, scoreFunction: "sigmoid", expertBias: bias, numGroups: 8, groupTopk: 4, indexDtype: "int32" },
    { topk: 4, scoreFunction: "softmax", usePreSoftmax: true },
    { topk: 2, scoreFunction: "sqrtsoftplus", routingMapFormat: "bitmap_u8" },
  ];
  return async (router: Router, i: number) => {
    const r = await router.fusedTopkWithScoreFunction(logits, variants[i % variants.length]!);
    await router.fusedTopkWithScoreFunctionBackward(r.saved, grad);
    if (i % 10 === 0) {
      const s = await router.fusedComputeScoreForMoEAuxLoss(logits, { topk: 4, scoreFunction: "softmax" });
      await router.fusedComputeScoreForMoEAuxLossBackward(s.saved, grad as Tensor<"float32">);
    }
  };
}

Deno.test(`${WASM_CALLS} wasm forward+backward calls keep linear memory and RSS flat`, async () => {
  const create = WasmBackend.create;
  let backend: WasmBackend | undefined;
  WasmBackend.create = async (o) => (backend = await create.call(WasmBackend, o));
  const router = await createRouter({ backend: "wasm" }).finally(() => WasmBackend.create = create);
  const small = round(64, 256, 1);
  const big = round(2048, 256, 2); // above the worker-thread threshold
  try {
    const warm = Math.min(200, WASM_CALLS / 10);
    for (let i = 0; i < warm; i++) await (i % 50 === 49 ? big : small)(router, i);
    const pages = backend!.memoryBytes / 65536;
    const rss = Deno.memoryUsage().rss;
    const started = performance.now();
    for (let i = warm; i < WASM_CALLS; i++) await (i % 50 === 49 ? big : small)(router, i);
    const seconds = (performance.now() - started) / 1000;
    const pagesAfter = backend!.memoryBytes / 65536;
    const rssAfter = Deno.memoryUsage().rss;
    console.log(
      `${WASM_CALLS} calls in ${seconds.toFixed(1)} s: wasm memory ${pages} -> ${pagesAfter} pages, ` +
        `RSS ${MiB(rss)} -> ${MiB(rssAfter)}`,
    );
    assert.strictEqual(pagesAfter, pages, "WebAssembly memory pages after the warm-up calls");
    assert.ok(rssAfter - rss < RSS_BOUND, `RSS grew by ${MiB(rssAfter - rss)}, bound ${MiB(RSS_BOUND)}`);
  } finally {
    router.dispose();
  }
});

Deno.test("saved states dropped without release() in a loop that never yields to the event loop are freed", async () => {
  // Pre-softmax states hold a whole T x E intermediate. Dropped states used
  // to reach the buffer pool through a FinalizationRegistry, whose cleanup
  // only runs between tasks: a loop of awaited one-thread calls never got
  // there, and every state's buffers stayed (3,000 calls: about 200 MiB).
  const router = await createRouter({ backend: "wasm", threads: 1 });
  const rng = mulberry32(5);
  const T = 64;
  const E = 256;
  const logits: FloatTensor = { data: normals(rng, T * E), shape: [T, E], dtype: "float32" };
  const grad: FloatTensor = { data: normals(rng, T * E), shape: [T, E], dtype: "float32" };
  const options: TopkOptions = { topk: 4, scoreFunction: "softmax", usePreSoftmax: true };
  try {
    const call = async () => {
      const r = await router.fusedTopkWithScoreFunction(logits, options);
      await router.fusedTopkWithScoreFunctionBackward(r.saved, grad);
    };
    for (let i = 0; i < 100; i++) await call();
    const external = Deno.memoryUsage().external;
    for (let i = 0; i < 3000; i++) await call();
    const grown = Deno.memoryUsage().external - external;
    assert.ok(grown < RSS_BOUND, `external memory grew by ${MiB(grown)}, bound ${MiB(RSS_BOUND)}`);
  } finally {
    router.dispose();
  }
});

Deno.test({
  name: `${GPU_CALLS} webgpu forward+backward calls keep the GPU buffers alive flat, and dispose() frees them`,
  ignore: !hasGpu,
  async fn() {
    const { device, live, counts } = await countedDevice();
    const router = await createRouter({ backend: "webgpu", webgpu: { device } });
    const small = round(64, 256, 3);
    try {
      const warm = Math.min(20, GPU_CALLS / 5);
      for (let i = 0; i < warm; i++) await small(router, i);
      const alive = live.size;
      const rss = Deno.memoryUsage().rss;
      const started = performance.now();
      for (let i = warm; i < GPU_CALLS; i++) await small(router, i);
      const seconds = (performance.now() - started) / 1000;
      const rssAfter = Deno.memoryUsage().rss;
      console.log(
        `${GPU_CALLS} calls in ${seconds.toFixed(1)} s: GPU buffers alive ${alive} -> ${live.size} ` +
          `(created ${counts.created}, destroyed ${counts.destroyed}), RSS ${MiB(rss)} -> ${MiB(rssAfter)}`,
      );
      assert.strictEqual(live.size, alive, "GPU buffers alive (created minus destroyed) after the warm-up calls");
      assert.ok(rssAfter - rss < RSS_BOUND, `RSS grew by ${MiB(rssAfter - rss)}, bound ${MiB(RSS_BOUND)}`);
    } finally {
      router.dispose();
      device.destroy();
    }
    assert.strictEqual(live.size, 0, `GPU buffers the backend left alive after dispose(): ${live.size}`);
  },
});
