/**
 * The router: validated entry points bound to one backend.
 *
 * @module
 */
import { type Backend, type HostIntermediate, Saved } from "./_backend.ts";
import type {
  AuxLossOptions,
  AuxLossResult,
  AuxScoresOptions,
  AuxScoresResult,
  BackendChoice,
  BackendName,
  FloatDType,
  FloatTensor,
  GpuAuxLossResult,
  GpuAuxScoresOptions,
  GpuAuxScoresResult,
  GpuSavedState,
  GpuTensor,
  GpuTopkInferenceOptions,
  GpuTopkInferenceResult,
  GpuTopkOptions,
  GpuTopkResult,
  IndexArray,
  IndexDType,
  SavedState,
  Tensor,
  TokensPerExpertDType,
  TopkInferenceOptions,
  TopkInferenceResult,
  TopkOptions,
  TopkResult,
} from "./_types.ts";
import {
  type AuxLossPlan,
  type AuxScoresPlan,
  checkGrad,
  checkGradLoss,
  type GpuAuxLossPlan,
  isGpuTensor,
  isHostAuxLossPlan,
  outputBuffer,
  planAuxLoss,
  planAuxScores,
  planTopk,
  type TopkPlan,
} from "./_validate.ts";
import { ARRAY_OF, describe } from "./tensor.ts";
import { WasmBackend } from "./wasm/backend.ts";
import { autoPolicy, WebGpuBackend, type WebGpuBackendOptions } from "./gpu/backend.ts";

/** Options of the top-k backward. */
export interface BackwardOptions {
  /** Caller buffer for gradLogits (logits dtype, T*E): written in place and returned, no allocation. */
  gradLogitsOut?: FloatTensor["data"];
}

// The caller's buffer when given (filled from `data` unless the backend wrote into it), else `data`.
function into<A extends ArrayBufferView>(buf: A | null | undefined, data: A): A {
  if (buf === null || buf === undefined || buf === data) return data;
  (buf as unknown as { set(src: A): void }).set(data);
  return buf;
}

/** Options of {@linkcode createRouter}. */
export interface RouterOptions {
  /** Backend to run on (default "auto"). */
  backend?: BackendChoice;
  /** WebAssembly: bytes of token data per chunk; bigger batches run in chunks of tokens (default 16 MiB). */
  chunkBytes?: number;
  /**
   * WebAssembly: threads for big batches (default: the hardware threads).
   * Worker threads share one WebAssembly memory; small batches stay on the
   * calling thread; where shared memory is unavailable, one thread is used.
   */
  threads?: number;
  /** WebGPU: options of the device (an existing `device`, profiling, lower limits). */
  webgpu?: WebGpuBackendOptions;
}

/** The router operations bound to one backend. Every operation returns a Promise. */
export interface Router {
  /** The backend the operations run on. */
  readonly backend: BackendName;
  /** Why this backend was chosen (relevant for "auto"). */
  readonly reason: string;
  /** "auto": the backend of the last call and why (null before the first call, and for other choices). */
  readonly lastChoice: { backend: BackendName; reason: string } | null;
  /** CPU threads big batches run on (WebAssembly; 1 for other backends). */
  readonly threads: number;
  /**
   * The WebGPU device of the router ("webgpu", or "auto" with a hardware
   * adapter), on which GPU-resident tensors ({@linkcode GpuTensor}) must
   * live; null when the router has none.
   */
  readonly device: GPUDevice | null;
  /** See {@linkcode fusedTopkWithScoreFunction}; `saveForBackward: false`: routing alone (no saved state). */
  fusedTopkWithScoreFunction(logits: FloatTensor, options: TopkInferenceOptions): Promise<TopkInferenceResult>;
  /** See {@linkcode fusedTopkWithScoreFunction}. */
  fusedTopkWithScoreFunction(logits: FloatTensor, options: TopkOptions): Promise<TopkResult>;
  /** See {@linkcode fusedTopkWithScoreFunctionBackward}. */
  fusedTopkWithScoreFunctionBackward(
    saved: TopkResult["saved"],
    gradProbs: FloatTensor,
    options?: BackwardOptions,
  ): Promise<FloatTensor>;
  /** See {@linkcode fusedComputeScoreForMoEAuxLoss}. */
  fusedComputeScoreForMoEAuxLoss(logits: FloatTensor, options: AuxScoresOptions): Promise<AuxScoresResult>;
  /** See {@linkcode fusedComputeScoreForMoEAuxLossBackward}. */
  fusedComputeScoreForMoEAuxLossBackward(
    saved: AuxScoresResult["saved"],
    gradScores: Tensor<"float32">,
  ): Promise<FloatTensor>;
  /** See {@linkcode fusedMoEAuxLoss}. */
  fusedMoEAuxLoss(probs: FloatTensor, tokensPerExpert: Tensor, options: AuxLossOptions): Promise<AuxLossResult>;
  /** See {@linkcode fusedMoEAuxLossBackward}. */
  fusedMoEAuxLossBackward(saved: AuxLossResult["saved"], gradLoss: number | FloatTensor): Promise<FloatTensor>;
  /** Frees what the router holds; later calls throw. */
  dispose(): void;
}

