// The WebGPU backend against the WebAssembly backend: identical chosen sets
// and dense order (bit-exact), values and gradients within tolerance, host
// and GPU-resident paths in agreement, limits crossed, errors before GPU work.
import assert from "node:assert";
import { createRouter, readGpuTensor, toGpuTensor } from "../mod.ts";
import type { FloatTensor } from "../mod.ts";
import { WebGpuBackend } from "../gpu/backend.ts";
import { planTopk } from "../_validate.ts";
import { assertArrayEqual, assertBitIdentical, assertClose, intermediateOf } from "./_assert.ts";
import { CROSS_TOLERANCE, type CrossCase, gradTensor, mulberry32, routableTensor } from "./_generators.ts";
import { widen } from "./reference.ts";

const hasGpu = (await navigator.gpu?.requestAdapter()) != null;

type GridCase = CrossCase;

function biasOf(E: number, seed: number): FloatTensor {
  const r = mulberry32(seed);
  return { data: Float32Array.from({ length: E }, () => Math.fround((r() - 0.5) * 0.1)), shape: [E], dtype: "float32" };
}

const GRID: GridCase[] = [
  {
    T: 37,
    E: 64,
    dtype: "float32",
    options: { topk: 4, scoreFunction: "sigmoid", expertBias: biasOf(64, 1), scalingFactor: 2.5 },
  },
  {
    T: 19,
    E: 130,
    dtype: "bfloat16",
    options: { topk: 8, scoreFunction: "softmax", usePreSoftmax: true, numGroups: 10, groupTopk: 4 },
  },
  { T: 23, E: 33, dtype: "float16", options: { topk: 3, scoreFunction: "softmax" } },
  { T: 9, E: 256, dtype: "float32", options: { topk: 24, scoreFunction: "sqrtsoftplus", expertBias: biasOf(256, 2) } },
  { T: 5, E: 1000, dtype: "float16", options: { topk: 40, scoreFunction: "sigmoid", numGroups: 8, groupTopk: 4 } },
];

Deno.test({
  name: "sqrtsoftplus far below 0 is exp(x / 2) on webgpu as on wasm, not 0",
  ignore: !hasGpu,
  async fn() {
    // far below 0, sqrtsoftplus(x) is exp(x / 2) to float32 precision; webgpu went through log1p(exp(x)), whose
    // (1 + u) - 1 the GPU compiler folded to u, and gave 0 (fuzz seed 566: x = -22.5 and -17)
    const gpu = await createRouter({ backend: "webgpu" });
    const cpu = await createRouter({ backend: "wasm" });
    try {
      const T = 64;
      const x = Float32Array.from({ length: T }, (_, t) => -16.2 - t * 1.5);
      const logits: FloatTensor = { data: x, shape: [T, 1], dtype: "float32" };
      const options = { topk: 1, scoreFunction: "sqrtsoftplus" as const };
      const a = await gpu.fusedTopkWithScoreFunction(logits, options);
      const b = await cpu.fusedTopkWithScoreFunction(logits, options);
      // within the cross tolerance: the GPU's exp is not bit for bit the WebAssembly one everywhere (1 ulp on llvmpipe)
      assertClose(a.probs.data as Float32Array, b.probs.data as Float32Array, CROSS_TOLERANCE.float32, "probs");
      for (let t = 0; t < T; t++) {
        assert.ok((a.probs.data as Float32Array)[t]! > 0, `x = ${x[t]}: sqrtsoftplus > 0 on webgpu`);
      }
    } finally {
      gpu.dispose();
      cpu.dispose();
    }
  },
});

Deno.test({
  name: "the webgpu backend chooses the same experts as wasm and agrees on values and gradients",
  ignore: !hasGpu,
  async fn(t) {
    const gpu = await createRouter({ backend: "webgpu" });
    const cpu = await createRouter({ backend: "wasm" });
    try {
      for (const [n, c] of GRID.entries()) {
        await t.step(
          `T=${c.T} E=${c.E} ${c.dtype} ${JSON.stringify({ ...c.options, expertBias: c.options.expertBias && "[E]" })}`,
          async () => {
            const logits = routableTensor(c, 100 + n);
            const grad = gradTensor(c, 200 + n);
            const tol = CROSS_TOLERANCE[c.dtype];
            for (const out of [{}, { routingMapFormat: "bitmap_u8" as const }, { indexDtype: "int32" as const }]) {
              for (const radixTopkThreshold of [1, 1000]) {
                const o = { ...c.options, ...out, radixTopkThreshold };
                const a = await gpu.fusedTopkWithScoreFunction(logits, o);
                const b = await cpu.fusedTopkWithScoreFunction(logits, o);
                const label = `${JSON.stringify(out)} threshold=${radixTopkThreshold}`;
                if (b.routingMap) assertArrayEqual(a.routingMap!.data, b.routingMap.data, `${label} routing map`);
                else assertArrayEqual(a.indices!.data, b.indices!.data, `${label} dense indices (order too)`);
                assertClose(widen(a.probs), widen(b.probs), tol, `${label} probs`);
                assertClose(
                  a.intermediate.data as Float32Array,
                  b.intermediate.data as Float32Array,
                  tol,
                  `${label} intermediate`,
                );
                const ga = await gpu.fusedTopkWithScoreFunctionBackward(a.saved, grad);
                const gb = await cpu.fusedTopkWithScoreFunctionBackward(b.saved, grad);
                assertClose(widen(ga), widen(gb), tol, `${label} grad`);
              }
            }
          },
        );
      }
    } finally {
      gpu.dispose();
      cpu.dispose();
    }
  },
});

