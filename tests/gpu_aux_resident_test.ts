// The aux-loss helpers on GPU-resident tensors: the same bits as the host
// path of the same WebGPU router (forward and backward, every dtype, both
// score functions families, both map layouts, mixed host / GPU arguments),
// work split beyond lowered limits, integer token counts widened as the host
// widens them, and every error raised before any GPU work.
import assert from "node:assert";
import { createRouter, fusedMoEAuxLossBackward, readGpuTensor, toGpuTensor } from "../mod.ts";
import type {
  AuxLossOptions,
  DType,
  FloatDType,
  FloatTensor,
  GpuTensor,
  RoutingMapFormat,
  ScoreFunction,
  Tensor,
  TokensPerExpertDType,
} from "../mod.ts";
import { assertArrayEqual, assertBitIdentical, assertClose } from "./_assert.ts";
import { CROSS_TOLERANCE, mulberry32, routableTensor } from "./_generators.ts";
import { narrowTo } from "./reference.ts";
import { countedDevice } from "./_gpu.ts";

const hasGpu = (await navigator.gpu?.requestAdapter()) != null;

/** Usage of every buffer the router returns: STORAGE | COPY_SRC | COPY_DST. */
const OUTPUT_USAGE = 0x80 | 0x04 | 0x08;

type Router = Awaited<ReturnType<typeof createRouter>>;

/** Reads a GpuTensor back, checking it is a new output buffer of the router. */
async function read<D extends DType>(router: Router, t: GpuTensor<D>, label: string): Promise<Tensor<D>> {
  assert.ok(t.buffer instanceof GPUBuffer, `${label} stays on the GPU`);
  assert.strictEqual(t.buffer.usage, OUTPUT_USAGE, `${label} usage`);
  return await readGpuTensor(router.device!, t);
}

/** A float tensor of `shape` with seeded values in [lo, hi), representable in `dtype`. */
function floats(shape: number[], dtype: FloatDType, seed: number, lo = -0.5, hi = 0.5): FloatTensor {
  const r = mulberry32(seed);
  const n = shape.reduce((a, b) => a * b, 1);
  const v = Float32Array.from({ length: n }, () => lo + (hi - lo) * r());
  return { data: narrowTo(v, dtype), shape, dtype } as FloatTensor;
}

/** Token counts of `cols` experts in `dtype` (seeded, up to 1000). */
function counts(cols: number, dtype: TokensPerExpertDType, seed: number): Tensor<TokensPerExpertDType> {
  const r = mulberry32(seed);
  const v = Array.from({ length: cols }, () => Math.floor(r() * 1000));
  if (dtype === "int32") return { data: Int32Array.from(v), shape: [cols], dtype };
  if (dtype === "int64") return { data: BigInt64Array.from(v, BigInt), shape: [cols], dtype };
  const f = Float32Array.from(v, (x) => x + 0.25);
  return { data: narrowTo(f, dtype === "bfloat16" ? "bfloat16" : "float32"), shape: [cols], dtype } as Tensor<
    TokensPerExpertDType
  >;
}

interface ScoresCase {
  shape: number[];
  dtype: FloatDType;
  score: ScoreFunction;
  topk: number;
}

const SCORES_CASES: ScoresCase[] = [
  { shape: [37, 64], dtype: "float32", score: "softmax", topk: 4 },
  { shape: [19, 130], dtype: "bfloat16", score: "sigmoid", topk: 8 },
  { shape: [23, 33], dtype: "float16", score: "sqrtsoftplus", topk: 3 },
  { shape: [5, 1000], dtype: "float32", score: "sigmoid", topk: 40 }, // radix selection
  { shape: [3, 7, 20], dtype: "float16", score: "softmax", topk: 2 }, // leading dimensions kept
];