/**
 * The GPU-resident forms of the operations, on a router that runs WebGPU
 * ("webgpu", or "auto" with a hardware adapter): inputs are
 * {@linkcode GpuTensor}s on `router.device`, outputs are new GpuTensors the
 * caller owns (usage `STORAGE | COPY_SRC | COPY_DST`), nothing is read back,
 * and the saved state stays on the GPU. Input buffers need
 * `GPUBufferUsage.STORAGE`. A router without WebGPU refuses them (TypeError).
 *
 * Where the result goes: a forward gives GpuTensors when its main input
 * (logits, probs) is GPU-resident; a GPU-resident side input alone
 * (`expertBias`, `tokensPerExpert`) runs the call on the GPU and gives host
 * results. The top-k and aux-scores backward give a GpuTensor when the
 * gradient is one, whatever the forward was. The aux-loss backward, whose
 * gradient is a scalar, gives a GpuTensor when the forward's probs were
 * GPU-resident (`saved.gpuResident`) or `gradLoss` is a GpuTensor.
 *
 * Keep what a saved state reads until its backward has been submitted: the
 * `intermediate` (and routing output) of a GPU-resident forward, and a
 * GPU-resident `tokensPerExpert` (read in place by the aux-loss backward).
 *
 * @example Aux-loss scores and their gradient without a readback (where a WebGPU adapter exists)
 * ```ts
 * import { createRouter, readGpuTensor, toGpuTensor } from "./mod.ts";
 * import assert from "node:assert";
 *
 * if (await navigator.gpu?.requestAdapter()) {
 *   const router = await createRouter({ backend: "webgpu" });
 *   const device = router.device!;
 *   const logits = toGpuTensor(device, { data: new Float32Array([0, 0, 0, 0]), shape: [1, 4], dtype: "float32" });
 *   const { scores, routingMap, saved } = await router.fusedComputeScoreForMoEAuxLoss(logits, {
 *     topk: 1, scoreFunction: "sigmoid",
 *   });
 *   assert.deepStrictEqual([...(await readGpuTensor(device, scores)).data], [0.25, 0.25, 0.25, 0.25]);
 *   assert.deepStrictEqual([...(await readGpuTensor(device, routingMap)).data], [1, 0, 0, 0]);
 *   const gradScores = toGpuTensor(device, { data: new Float32Array(4).fill(1), shape: [1, 4], dtype: "float32" });
 *   const gradLogits = await router.fusedComputeScoreForMoEAuxLossBackward(saved, gradScores);
 *   assert.ok((await readGpuTensor(device, gradLogits)).data.every((v) => Math.abs(v) < 1e-6));
 *   router.dispose();
 * }
 * ```
 *
 * @example The aux loss of GPU-resident probs; its gradient stays on the GPU (where a WebGPU adapter exists)
 * ```ts
 * import { createRouter, readGpuTensor, toGpuTensor } from "./mod.ts";
 * import assert from "node:assert";
 *
 * if (await navigator.gpu?.requestAdapter()) {
 *   const router = await createRouter({ backend: "webgpu" });
 *   const device = router.device!;
 *   const probs = toGpuTensor(device, { data: new Float32Array([0.5, 0.5, 1, 0]), shape: [2, 2], dtype: "float32" });
 *   const tokensPerExpert = toGpuTensor(device, { data: new Int32Array([1, 1]), shape: [2], dtype: "int32" });
 *   const { loss, saved } = await router.fusedMoEAuxLoss(probs, tokensPerExpert, {
 *     totalNumTokens: 2, numExperts: 2, topk: 1, coeff: 1,
 *   });
 *   assert.deepStrictEqual((await readGpuTensor(device, loss)).data[0], 1); // (1.5 + 0.5) * 2 / 4
 *   const gradProbs = await router.fusedMoEAuxLossBackward(saved, 1); // a GpuTensor: the forward was GPU-resident
 *   assert.deepStrictEqual([...(await readGpuTensor(device, gradProbs)).data], [0.5, 0.5, 0.5, 0.5]);
 *   router.dispose();
 * }
 * ```
 */
