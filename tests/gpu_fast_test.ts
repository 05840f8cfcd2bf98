// The specialised WebGPU forward and backward (gpu/_fast_kernels.ts) against the wasm
// backend and against the general WebGPU kernels: identical chosen sets and
// dense order, values within tolerance, for every score function, dtype,
// routing output and team size it takes, with ties, NaN and infinities,
// dead rows in the last workgroup and dispatches split at binding limits.
import assert from "node:assert";
import { createRouter } from "../mod.ts";
import type { FloatDType, FloatTensor, IndexDType, RoutingMapFormat, Tensor, TopkOptions } from "../mod.ts";
import { planTopk } from "../_validate.ts";
import { fastBackwardKey, fastForwardKey } from "../gpu/_fast_kernels.ts";
import { assertArrayEqual, assertBitIdentical, assertClose } from "./_assert.ts";
import { CROSS_TOLERANCE, type CrossCase, gradTensor, mulberry32, routableTensor } from "./_generators.ts";
import { narrowTo, widen } from "./reference.ts";

const hasGpu = (await navigator.gpu?.requestAdapter()) != null;

interface Case extends CrossCase {
  /** Lanes per row the fast kernel must pick (checks that the case exercises what it claims). */
  tpr: number;
}

function bias(E: number, seed: number, dtype: FloatDType = "float32"): FloatTensor {
  const r = mulberry32(seed);
  const v = Float32Array.from({ length: E }, () => Math.fround((r() - 0.5) * 0.1));
  return { data: narrowTo(v, dtype), shape: [E], dtype } as FloatTensor;
}

const DSV3: TopkOptions = {
  topk: 8,
  scoreFunction: "sigmoid",
  numGroups: 8,
  groupTopk: 4,
  scalingFactor: 2.5,
  expertBias: bias(256, 1),
};

const CASES: Case[] = [
  // two lanes share each group of DeepSeek-V3
  { T: 70, E: 256, dtype: "float32", options: DSV3, tpr: 16 },
  { T: 33, E: 256, dtype: "bfloat16", options: { ...DSV3, expertBias: bias(256, 2, "bfloat16") }, tpr: 16 },
  { T: 130, E: 128, dtype: "float32", options: { topk: 8, scoreFunction: "softmax" }, tpr: 8 },
  { T: 300, E: 8, dtype: "float32", options: { topk: 2, scoreFunction: "softmax", scalingFactor: 1.5 }, tpr: 1 },
  { T: 41, E: 64, dtype: "float16", options: { topk: 4, scoreFunction: "softmax", usePreSoftmax: true }, tpr: 4 },
  {
    T: 17,
    E: 512,
    dtype: "float32",
    options: { topk: 15, scoreFunction: "sqrtsoftplus", expertBias: bias(512, 3, "float16") },
    tpr: 16,
  },
  { T: 9, E: 96, dtype: "float32", options: { topk: 1, scoreFunction: "sigmoid" }, tpr: 8 },
  // rows of a bitmap that are not whole bytes (E = 12): the backward must still match every other format
  {
    T: 50,
    E: 12,
    dtype: "float32",
    options: { topk: 3, scoreFunction: "sqrtsoftplus", expertBias: bias(12, 5) },
    tpr: 1,
  },
  {
    T: 45,
    E: 64,
    dtype: "float32",
    options: { topk: 8, scoreFunction: "softmax", numGroups: 8, groupTopk: 4 },
    tpr: 4,
  },
  {
    T: 29,
    E: 256,
    dtype: "float32",
    options: { topk: 8, scoreFunction: "softmax", usePreSoftmax: true, numGroups: 8, groupTopk: 4, scalingFactor: 2.5 },
    tpr: 16,
  },
  {
    T: 25,
    E: 128,
    dtype: "float16",
    options: { topk: 6, scoreFunction: "sigmoid", numGroups: 4, groupTopk: 2, expertBias: bias(128, 4) },
    tpr: 8,
  },
];

