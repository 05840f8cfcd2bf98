/**
 * The WebGPU backend: the router kernels as WGSL compute shaders run through
 * `navigator.gpu`.
 *
 * Two ways in:
 * - host arrays: one upload, one submission and one readback per call;
 * - GPU-resident tensors (`{ buffer, shape, dtype }`, see {@linkcode GpuTensor}):
 *   no readback at all; the outputs are new buffers that the caller owns,
 *   and the state saved for backward stays on the GPU.
 *
 * Buffer usage a caller must set: every input buffer (logits, gradients)
 * needs `GPUBufferUsage.STORAGE`; output buffers are created with
 * `STORAGE | COPY_SRC | COPY_DST`, so they can be read back (copy to a
 * `MAP_READ` buffer) or fed to further kernels. Output buffers of a forward
 * call are also what its backward reads: do not destroy or overwrite them
 * before the backward has been submitted.
 *
 * Pipelines are compiled once per configuration and cached per device;
 * scratch buffers are pooled; `dispose()` frees the pool (and the device when
 * the backend created it).
 *
 * @module
 */
import {
  type AuxScoresForwardOut,
  type Backend,
  copier,
  newAuxScoresArrays,
  type TopkForwardOut,
} from "../_backend.ts";
import {
  type AuxScoresPlan,
  type GpuAuxLossPlan,
  type RouteFormat,
  routeRowBytes,
  type TopkPlan,
} from "../_validate.ts";
import type { FloatDType, FloatTensor, GpuTensor, IndexArray, Tensor } from "../_types.ts";
import { ARRAY_OF, BYTES_OF } from "../tensor.ts";
import { AUX_WG, auxLossKernel, type AuxLossKey } from "./_aux_loss_kernels.ts";
import { type Compiled, pipelineFor } from "./_pipelines.ts";
import { BufferPool } from "./_pool.ts";
import {
  fastBackwardKernel,
  type FastBackwardKey,
  fastBackwardKey,
  fastBackwardRowsPerWorkgroup,
  fastForwardKernel,
  type FastForwardKey,
  fastForwardKey,
  fastRowsPerWorkgroup,
} from "./_fast_kernels.ts";
import { foldGrid, packUniforms, uniformBytes, type UniformValues } from "./_shader.ts";
import {
  backwardKernel,
  type BackwardKey,
  DT_CODE,
  FMT_CODE,
  forwardKernel,
  type ForwardKey,
  RADIX_MAX_DENSE_K,
  type RowLayout,
  rowLayout,
  WG,
} from "./_topk_kernels.ts";

/** Options of {@linkcode WebGpuBackend.create}. */
export interface WebGpuBackendOptions {
  /** Run on this device (GPU-resident tensors must live on it); default: a new device of the best adapter. */
  device?: GPUDevice;
  /** Adapter to open a device on (ignored with `device`). */
  adapter?: GPUAdapter;
  /** Cap on the bytes of one storage binding, below the device's limit (tests use it to cross the limit cheaply). */
  maxBindingBytes?: number;
  /** Cap on workgroups per grid dimension, below the device's limit (tests use it to fold grids cheaply). */
  maxWorkgroupsPerDimension?: number;
  /** Record GPU time of each submission with timestamp queries (see {@linkcode WebGpuBackend.lastGpuTimeNs}). */
  profile?: boolean;
  /** Run the general kernels even where a specialised one exists (tests and benchmarks compare the two). */
  generalKernels?: boolean;
}

/** Outputs of a GPU-resident top-k forward. */
export interface GpuTopkForwardOut {
  probs: GPUBuffer;
  /** null (with the payload) where the plan saves nothing. */
  intermediate: GPUBuffer | null;
  route: GPUBuffer;
  payload: GpuPayload | null;
}

/** Outputs of a GPU-resident aux-scores forward. */
export interface GpuAuxScoresForwardOut {
  scores: GPUBuffer;
  intermediate: GPUBuffer;
  route: GPUBuffer;
  payload: GpuPayload;
}

/** State a GPU-resident forward keeps for its backward: buffers on the device. */
export interface GpuPayload {
  readonly gpu: true;
  readonly intermediate: GPUBuffer;
  readonly route: GPUBuffer;
}

interface HostPayload {
  intermediate: Float32Array;
  route: Uint8Array | IndexArray;
}

/** Software adapters (CPU emulation) never run the "auto" backend. */
const SOFTWARE_ADAPTER = /llvmpipe|lavapipe|softpipe|swiftshader|swrast|software|microsoft basic render/i;

/** Whether an adapter is a software (CPU-emulated) one: the fallback flag, or its description. */
export function isSoftwareAdapter(adapter: GPUAdapter): boolean {
  const info = adapter.info as GPUAdapterInfo & { isFallbackAdapter?: boolean };
  const legacy = (adapter as { isFallbackAdapter?: boolean }).isFallbackAdapter;
  if (info?.isFallbackAdapter === true || legacy === true) return true;
  return SOFTWARE_ADAPTER.test(`${info?.description ?? ""} ${info?.device ?? ""} ${info?.architecture ?? ""}`);
}

/** The runtime's WebGPU entry point, or undefined. */
function gpu(): GPU | undefined {
  return (globalThis.navigator as Navigator & { gpu?: GPU } | undefined)?.gpu;
}

/** The best adapter of the runtime (high-performance), or null when there is none. */
export async function requestAdapter(): Promise<GPUAdapter | null> {
  const g = gpu();
  if (g === undefined) return null;
  return await g.requestAdapter({ powerPreference: "high-performance" });
}

/**
 * Logits per host-array call from which "auto" runs on a hardware GPU.
 * Measured on an NVIDIA H200 under Deno: a host-array DeepSeek-V3 forward
 * (2^21 logits: upload, kernels, readback of probs, intermediate and map)
 * took 56 ms of wall time, against about 12 ms for the WebAssembly backend
 * on a 2-core CPU (5-6 ns per logit); the transfers grow with the batch as
 * the CPU time does, so the GPU pays only for very large batches (or for
 * GPU-resident tensors, which never come back).
 */
export const AUTO_MIN_GPU_ELEMENTS = 1 << 25;

/** What "auto" may use: a hardware adapter (or null, with the reason), and the batch size from which it pays. */
export async function autoPolicy(): Promise<{ adapter: GPUAdapter | null; reason: string; minElements: number }> {
  let adapter: GPUAdapter | null = null;
  try {
    adapter = await requestAdapter();
  } catch {
    adapter = null;
  }
  const minElements = AUTO_MIN_GPU_ELEMENTS;
  if (adapter === null) return { adapter, reason: "no WebGPU adapter", minElements };
  const desc = adapter.info?.description || adapter.info?.vendor || "unknown adapter";
  if (isSoftwareAdapter(adapter)) {
    return { adapter: null, reason: `the WebGPU adapter is a software one (${desc})`, minElements };
  }
  return {
    adapter,
    reason:
      `WebGPU on ${desc} for calls of >= ${minElements} logits, WebAssembly below (a GPU round trip costs ~11 ms)`,
    minElements,
  };
}

const STORAGE = 0x80; // GPUBufferUsage.STORAGE, usable before the global exists
const USAGE = {
  input: STORAGE | 0x08, // STORAGE | COPY_DST
  output: STORAGE | 0x04 | 0x08, // STORAGE | COPY_SRC | COPY_DST
  uniform: 0x40 | 0x08, // UNIFORM | COPY_DST
  read: 0x01 | 0x08, // MAP_READ | COPY_DST
} as const;