export interface GpuResidentOps {
  /** Top-k forward on GPU-resident logits, routing alone (`saveForBackward: false`: no intermediate, no saved state). */
  fusedTopkWithScoreFunction(
    logits: GpuTensor<FloatDType>,
    options: GpuTopkInferenceOptions,
  ): Promise<GpuTopkInferenceResult>;
  /** Top-k forward on GPU-resident logits (and optionally a GPU-resident expertBias). */
  fusedTopkWithScoreFunction(logits: GpuTensor<FloatDType>, options: GpuTopkOptions): Promise<GpuTopkResult>;
  /** Top-k backward with GPU-resident gradProbs: gradLogits is a new GpuTensor. */
  fusedTopkWithScoreFunctionBackward(
    saved: TopkResult["saved"],
    gradProbs: GpuTensor<FloatDType>,
  ): Promise<GpuTensor<FloatDType>>;
  /** Aux-loss scores of GPU-resident logits: scores, routingMap and intermediate are new GpuTensors. */
  fusedComputeScoreForMoEAuxLoss(
    logits: GpuTensor<FloatDType>,
    options: GpuAuxScoresOptions,
  ): Promise<GpuAuxScoresResult>;
  /**
   * Aux-scores backward with GPU-resident gradScores: gradLogits is a new
   * GpuTensor (logits dtype). gradScores must be float32 (checked before any
   * GPU work; typed as any float dtype so that the float32 gradProbs of the
   * aux-loss backward passes as it is).
   */
  fusedComputeScoreForMoEAuxLossBackward(
    saved: AuxScoresResult["saved"],
    gradScores: GpuTensor<FloatDType>,
  ): Promise<GpuTensor<FloatDType>>;
  /** Aux loss of GPU-resident probs (tokensPerExpert on the host or the GPU): the loss is a new 0-d GpuTensor. */
  fusedMoEAuxLoss(
    probs: GpuTensor<FloatDType>,
    tokensPerExpert: Tensor | GpuTensor<TokensPerExpertDType>,
    options: AuxLossOptions,
  ): Promise<GpuAuxLossResult>;
  /** Aux loss of host probs with GPU-resident tokensPerExpert: runs on the GPU, the loss comes back to the host. */
  fusedMoEAuxLoss(
    probs: FloatTensor,
    tokensPerExpert: GpuTensor<TokensPerExpertDType>,
    options: AuxLossOptions,
  ): Promise<AuxLossResult>;
  /** Aux-loss backward of a GPU-resident forward: gradProbs is a new GpuTensor, whatever form gradLoss takes. */
  fusedMoEAuxLossBackward(
    saved: GpuSavedState,
    gradLoss: number | FloatTensor | GpuTensor<FloatDType>,
  ): Promise<GpuTensor<FloatDType>>;
  /** Aux-loss backward with a one-element GPU-resident gradLoss: gradProbs is a new GpuTensor. */
  fusedMoEAuxLossBackward(saved: SavedState, gradLoss: GpuTensor<FloatDType>): Promise<GpuTensor<FloatDType>>;
}

const BACKENDS: readonly BackendChoice[] = ["auto", "wasm", "webgpu"];

