/**
 * CPU benchmark: the WebAssembly backend against the plain TypeScript
 * reference (tests/reference.ts), forward and backward, on three router
 * shapes, with fresh output arrays per call and with caller buffers reused
 * across calls. Run with `deno task bench`; each group prints the speed-up of
 * the WebAssembly kernels over the reference measured in the same run.
 *
 * @module
 */
import { createRouter, type TopkInferenceOptions, type TopkOptions } from "../mod.ts";
import { mulberry32, normals } from "../tests/_generators.ts";
import { refTopkBackward, refTopkForward, type RefTopkOptions } from "../tests/reference.ts";

interface Case {
  name: string;
  tokens: number;
  experts: number;
  options: TopkOptions;
}

const E_DSV3 = 256;
const CASES: Case[] = [
  {
    name: "DeepSeek-V3 8192x256 top-8 sigmoid G8/4 bias s2.5",
    tokens: 8192,
    experts: E_DSV3,
    options: {
      topk: 8,
      scoreFunction: "sigmoid",
      numGroups: 8,
      groupTopk: 4,
      scalingFactor: 2.5,
      expertBias: { data: normals(mulberry32(7), E_DSV3, 0.01), shape: [E_DSV3], dtype: "float32" },
    },
  },
  { name: "Qwen3 8192x128 top-8 softmax", tokens: 8192, experts: 128, options: { topk: 8, scoreFunction: "softmax" } },
  {
    name: "wide 4096x1024 top-32 sigmoid (radix)",
    tokens: 4096,
    experts: 1024,
    options: { topk: 32, scoreFunction: "sigmoid" },
  },
];

const router = await createRouter({ backend: "wasm" });

for (const c of CASES) {
  const n = c.tokens * c.experts;
  const logits = { data: normals(mulberry32(1), n), shape: [c.tokens, c.experts], dtype: "float32" as const };
  const grad = { data: normals(mulberry32(2), n), shape: [c.tokens, c.experts], dtype: "float32" as const };
  const ref: RefTopkOptions = { ...c.options, expertBias: c.options.expertBias?.data as Float32Array | undefined };
  const saved = (await router.fusedTopkWithScoreFunction(logits, c.options)).saved;
  const refForward = refTopkForward(logits.data, c.tokens, c.experts, ref);
  // caller buffers, reused across calls: no fresh output arrays to allocate and first-touch
  const outs = {
    probsOut: new Float32Array(n),
    intermediateOut: new Float32Array(n),
    routingMapOut: new Uint8Array(n),
  };
  const gradLogitsOut = new Float32Array(n);

  Deno.bench({
    name: "plain TypeScript reference",
    group: `${c.name}: forward`,
    baseline: true,
    n: 3,
    warmup: 1,
    fn: () => {
      refTopkForward(logits.data, c.tokens, c.experts, ref);
    },
  });
  const forwards: Array<[string, TopkOptions | TopkInferenceOptions]> = [
    ["WebAssembly SIMD", c.options],
    ["WebAssembly SIMD, caller buffers", { ...c.options, ...outs }],
    ["WebAssembly SIMD, routing alone (saveForBackward: false)", { ...c.options, saveForBackward: false }],
  ];
  for (const [name, options] of forwards) {
    Deno.bench({
      name,
      group: `${c.name}: forward`,
      n: 30,
      warmup: 10,
      fn: async () => {
        await router.fusedTopkWithScoreFunction(logits, options as TopkOptions);
      },
    });
  }
  Deno.bench({
    name: "plain TypeScript reference",
    group: `${c.name}: backward`,
    baseline: true,
    n: 3,
    warmup: 1,
    fn: () => {
      refTopkBackward(refForward, grad.data);
    },
  });
  Deno.bench({
    name: "WebAssembly SIMD",
    group: `${c.name}: backward`,
    n: 30,
    warmup: 10,
    fn: async () => {
      await router.fusedTopkWithScoreFunctionBackward(saved, grad);
    },
  });
  Deno.bench({
    name: "WebAssembly SIMD, caller buffers",
    group: `${c.name}: backward`,
    n: 30,
    warmup: 10,
    fn: async () => {
      await router.fusedTopkWithScoreFunctionBackward(saved, grad, { gradLogitsOut });
    },
  });
}