const UNIFORM_STRIDE = 256;
/** Rows of probs one thread of the aux-loss column sums adds up. */
const AUX_CHUNK = 64;

function align4(n: number): number {
  return Math.ceil(n / 4) * 4;
}

function gcd(a: number, b: number): number {
  while (b) [a, b] = [b, a % b];
  return a;
}

function newFloat(dtype: FloatDType, n: number): FloatTensor["data"] {
  return new (ARRAY_OF[dtype] as new (n: number) => FloatTensor["data"])(n);
}

function newRoute(route: RouteFormat, n: number): Uint8Array | IndexArray {
  if (route === "bytemap" || route === "bitmap_u8") return new Uint8Array(n);
  return new (ARRAY_OF[route] as new (n: number) => IndexArray)(n);
}

// bits needed for E - 1, in 8-bit passes (radix tie-break on the index)
function loPasses(E: number): number {
  const bits = Math.max(1, 32 - Math.clz32(Math.max(0, E - 1)));
  return Math.ceil(bits / 8);
}

/** The expert bias on the device: its buffer and dtype, and whether it came from the pool. */
interface BiasBuffer {
  buffer: GPUBuffer;
  dtype: FloatDType;
  pooled: boolean;
}

/** A region of a buffer bound to a kernel. */
interface Bound {
  buffer: GPUBuffer;
  offset: number;
  size: number;
}

/** One dispatch: kernel, uniforms, bindings (in the kernel's order), workgroup count. */
interface Dispatch {
  compiled: Compiled;
  uniforms: UniformValues;
  bindings: Bound[];
  workgroups: number;
}

/** A buffer region to copy into the readback buffer. */
interface Readback {
  buffer: GPUBuffer;
  bytes: number;
}

/** Runs the router kernels in WGSL on a WebGPU device. */
export class WebGpuBackend implements Backend {
  readonly name = "webgpu" as const;
  /** The device the kernels run on. */
  readonly device: GPUDevice;
  /** The adapter's description (empty when a device was given). */
  readonly adapterDescription: string;
  #ownsDevice: boolean;
  #pool: BufferPool;
  #maxBinding: number;
  #maxGrid: number;
  #align: number;
  #disposed = false;
  /** Why the device was lost, once it is: every later call is refused with it. */
  #lost: string | null = null;
  #profile: { query: GPUQuerySet; resolve: GPUBuffer; read: GPUBuffer; pending: boolean } | null = null;
  #lastGpuNs: number | null = null;
  #repeat = 1;
  #warmup = 0;
  #general: boolean;