/**
 * Creates a router bound to one backend. `"wasm"` runs the WebAssembly SIMD
 * kernels on the CPU; `"auto"` picks the best backend available (today:
 * WebAssembly); `"webgpu"` is not available yet and throws.
 *
 * @param options `{ backend }`, default `"auto"`
 * @returns the six router operations bound to the backend, and `dispose()`
 * @throws {TypeError} for an unknown backend; {Error} where it is unavailable
 *
 * @example Route two tokens on the WebAssembly backend
 * ```ts
 * import { createRouter } from "./mod.ts";
 * import assert from "node:assert";
 *
 * const router = await createRouter({ backend: "wasm" });
 * const logits = { data: new Float32Array([0, 3, 1, 2, 5, 4, 0, 1]), shape: [2, 4], dtype: "float32" as const };
 * const { indices } = await router.fusedTopkWithScoreFunction(logits, {
 *   topk: 2, scoreFunction: "sigmoid", indexDtype: "int32",
 * });
 * assert.deepStrictEqual([...indices!.data], [1, 3, 0, 1]);
 * router.dispose();
 * ```
 */
export async function createRouter(options: RouterOptions = {}): Promise<GpuResidentOps & Router> {
  const choice = options.backend ?? "auto";
  if (!BACKENDS.includes(choice)) {
    throw new TypeError(`backend must be one of ${BACKENDS.join(", ")}, got ${describe(choice)}`);
  }
  if (choice === "webgpu") {
    return new BoundRouter(await WebGpuBackend.create(options.webgpu ?? {}), "asked for webgpu");
  }
  const wasmOptions = {
    ...(options.chunkBytes === undefined ? {} : { chunkBytes: positive("chunkBytes", options.chunkBytes) }),
    ...(options.threads === undefined ? {} : { threads: positive("threads", options.threads) }),
  };
  if (choice === "wasm") return new BoundRouter(await WasmBackend.create(wasmOptions), "asked for wasm");
  // auto: WebGPU on a hardware adapter for batches big enough to pay for the round trip, else WebAssembly
  const policy = await autoPolicy();
  const wasm = await WasmBackend.create(wasmOptions);
  if (policy.adapter === null) return new BoundRouter(wasm, `auto: WebAssembly (${policy.reason})`);
  const gpu = await WebGpuBackend.create({ ...options.webgpu, adapter: policy.adapter });
  return new BoundRouter(wasm, `auto: ${policy.reason}`, { backend: gpu, minElements: policy.minElements });
}

function positive(name: string, v: unknown): number {
  if (typeof v !== "number" || !Number.isInteger(v) || v < 1) {
    throw new RangeError(`${name} must be a positive integer, got ${describe(v)}`);
  }
  return v;
}

class BoundRouter implements Router, GpuResidentOps {
  #backend: Backend | null;
  #big: { backend: Backend; minElements: number } | null;
  readonly backend: BackendName;
  readonly reason: string;
  readonly threads: number;
  readonly device: GPUDevice | null;
  lastChoice: { backend: BackendName; reason: string } | null = null;

  /** `big`: auto's second backend (WebGPU), used for calls of at least minElements logits. */
  constructor(backend: Backend, reason: string, big: { backend: Backend; minElements: number } | null = null) {
    this.#backend = backend;
    this.#big = big;
    this.backend = big?.backend.name ?? backend.name;
    this.reason = reason;
    this.threads = backend instanceof WasmBackend ? backend.threads : 1;
    const gpu = big?.backend ?? backend;
    this.device = gpu instanceof WebGpuBackend ? gpu.device : null;
  }