Deno.test({
  name: "GPU-resident aux scores give the host path's bits, forward and backward, and agree with wasm",
  ignore: !hasGpu,
  async fn(t) {
    const router = await createRouter({ backend: "webgpu" });
    const cpu = await createRouter({ backend: "wasm" });
    const device = router.device!;
    try {
      for (const [n, c] of SCORES_CASES.entries()) {
        await t.step(`[${c.shape}] ${c.dtype} ${c.score} topk=${c.topk}`, async () => {
          const E = c.shape.at(-1)!;
          const T = c.shape.slice(0, -1).reduce((a, b) => a * b, 1);
          const flat = routableTensor(
            { T, E, dtype: c.dtype, options: { topk: c.topk, scoreFunction: c.score } },
            300 + n,
          );
          const logits = { ...flat, shape: c.shape } as FloatTensor;
          const grad = { ...floats(c.shape, "float32", 400 + n), dtype: "float32" } as Tensor<"float32">;
          const x = toGpuTensor(device, logits);
          const g = toGpuTensor(device, grad);
          for (const routingMapFormat of ["bytemap", "bitmap_u8"] as RoutingMapFormat[]) {
            const label = routingMapFormat;
            const options = { topk: c.topk, scoreFunction: c.score, routingMapFormat };
            const host = await router.fusedComputeScoreForMoEAuxLoss(logits, options);
            const hostGrad = await router.fusedComputeScoreForMoEAuxLossBackward(host.saved, grad);
            const res = await router.fusedComputeScoreForMoEAuxLoss(x, options);
            assert.strictEqual(res.saved.gpuResident, true, "a GPU-resident state");
            assert.notStrictEqual(host.saved.gpuResident, true, "a host state");
            for (
              const [name, a, b] of [
                ["scores", res.scores, host.scores],
                ["routingMap", res.routingMap, host.routingMap],
                ["intermediate", res.intermediate, host.intermediate],
              ] as const
            ) {
              assert.deepStrictEqual(a.shape, b.shape, `${label} ${name} shape`);
              assert.strictEqual(a.dtype, b.dtype, `${label} ${name} dtype`);
              assertBitIdentical((await read(router, a, name)).data, b.data, `${label} ${name}`);
            }
            const gradGpu = await router.fusedComputeScoreForMoEAuxLossBackward(res.saved, g);
            assert.deepStrictEqual(gradGpu.shape, c.shape);
            assert.strictEqual(gradGpu.dtype, c.dtype);
            assertBitIdentical((await read(router, gradGpu, "gradLogits")).data, hostGrad.data, `${label} gradLogits`);
            // mixed: GPU forward + host gradScores (host result), host forward + GPU gradScores (GPU result)
            const a = await router.fusedComputeScoreForMoEAuxLossBackward(res.saved, grad);
            assert.ok(a.data instanceof hostGrad.data.constructor, "a host gradient gives a host result");
            assertBitIdentical(a.data, hostGrad.data, `${label} GPU forward, host gradScores`);
            const b = await router.fusedComputeScoreForMoEAuxLossBackward(host.saved, g);
            assertBitIdentical((await read(router, b, "mixed")).data, hostGrad.data, `${label} host forward, GPU grad`);
            // the values themselves: the WebAssembly backend within tolerance, the same routing map
            const ref = await cpu.fusedComputeScoreForMoEAuxLoss(logits, options);
            const refGrad = await cpu.fusedComputeScoreForMoEAuxLossBackward(ref.saved, grad);
            assertArrayEqual(host.routingMap.data, ref.routingMap.data, `${label} routing map against wasm`);
            assertClose(host.scores.data, ref.scores.data, CROSS_TOLERANCE.float32, `${label} scores against wasm`);
            const tol = CROSS_TOLERANCE[c.dtype];
            assertClose(readFloat(hostGrad), readFloat(refGrad), tol, `${label} gradLogits against wasm`);
            for (const o of [res.scores, res.routingMap, res.intermediate, gradGpu, b]) o.buffer.destroy();
          }
          x.buffer.destroy();
          g.buffer.destroy();
        });
      }
    } finally {
      router.dispose();
      cpu.dispose();
    }
  },
});

/** A float tensor's values as float32. */
function readFloat(t: FloatTensor): Float32Array {
  if (t.dtype === "bfloat16") {
    return new Float32Array(Uint32Array.from(t.data as Uint16Array, (b) => b << 16).buffer);
  }
  return Float32Array.from(t.data as ArrayLike<number>);
}

interface LossCase {
  shape: [number, number];
  dtype: FloatDType;
  numExperts: number;
}

const LOSS_CASES: LossCase[] = [
  { shape: [37, 64], dtype: "float32", numExperts: 64 },
  { shape: [200, 130], dtype: "bfloat16", numExperts: 65 }, // rows over several 64-row chunks; cols = 2 * E
  { shape: [45, 33], dtype: "float16", numExperts: 33 }, // odd 16-bit rows
];

const TPE_DTYPES: TokensPerExpertDType[] = ["int32", "int64", "float32", "bfloat16"];