// the radix path: K at or above the threshold
CASES.push(
  { T: 21, E: 1024, dtype: "float32", options: { topk: 32, scoreFunction: "sigmoid", scalingFactor: 2 }, tpr: 32 },
  { T: 37, E: 256, dtype: "float16", options: { topk: 20, scoreFunction: "softmax", usePreSoftmax: true }, tpr: 32 },
  { T: 40, E: 64, dtype: "float32", options: { topk: 16, scoreFunction: "softmax" }, tpr: 16 },
  {
    T: 30,
    E: 128,
    dtype: "bfloat16",
    options: { topk: 8, scoreFunction: "sqrtsoftplus", expertBias: bias(128, 6), radixTopkThreshold: 1 },
    tpr: 32,
  },
  {
    T: 5,
    E: 1024,
    dtype: "float32",
    options: { topk: 64, scoreFunction: "sigmoid", expertBias: bias(1024, 7) },
    tpr: 32,
  },
);

const OUTPUTS: ({ routingMapFormat: RoutingMapFormat } | { indexDtype: IndexDType })[] = [
  { routingMapFormat: "bytemap" },
  { routingMapFormat: "bitmap_u8" },
  { indexDtype: "int16" },
  { indexDtype: "int32" },
  { indexDtype: "int64" },
];

// logits from a few values only, so that many experts tie exactly, with NaN
// and infinities sprinkled in: the tie rule and the NaN rule decide
function tiedLogitsOf(c: Case, seed: number): FloatTensor {
  const r = mulberry32(seed);
  const special = [NaN, Infinity, -Infinity];
  const x = Float32Array.from(
    { length: c.T * c.E },
    () => r() < 0.03 ? special[Math.floor(r() * 3)]! : Math.floor(r() * 5) / 2 - 1,
  );
  // a row of one value and a row of NaN: every key of the row ties
  x.fill(0.5, 0, c.E);
  if (c.T > 1) x.fill(NaN, c.E, 2 * c.E);
  return { data: narrowTo(x, c.dtype), shape: [c.T, c.E], dtype: c.dtype } as FloatTensor;
}

function sameRoute(
  a: { routingMap?: { data: Uint8Array }; indices?: { data: ArrayLike<unknown> } },
  b: typeof a,
  label: string,
) {
  if (b.routingMap) assertArrayEqual(a.routingMap!.data, b.routingMap.data, `${label} routing map`);
  else assertArrayEqual(a.indices!.data as ArrayLike<number>, b.indices!.data as ArrayLike<number>, `${label} indices`);
}

Deno.test({
  name: "the specialised WebGPU forward and backward match wasm and the general kernels",
  ignore: !hasGpu,
  async fn(t) {
    const fast = await createRouter({ backend: "webgpu" });
    const general = await createRouter({ backend: "webgpu", webgpu: { generalKernels: true } });
    const cpu = await createRouter({ backend: "wasm" });
    try {
      for (const [n, c] of CASES.entries()) {
        const name = `T=${c.T} E=${c.E} ${c.dtype} ${
          JSON.stringify({ ...c.options, expertBias: c.options.expertBias && c.options.expertBias.dtype })
        }`;
        await t.step(name, async () => {
          const tol = CROSS_TOLERANCE[c.dtype];
          const key = fastForwardKey(planTopk(routableTensor(c, 1), c.options));
          assert.ok(key !== null, "the case takes the specialised kernel");
          assert.strictEqual(key.tpr, c.tpr, "lanes per row");
          const backwardKey = fastBackwardKey(planTopk(routableTensor(c, 1), c.options));
          assert.ok(backwardKey !== null || c.E > 512, "the backward takes the specialised kernel up to E = 512");
          const grad = gradTensor(c, 30 + n);
          for (
            const [kind, logits] of [["routable", routableTensor(c, 10 + n)], [
              "ties",
              tiedLogitsOf(c, 20 + n),
            ]] as const
          ) {
            let firstGrad: Float32Array | null = null;
            for (const out of OUTPUTS) {
              const o = { ...c.options, ...out };
              const label = `${kind} ${JSON.stringify(out)}`;
              const a = await fast.fusedTopkWithScoreFunction(logits, o);
              const g = await general.fusedTopkWithScoreFunction(logits, o);
              sameRoute(a, g, `${label} fast vs general`);
              assertClose(widen(a.probs), widen(g.probs), tol, `${label} probs fast vs general`);
              assertClose(a.intermediate.data, g.intermediate.data, tol, `${label} intermediate fast vs general`);
              const ga = widen(await fast.fusedTopkWithScoreFunctionBackward(a.saved, grad));
              const gg = widen(await general.fusedTopkWithScoreFunctionBackward(g.saved, grad));
              assertClose(ga, gg, tol, `${label} gradient fast vs general`);
              firstGrad ??= ga;
              assertBitIdentical(ga, firstGrad, `${label} gradient equals the bytemap's`);
              const b = await cpu.fusedTopkWithScoreFunction(logits, o);
              sameRoute(a, b, `${label} fast vs wasm`);
              assertClose(widen(a.probs), widen(b.probs), tol, `${label} probs fast vs wasm`);
              assertClose(a.intermediate.data, b.intermediate.data, tol, `${label} intermediate fast vs wasm`);
              const gb = widen(await cpu.fusedTopkWithScoreFunctionBackward(b.saved, grad));
              assertClose(ga, gb, tol, `${label} gradient fast vs wasm`);
            }
          }
        });
      }
    } finally {
      fast.dispose();
      general.dispose();
      cpu.dispose();
    }
  },
});