  // The WebGPU backend for a call with GPU-resident tensors (`what` names one).
  #gpu(what: string): WebGpuBackend {
    if (this.#backend === null) throw new Error(`this router was disposed; create a new one with createRouter()`);
    const b = this.#big?.backend ?? this.#backend;
    if (!(b instanceof WebGpuBackend)) {
      throw new TypeError(
        `${what} is a GpuTensor: GPU-resident tensors need a router on the webgpu backend, this one runs ${b.name}`,
      );
    }
    if (this.#big !== null) this.lastChoice = { backend: b.name, reason: `${what} is GPU-resident` };
    return b;
  }

  // The backend of a call of `elements` logits (auto: per call), or of a saved state's backend.
  #use(elements = 0, savedBackend?: unknown): Backend {
    if (this.#backend === null) throw new Error(`this router was disposed; create a new one with createRouter()`);
    const big = this.#big;
    if (big === null) return this.#backend;
    // a lost GPU device: auto goes on with WebAssembly (a GPU saved state still fails, saying why)
    const lost = big.backend instanceof WebGpuBackend ? big.backend.lost : null;
    const useBig = savedBackend !== undefined
      ? savedBackend === big.backend.name
      : lost === null && elements >= big.minElements;
    const b = useBig ? big.backend : this.#backend;
    this.lastChoice = {
      backend: b.name,
      reason: savedBackend !== undefined
        ? `backward runs where its forward ran (${b.name})`
        : lost !== null
        ? `the GPU device was lost (${lost}): WebAssembly`
        : `${elements} logits ${useBig ? ">=" : "<"} ${big.minElements}: ${
          useBig ? "the transfer and submission pay off" : "below the GPU round trip's cost"
        }`,
    };
    return b;
  }

  dispose(): void {
    this.#backend?.dispose();
    this.#big?.backend.dispose();
    this.#backend = null;
    this.#big = null;
  }

  fusedTopkWithScoreFunction(logits: FloatTensor, options: TopkInferenceOptions): Promise<TopkInferenceResult>;
  fusedTopkWithScoreFunction(logits: FloatTensor, options: TopkOptions): Promise<TopkResult>;
  fusedTopkWithScoreFunction(
    logits: GpuTensor<FloatDType>,
    options: GpuTopkInferenceOptions,
  ): Promise<GpuTopkInferenceResult>;
  fusedTopkWithScoreFunction(logits: GpuTensor<FloatDType>, options: GpuTopkOptions): Promise<GpuTopkResult>;
  fusedTopkWithScoreFunction(
    logits: FloatTensor | GpuTensor<FloatDType>,
    options: TopkOptions | TopkInferenceOptions | GpuTopkOptions | GpuTopkInferenceOptions,
  ): Promise<TopkResult | TopkInferenceResult | GpuTopkResult | GpuTopkInferenceResult> {
    return isGpuTensor(logits) ? this.#topkGpu(logits, options) : this.#topkHost(logits, options as TopkOptions);
  }

  async #topkGpu(
    logits: GpuTensor<FloatDType>,
    options: GpuTopkOptions | GpuTopkInferenceOptions,
  ): Promise<GpuTopkResult | GpuTopkInferenceResult> {
    const plan = planTopk(logits, options);
    const b = this.#gpu("logits");
    const out = await b.topkForwardGpu(plan, logits);
    const lead = plan.shape.slice(0, -1);
    const result: GpuTopkInferenceResult & Partial<GpuTopkResult> = {
      probs: { buffer: out.probs, shape: [...plan.shape], dtype: plan.dtype },
    };
    if (plan.save) {
      result.intermediate = { buffer: out.intermediate as GPUBuffer, shape: [...plan.shape], dtype: "float32" };
      result.saved = new Saved<TopkPlan>(b.name, "topk", plan, out.payload, true) as GpuSavedState;
    }
    if (plan.route === "bytemap" || plan.route === "bitmap_u8") {
      const last = plan.route === "bytemap" ? plan.E : Math.ceil(plan.E / 8);
      result.routingMap = { buffer: out.route, shape: [...lead, last], dtype: "uint8" };
    } else {
      result.indices = { buffer: out.route, shape: [...lead, plan.K], dtype: plan.route };
    }
    return result;
  }