Deno.test({
  name: "the GPU-resident aux loss gives the host path's bits, forward and backward, for every gradLoss form",
  ignore: !hasGpu,
  async fn(t) {
    const router = await createRouter({ backend: "webgpu" });
    const device = router.device!;
    try {
      for (const [n, c] of LOSS_CASES.entries()) {
        await t.step(`[${c.shape}] ${c.dtype} numExperts=${c.numExperts}`, async () => {
          const probs = floats(c.shape, c.dtype, 500 + n, 0, 1);
          const p = toGpuTensor(device, probs);
          const options: AuxLossOptions = {
            totalNumTokens: c.shape[0],
            numExperts: c.numExperts,
            topk: 4,
            coeff: 0.01,
          };
          for (const [m, dt] of TPE_DTYPES.entries()) {
            const label = `tokensPerExpert ${dt}`;
            const tpe = counts(c.shape[1], dt, 600 + m);
            const tpeGpu = toGpuTensor(device, tpe);
            const host = await router.fusedMoEAuxLoss(probs, tpe, options);
            const hostGrad = await router.fusedMoEAuxLossBackward(host.saved, 1.5);
            // GPU probs with host or GPU counts; host probs with GPU counts
            for (const counted of [tpe, tpeGpu]) {
              const res = await router.fusedMoEAuxLoss(p, counted, options);
              assert.strictEqual(res.saved.gpuResident, true);
              assert.deepStrictEqual(res.loss.shape, []);
              assert.strictEqual(res.loss.dtype, c.dtype);
              assertBitIdentical((await read(router, res.loss, "loss")).data, host.loss.data, `${label} loss`);
              // gradLoss: a number, a host tensor, a GPU tensor: a GPU-resident forward gives a GPU gradProbs
              const g1 = await router.fusedMoEAuxLossBackward(res.saved, 1.5);
              const g2 = await router.fusedMoEAuxLossBackward(res.saved, {
                data: new Float32Array([1.5]),
                shape: [1],
                dtype: "float32",
              });
              const gl = toGpuTensor(device, {
                data: narrowTo(new Float32Array([1.5]), c.dtype),
                shape: [],
                dtype: c.dtype,
              });
              const g3 = await router.fusedMoEAuxLossBackward(res.saved, gl as GpuTensor<FloatDType>);
              for (const [name, g] of [["number", g1], ["host tensor", g2], ["GPU tensor", g3]] as const) {
                assert.deepStrictEqual(g.shape, c.shape, `${label} gradProbs (${name}) shape`);
                assert.strictEqual(g.dtype, c.dtype);
                assertBitIdentical(
                  (await read(router, g, "gradProbs")).data,
                  hostGrad.data,
                  `${label} gradProbs (gradLoss a ${name}${counted === tpe ? "" : ", GPU counts"})`,
                );
                g.buffer.destroy();
              }
              for (const o of [res.loss, gl]) o.buffer.destroy();
            }
            const mixed = await router.fusedMoEAuxLoss(probs, tpeGpu, options);
            assert.ok(mixed.loss.data instanceof host.loss.data.constructor, "host probs give a host loss");
            assert.notStrictEqual(mixed.saved.gpuResident, true);
            assertBitIdentical(mixed.loss.data, host.loss.data, `${label} host probs, GPU counts: loss`);
            const mixedGrad = await router.fusedMoEAuxLossBackward(mixed.saved, 1.5);
            assertBitIdentical(mixedGrad.data, hostGrad.data, `${label} host probs, GPU counts: gradProbs`);
            // a host forward with a GPU-resident gradLoss gives a GPU gradProbs
            const gl = toGpuTensor(device, { data: new Float32Array([1.5]), shape: [1], dtype: "float32" });
            const g4 = await router.fusedMoEAuxLossBackward(host.saved, gl as GpuTensor<FloatDType>);
            assertBitIdentical(
              (await read(router, g4, "gradProbs")).data,
              hostGrad.data,
              `${label} host forward, GPU gradLoss`,
            );
            for (const o of [g4, gl, tpeGpu]) o.buffer.destroy();
          }
          p.buffer.destroy();
        });
      }
      await t.step("an empty batch: a zero loss, even after a call that left sums in the pool", async () => {
        const tpe = counts(8, "int32", 1);
        const options = { totalNumTokens: 1, numExperts: 8, topk: 1, coeff: 1 };
        await router.fusedMoEAuxLoss(floats([10, 8], "float32", 2, 1, 2), tpe, options);
        const empty: FloatTensor = { data: new Float32Array(0), shape: [0, 8], dtype: "float32" };
        const host = await router.fusedMoEAuxLoss(empty, tpe, options);
        assert.strictEqual(host.loss.data[0], 0, "host path");
        await router.fusedMoEAuxLoss(toGpuTensor(device, floats([10, 8], "float32", 3, 1, 2)), tpe, options);
        const res = await router.fusedMoEAuxLoss(toGpuTensor(device, empty), toGpuTensor(device, tpe), options);
        assert.strictEqual((await read(router, res.loss, "loss")).data[0], 0, "GPU-resident");
        const g = await router.fusedMoEAuxLossBackward(res.saved, 1);
        assert.deepStrictEqual(g.shape, [0, 8]);
      });
    } finally {
      router.dispose();
    }
  },
});