Deno.test({
  name: "the specialised WebGPU forward gives the same result when split into several dispatches",
  ignore: !hasGpu,
  async fn() {
    const whole = await createRouter({ backend: "webgpu" });
    // 16 KiB bindings: 8 rows of 256 float32 logits per dispatch
    const split = await createRouter({ backend: "webgpu", webgpu: { maxBindingBytes: 16384 } });
    try {
      const c = CASES[0]!;
      const logits = routableTensor({ ...c, T: 77 }, 5);
      for (const out of OUTPUTS) {
        const o = { ...c.options, ...out };
        const a = await whole.fusedTopkWithScoreFunction(logits, o);
        const b = await split.fusedTopkWithScoreFunction(logits, o);
        sameRoute(a, b, JSON.stringify(out));
        assertArrayEqual(a.probs.data as Float32Array, b.probs.data as Float32Array, "probs");
        assertArrayEqual(a.intermediate.data, b.intermediate.data, "intermediate");
      }
    } finally {
      whole.dispose();
      split.dispose();
    }
  },
});

// Deno's WebGPU runs on OpenGL where there is no Vulkan driver, and its
// translation of WGSL to GLSL turned an identifier `gl` into `gl_1`, which
// GLSL reserves (its `gl_` prefix): the grouped kernels did not compile there.
Deno.test({
  name: "the WGSL of the kernels uses no identifier that GLSL reserves (gl, gl_*)",
  ignore: !hasGpu,
  async fn() {
    const adapter = (await navigator.gpu.requestAdapter())!;
    const device = await adapter.requestDevice();
    const sources: string[] = [];
    const create = device.createShaderModule.bind(device);
    device.createShaderModule = (d: GPUShaderModuleDescriptor) => {
      sources.push(d.code);
      return create(d);
    };
    const rng = mulberry32(404);
    const E = 64;
    const logits: FloatTensor = {
      data: Float32Array.from({ length: 8 * E }, () => rng() * 4 - 2),
      shape: [8, E],
      dtype: "float32",
    };
    const bias: FloatTensor = { data: new Float32Array(E), shape: [E], dtype: "float32" };
    const grad: Tensor<"float32"> = { data: new Float32Array(8 * E).fill(1), shape: [8, E], dtype: "float32" };
    for (const generalKernels of [false, true]) {
      const router = await createRouter({ backend: "webgpu", webgpu: { device, generalKernels } });
      try {
        for (
          const options of [
            { topk: 8, scoreFunction: "sigmoid", numGroups: 8, groupTopk: 4, expertBias: bias },
            { topk: 8, scoreFunction: "softmax", numGroups: 8, groupTopk: 4 },
            { topk: 4, scoreFunction: "sqrtsoftplus" },
          ] as TopkOptions[]
        ) {
          const out = await router.fusedTopkWithScoreFunction(logits, options);
          await router.fusedTopkWithScoreFunctionBackward(out.saved, grad);
        }
        const aux = await router.fusedComputeScoreForMoEAuxLoss(logits, {
          topk: 4,
          scoreFunction: "softmax",
        });
        await router.fusedComputeScoreForMoEAuxLossBackward(aux.saved, grad);
      } finally {
        router.dispose();
      }
    }
    assert.ok(sources.length >= 4, `${sources.length} shaders compiled`);
    for (const code of sources) {
      const bad = code.match(/\bgl(_\w*)?\b/);
      assert.ok(bad === null, `identifier ${bad?.[0]} in a shader:\n${code.slice(0, 200)}`);
    }
    device.destroy();
  },
});