Deno.test({
  name: "GPU-resident tensors through the router give the host path's results, with no readback",
  ignore: !hasGpu,
  async fn(t) {
    const router = await createRouter({ backend: "webgpu" });
    const device = router.device!;
    try {
      for (const [n, c] of [GRID[0]!, GRID[1]!, GRID[2]!, GRID[4]!].entries()) {
        await t.step(`T=${c.T} E=${c.E} ${c.dtype} topk=${c.options.topk}`, async () => {
          const logits = routableTensor(c, 7 + n);
          const grad = gradTensor(c, 8 + n);
          const bias = c.options.expertBias;
          for (const out of [{}, { routingMapFormat: "bitmap_u8" as const }, { indexDtype: "int64" as const }]) {
            const options = { ...c.options, ...out };
            const host = await router.fusedTopkWithScoreFunction(logits, options);
            const hostGrad = await router.fusedTopkWithScoreFunctionBackward(host.saved, grad);
            const x = toGpuTensor(device, logits);
            const g = toGpuTensor(device, grad);
            const b = bias ? toGpuTensor(device, bias) : undefined;
            const res = await router.fusedTopkWithScoreFunction(x, { ...options, ...(b ? { expertBias: b } : {}) });
            assert.ok(res.probs.buffer instanceof GPUBuffer, "probs stays on the GPU");
            assert.deepStrictEqual(res.probs.shape, [c.T, c.E]);
            const gradGpu = await router.fusedTopkWithScoreFunctionBackward(res.saved, g);
            assertBitIdentical((await readGpuTensor(device, res.probs)).data, host.probs.data, "probs");
            assertBitIdentical(
              (await readGpuTensor(device, res.intermediate)).data,
              host.intermediate.data,
              "intermediate",
            );
            const route = res.routingMap ?? res.indices!;
            const hostRoute = host.routingMap ?? host.indices!;
            assert.deepStrictEqual(route.shape, hostRoute.shape, "route shape");
            assert.strictEqual(route.dtype, hostRoute.dtype, "route dtype");
            assertBitIdentical((await readGpuTensor(device, route)).data, hostRoute.data, "route");
            assertBitIdentical((await readGpuTensor(device, gradGpu)).data, hostGrad.data, "gradLogits");
            // mixed: GPU forward + host gradient, host forward + GPU gradient
            const res2 = await router.fusedTopkWithScoreFunction(x, options);
            assertBitIdentical(
              (await router.fusedTopkWithScoreFunctionBackward(res2.saved, grad)).data,
              hostGrad.data,
              "GPU forward, host grad",
            );
            const host2 = await router.fusedTopkWithScoreFunction(logits, options);
            const mixed = await router.fusedTopkWithScoreFunctionBackward(host2.saved, g);
            assertBitIdentical((await readGpuTensor(device, mixed)).data, hostGrad.data, "host forward, GPU grad");
            for (const r of [res, res2]) {
              for (const o of [r.probs, r.intermediate, r.routingMap ?? r.indices!]) o.buffer.destroy();
            }
            for (const o of [gradGpu, mixed, x, g, ...(b ? [b] : [])]) o.buffer.destroy();
          }
        });
      }
    } finally {
      router.dispose();
    }
  },
});