Deno.test({
  name: "GPU-resident integer token counts are widened as the host widens them (fround of Number)",
  ignore: !hasGpu,
  async fn() {
    const router = await createRouter({ backend: "webgpu" });
    const device = router.device!;
    // constant = numExperts * coeff / (topk * totalNumTokens^2) = 8 * 0.125 / 1 = 1: gradProbs = widened counts
    const options = { totalNumTokens: 1, numExperts: 8, topk: 1, coeff: 0.125 };
    const probs: FloatTensor = { data: new Float32Array(8).fill(1), shape: [1, 8], dtype: "float32" };
    const cases: Tensor<TokensPerExpertDType>[] = [
      {
        data: new Int32Array([0, -5, 16777217, 16777219, 2147483647, -2147483648, 33554435, -16777217]),
        shape: [8],
        dtype: "int32",
      },
      {
        data: new BigInt64Array([
          9007199254740993n, // 2^53 + 1
          (1n << 60n) + (1n << 36n) + 1n, // a double rounds it onto a float tie: fround(Number(v)) = 2^60
          -((1n << 60n) + (1n << 36n) + 1n),
          9223372036854775807n, // 2^63 - 1
          -9223372036854775808n, // -2^63
          (1n << 40n) + (1n << 16n), // a tie at 24 bits: to even
          (1n << 40n) + (3n << 16n), // a tie at 24 bits: to even (up)
          4294967297n, // 2^32 + 1
        ]),
        shape: [8],
        dtype: "int64",
      },
      {
        // no subnormal: WGSL lets GPUs flush them to 0 in arithmetic (the H200 does, in gradProbs = g * tpe)
        data: new Uint16Array([0x3f80, 0xbf80, 0x4b80, 0x0081, 0x7f7f, 0x8000, 0x4000, 0x3e00]),
        shape: [8],
        dtype: "bfloat16",
      },
    ];
    try {
      for (const tpe of cases) {
        const expected = tpe.dtype === "bfloat16"
          ? new Float32Array(Uint32Array.from(tpe.data as Uint16Array, (b) => b << 16).buffer)
          : Float32Array.from(tpe.data as ArrayLike<number | bigint>, (v) => Math.fround(Number(v)));
        const tpeGpu = toGpuTensor(device, tpe);
        const host = await router.fusedMoEAuxLossBackward((await router.fusedMoEAuxLoss(probs, tpe, options)).saved, 1);
        assertBitIdentical(host.data, expected, `${tpe.dtype}: the host path`);
        const res = await router.fusedMoEAuxLoss(toGpuTensor(device, probs), tpeGpu, options);
        const g = await read(router, await router.fusedMoEAuxLossBackward(res.saved, 1), "gradProbs");
        assertBitIdentical(g.data, expected, `${tpe.dtype}: widened on the GPU`);
        const loss = (await read(router, res.loss, "loss")).data;
        const hostLoss = (await router.fusedMoEAuxLoss(probs, tpe, options)).loss.data;
        assertBitIdentical(loss, hostLoss, `${tpe.dtype}: loss`);
      }
    } finally {
      router.dispose();
    }
  },
});