  async #topkHost(
    logits: FloatTensor,
    options: TopkOptions | TopkInferenceOptions,
  ): Promise<TopkResult | TopkInferenceResult> {
    const plan = planTopk(logits, options);
    const b = plan.biasGpu !== null ? this.#gpu("expertBias") : this.#use(plan.T * plan.E);
    const out = await b.topkForward(plan, logits);
    // a backend that did not write into the caller's buffers: copy into them
    const probs = into(plan.probsOut, out.probs);
    const route = plan.indicesOut || plan.routingMapOut
      ? into<Uint8Array | IndexArray>(plan.indicesOut ?? plan.routingMapOut, out.route)
      : out.route;
    const lead = plan.shape.slice(0, -1);
    const result: TopkInferenceResult & Partial<TopkResult> = {
      probs: { data: probs, shape: [...plan.shape], dtype: plan.dtype },
    };
    if (plan.save) {
      const saved = new Saved<TopkPlan>(b.name, "topk", plan, out.payload, false, recycler(b));
      result.intermediate = hostIntermediate(saved, plan.intermediateOut, out.intermediate!, plan.shape);
      result.saved = saved;
    }
    if (plan.route === "bytemap" || plan.route === "bitmap_u8") {
      const last = plan.route === "bytemap" ? plan.E : Math.ceil(plan.E / 8);
      result.routingMap = { data: route as Uint8Array, shape: [...lead, last], dtype: "uint8" };
    } else {
      result.indices = { data: route, shape: [...lead, plan.K], dtype: plan.route } as Tensor<IndexDType>;
    }
    return result;
  }

  fusedTopkWithScoreFunctionBackward(
    saved: TopkResult["saved"],
    gradProbs: FloatTensor,
    options?: BackwardOptions,
  ): Promise<FloatTensor>;
  fusedTopkWithScoreFunctionBackward(
    saved: TopkResult["saved"],
    gradProbs: GpuTensor<FloatDType>,
  ): Promise<GpuTensor<FloatDType>>;
  async fusedTopkWithScoreFunctionBackward(
    saved: TopkResult["saved"],
    gradProbs: FloatTensor | GpuTensor<FloatDType>,
    options: BackwardOptions = {},
  ): Promise<FloatTensor | GpuTensor<FloatDType>> {
    if (isGpuTensor(gradProbs)) {
      const b = this.#gpu("gradProbs");
      const { plan, payload } = Saved.take<TopkPlan>(saved, "topk", b.name);
      checkGrad("gradProbs", gradProbs, plan.shape, plan.dtype);
      if (options.gradLogitsOut !== undefined) {
        throw new TypeError(`gradLogitsOut applies to host gradProbs; with a GpuTensor the result is a new GpuTensor`);
      }
      return { buffer: await b.topkBackwardGpu(plan, payload, gradProbs), shape: [...plan.shape], dtype: plan.dtype };
    }
    const b = this.#use(0, savedBackend(saved));
    const { plan, payload } = Saved.take<TopkPlan>(saved, "topk", b.name);
    checkGrad("gradProbs", gradProbs, plan.shape, plan.dtype);
    if (typeof options !== "object" || options === null) {
      throw new TypeError(`options must be an object, got ${describe(options)}`);
    }
    const outBuf = outputBuffer<FloatTensor["data"]>(
      "gradLogitsOut",
      options.gradLogitsOut,
      ARRAY_OF[plan.dtype],
      plan.T * plan.E,
      [gradProbs.data],
      [],
    );
    const data = into(outBuf, await b.topkBackward(plan, payload, gradProbs, outBuf));
    return { data, shape: [...plan.shape], dtype: plan.dtype };
  }

  fusedComputeScoreForMoEAuxLoss(logits: FloatTensor, options: AuxScoresOptions): Promise<AuxScoresResult>;
  fusedComputeScoreForMoEAuxLoss(
    logits: GpuTensor<FloatDType>,
    options: GpuAuxScoresOptions,
  ): Promise<GpuAuxScoresResult>;
  async fusedComputeScoreForMoEAuxLoss(
    logits: FloatTensor | GpuTensor<FloatDType>,
    options: AuxScoresOptions | GpuAuxScoresOptions,
  ): Promise<AuxScoresResult | GpuAuxScoresResult> {
    const plan = planAuxScores(logits, options);
    const last = plan.route === "bytemap" ? plan.E : Math.ceil(plan.E / 8);
    const mapShape = [...plan.shape.slice(0, -1), last];
    if (isGpuTensor(logits)) {
      const b = this.#gpu("logits");
      const out = await b.auxScoresForwardGpu(plan, logits);
      return {
        scores: { buffer: out.scores, shape: [...plan.shape], dtype: "float32" },
        routingMap: { buffer: out.route, shape: mapShape, dtype: "uint8" },
        intermediate: { buffer: out.intermediate, shape: [...plan.shape], dtype: "float32" },
        saved: new Saved<AuxScoresPlan>(b.name, "auxScores", plan, out.payload, true) as GpuSavedState,
      };
    }
    const b = this.#use(plan.T * plan.E);
    const out = await b.auxScoresForward(plan, logits);
    const saved = new Saved<AuxScoresPlan>(b.name, "auxScores", plan, out.payload, false, recycler(b));
    return {
      scores: { data: out.scores, shape: [...plan.shape], dtype: "float32" },
      routingMap: { data: out.route, shape: mapShape, dtype: "uint8" },
      intermediate: hostIntermediate(saved, null, out.intermediate, plan.shape),
      saved,
    };
  }

  fusedComputeScoreForMoEAuxLossBackward(
    saved: AuxScoresResult["saved"],
    gradScores: Tensor<"float32">,
  ): Promise<FloatTensor>;
  fusedComputeScoreForMoEAuxLossBackward(
    saved: AuxScoresResult["saved"],
    gradScores: GpuTensor<FloatDType>,
  ): Promise<GpuTensor<FloatDType>>;
  async fusedComputeScoreForMoEAuxLossBackward(
    saved: AuxScoresResult["saved"],
    gradScores: Tensor<"float32"> | GpuTensor<FloatDType>,
  ): Promise<FloatTensor | GpuTensor<FloatDType>> {
    if (isGpuTensor(gradScores)) {
      const b = this.#gpu("gradScores");
      const { plan, payload } = Saved.take<AuxScoresPlan>(saved, "auxScores", b.name);
      checkGrad("gradScores", gradScores, plan.shape, "float32");
      const buffer = await b.auxScoresBackwardGpu(plan, payload, gradScores);
      return { buffer, shape: [...plan.shape], dtype: plan.dtype };
    }
    const b = this.#use(0, savedBackend(saved));
    const { plan, payload } = Saved.take<AuxScoresPlan>(saved, "auxScores", b.name);
    checkGrad("gradScores", gradScores, plan.shape, "float32");
    const data = await b.auxScoresBackward(plan, payload, gradScores as Tensor<"float32">);
    return { data, shape: [...plan.shape], dtype: plan.dtype };
  }

  fusedMoEAuxLoss(probs: FloatTensor, tokensPerExpert: Tensor, options: AuxLossOptions): Promise<AuxLossResult>;
  fusedMoEAuxLoss(
    probs: GpuTensor<FloatDType>,
    tokensPerExpert: Tensor | GpuTensor<TokensPerExpertDType>,
    options: AuxLossOptions,
  ): Promise<GpuAuxLossResult>;
  fusedMoEAuxLoss(
    probs: FloatTensor,
    tokensPerExpert: GpuTensor<TokensPerExpertDType>,
    options: AuxLossOptions,
  ): Promise<AuxLossResult>;
  async fusedMoEAuxLoss(
    probs: FloatTensor | GpuTensor<FloatDType>,
    tokensPerExpert: Tensor | GpuTensor<TokensPerExpertDType>,
    options: AuxLossOptions,
  ): Promise<AuxLossResult | GpuAuxLossResult> {
    const plan = planAuxLoss(probs, tokensPerExpert, options);
    if (isGpuTensor(probs)) {
      const b = this.#gpu("probs");
      return {
        loss: { buffer: await b.auxLossForwardGpu(plan, probs), shape: [], dtype: plan.dtype },
        saved: new Saved<GpuAuxLossPlan>(b.name, "auxLoss", plan, null, true) as GpuSavedState,
      };
    }
    // host probs: a GPU-resident tokensPerExpert runs the call on the GPU, the loss comes back
    const b = isHostAuxLossPlan(plan) ? this.#use(plan.rows * plan.cols) : this.#gpu("tokensPerExpert");
    // (only the webgpu backend takes a GPU-resident tokensPerExpert; #gpu sent those calls to it)
    const data = b instanceof WebGpuBackend
      ? await b.auxLossForward(plan, probs)
      : await b.auxLossForward(plan as AuxLossPlan, probs);
    return {
      loss: { data, shape: [], dtype: plan.dtype },
      saved: new Saved<GpuAuxLossPlan>(b.name, "auxLoss", plan, null),
    };
  }

  fusedMoEAuxLossBackward(saved: AuxLossResult["saved"], gradLoss: number | FloatTensor): Promise<FloatTensor>;
  fusedMoEAuxLossBackward(
    saved: GpuSavedState,
    gradLoss: number | FloatTensor | GpuTensor<FloatDType>,
  ): Promise<GpuTensor<FloatDType>>;
  fusedMoEAuxLossBackward(saved: SavedState, gradLoss: GpuTensor<FloatDType>): Promise<GpuTensor<FloatDType>>;
  async fusedMoEAuxLossBackward(
    saved: SavedState,
    gradLoss: number | FloatTensor | GpuTensor<FloatDType>,
  ): Promise<FloatTensor | GpuTensor<FloatDType>> {
    const b = isGpuTensor(gradLoss) ? this.#gpu("gradLoss") : this.#use(0, savedBackend(saved));
    const { plan, gpuResident } = Saved.take<GpuAuxLossPlan>(saved, "auxLoss", b.name);
    const g = checkGradLoss(gradLoss);
    if (typeof g !== "number" || gpuResident) {
      // a GPU-resident forward or gradLoss: gradProbs stays on the GPU
      const gpu = b as WebGpuBackend;
      return { buffer: await gpu.auxLossBackwardGpu(plan, g), shape: [...plan.shape], dtype: plan.dtype };
    }
    const data = b instanceof WebGpuBackend
      ? await b.auxLossBackward(plan, g)
      : await b.auxLossBackward(plan as AuxLossPlan, g);
    return { data, shape: [...plan.shape], dtype: plan.dtype };
  }
}