  private constructor(device: GPUDevice, owns: boolean, description: string, options: WebGpuBackendOptions) {
    this.device = device;
    this.#ownsDevice = owns;
    this.adapterDescription = description;
    this.#pool = new BufferPool(device);
    this.#general = options.generalKernels ?? false;
    device.lost.then((info) => {
      this.#lost = `${info.reason}${info.message ? `: ${info.message}` : ""}`;
    });
    const lim = device.limits;
    this.#maxBinding = Math.min(
      lim.maxStorageBufferBindingSize,
      lim.maxBufferSize,
      options.maxBindingBytes ?? Infinity,
    );
    this.#maxGrid = Math.min(lim.maxComputeWorkgroupsPerDimension, options.maxWorkgroupsPerDimension ?? Infinity);
    this.#align = Math.max(4, lim.minStorageBufferOffsetAlignment);
    if (options.profile) {
      if (!device.features.has("timestamp-query")) {
        throw new Error(`profile needs the "timestamp-query" feature, which this device lacks`);
      }
      this.#profile = {
        query: device.createQuerySet({ type: "timestamp", count: 2 }),
        resolve: device.createBuffer({ size: 16, usage: 0x200 | 0x04 }), // QUERY_RESOLVE | COPY_SRC
        read: device.createBuffer({ size: 16, usage: USAGE.read }),
        pending: false,
      };
    }
  }

  /**
   * Opens the backend: on `options.device`, or on a new device of the best
   * adapter with the adapter's largest buffer, binding and workgroup-memory
   * limits (and timestamp queries when the adapter has them).
   *
   * @throws {Error} when the runtime has no WebGPU or no adapter
   */
  static async create(options: WebGpuBackendOptions = {}): Promise<WebGpuBackend> {
    if (options.device !== undefined) return new WebGpuBackend(options.device, false, "", options);
    const adapter = options.adapter ?? await requestAdapter();
    if (adapter === null) {
      throw new Error(
        gpu() === undefined
          ? `backend "webgpu" needs navigator.gpu, which this runtime lacks (Deno: run with --unstable-webgpu or a WebGPU-enabled build)`
          : `backend "webgpu" found no WebGPU adapter on this machine`,
      );
    }
    const a = adapter.limits;
    const requiredFeatures: GPUFeatureName[] = adapter.features.has("timestamp-query") ? ["timestamp-query"] : [];
    const device = await adapter.requestDevice({
      requiredFeatures,
      requiredLimits: {
        maxStorageBufferBindingSize: a.maxStorageBufferBindingSize,
        maxBufferSize: a.maxBufferSize,
        maxComputeWorkgroupStorageSize: a.maxComputeWorkgroupStorageSize,
        maxComputeInvocationsPerWorkgroup: Math.max(WG, Math.min(a.maxComputeInvocationsPerWorkgroup, 1024)),
        maxComputeWorkgroupSizeX: Math.max(WG, Math.min(a.maxComputeWorkgroupSizeX, 1024)),
      },
    });
    return new WebGpuBackend(device, true, adapter.info?.description ?? "", options);
  }

  /**
   * Benchmark hook: every later submission encodes its dispatches `n` times
   * in its one compute pass (outputs are rewritten with the same values), so
   * that timestamps around the pass give n back-to-back calls' GPU time.
   * With `warmup`, an untimed pass of that many more calls goes first: an
   * idle GPU runs at a fraction of its clock and takes milliseconds of work
   * to reach full speed.
   */
  setRepeat(n: number, warmup = 0): void {
    this.#repeat = Math.max(1, Math.floor(n));
    this.#warmup = Math.max(0, Math.floor(warmup));
  }

  /** GPU time of the last submission's compute pass in nanoseconds (profile: true), or null. */
  async lastGpuTimeNs(): Promise<number | null> {
    const p = this.#profile;
    if (p === null || !p.pending) return this.#lastGpuNs;
    await p.read.mapAsync(GPUMapMode.READ);
    const t = new BigUint64Array(p.read.getMappedRange().slice(0));
    p.read.unmap();
    p.pending = false;
    this.#lastGpuNs = Number((t[1] as bigint) - (t[0] as bigint));
    return this.#lastGpuNs;
  }

  /** Why the device was lost ("destroyed: ..."), or null while it works. */
  get lost(): string | null {
    return this.#lost;
  }

  // Refuses work on a disposed backend or a lost device (checked again after
  // every wait, since either can happen while a call is in flight).
  #usable(): void {
    if (this.#disposed) throw new Error(`this router was disposed; create a new one with createRouter()`);
    if (this.#lost !== null) {
      throw new Error(`webgpu: the GPU device was lost (${this.#lost}); create a new router with createRouter()`);
    }
  }

  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#pool.dispose();
    if (this.#profile) {
      this.#profile.query.destroy();
      this.#profile.resolve.destroy();
      this.#profile.read.destroy();
    }
    if (this.#ownsDevice) this.device.destroy();
  }

  // ---- planning helpers ---------------------------------------------------------

  /**
   * Rows per dispatch so that every row-addressed binding stays within the
   * binding limit and starts at an allowed offset (a multiple of the storage
   * offset alignment, which also keeps 16-bit rows' words whole).
   */
  #rowsPerDispatch(T: number, rowBytes: readonly number[], what: string, multiple = 1, cap = Infinity): number {
    let step = multiple;
    let most = Math.min(T, cap);
    for (const rb of rowBytes) {
      if (rb <= 0) continue;
      const s = this.#align / gcd(this.#align, rb);
      step = (step * s) / gcd(step, s);
      most = Math.min(most, Math.floor(this.#maxBinding / rb));
    }
    if (most >= T) return T;
    const rows = Math.floor(most / step) * step;
    if (rows < 1 && most >= 1 && step > cap) {
      throw new RangeError(`${what}: no dispatch size fits both alignment ${step} and ${cap}`);
    }
    if (rows < 1) {
      throw new RangeError(
        `${what}: ${step} rows (the fewest whose bindings start at the device's ${this.#align}-byte offset alignment) ` +
          `need ${
            step * Math.max(...rowBytes)
          } bytes in a storage binding, beyond this device's limit of ${this.#maxBinding} bytes`,
      );
    }
    return rows;
  }

  // rows one dispatch of a row layout can cover within the grid limits
  #gridRows(layout: RowLayout): number {
    return layout.rpw * this.#maxGrid * this.#maxGrid;
  }

  #checkBufferSize(bytes: number, what: string): void {
    if (bytes > this.device.limits.maxBufferSize) {
      throw new RangeError(
        `${what} needs a buffer of ${bytes} bytes, beyond this device's maxBufferSize of ${this.device.limits.maxBufferSize}`,
      );
    }
  }

  // Rows per host round: every buffer of the round must fit maxBufferSize.
  #rowsPerRound(T: number, rowBytes: readonly number[], what: string): number {
    const total = rowBytes.reduce((a, b) => a + b, 0);
    const most = Math.floor(this.device.limits.maxBufferSize / Math.max(1, total + 256));
    if (most >= T) return T;
    if (most < 1) throw new RangeError(`${what}: one row needs ${total} bytes, beyond this device's maxBufferSize`);
    return Math.max(256, Math.floor(most / 256) * 256);
  }

  #upload(data: ArrayBufferView, from: number, n: number, label: string): GPUBuffer {
    const bpe = (data as unknown as { BYTES_PER_ELEMENT: number }).BYTES_PER_ELEMENT;
    const bytes = n * bpe;
    const buf = this.#pool.acquire(align4(bytes), USAGE.input, label);
    // nothing to write (an empty batch): Deno's writeBuffer panics on zero bytes of an empty array
    if (bytes === 0) return buf;
    if (bytes % 4 === 0) {
      this.device.queue.writeBuffer(buf, 0, data.buffer as ArrayBuffer, data.byteOffset + from * bpe, bytes);
    } else {
      const padded = new Uint8Array(align4(bytes));
      padded.set(new Uint8Array(data.buffer, data.byteOffset + from * bpe, bytes));
      this.device.queue.writeBuffer(buf, 0, padded);
    }
    return buf;
  }

  /**
   * Encodes the dispatches (one compute pass), copies the readback regions
   * into one mappable buffer, submits once, and maps it when there is
   * something to read. Returns the bytes read, region by region.
   */
  async #submit(dispatches: Dispatch[], readbacks: Readback[]): Promise<Uint8Array[]> {
    this.#usable();
    // WebGPU validation errors (a caller buffer of another device, a
    // destroyed buffer) become exceptions of this call, not console noise
    this.device.pushErrorScope("validation");
    let read: GPUBuffer | null = null;
    let failure: unknown = null;
    try {
      read = this.#encode(dispatches, readbacks);
    } catch (e) {
      failure = e;
    }
    const error = await this.device.popErrorScope().catch(() => null);
    // a loss or dispose() while the commands ran explains any failure better than the failure itself
    this.#usable();
    if (failure !== null) throw failure;
    if (error !== null) throw new Error(`webgpu: the router's commands were refused: ${error.message}`);
    if (read === null) return [];
    try {
      await read.mapAsync(GPUMapMode.READ);
    } catch (e) {
      this.#usable();
      throw e;
    }
    this.#usable();
    const mapped = read.getMappedRange();
    let at = 0;
    const out = readbacks.map((r) => {
      const bytes = new Uint8Array(mapped.slice(at, at + r.bytes));
      at += Math.ceil(align4(r.bytes) / 256) * 256;
      return bytes;
    });
    read.unmap();
    this.#pool.release(read);
    return out;
  }

  // Encodes and submits the dispatches and the copies into the readback buffer (returned, or null).
  #encode(dispatches: Dispatch[], readbacks: Readback[]): GPUBuffer | null {
    const device = this.device;
    const ubuf = this.#pool.acquire(Math.max(1, dispatches.length) * UNIFORM_STRIDE, USAGE.uniform, "uniforms");
    const ubytes = new ArrayBuffer(Math.max(1, dispatches.length) * UNIFORM_STRIDE);
    const view = new DataView(ubytes);
    const groups = dispatches.map((d, i) => {
      const [x, y] = foldGrid(d.workgroups, this.#maxGrid);
      packUniforms(d.compiled.source, { ...d.uniforms, gridX: x }, view, i * UNIFORM_STRIDE);
      const bindGroup = device.createBindGroup({
        label: d.compiled.source.label,
        layout: d.compiled.layout,
        entries: [
          { binding: 0, resource: { buffer: ubuf, offset: i * UNIFORM_STRIDE, size: uniformBytes(d.compiled.source) } },
          ...d.bindings.map((b, j) => ({
            binding: j + 1,
            resource: { buffer: b.buffer, offset: b.offset, size: b.size },
          })),
        ],
      });
      return { bindGroup, x, y };
    });
    device.queue.writeBuffer(ubuf, 0, ubytes);
    const encoder = device.createCommandEncoder({ label: "moe-router" });
    const p = this.#profile;
    if (this.#warmup > 0) {
      const warm = encoder.beginComputePass();
      for (let r = 0; r < this.#warmup; r++) {
        dispatches.forEach((d, i) => {
          warm.setPipeline(d.compiled.pipeline);
          warm.setBindGroup(0, groups[i]!.bindGroup);
          warm.dispatchWorkgroups(groups[i]!.x, groups[i]!.y);
        });
      }
      warm.end();
    }
    const pass = encoder.beginComputePass(
      p ? { timestampWrites: { querySet: p.query, beginningOfPassWriteIndex: 0, endOfPassWriteIndex: 1 } } : {},
    );
    for (let r = 0; r < this.#repeat; r++) {
      dispatches.forEach((d, i) => {
        const g = groups[i]!;
        pass.setPipeline(d.compiled.pipeline);
        pass.setBindGroup(0, g.bindGroup);
        pass.dispatchWorkgroups(g.x, g.y);
      });
    }
    pass.end();
    if (p) {
      // every submission resolves its times; the read buffer keeps the latest
      encoder.resolveQuerySet(p.query, 0, 2, p.resolve, 0);
      encoder.copyBufferToBuffer(p.resolve, 0, p.read, 0, 16);
    }
    let read: GPUBuffer | null = null;
    const offsets: number[] = [];
    if (readbacks.length > 0) {
      let total = 0;
      for (const r of readbacks) {
        offsets.push(total);
        total += Math.ceil(align4(r.bytes) / 256) * 256;
      }
      read = this.#pool.acquire(total, USAGE.read, "readback");
      readbacks.forEach((r, i) => encoder.copyBufferToBuffer(r.buffer, 0, read!, offsets[i]!, align4(r.bytes)));
    }
    device.queue.submit([encoder.finish()]);
    if (p) p.pending = true;
    this.#pool.release(ubuf);
    return read;
  }

  // ---- top-k forward --------------------------------------------------------------

  // The pipeline key and row layout of a forward call (plan errors surface here, before GPU work).
  #forwardKey(plan: TopkPlan | AuxScoresPlan, op: "topk" | "aux"): { key: ForwardKey; layout: RowLayout } {
    const t = plan as Partial<TopkPlan>;
    const grouped = (t.groupTopk ?? 0) > 0;
    // radix when K >= threshold, as on the CPU; the two give the same set and
    // order, so naive stands in where the radix ranking of dense output would not fit
    const dense = plan.route !== "bytemap" && plan.route !== "bitmap_u8";
    const radix = plan.K >= plan.radixThreshold && !(dense && plan.K > RADIX_MAX_DENSE_K);
    const layout = rowLayout({ E: plan.E, G: t.numGroups ?? 0, grouped, radix });
    const key: ForwardKey = {
      kernel: "forward",
      op,
      score: plan.score,
      pre: op === "topk" && (t.pre ?? false),
      radix,
      grouped,
      shared: sharesWords(plan.dtype, plan.E, plan.route),
      scr: layout.scr,
    };
    return { key, layout };
  }

  // The dispatches of a forward over n rows held in the given buffers.
  #forwardDispatches(
    plan: TopkPlan | AuxScoresPlan,
    op: "topk" | "aux",
    n: number,
    bufs: { logits: GPUBuffer; probs: GPUBuffer; inter: GPUBuffer; route: GPUBuffer; bias: BiasBuffer | null },
  ): Dispatch[] {
    const { E, K, dtype, route } = plan;
    const inB = BYTES_OF[dtype];
    const outB = op === "aux" ? 4 : inB;
    const rB = routeRowBytes(route, E, K);
    const fast = op === "topk" && !this.#general ? fastForwardKey(plan as TopkPlan) : null;
    if (fast !== null) {
      return this.#fastForwardDispatches(plan as TopkPlan, fast, n, bufs, [E * inB, E * outB, E * 4, rB]);
    }
    const { key, layout } = this.#forwardKey(plan, op);
    const compiled = pipelineFor(this.device, key, forwardKernel);
    const rows = this.#rowsPerDispatch(n, [E * inB, E * outB, E * 4, rB], "webgpu forward", 1, this.#gridRows(layout));
    const t = plan as Partial<TopkPlan>;
    const G = t.numGroups ?? 0;
    const GK = t.groupTopk ?? 0;
    const out: Dispatch[] = [];
    for (let t0 = 0; t0 < n; t0 += rows) {
      const m = Math.min(rows, n - t0);
      const region = (buffer: GPUBuffer, rb: number): Bound => ({ buffer, offset: t0 * rb, size: align4(m * rb) });
      const bindings = [
        region(bufs.logits, E * inB),
        region(bufs.probs, E * outB),
        region(bufs.inter, E * 4),
        region(bufs.route, rB),
      ];
      bindings.push(
        bufs.bias
          ? { buffer: bufs.bias.buffer, offset: 0, size: align4(E * BYTES_OF[bufs.bias.dtype]) }
          : this.#dummy(),
      );
      out.push({
        compiled,
        workgroups: Math.ceil(m / layout.rpw),
        bindings,
        uniforms: {
          ...rowUniforms(layout),
          T: m,
          E,
          K,
          G,
          GK,
          gsize: GK > 0 ? E / G : 1,
          per: GK > 0 ? K / GK : 0,
          loPasses: loPasses(E),
          L: Math.ceil(E / 8),
          scale: t.scale ?? 1,
          dt: DT_CODE[dtype],
          fmt: FMT_CODE[route],
          hasBias: bufs.bias ? 1 : 0,
          biasDt: DT_CODE[bufs.bias?.dtype ?? "float32"],
        },
      });
    }
    return out;
  }

  // The dispatches of a forward through the specialised kernel (gpu/_fast_kernels.ts).
  #fastForwardDispatches(
    plan: TopkPlan,
    key: FastForwardKey,
    n: number,
    bufs: { logits: GPUBuffer; probs: GPUBuffer; inter: GPUBuffer; route: GPUBuffer; bias: BiasBuffer | null },
    rowBytes: number[],
  ): Dispatch[] {
    const { E } = plan;
    const bias = bufs.bias
      ? { buffer: bufs.bias.buffer, offset: 0, size: align4(E * BYTES_OF[bufs.bias.dtype]) }
      : this.#dummy();
    return this.#rowDispatches(
      pipelineFor(this.device, key, fastForwardKernel),
      fastRowsPerWorkgroup(key),
      n,
      "webgpu forward",
      [[bufs.logits, rowBytes[0]!], [bufs.probs, rowBytes[1]!], [bufs.inter, E * 4], [bufs.route, rowBytes[3]!]],
      [bias],
      { scale: plan.scale, fmt: FMT_CODE[plan.route], rb: rowBytes[3]! },
    );
  }

  // Dispatches of a kernel that routes `rpw` rows a workgroup over n rows:
  // as many rows a dispatch as the binding and grid limits allow; `rowed`
  // bindings are regions of [buffer, bytes a row], `whole` ones follow them;
  // the uniforms get the dispatch's row count T.
  #rowDispatches(
    compiled: Compiled,
    rpw: number,
    n: number,
    what: string,
    rowed: [GPUBuffer, number][],
    whole: Bound[],
    uniforms: UniformValues,
  ): Dispatch[] {
    const rowBytes = rowed.map(([, rb]) => rb);
    const rows = this.#rowsPerDispatch(n, rowBytes, what, 1, rpw * this.#maxGrid * this.#maxGrid);
    const out: Dispatch[] = [];
    for (let t0 = 0; t0 < n; t0 += rows) {
      const m = Math.min(rows, n - t0);
      out.push({
        compiled,
        workgroups: Math.ceil(m / rpw),
        bindings: [
          ...rowed.map(([buffer, rb]): Bound => ({ buffer, offset: t0 * rb, size: Math.max(4, align4(m * rb)) })),
          ...whole,
        ],
        uniforms: { ...uniforms, T: m },
      });
    }
    return out;
  }

  async topkForward(plan: TopkPlan, logits: FloatTensor): Promise<TopkForwardOut> {
    const { T, E, K, dtype, route } = plan;
    const inB = BYTES_OF[dtype];
    const rB = routeRowBytes(route, E, K);
    const routeElems = route === "bytemap" || route === "bitmap_u8" ? rB : K;
    const probs = newFloat(dtype, T * E);
    // routing alone (plan.save false): the kernels still write an intermediate, which is not read back
    const intermediate = plan.save ? new Float32Array(T * E) : null;
    const routeOut: Uint8Array | IndexArray = plan.indicesOut ?? newRoute(route, T * routeElems);
    this.#forwardKey(plan, "topk"); // plan errors before any GPU work
    const perRound = this.#rowsPerRound(T, [2 * E * inB, 2 * E * inB, 8 * E, 2 * rB], "fusedTopkWithScoreFunction");
    const bias = this.#bias(plan);
    for (let r0 = 0; r0 < T; r0 += perRound) {
      const n = Math.min(perRound, T - r0);
      const logitsBuf = this.#upload(logits.data, r0 * E, n * E, "logits");
      const probsBuf = this.#pool.acquire(align4(n * E * inB), USAGE.output, "probs");
      const interBuf = this.#pool.acquire(n * E * 4, USAGE.output, "intermediate");
      const routeBuf = this.#pool.acquire(align4(n * rB), USAGE.output, "route");
      const dispatches = this.#forwardDispatches(plan, "topk", n, {
        logits: logitsBuf,
        probs: probsBuf,
        inter: interBuf,
        route: routeBuf,
        bias,
      });
      const [p, r, i] = await this.#submit(dispatches, [
        { buffer: probsBuf, bytes: n * E * inB },
        { buffer: routeBuf, bytes: n * rB },
        ...(intermediate ? [{ buffer: interBuf, bytes: n * E * 4 }] : []),
      ]);
      bytesOf(probs).set(p!, r0 * E * inB);
      bytesOf(routeOut).set(r!, r0 * rB);
      if (intermediate) bytesOf(intermediate).set(i!, r0 * E * 4);
      this.#pool.release(logitsBuf, probsBuf, interBuf, routeBuf);
    }
    if (bias?.pooled) this.#pool.release(bias.buffer);
    // the saved state keeps its own copies: callers may edit or reuse every array they get
    // (the intermediate: the caller's copy, made now for intermediateOut, else on first read)
    if (intermediate === null) return { probs, intermediate: null, route: routeOut, payload: null };
    const lazy = plan.intermediateOut === null;
    const payload: HostPayload = { intermediate, route: routeOut.slice() };
    return { probs, intermediate: lazy ? copier(intermediate) : intermediate, route: routeOut, payload };
  }

  /**
   * Top-k forward on GPU-resident logits: outputs are new buffers the caller
   * owns (usage STORAGE | COPY_SRC | COPY_DST); nothing is read back.
   */
  async topkForwardGpu(plan: TopkPlan, logits: GpuTensor): Promise<GpuTopkForwardOut> {
    const { T, E, K, dtype, route } = plan;
    const inB = BYTES_OF[dtype];
    const rB = routeRowBytes(route, E, K);
    this.#forwardKey(plan, "topk");
    this.#checkBufferSize(T * E * 4, "fusedTopkWithScoreFunction intermediate");
    const probs = this.#output(align4(T * E * inB), "probs");
    // routing alone (plan.save false): the kernels' intermediate goes to a pooled buffer, given back after
    const intermediate = plan.save
      ? this.#output(T * E * 4, "intermediate")
      : this.#pool.acquire(T * E * 4, USAGE.output, "intermediate");
    const routeBuf = this.#output(align4(T * rB), "route");
    await this.#filling(plan.save ? [probs, intermediate, routeBuf] : [probs, routeBuf], async () => {
      const bias = this.#bias(plan);
      try {
        await this.#submit(
          this.#forwardDispatches(plan, "topk", T, {
            logits: logits.buffer,
            probs,
            inter: intermediate,
            route: routeBuf,
            bias,
          }),
          [],
        );
      } finally {
        if (bias?.pooled) this.#pool.release(bias.buffer);
        if (!plan.save) this.#pool.release(intermediate);
      }
    });
    if (!plan.save) return { probs, intermediate: null, route: routeBuf, payload: null };
    return { probs, intermediate, route: routeBuf, payload: { gpu: true, intermediate, route: routeBuf } };
  }

  // the expert bias: the caller's GPU buffer, or the host bias uploaded (pooled)
  #bias(plan: TopkPlan): BiasBuffer | null {
    if (plan.biasGpu !== null) return { buffer: plan.biasGpu.buffer, dtype: plan.biasGpu.dtype, pooled: false };
    if (plan.bias === null) return null;
    return { buffer: this.#upload(plan.bias, 0, plan.E, "bias"), dtype: "float32", pooled: true };
  }

  // a small buffer bound where a kernel variant reads nothing
  #dummyBuf: GPUBuffer | null = null;
  #dummy(): Bound {
    this.#dummyBuf ??= this.#pool.acquire(256, USAGE.input, "unused");
    return { buffer: this.#dummyBuf, offset: 0, size: 256 };
  }

  #output(bytes: number, label: string): GPUBuffer {
    this.#checkBufferSize(bytes, label);
    return this.device.createBuffer({ label: `moe-router ${label}`, size: Math.max(4, bytes), usage: USAGE.output });
  }

  // ---- top-k backward --------------------------------------------------------------

  #backwardDispatches(
    plan: {
      E: number;
      K: number;
      dtype: FloatDType;
      route: RouteFormat;
      score: TopkPlan["score"];
      pre: boolean;
      scale: number;
    },
    op: "topk" | "aux",
    n: number,
    bufs: { grad: GPUBuffer; inter: GPUBuffer; route: GPUBuffer; out: GPUBuffer },
  ): Dispatch[] {
    const { E, K, dtype } = plan;
    const route: RouteFormat = op === "aux" ? "bytemap" : plan.route;
    const fast = op === "topk" && !this.#general ? fastBackwardKey(plan) : null;
    if (fast !== null) return this.#fastBackwardDispatches(plan, fast, n, bufs);
    const layout = rowLayout({ E, G: 0, grouped: false, radix: false, backward: true });
    const key: BackwardKey = {
      kernel: "backward",
      op,
      score: plan.score,
      pre: op === "topk" && plan.pre,
      shared: dtype !== "float32" && E % 2 === 1,
      scr: layout.scr,
    };
    const compiled = pipelineFor(this.device, key, backwardKernel);
    const outB = BYTES_OF[dtype];
    const gB = op === "aux" ? 4 : outB;
    const rB = op === "aux" ? 0 : routeRowBytes(route, E, K);
    const rows = this.#rowsPerDispatch(n, [E * gB, E * 4, rB, E * outB], "webgpu backward", 1, this.#gridRows(layout));
    const out: Dispatch[] = [];
    for (let t0 = 0; t0 < n; t0 += rows) {
      const m = Math.min(rows, n - t0);
      const region = (buffer: GPUBuffer, rb: number): Bound => ({
        buffer,
        offset: t0 * rb,
        size: Math.max(4, align4(m * rb)),
      });
      out.push({
        compiled,
        workgroups: Math.ceil(m / layout.rpw),
        bindings: [
          region(bufs.grad, E * gB),
          region(bufs.inter, E * 4),
          rB > 0 ? region(bufs.route, rB) : this.#dummy(),
          region(bufs.out, E * outB),
        ],
        uniforms: {
          ...rowUniforms(layout),
          T: m,
          E,
          K,
          G: 0,
          GK: 0,
          gsize: 1,
          per: 0,
          loPasses: 0,
          L: Math.ceil(E / 8),
          scale: plan.scale,
          dt: DT_CODE[dtype],
          fmt: FMT_CODE[route],
          hasBias: 0,
          biasDt: 0,
        },
      });
    }
    return out;
  }

  // The dispatches of a top-k backward through the specialised kernel (gpu/_fast_kernels.ts).
  #fastBackwardDispatches(
    plan: { E: number; K: number; dtype: FloatDType; route: RouteFormat; scale: number },
    key: FastBackwardKey,
    n: number,
    bufs: { grad: GPUBuffer; inter: GPUBuffer; route: GPUBuffer; out: GPUBuffer },
  ): Dispatch[] {
    const { E, K, dtype, route } = plan;
    const outB = BYTES_OF[dtype];
    const rB = routeRowBytes(route, E, K);
    return this.#rowDispatches(
      pipelineFor(this.device, key, fastBackwardKernel),
      fastBackwardRowsPerWorkgroup(key),
      n,
      "webgpu backward",
      [[bufs.grad, E * outB], [bufs.inter, E * 4], [bufs.route, rB], [bufs.out, E * outB]],
      [],
      { scale: plan.scale, fmt: FMT_CODE[route], rb: rB },
    );
  }

  async topkBackward(plan: TopkPlan, payload: unknown, grad: FloatTensor): Promise<FloatTensor["data"]> {
    const { T, E, K, dtype, route } = plan;
    const inB = BYTES_OF[dtype];
    const rB = routeRowBytes(route, E, K);
    const out = newFloat(dtype, T * E);
    const gpuSaved = (payload as GpuPayload).gpu === true ? payload as GpuPayload : null;
    const perRound = gpuSaved
      ? T
      : this.#rowsPerRound(T, [2 * E * inB, 8 * E, 2 * rB, 2 * E * inB], "fusedTopkWithScoreFunctionBackward");
    for (let r0 = 0; r0 < T; r0 += perRound) {
      const n = Math.min(perRound, T - r0);
      const gradBuf = this.#upload(grad.data, r0 * E, n * E, "gradProbs");
      const routeElems = route === "bytemap" || route === "bitmap_u8" ? rB : K;
      let interBuf: GPUBuffer;
      let routeBuf: GPUBuffer;
      const mine: GPUBuffer[] = [];
      if (gpuSaved) {
        interBuf = gpuSaved.intermediate;
        routeBuf = gpuSaved.route;
      } else {
        const saved = payload as HostPayload;
        interBuf = this.#upload(saved.intermediate, r0 * E, n * E, "intermediate");
        routeBuf = this.#upload(saved.route, r0 * routeElems, n * routeElems, "route");
        mine.push(interBuf, routeBuf);
      }
      const outBuf = this.#pool.acquire(align4(n * E * inB), USAGE.output, "gradLogits");
      const [g] = await this.#submit(
        this.#backwardDispatches(plan, "topk", n, { grad: gradBuf, inter: interBuf, route: routeBuf, out: outBuf }),
        [{ buffer: outBuf, bytes: n * E * inB }],
      );
      bytesOf(out).set(g!, r0 * E * inB);
      this.#pool.release(gradBuf, outBuf, ...mine);
    }
    return out;
  }

  /** Top-k backward with GPU-resident gradProbs: the result is a new buffer the caller owns. */
  async topkBackwardGpu(plan: TopkPlan, payload: unknown, grad: GpuTensor): Promise<GPUBuffer> {
    const { T, E, K, dtype, route } = plan;
    const rB = routeRowBytes(route, E, K);
    const routeElems = route === "bytemap" || route === "bitmap_u8" ? rB : K;
    const gpuSaved = (payload as GpuPayload).gpu === true ? payload as GpuPayload : null;
    const mine: GPUBuffer[] = [];
    let interBuf: GPUBuffer;
    let routeBuf: GPUBuffer;
    if (gpuSaved) {
      interBuf = gpuSaved.intermediate;
      routeBuf = gpuSaved.route;
    } else {
      const saved = payload as HostPayload;
      interBuf = this.#upload(saved.intermediate, 0, T * E, "intermediate");
      routeBuf = this.#upload(saved.route, 0, T * routeElems, "route");
      mine.push(interBuf, routeBuf);
    }
    const outBuf = this.#output(align4(T * E * BYTES_OF[dtype]), "gradLogits");
    try {
      await this.#filling([outBuf], () =>
        this.#submit(
          this.#backwardDispatches(plan, "topk", T, {
            grad: grad.buffer,
            inter: interBuf,
            route: routeBuf,
            out: outBuf,
          }),
          [],
        ));
    } finally {
      this.#pool.release(...mine);
    }
    return outBuf;
  }

  // ---- aux-loss scores ---------------------------------------------------------------

  async auxScoresForward(plan: AuxScoresPlan, logits: FloatTensor): Promise<AuxScoresForwardOut> {
    const { T, E, K, dtype, route } = plan;
    const inB = BYTES_OF[dtype];
    const rB = routeRowBytes(route, E, K);
    const { scores, route: routeOut } = newAuxScoresArrays(plan);
    const intermediate = new Float32Array(T * E); // the saved state's own
    this.#forwardKey(plan, "aux");
    const perRound = this.#rowsPerRound(T, [2 * E * inB, 8 * E, 8 * E, 2 * rB], "fusedComputeScoreForMoEAuxLoss");
    for (let r0 = 0; r0 < T; r0 += perRound) {
      const n = Math.min(perRound, T - r0);
      const logitsBuf = this.#upload(logits.data, r0 * E, n * E, "logits");
      const scoresBuf = this.#pool.acquire(n * E * 4, USAGE.output, "scores");
      const interBuf = this.#pool.acquire(n * E * 4, USAGE.output, "intermediate");
      const routeBuf = this.#pool.acquire(align4(n * rB), USAGE.output, "route");
      const [s, i, r] = await this.#submit(
        this.#forwardDispatches(plan, "aux", n, {
          logits: logitsBuf,
          probs: scoresBuf,
          inter: interBuf,
          route: routeBuf,
          bias: null,
        }),
        [
          { buffer: scoresBuf, bytes: n * E * 4 },
          { buffer: interBuf, bytes: n * E * 4 },
          { buffer: routeBuf, bytes: n * rB },
        ],
      );
      bytesOf(scores).set(s!, r0 * E * 4);
      bytesOf(intermediate).set(i!, r0 * E * 4);
      routeOut.set(r!, r0 * rB);
      this.#pool.release(logitsBuf, scoresBuf, interBuf, routeBuf);
    }
    return { scores, intermediate: copier(intermediate), route: routeOut, payload: intermediate };
  }

  /**
   * Aux-loss scores of GPU-resident logits: scores, intermediate and routing
   * map are new buffers the caller owns (usage STORAGE | COPY_SRC |
   * COPY_DST); nothing is read back; the state keeps the intermediate buffer.
   */
  async auxScoresForwardGpu(plan: AuxScoresPlan, logits: GpuTensor): Promise<GpuAuxScoresForwardOut> {
    const { T, E, K, route } = plan;
    const rB = routeRowBytes(route, E, K);
    this.#forwardKey(plan, "aux"); // plan errors before any GPU work
    this.#checkBufferSize(T * E * 4, "fusedComputeScoreForMoEAuxLoss scores");
    const scores = this.#output(T * E * 4, "scores");
    const intermediate = this.#output(T * E * 4, "intermediate");
    const routeBuf = this.#output(align4(T * rB), "route");
    await this.#filling([scores, intermediate, routeBuf], () =>
      this.#submit(
        this.#forwardDispatches(plan, "aux", T, {
          logits: logits.buffer,
          probs: scores,
          inter: intermediate,
          route: routeBuf,
          bias: null,
        }),
        [],
      ));
    return { scores, intermediate, route: routeBuf, payload: { gpu: true, intermediate, route: routeBuf } };
  }

  // The dispatches of an aux-scores backward over n rows (float32 gradScores, intermediate, gradLogits).
  #auxScoresBackwardDispatches(
    plan: AuxScoresPlan,
    n: number,
    bufs: { grad: GPUBuffer; inter: GPUBuffer; out: GPUBuffer },
  ): Dispatch[] {
    // every expert takes part (as with pre-softmax); there is no routing output to read
    return this.#backwardDispatches({ ...plan, pre: true, scale: 1 }, "aux", n, { ...bufs, route: bufs.grad });
  }

  async auxScoresBackward(
    plan: AuxScoresPlan,
    payload: unknown,
    grad: Tensor<"float32">,
  ): Promise<FloatTensor["data"]> {
    const { T, E, dtype } = plan;
    const outB = BYTES_OF[dtype];
    const gpuSaved = gpuPayloadOf(payload);
    const out = newFloat(dtype, T * E);
    // a GPU-resident state is one buffer: one round
    const perRound = gpuSaved
      ? T
      : this.#rowsPerRound(T, [8 * E, 8 * E, 2 * E * outB], "fusedComputeScoreForMoEAuxLossBackward");
    for (let r0 = 0; r0 < T; r0 += perRound) {
      const n = Math.min(perRound, T - r0);
      const gradBuf = this.#upload(grad.data, r0 * E, n * E, "gradScores");
      const mine = gpuSaved ? [] : [this.#upload(payload as Float32Array, r0 * E, n * E, "intermediate")];
      const interBuf = gpuSaved?.intermediate ?? mine[0]!;
      const outBuf = this.#pool.acquire(align4(n * E * outB), USAGE.output, "gradLogits");
      try {
        const [g] = await this.#submit(
          this.#auxScoresBackwardDispatches(plan, n, { grad: gradBuf, inter: interBuf, out: outBuf }),
          [{ buffer: outBuf, bytes: n * E * outB }],
        );
        bytesOf(out).set(g!, r0 * E * outB);
      } finally {
        this.#pool.release(gradBuf, outBuf, ...mine);
      }
    }
    return out;
  }

  /** Aux-scores backward with GPU-resident gradScores: the result is a new buffer the caller owns. */
  async auxScoresBackwardGpu(plan: AuxScoresPlan, payload: unknown, grad: GpuTensor): Promise<GPUBuffer> {
    const { T, E, dtype } = plan;
    const gpuSaved = gpuPayloadOf(payload);
    this.#checkBufferSize(T * E * 4, "fusedComputeScoreForMoEAuxLossBackward intermediate");
    const mine = gpuSaved ? [] : [this.#upload(payload as Float32Array, 0, T * E, "intermediate")];
    const inter = gpuSaved?.intermediate ?? mine[0]!;
    try {
      const out = this.#output(align4(T * E * BYTES_OF[dtype]), "gradLogits");
      await this.#filling(
        [out],
        () => this.#submit(this.#auxScoresBackwardDispatches(plan, T, { grad: grad.buffer, inter, out }), []),
      );
      return out;
    } finally {
      this.#pool.release(...mine);
    }
  }

  // ---- aux loss -------------------------------------------------------------------------

  // Rows summed by one thread of the column sums, and the rows of one dispatch (size errors before any GPU work).
  #auxLossLayout(plan: GpuAuxLossPlan): { chunks: number; perDispatch: number } {
    const { rows, cols, dtype } = plan;
    const chunks = Math.max(1, Math.ceil(rows / AUX_CHUNK));
    this.#checkBufferSize(chunks * cols * 4, "fusedMoEAuxLoss partial sums");
    this.#checkBufferSize(rows * cols * BYTES_OF[dtype], "fusedMoEAuxLoss probs");
    // a dispatch's grid is column blocks x chunks: as many chunks as the grid holds
    const xBlocks = Math.ceil(cols / AUX_WG);
    const gridChunks = Math.floor((this.#maxGrid * this.#maxGrid) / xBlocks);
    if (gridChunks < 1) {
      throw new RangeError(
        `fusedMoEAuxLoss: ${cols} columns need ${xBlocks} workgroups a row of chunks, beyond this device's grid of ${this.#maxGrid}x${this.#maxGrid}`,
      );
    }
    const perDispatch = this.#rowsPerDispatch(
      rows,
      [cols * BYTES_OF[dtype]],
      "fusedMoEAuxLoss",
      AUX_CHUNK,
      AUX_CHUNK * gridChunks,
    );
    return { chunks, perDispatch };
  }

  // tokensPerExpert as float32 on the device: the host copy uploaded, the
  // caller's float32 buffer read in place, or the caller's int32 / int64 /
  // bfloat16 buffer widened into scratch by a dispatch (`pre`) that runs first.
  #tpe(plan: GpuAuxLossPlan): { bound: Bound; pre: Dispatch[]; scratch: GPUBuffer[] } {
    const { cols } = plan;
    const size = align4(cols * 4);
    const t = plan.tpe;
    if (t instanceof Float32Array) {
      const buffer = this.#upload(t, 0, cols, "tokensPerExpert");
      return { bound: { buffer, offset: 0, size }, pre: [], scratch: [buffer] };
    }
    if (t.dtype === "float32") return { bound: { buffer: t.buffer, offset: 0, size }, pre: [], scratch: [] };
    const key: AuxLossKey = { kernel: "auxTpe", dtype: t.dtype };
    const widen: Dispatch = {
      compiled: pipelineFor(this.device, key, auxLossKernel),
      workgroups: Math.ceil(cols / AUX_WG),
      bindings: [{ buffer: t.buffer, offset: 0, size: align4(cols * BYTES_OF[t.dtype]) }],
      uniforms: { rows: 0, cols, chunkRows: 0, chunks: 0, c0: 0, e0: 0, n: cols, g: 0 },
    };
    const buffer = this.#pool.acquire(size, USAGE.output, "tokensPerExpert");
    widen.bindings.push({ buffer, offset: 0, size });
    return { bound: { buffer, offset: 0, size }, pre: [widen], scratch: [buffer] };
  }

  // Runs the aux loss of the probs in `probs` (rows x cols from offset 0) into `loss` (4 bytes: the value in its
  // dtype's bits); returns the loss bytes when `read`.
  async #auxLoss(
    plan: GpuAuxLossPlan,
    layout: { chunks: number; perDispatch: number },
    probs: GPUBuffer,
    loss: GPUBuffer,
    read: boolean,
  ): Promise<Uint8Array | undefined> {
    const { rows, cols, dtype } = plan;
    const { chunks, perDispatch } = layout;
    const inB = BYTES_OF[dtype];
    const colsum = pipelineFor(this.device, { kernel: "auxColsum", dtype } satisfies AuxLossKey, auxLossKernel);
    const finish = pipelineFor(this.device, { kernel: "auxFinish", dtype } satisfies AuxLossKey, auxLossKernel);
    const tpe = this.#tpe(plan);
    const partial = this.#pool.acquire(chunks * cols * 4, USAGE.output, "partial");
    // no rows, no column sums: the finish reads zeros (the pool's buffers are not cleared)
    if (rows === 0) this.device.queue.writeBuffer(partial, 0, new Uint8Array(cols * 4));
    const common = {
      rows: 0,
      cols,
      chunkRows: AUX_CHUNK,
      chunks: 0,
      c0: 0,
      e0: 0,
      n: 0,
      g: Math.fround(plan.constant),
    };
    const dispatches: Dispatch[] = [...tpe.pre];
    for (let r0 = 0; r0 < rows; r0 += perDispatch) {
      const m = Math.min(perDispatch, rows - r0);
      const mc = Math.ceil(m / AUX_CHUNK);
      const xBlocks = Math.ceil(cols / AUX_WG);
      dispatches.push({
        compiled: colsum,
        // a 2-D grid: x = column blocks, y = chunks (gridX = xBlocks, set through foldGrid's width)
        workgroups: xBlocks * mc,
        bindings: [
          { buffer: probs, offset: r0 * cols * inB, size: align4(m * cols * inB) },
          { buffer: partial, offset: 0, size: chunks * cols * 4 },
        ],
        uniforms: { ...common, rows: m, chunks: mc, c0: r0 / AUX_CHUNK, n: xBlocks },
      });
    }
    dispatches.push({
      compiled: finish,
      workgroups: 1,
      bindings: [{ buffer: partial, offset: 0, size: chunks * cols * 4 }, tpe.bound, {
        buffer: loss,
        offset: 0,
        size: 4,
      }],
      uniforms: { ...common, chunks },
    });
    try {
      const [bits] = await this.#submit(dispatches, read ? [{ buffer: loss, bytes: 4 }] : []);
      return bits;
    } finally {
      this.#pool.release(partial, ...tpe.scratch);
    }
  }

  /** Aux loss of host probs (tokensPerExpert on the host, or GPU-resident): the loss comes back. */
  async auxLossForward(plan: GpuAuxLossPlan, probs: FloatTensor): Promise<FloatTensor["data"]> {
    const { rows, cols, dtype } = plan;
    const layout = this.#auxLossLayout(plan);
    const probsBuf = this.#upload(probs.data, 0, rows * cols, "probs");
    const loss = this.#pool.acquire(4, USAGE.output, "loss");
    try {
      const bits = await this.#auxLoss(plan, layout, probsBuf, loss, true);
      const out = newFloat(dtype, 1);
      bytesOf(out).set(bits!.subarray(0, BYTES_OF[dtype]));
      return out;
    } finally {
      this.#pool.release(probsBuf, loss);
    }
  }

  /**
   * Aux loss of GPU-resident probs: the loss is a new 4-byte buffer the
   * caller owns (the value in the probs dtype's bits, at offset 0).
   */
  async auxLossForwardGpu(plan: GpuAuxLossPlan, probs: GpuTensor): Promise<GPUBuffer> {
    const layout = this.#auxLossLayout(plan);
    const loss = this.#output(4, "loss");
    await this.#filling([loss], () => this.#auxLoss(plan, layout, probs.buffer, loss, false));
    return loss;
  }

  // The dispatches of the aux-loss backward into `out` (rows x cols of the plan's dtype): a number
  // gradLoss travels in the uniforms, a GPU-resident one is read by the kernel.
  #auxLossBackwardDispatches(
    plan: GpuAuxLossPlan,
    tpe: Bound,
    out: GPUBuffer,
    gradLoss: number | GpuTensor<FloatDType>,
  ): Dispatch[] {
    const { rows, cols, dtype } = plan;
    const outB = BYTES_OF[dtype];
    const total = rows * cols;
    const gpuGrad = typeof gradLoss === "number" ? null : gradLoss;
    const key: AuxLossKey = gpuGrad === null
      ? { kernel: "auxBackward", dtype }
      : { kernel: "auxBackward", dtype, gradLoss: gpuGrad.dtype };
    const compiled = pipelineFor(this.device, key, auxLossKernel);
    // g = gradLoss * constant, each rounded to float32 first (the kernel multiplies a GPU-resident gradLoss in)
    const c = Math.fround(plan.constant);
    const g = gpuGrad === null ? Math.fround(Math.fround(gradLoss as number) * c) : c;
    // elements of a dispatch: within the binding limit, and one thread a word within the grid
    const gridElems = AUX_WG * this.#maxGrid * this.#maxGrid * (4 / outB);
    const elems = this.#rowsPerDispatch(total, [outB], "fusedMoEAuxLossBackward", 2, gridElems);
    const dispatches: Dispatch[] = [];
    for (let e0 = 0; e0 < total; e0 += elems) {
      const m = Math.min(elems, total - e0);
      const words = outB === 2 ? Math.ceil(m / 2) : m;
      dispatches.push({
        compiled,
        workgroups: Math.ceil(words / AUX_WG),
        bindings: [
          tpe,
          { buffer: out, offset: e0 * outB, size: words * 4 },
          ...(gpuGrad === null ? [] : [{ buffer: gpuGrad.buffer, offset: 0, size: 4 }]),
        ],
        uniforms: { rows, cols, chunkRows: 0, chunks: 0, c0: 0, e0, n: words, g },
      });
    }
    return dispatches;
  }

  /** Aux-loss backward to a host gradProbs. */
  async auxLossBackward(plan: GpuAuxLossPlan, gradLoss: number): Promise<FloatTensor["data"]> {
    const { rows, cols, dtype } = plan;
    const bytes = rows * cols * BYTES_OF[dtype];
    this.#checkBufferSize(align4(bytes), "fusedMoEAuxLossBackward");
    const tpe = this.#tpe(plan);
    const outBuf = this.#pool.acquire(align4(bytes), USAGE.output, "gradProbs");
    try {
      const [g] = await this.#submit(
        [...tpe.pre, ...this.#auxLossBackwardDispatches(plan, tpe.bound, outBuf, gradLoss)],
        [{ buffer: outBuf, bytes }],
      );
      const out = newFloat(dtype, rows * cols);
      bytesOf(out).set(g!);
      return out;
    } finally {
      this.#pool.release(outBuf, ...tpe.scratch);
    }
  }

  /**
   * Aux-loss backward to a GPU-resident gradProbs (a new buffer the caller
   * owns); gradLoss is a number or a one-element GPU-resident tensor.
   */
  async auxLossBackwardGpu(plan: GpuAuxLossPlan, gradLoss: number | GpuTensor<FloatDType>): Promise<GPUBuffer> {
    const { rows, cols, dtype } = plan;
    const bytes = align4(rows * cols * BYTES_OF[dtype]);
    this.#checkBufferSize(bytes, "fusedMoEAuxLossBackward");
    const out = this.#output(bytes, "gradProbs");
    await this.#filling([out], async () => {
      const tpe = this.#tpe(plan);
      try {
        await this.#submit([...tpe.pre, ...this.#auxLossBackwardDispatches(plan, tpe.bound, out, gradLoss)], []);
      } finally {
        this.#pool.release(...tpe.scratch);
      }
    });
    return out;
  }

  // Runs `work`, which fills new output buffers; when it fails the caller never gets them, so they are destroyed.
  async #filling(outputs: readonly GPUBuffer[], work: () => Promise<unknown>): Promise<void> {
    try {
      await work();
    } catch (e) {
      for (const b of outputs) b.destroy();
      throw e;
    }
  }
}

// The GPU-resident payload of a saved state, or null for a host one.
function gpuPayloadOf(payload: unknown): GpuPayload | null {
  return typeof payload === "object" && payload !== null && (payload as GpuPayload).gpu === true
    ? payload as GpuPayload
    : null;
}

// Whether a forward's outputs have words that neighbouring rows (or lanes)
// share: 16-bit rows of odd length, routing-map rows not a multiple of 4
// bytes, int16 indices (positions written by different lanes).
function sharesWords(dtype: FloatDType, E: number, route: RouteFormat): boolean {
  if (dtype !== "float32" && E % 2 === 1) return true;
  if (route === "bytemap") return E % 4 !== 0;
  if (route === "bitmap_u8") return Math.ceil(E / 8) % 4 !== 0;
  return route === "int16";
}

// the uniforms of a row layout
function rowUniforms(l: RowLayout): UniformValues {
  return { tpr: l.tpr, mw: l.mw, cached: l.cached, oMask: l.oMask, oG: l.oG, oW: l.oW };
}

function bytesOf(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}