Deno.test({
  name: "GPU-resident aux work beyond the binding and dispatch limits is split and gives the same bits",
  ignore: !hasGpu,
  async fn() {
    // limits lowered on purpose: 64 KiB per binding, 4 workgroups per grid dimension
    const small = await createRouter({
      backend: "webgpu",
      webgpu: { maxBindingBytes: 65536, maxWorkgroupsPerDimension: 4 },
    });
    const plain = await createRouter({ backend: "webgpu" });
    try {
      const cases = [
        { T: 1000, E: 64, dtype: "float32" as const, score: "sigmoid" as const },
        { T: 999, E: 33, dtype: "bfloat16" as const, score: "softmax" as const },
      ];
      for (const [n, c] of cases.entries()) {
        const logits = floats([c.T, c.E], c.dtype, 700 + n, -3, 3);
        const grad = floats([c.T, c.E], "float32", 800 + n) as Tensor<"float32">;
        const options = { topk: 4, scoreFunction: c.score, routingMapFormat: "bitmap_u8" as const };
        const results: ArrayBufferView[][] = [];
        for (const r of [small, plain]) {
          const res = await r.fusedComputeScoreForMoEAuxLoss(toGpuTensor(r.device!, logits), options);
          const g = await r.fusedComputeScoreForMoEAuxLossBackward(res.saved, toGpuTensor(r.device!, grad));
          const tpe = toGpuTensor(r.device!, counts(c.E, "int64", 9));
          const probs = toGpuTensor(r.device!, floats([c.T, c.E], c.dtype, 900 + n, 0, 1));
          const loss = await r.fusedMoEAuxLoss(probs, tpe, { totalNumTokens: c.T, numExperts: c.E, topk: 4, coeff: 1 });
          const gp = await r.fusedMoEAuxLossBackward(loss.saved, 0.5);
          results.push(
            await Promise.all(
              [res.scores, res.routingMap, res.intermediate, g, loss.loss, gp].map(async (x) =>
                (await read(r, x as GpuTensor, "output")).data
              ),
            ),
          );
        }
        const names = ["scores", "routingMap", "intermediate", "gradLogits", "loss", "gradProbs"];
        names.forEach((name, i) => assertBitIdentical(results[0]![i]!, results[1]![i]!, `[${c.T}, ${c.E}] ${name}`));
      }
    } finally {
      small.dispose();
      plain.dispose();
    }
  },
});