// what gives a host payload's buffers back to its backend, where the backend reuses them
/**
 * The intermediate of a host forward: the caller's buffer (filled), the
 * backend's array, or, where the backend kept it in the saved state only
 * (never when the caller passed `intermediateOut`), a
 * {@linkcode LazyIntermediate}.
 */
function hostIntermediate(
  saved: Saved<unknown>,
  out: Float32Array | null,
  got: HostIntermediate,
  shape: readonly number[],
): Tensor<"float32"> {
  if (typeof got !== "function") return { data: into(out, got), shape: [...shape], dtype: "float32" };
  return new LazyIntermediate(saved, got, [...shape]);
}

/**
 * An intermediate tensor whose `data` is copied out of the saved state on
 * first read (most callers never read it). The state's buffers are reused
 * once it is released, so that read must come first; the tensor holds the
 * state, so a dropped result cannot free them under it. `data` is an own
 * enumerable accessor (spreading the tensor reads it, as for a plain one),
 * one function shared by every instance: a getter closure per object kept
 * about 40 KiB a call alive in a loop of calls under `deno test`.
 */
class LazyIntermediate {
  readonly dtype = "float32" as const;
  declare readonly data: Float32Array;
  saved: Saved<unknown>;
  read: (() => Float32Array) | null;
  value: Float32Array | null = null;

  constructor(saved: Saved<unknown>, read: () => Float32Array, readonly shape: readonly number[]) {
    this.saved = saved;
    this.read = read;
    Object.defineProperty(this, "data", { get: lazyData, enumerable: true });
    // the bookkeeping stays out of spreads and logs
    for (const key of ["saved", "read", "value"]) Object.defineProperty(this, key, { enumerable: false });
  }
}

function lazyData(this: LazyIntermediate): Float32Array {
  if (this.value === null) {
    if (this.saved.released) {
      throw new TypeError(
        "intermediate was not read before its saved state was released: read result.intermediate.data before saved.release(), or pass intermediateOut",
      );
    }
    this.value = (this.read as () => Float32Array)();
    this.read = null;
  }
  return this.value;
}

function recycler(b: Backend): ((payload: unknown) => void) | undefined {
  return b.recycle === undefined ? undefined : (payload) => b.recycle!(payload);
}

// the backend a saved state names (Saved.take checks the rest)
function savedBackend(saved: unknown): unknown {
  return saved instanceof Saved ? saved.backend : null;
}