Deno.test({
  name: "GPU-resident inputs are validated before any GPU work",
  ignore: !hasGpu,
  async fn() {
    const router = await createRouter({ backend: "webgpu" });
    const cpu = await createRouter({ backend: "wasm" });
    const device = router.device!;
    const opts = { topk: 2, scoreFunction: "sigmoid" as const };
    const buf = (size: number, usage: number) => device.createBuffer({ size, usage });
    try {
      const ok = buf(32, GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC);
      await assert.rejects(
        () =>
          router.fusedTopkWithScoreFunction({
            buffer: buf(16, GPUBufferUsage.STORAGE),
            shape: [2, 4],
            dtype: "float32",
          }, opts),
        /logits.buffer must hold at least 32 bytes/,
      );
      await assert.rejects(
        () =>
          router.fusedTopkWithScoreFunction({
            buffer: buf(32, GPUBufferUsage.COPY_SRC),
            shape: [2, 4],
            dtype: "float32",
          }, opts),
        /GPUBufferUsage.STORAGE/,
      );
      await assert.rejects(
        // deno-lint-ignore no-explicit-any
        () => router.fusedTopkWithScoreFunction({ buffer: ok, shape: [2, 4], dtype: "int32" as any }, opts),
        /logits.dtype must be one of float32, float16, bfloat16/,
      );
      await assert.rejects(
        () =>
          router.fusedTopkWithScoreFunction({ buffer: ok, shape: [2, 4], dtype: "float32" }, {
            ...opts,
            indicesOut: new Int32Array(4),
          } as never),
        /indicesOut applies to host logits/,
      );
      await assert.rejects(
        () => cpu.fusedTopkWithScoreFunction({ buffer: ok, shape: [2, 4], dtype: "float32" }, opts),
        /GPU-resident tensors need a router on the webgpu backend, this one runs wasm/,
      );
      const res = await router.fusedTopkWithScoreFunction({ buffer: ok, shape: [2, 4], dtype: "float32" }, opts);
      await assert.rejects(
        () => router.fusedTopkWithScoreFunctionBackward(res.saved, { buffer: ok, shape: [2, 4], dtype: "float16" }),
        /gradProbs.dtype must be float32/,
      );
      await assert.rejects(
        () => router.fusedTopkWithScoreFunctionBackward(res.saved, { buffer: ok, shape: [4, 2], dtype: "float32" }),
        /gradProbs.shape must be \[2, 4\]/,
      );
      // a buffer of another device: refused by WebGPU validation, reported as an error of the call
      const other = await createRouter({ backend: "webgpu" });
      const foreign = other.device!.createBuffer({ size: 32, usage: GPUBufferUsage.STORAGE });
      await assert.rejects(
        () => router.fusedTopkWithScoreFunction({ buffer: foreign, shape: [2, 4], dtype: "float32" }, opts),
        /webgpu: the router's commands were refused/,
      );
      other.dispose();
    } finally {
      router.dispose();
      cpu.dispose();
    }
  },
});

Deno.test({
  name: "work beyond the binding and dispatch limits is split and gives the same results",
  ignore: !hasGpu,
  async fn() {
    // limits lowered on purpose: 64 KiB per binding, 4 workgroups per grid dimension
    const small = await WebGpuBackend.create({ maxBindingBytes: 65536, maxWorkgroupsPerDimension: 4 });
    const plain = await WebGpuBackend.create();
    try {
      for (const c of [GRID[0]!, GRID[2]!]) {
        const cc = { ...c, T: 1000 };
        const logits = routableTensor(cc, 11);
        const grad = gradTensor(cc, 12);
        for (const out of [{}, { indexDtype: "int16" as const }]) {
          const plan = planTopk(logits, { ...c.options, ...out });
          const a = await small.topkForward(plan, logits);
          const b = await plain.topkForward(plan, logits);
          assertBitIdentical(a.probs, b.probs, "probs");
          assertBitIdentical(intermediateOf(a.intermediate), intermediateOf(b.intermediate), "intermediate");
          assertBitIdentical(a.route, b.route, "route");
          assertBitIdentical(
            await small.topkBackward(plan, a.payload, grad),
            await plain.topkBackward(plan, b.payload, grad),
            "grad",
          );
        }
      }
    } finally {
      small.dispose();
      plain.dispose();
    }
  },
});

Deno.test({
  name: "bad arguments are refused before any GPU work",
  ignore: !hasGpu,
  async fn() {
    const router = await createRouter({ backend: "webgpu" });
    try {
      const logits: FloatTensor = { data: new Float32Array(8), shape: [2, 4], dtype: "float32" };
      await assert.rejects(
        () => router.fusedTopkWithScoreFunction(logits, { topk: 5, scoreFunction: "sigmoid" }),
        RangeError,
      );
      await assert.rejects(
        () =>
          router.fusedTopkWithScoreFunction(logits, { topk: 2, scoreFunction: "softmax", expertBias: biasOf(4, 1) }),
        TypeError,
      );
      await assert.rejects(
        () =>
          router.fusedTopkWithScoreFunction(logits, { topk: 2, scoreFunction: "sigmoid", numGroups: 3, groupTopk: 1 }),
        RangeError,
      );
      const cpu = await createRouter({ backend: "wasm" });
      const fromCpu = await cpu.fusedTopkWithScoreFunction(logits, { topk: 2, scoreFunction: "sigmoid" });
      await assert.rejects(() => router.fusedTopkWithScoreFunctionBackward(fromCpu.saved, logits), /wasm backend/);
      cpu.dispose();
      const own = await router.fusedTopkWithScoreFunction(logits, { topk: 2, scoreFunction: "sigmoid" });
      own.saved.release();
      await assert.rejects(() => router.fusedTopkWithScoreFunctionBackward(own.saved, logits), /released/);
    } finally {
      router.dispose();
    }
  },
});