Deno.test({
  name: "GPU-resident aux calls refuse bad arguments before any GPU work, and leak no buffer",
  ignore: !hasGpu,
  async fn(t) {
    const { device, live, counts: made } = await countedDevice();
    const router = await createRouter({ backend: "webgpu", webgpu: { device } });
    const cpu = await createRouter({ backend: "wasm" });
    const other = await createRouter({ backend: "webgpu" });
    const E = 8;
    const buf = (size: number, usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST) =>
      device.createBuffer({ size, usage });
    const logits: GpuTensor<"float32"> = { buffer: buf(64), shape: [2, E], dtype: "float32" };
    const grad: GpuTensor<"float32"> = { buffer: buf(64), shape: [2, E], dtype: "float32" };
    const tpe: GpuTensor<"int32"> = { buffer: buf(32), shape: [E], dtype: "int32" };
    const one: GpuTensor<"float32"> = { buffer: buf(4), shape: [], dtype: "float32" };
    const two: GpuTensor<"float32"> = { buffer: buf(8), shape: [2], dtype: "float32" };
    const noStorage = buf(64, GPUBufferUsage.COPY_SRC);
    const scoresOptions = { topk: 2, scoreFunction: "sigmoid" as const };
    const lossOptions = { totalNumTokens: 2, numExperts: E, topk: 2, coeff: 1 };
    try {
      const scores = await router.fusedComputeScoreForMoEAuxLoss(logits, scoresOptions);
      const loss = await router.fusedMoEAuxLoss(logits, tpe, lossOptions);
      const hostLogits: FloatTensor = { data: new Float32Array(2 * E), shape: [2, E], dtype: "float32" };
      const cpuScores = await cpu.fusedComputeScoreForMoEAuxLoss(hostLogits, scoresOptions);
      const cpuLoss = await cpu.fusedMoEAuxLoss(hostLogits, { data: new Int32Array(E), shape: [E], dtype: "int32" }, {
        ...lossOptions,
      });
      // every call of the table must fail with its error, creating no buffer at all
      const table: [string, () => Promise<unknown>, typeof TypeError | typeof RangeError | typeof Error, RegExp][] = [
        [
          "GPU logits on a wasm router",
          () => cpu.fusedComputeScoreForMoEAuxLoss(logits, scoresOptions),
          TypeError,
          /logits is a GpuTensor: GPU-resident tensors need a router on the webgpu backend, this one runs wasm/,
        ],
        [
          "GPU probs on a wasm router",
          () => cpu.fusedMoEAuxLoss(logits, tpe, lossOptions),
          TypeError,
          /probs is a GpuTensor: .* this one runs wasm/,
        ],
        [
          "GPU tokensPerExpert on a wasm router",
          () => cpu.fusedMoEAuxLoss(hostLogits, tpe, lossOptions),
          TypeError,
          /tokensPerExpert is a GpuTensor: .* this one runs wasm/,
        ],
        [
          "GPU gradScores on a wasm router",
          () => cpu.fusedComputeScoreForMoEAuxLossBackward(cpuScores.saved, grad),
          TypeError,
          /gradScores is a GpuTensor: .* this one runs wasm/,
        ],
        [
          "GPU gradLoss on a wasm router",
          () => cpu.fusedMoEAuxLossBackward(cpuLoss.saved, one),
          TypeError,
          /gradLoss is a GpuTensor: .* this one runs wasm/,
        ],
        [
          "a GPU-resident state on a wasm router",
          () => cpu.fusedComputeScoreForMoEAuxLossBackward(scores.saved, hostLogits as Tensor<"float32">),
          TypeError,
          /saved comes from the webgpu backend, this router runs wasm/,
        ],
        [
          "a wasm state with GPU gradScores",
          () => router.fusedComputeScoreForMoEAuxLossBackward(cpuScores.saved, grad),
          TypeError,
          /saved comes from the wasm backend, this router runs webgpu/,
        ],
        [
          "an aux-scores state to the aux-loss backward",
          () => router.fusedMoEAuxLossBackward(scores.saved, one),
          TypeError,
          /saved must come from fusedMoEAuxLoss, got a state from fusedComputeScoreForMoEAuxLoss/,
        ],
        [
          "a GPU-resident aux-loss state to the module-level backward",
          () => fusedMoEAuxLossBackward(loss.saved, 1),
          TypeError,
          /saved comes from a GPU-resident fusedMoEAuxLoss: run its backward on the router that ran it/,
        ],
        [
          "integer logits",
          () => router.fusedComputeScoreForMoEAuxLoss({ ...logits, dtype: "int32" } as never, scoresOptions),
          TypeError,
          /logits.dtype must be one of float32, float16, bfloat16, got "int32"/,
        ],
        [
          "topk beyond E",
          () => router.fusedComputeScoreForMoEAuxLoss(logits, { ...scoresOptions, topk: 9 }),
          RangeError,
          /topk must be an integer in \[1, numExperts=8\], got 9/,
        ],
        [
          "checkFinite with GPU logits",
          () => router.fusedComputeScoreForMoEAuxLoss(logits, { ...scoresOptions, checkFinite: true } as never),
          TypeError,
          /checkFinite applies to host logits/,
        ],
        [
          "a logits buffer too small",
          () => router.fusedComputeScoreForMoEAuxLoss({ ...logits, shape: [3, E] }, scoresOptions),
          TypeError,
          /logits.buffer must hold at least 96 bytes .*, got 64/,
        ],
        [
          "a logits buffer without STORAGE",
          () => router.fusedComputeScoreForMoEAuxLoss({ ...logits, buffer: noStorage }, scoresOptions),
          TypeError,
          /logits.buffer must have GPUBufferUsage.STORAGE/,
        ],
        [
          "float16 gradScores",
          () => router.fusedComputeScoreForMoEAuxLossBackward(scores.saved, { ...grad, dtype: "float16" } as never),
          TypeError,
          /gradScores.dtype must be float32.*got float16/,
        ],
        [
          "gradScores of another shape",
          () => router.fusedComputeScoreForMoEAuxLossBackward(scores.saved, { ...grad, shape: [4, 4] }),
          TypeError,
          /gradScores.shape must be \[2, 8\] .*got \[4, 4\]/,
        ],
        [
          "3-D GPU probs",
          () => router.fusedMoEAuxLoss({ ...logits, shape: [1, 2, E] }, tpe, lossOptions),
          TypeError,
          /probs must be 2-D \[tokens, cols\], got shape \[1, 2, 8\]/,
        ],
        [
          "GPU tokensPerExpert of the wrong length",
          () => router.fusedMoEAuxLoss(logits, { ...tpe, shape: [4] }, lossOptions),
          TypeError,
          /tokensPerExpert.shape must be \[8\] \(the columns of probs\), got \[4\]/,
        ],
        [
          "float16 GPU tokensPerExpert",
          () => router.fusedMoEAuxLoss(logits, { ...tpe, dtype: "float16" } as never, lossOptions),
          TypeError,
          /tokensPerExpert.dtype must be one of int32, int64, float32, bfloat16, got "float16"/,
        ],
        [
          "a GPU tokensPerExpert too small for int64",
          () => router.fusedMoEAuxLoss(logits, { ...tpe, dtype: "int64" } as never, lossOptions),
          TypeError,
          /tokensPerExpert.buffer must hold at least 64 bytes/,
        ],
        [
          "numExperts not dividing the columns",
          () => router.fusedMoEAuxLoss(logits, tpe, { ...lossOptions, numExperts: 3 }),
          RangeError,
          /numExperts must divide the columns of probs \(8\), got 3/,
        ],
        [
          "a GPU gradLoss of two elements",
          () => router.fusedMoEAuxLossBackward(loss.saved, two),
          TypeError,
          /gradLoss must be a one-element tensor \(shape \[\] or \[1\]\), got a GpuTensor of shape \[2\]/,
        ],
        [
          "an int32 GPU gradLoss",
          () => router.fusedMoEAuxLossBackward(loss.saved, { ...one, dtype: "int32" } as never),
          TypeError,
          /gradLoss.dtype must be one of float32, float16, bfloat16, got "int32"/,
        ],
        [
          "a string gradLoss",
          () => router.fusedMoEAuxLossBackward(loss.saved, "1" as never),
          TypeError,
          /gradLoss must be a number or a one-element float tensor \(host or GpuTensor\), got "1"/,
        ],
      ];
      for (const [name, call, cls, message] of table) {
        await t.step(name, async () => {
          const before = made.created;
          const error = await call().then(() => null, (e: unknown) => e);
          assert.ok(error instanceof cls, `${name}: expected a ${cls.name}, got ${error}`);
          assert.strictEqual(error.constructor, cls, `${name}: ${error.constructor.name}`);
          assert.match(error.message, message);
          assert.strictEqual(made.created, before, `${name}: buffers created before the error`);
        });
      }

      await t.step("a released GPU-resident state is refused; a live one may be used twice", async () => {
        const s = await router.fusedComputeScoreForMoEAuxLoss(logits, scoresOptions);
        const a = await router.fusedComputeScoreForMoEAuxLossBackward(s.saved, grad);
        const b = await router.fusedComputeScoreForMoEAuxLossBackward(s.saved, grad);
        assertBitIdentical((await read(router, a, "a")).data, (await read(router, b, "b")).data, "twice");
        const l = await router.fusedMoEAuxLoss(logits, tpe, lossOptions);
        s.saved.release();
        l.saved.release();
        assert.strictEqual(s.saved.released, true);
        await assert.rejects(() => router.fusedComputeScoreForMoEAuxLossBackward(s.saved, grad), /saved was released/);
        await assert.rejects(() => router.fusedMoEAuxLossBackward(l.saved, 1), /saved was released/);
        for (const o of [a, b, s.scores, s.routingMap, s.intermediate, l.loss]) o.buffer.destroy();
      });

      await t.step(
        "a buffer of another device is refused by the call (top-k too), and its outputs are destroyed",
        async () => {
          const foreign = other.device!.createBuffer({ size: 64, usage: GPUBufferUsage.STORAGE });
          const topkOptions = { topk: 2, scoreFunction: "sigmoid" as const };
          const topk = await router.fusedTopkWithScoreFunction(logits, topkOptions);
          const calls: [string, () => Promise<unknown>][] = [
            ["top-k", () => router.fusedTopkWithScoreFunction({ ...logits, buffer: foreign }, topkOptions)],
            [
              "top-k backward",
              () => router.fusedTopkWithScoreFunctionBackward(topk.saved, { ...grad, buffer: foreign }),
            ],
            ["aux scores", () => router.fusedComputeScoreForMoEAuxLoss({ ...logits, buffer: foreign }, scoresOptions)],
            [
              "aux scores backward",
              () => router.fusedComputeScoreForMoEAuxLossBackward(scores.saved, { ...grad, buffer: foreign }),
            ],
            ["aux loss", () => router.fusedMoEAuxLoss({ ...logits, buffer: foreign }, tpe, lossOptions)],
            ["aux loss backward", () => router.fusedMoEAuxLossBackward(loss.saved, { ...one, buffer: foreign })],
          ];
          for (const [name, call] of calls) {
            await call().catch(() => {}); // warm: the pool's scratch buffers
            const alive = live.size;
            await assert.rejects(call, /webgpu: the router's commands were refused/, name);
            assert.strictEqual(live.size, alive, `${name}: GPU buffers alive after a refused call`);
          }
          for (const o of [topk.probs, topk.intermediate, topk.indices ?? topk.routingMap!]) o.buffer.destroy();
          foreign.destroy();
        },
      );

      await t.step("repeated GPU-resident calls keep the GPU buffers alive flat", async () => {
        const round = async () => {
          const s = await router.fusedComputeScoreForMoEAuxLoss(logits, scoresOptions);
          const g = await router.fusedComputeScoreForMoEAuxLossBackward(s.saved, grad);
          const l = await router.fusedMoEAuxLoss(logits, tpe, lossOptions);
          const gp = await router.fusedMoEAuxLossBackward(l.saved, one);
          for (const o of [s.scores, s.routingMap, s.intermediate, g, l.loss, gp]) o.buffer.destroy();
        };
        await round();
        const alive = live.size;
        for (let i = 0; i < 10; i++) await round();
        assert.strictEqual(live.size, alive, "GPU buffers alive after 10 more rounds");
      });
    } finally {
      router.dispose();
      cpu.dispose();
      other.dispose();
      device.destroy();
    }
  },
});

Deno.test({
  name: "the overloads type GPU-resident aux results as GpuTensors and host ones as host tensors",
  ignore: !hasGpu,
  async fn() {
    const router = await createRouter({ backend: "webgpu" });
    const device = router.device!;
    try {
      const probs: FloatTensor = { data: new Float32Array([0.5, 0.5, 1, 0]), shape: [2, 2], dtype: "float32" };
      const tpe: Tensor = { data: new Int32Array([1, 1]), shape: [2], dtype: "int32" };
      const options = { totalNumTokens: 2, numExperts: 2, topk: 1, coeff: 1 };
      const gpu = await router.fusedMoEAuxLoss(toGpuTensor(device, probs), tpe, options);
      const host = await router.fusedMoEAuxLoss(probs, tpe, options);
      // these assignments type-check only if the overloads resolve as documented
      const gpuGrad: GpuTensor<FloatDType> = await router.fusedMoEAuxLossBackward(gpu.saved, 1);
      const hostGrad: FloatTensor = await router.fusedMoEAuxLossBackward(host.saved, 1);
      const gpuLoss: GpuTensor<FloatDType> = gpu.loss;
      assert.ok(gpuGrad.buffer instanceof GPUBuffer && gpuLoss.buffer instanceof GPUBuffer);
      assert.ok(hostGrad.data instanceof Float32Array);
      assert.deepStrictEqual([...hostGrad.data], [0.5, 0.5, 0.5, 0.5]); // 1 * tokens * 2 / (1 * 2^2)
      assert.deepStrictEqual([...(await readGpuTensor(device, gpuGrad)).data], [0.5, 0.5, 0.5, 0.5]);
      assert.deepStrictEqual([...(await readGpuTensor(device, gpuLoss)).data], [1]);
    } finally {
      router.dispose();
    }
  },
});

Deno.test({
  name: "the webgpu host aux-scores state owns its intermediate: editing the returned one changes no gradient",
  ignore: !hasGpu,
  async fn() {
    const router = await createRouter({ backend: "webgpu" });
    try {
      const logits = floats([4, 16], "float32", 11, -2, 2);
      const grad = floats([4, 16], "float32", 12) as Tensor<"float32">;
      const options = { topk: 4, scoreFunction: "sigmoid" as const };
      const expected = await router.fusedComputeScoreForMoEAuxLossBackward(
        (await router.fusedComputeScoreForMoEAuxLoss(logits, options)).saved,
        grad,
      );
      const r = await router.fusedComputeScoreForMoEAuxLoss(logits, options);
      r.intermediate.data.fill(0.5);
      const g = await router.fusedComputeScoreForMoEAuxLossBackward(r.saved, grad);
      assertBitIdentical(g.data, expected.data, "aux backward after intermediate.data.fill(0.5)");
    } finally {
      router.dispose();
    }
  },
});
