// The WebAssembly backend: host side of wasm/assembly/router.ts. It lays out
// the module's linear memory for a chunk of tokens, copies inputs in, runs a
// kernel and copies outputs out. Memory is kept between calls and grown only
// when a larger chunk arrives; big batches are cut into chunks of tokens so
// that it stays bounded whatever the batch size.
import type { AuxScoresForwardOut, Backend, TopkForwardOut } from "../_backend.ts";
import type { AuxLossPlan, AuxScoresPlan, RouteFormat, TopkPlan } from "../_validate.ts";
import type { FloatDType, FloatTensor, IndexArray, Tensor } from "../_types.ts";
import { ARRAY_OF, BYTES_OF } from "../tensor.ts";
import { ROUTER_WASM_BASE64 } from "./_router_wasm.ts";

interface Kernels {
  memory: WebAssembly.Memory;
  heapBase(): number;
  scratchBytes(E: number, K: number, G: number): number;
  mathCheck(kind: number, ptr: number, n: number): void;
  topkForward(
    logits: number,
    dt: number,
    T: number,
    E: number,
    K: number,
    fn: number,
    pre: number,
    G: number,
    GK: number,
    scale: number,
    bias: number,
    fmt: number,
    radixThreshold: number,
    probs: number,
    inter: number,
    route: number,
    scratch: number,
  ): void;
  topkBackward(
    grad: number,
    dt: number,
    T: number,
    E: number,
    K: number,
    fn: number,
    pre: number,
    scale: number,
    inter: number,
    fmt: number,
    route: number,
    out: number,
    scratch: number,
  ): void;
  auxScoresForward(
    logits: number,
    dt: number,
    T: number,
    E: number,
    K: number,
    fn: number,
    fmt: number,
    radixThreshold: number,
    scores: number,
    inter: number,
    route: number,
    scratch: number,
  ): void;
  auxScoresBackward(
    grad: number,
    T: number,
    E: number,
    fn: number,
    inter: number,
    dt: number,
    out: number,
    scratch: number,
  ): void;
  auxLossSum(probs: number, dt: number, rows: number, cols: number, tpe: number, colsum: number): number;
  auxLossBackward(g: number, rows: number, cols: number, tpe: number, dt: number, out: number, scratch: number): void;
}

// codes shared with wasm/assembly/router.ts
const DT = { float32: 0, float16: 1, bfloat16: 2 } as const;
const SCORE = { softmax: 0, sigmoid: 1, sqrtsoftplus: 2 } as const;
const ROUTE: Record<RouteFormat, number> = { bytemap: 0, bitmap_u8: 1, int16: 2, int32: 3, int64: 4 };

/** Default bytes of token data (inputs and outputs) per kernel call. */
export const DEFAULT_CHUNK_BYTES = 64 << 20;
// wasm32 addresses: the module can never hold more than this
const MAX_MEMORY = 4 * 1024 * 1024 * 1024 - 65536;
const PAGE = 65536;

let compiled: Promise<WebAssembly.Module> | undefined;

/** Compiles the embedded module once per process (asynchronously: browsers refuse big synchronous compiles). */
function compile(): Promise<WebAssembly.Module> {
  compiled ??= (() => {
    const bin = atob(ROUTER_WASM_BASE64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return WebAssembly.compile(bytes);
  })();
  return compiled;
}

/** Instantiates the kernels: one instance (and one linear memory) per backend. */
export async function instantiateKernels(): Promise<Kernels> {
  const instance = await WebAssembly.instantiate(await compile(), {});
  return instance.exports as unknown as Kernels;
}

function align16(n: number): number {
  return Math.ceil(n / 16) * 16;
}

function routeRowBytes(route: RouteFormat, E: number, K: number): number {
  switch (route) {
    case "bytemap":
      return E;
    case "bitmap_u8":
      return Math.ceil(E / 8);
    default:
      return K * BYTES_OF[route];
  }
}

/** Bump allocator over the module's memory, rebuilt for every call. */
class Layout {
  #next: number;
  constructor(base: number) {
    this.#next = align16(base);
  }
  /** Reserves n bytes (+16 of slack for vector stores), 16-byte aligned. */
  take(n: number): number {
    const at = this.#next;
    this.#next = align16(at + n + 16);
    return at;
  }
  get end(): number {
    return this.#next;
  }
}

/** Options of the WebAssembly backend. */
export interface WasmBackendOptions {
  /** Bytes of token data per kernel call; batches beyond it are cut into chunks of tokens. */
  chunkBytes?: number;
}

/** Runs the router kernels in WebAssembly on host arrays. */
export class WasmBackend implements Backend {
  readonly name = "wasm" as const;
  #k: Kernels;
  #chunkBytes: number;

  private constructor(k: Kernels, chunkBytes: number) {
    this.#k = k;
    this.#chunkBytes = chunkBytes;
  }

  /** Creates a backend with its own module instance. */
  static async create(options: WasmBackendOptions = {}): Promise<WasmBackend> {
    return new WasmBackend(await instantiateKernels(), options.chunkBytes ?? DEFAULT_CHUNK_BYTES);
  }

  /** Bytes of linear memory the module holds now. */
  get memoryBytes(): number {
    return this.#k.memory.buffer.byteLength;
  }

  dispose(): void {
    // the instance and its memory go with the last reference; nothing to free by hand
  }

  // Grows linear memory to `end` bytes, with a clear error beyond wasm32's reach.
  #ensure(end: number, what: string): void {
    if (end > MAX_MEMORY) {
      throw new RangeError(
        `${what} needs ${end} bytes of WebAssembly memory for one token chunk, beyond the 4 GiB limit of wasm32`,
      );
    }
    const have = this.#k.memory.buffer.byteLength;
    if (end > have) this.#k.memory.grow(Math.ceil((end - have) / PAGE));
  }

  // How many tokens fit one chunk, given the token data bytes per token.
  #chunk(T: number, perToken: number): number {
    return Math.max(1, Math.min(T, Math.floor(this.#chunkBytes / Math.max(1, perToken))));
  }

  #bytes(): Uint8Array {
    return new Uint8Array(this.#k.memory.buffer);
  }

  // Copies elements [from, from + n) of a typed array into memory at ptr.
  #put(ptr: number, data: ArrayBufferView & { BYTES_PER_ELEMENT: number }, from: number, n: number): void {
    const b = data.BYTES_PER_ELEMENT;
    this.#bytes().set(new Uint8Array(data.buffer, data.byteOffset + from * b, n * b), ptr);
  }

  // Copies n elements at ptr out of memory into dst at element `to`.
  #get(ptr: number, dst: ArrayBufferView & { BYTES_PER_ELEMENT: number }, to: number, n: number): void {
    const b = dst.BYTES_PER_ELEMENT;
    new Uint8Array(dst.buffer, dst.byteOffset + to * b, n * b).set(new Uint8Array(this.#k.memory.buffer, ptr, n * b));
  }

  topkForward(plan: TopkPlan, logits: FloatTensor): Promise<TopkForwardOut> {
    const { T, E, K, dtype, route } = plan;
    const inB = BYTES_OF[dtype];
    const rB = routeRowBytes(route, E, K);
    const probs = newFloat(dtype, T * E);
    const intermediate = new Float32Array(T * E);
    const routeOut: Uint8Array | IndexArray = plan.indicesOut ?? newRoute(route, T, E, K);
    const n = this.#chunk(T, 2 * E * inB + 4 * E + rB);
    const k = this.#k;
    const L = new Layout(k.heapBase());
    const scratch = L.take(k.scratchBytes(E, K, plan.numGroups));
    const bias = plan.bias ? L.take(4 * align16(E)) : 0;
    const inP = L.take(n * E * inB);
    const probsP = L.take(n * E * inB);
    const interP = L.take(n * E * 4);
    const routeP = L.take(n * rB);
    this.#ensure(L.end, "fusedTopkWithScoreFunction");
    if (plan.bias) {
      this.#bytes().fill(0, bias, bias + 4 * align16(E));
      this.#put(bias, plan.bias, 0, E);
    }
    const routeElems = route === "bytemap" || route === "bitmap_u8" ? rB : K;
    for (let t0 = 0; t0 < T; t0 += n) {
      const m = Math.min(n, T - t0);
      this.#put(inP, logits.data, t0 * E, m * E);
      k.topkForward(
        inP,
        DT[dtype],
        m,
        E,
        K,
        SCORE[plan.score],
        plan.pre ? 1 : 0,
        plan.numGroups,
        plan.groupTopk,
        plan.scale,
        bias,
        ROUTE[route],
        plan.radixThreshold,
        probsP,
        interP,
        routeP,
        scratch,
      );
      this.#get(probsP, probs, t0 * E, m * E);
      this.#get(interP, intermediate, t0 * E, m * E);
      this.#get(routeP, routeOut, t0 * routeElems, m * routeElems);
    }
    // the saved state keeps its own copy of dense indices: callers often reuse their buffer
    const saved = route === "bytemap" || route === "bitmap_u8" ? routeOut : routeOut.slice();
    return Promise.resolve({ probs, intermediate, route: routeOut, payload: { intermediate, route: saved } });
  }

  topkBackward(plan: TopkPlan, payload: unknown, grad: FloatTensor): Promise<FloatTensor["data"]> {
    const { T, E, K, dtype, route } = plan;
    const saved = payload as { intermediate: Float32Array; route: Uint8Array | IndexArray };
    const inB = BYTES_OF[dtype];
    const rB = routeRowBytes(route, E, K);
    const out = newFloat(dtype, T * E);
    const n = this.#chunk(T, 2 * E * inB + 4 * E + rB);
    const k = this.#k;
    const L = new Layout(k.heapBase());
    const scratch = L.take(k.scratchBytes(E, K, 0));
    const gradP = L.take(n * E * inB);
    const interP = L.take(n * E * 4);
    const routeP = L.take(n * rB);
    const outP = L.take(n * E * inB);
    this.#ensure(L.end, "fusedTopkWithScoreFunctionBackward");
    const routeElems = route === "bytemap" || route === "bitmap_u8" ? rB : K;
    for (let t0 = 0; t0 < T; t0 += n) {
      const m = Math.min(n, T - t0);
      this.#put(gradP, grad.data, t0 * E, m * E);
      this.#put(interP, saved.intermediate, t0 * E, m * E);
      this.#put(routeP, saved.route, t0 * routeElems, m * routeElems);
      k.topkBackward(
        gradP,
        DT[dtype],
        m,
        E,
        K,
        SCORE[plan.score],
        plan.pre ? 1 : 0,
        plan.scale,
        interP,
        ROUTE[route],
        routeP,
        outP,
        scratch,
      );
      this.#get(outP, out, t0 * E, m * E);
    }
    return Promise.resolve(out);
  }

  auxScoresForward(plan: AuxScoresPlan, logits: FloatTensor): Promise<AuxScoresForwardOut> {
    const { T, E, K, dtype, route } = plan;
    const inB = BYTES_OF[dtype];
    const rB = routeRowBytes(route, E, K);
    const scores = new Float32Array(T * E);
    const intermediate = new Float32Array(T * E);
    const routeOut = new Uint8Array(T * rB);
    const n = this.#chunk(T, E * inB + 8 * E + rB);
    const k = this.#k;
    const L = new Layout(k.heapBase());
    const scratch = L.take(k.scratchBytes(E, K, 0));
    const inP = L.take(n * E * inB);
    const scoresP = L.take(n * E * 4);
    const interP = L.take(n * E * 4);
    const routeP = L.take(n * rB);
    this.#ensure(L.end, "fusedComputeScoreForMoEAuxLoss");
    for (let t0 = 0; t0 < T; t0 += n) {
      const m = Math.min(n, T - t0);
      this.#put(inP, logits.data, t0 * E, m * E);
      k.auxScoresForward(
        inP,
        DT[dtype],
        m,
        E,
        K,
        SCORE[plan.score],
        ROUTE[route],
        plan.radixThreshold,
        scoresP,
        interP,
        routeP,
        scratch,
      );
      this.#get(scoresP, scores, t0 * E, m * E);
      this.#get(interP, intermediate, t0 * E, m * E);
      this.#get(routeP, routeOut, t0 * rB, m * rB);
    }
    return Promise.resolve({ scores, intermediate, route: routeOut, payload: intermediate });
  }

  auxScoresBackward(plan: AuxScoresPlan, payload: unknown, grad: Tensor<"float32">): Promise<FloatTensor["data"]> {
    const { T, E, dtype } = plan;
    const intermediate = payload as Float32Array;
    const outB = BYTES_OF[dtype];
    const out = newFloat(dtype, T * E);
    const n = this.#chunk(T, 8 * E + E * outB);
    const k = this.#k;
    const L = new Layout(k.heapBase());
    const scratch = L.take(k.scratchBytes(E, 1, 0));
    const gradP = L.take(n * E * 4);
    const interP = L.take(n * E * 4);
    const outP = L.take(n * E * outB);
    this.#ensure(L.end, "fusedComputeScoreForMoEAuxLossBackward");
    for (let t0 = 0; t0 < T; t0 += n) {
      const m = Math.min(n, T - t0);
      this.#put(gradP, grad.data, t0 * E, m * E);
      this.#put(interP, intermediate, t0 * E, m * E);
      k.auxScoresBackward(gradP, m, E, SCORE[plan.score], interP, DT[dtype], outP, scratch);
      this.#get(outP, out, t0 * E, m * E);
    }
    return Promise.resolve(out);
  }

  auxLossForward(plan: AuxLossPlan, probs: FloatTensor): Promise<FloatTensor["data"]> {
    const { rows, cols, dtype } = plan;
    const inB = BYTES_OF[dtype];
    const n = this.#chunk(rows, cols * inB);
    const k = this.#k;
    const L = new Layout(k.heapBase());
    const tpeP = L.take(cols * 4);
    const colsumP = L.take(cols * 4);
    const inP = L.take(n * cols * inB);
    this.#ensure(L.end, "fusedMoEAuxLoss");
    this.#put(tpeP, plan.tpe, 0, cols);
    let total = 0;
    for (let t0 = 0; t0 < rows; t0 += n) {
      const m = Math.min(n, rows - t0);
      this.#put(inP, probs.data, t0 * cols, m * cols);
      total = Math.fround(total + k.auxLossSum(inP, DT[dtype], m, cols, tpeP, colsumP));
    }
    const loss = newFloat(dtype, 1);
    writeNarrowed(loss, Math.fround(total * Math.fround(plan.constant)));
    return Promise.resolve(loss);
  }

  auxLossBackward(plan: AuxLossPlan, gradLoss: number): Promise<FloatTensor["data"]> {
    const { rows, cols, dtype } = plan;
    const outB = BYTES_OF[dtype];
    const out = newFloat(dtype, rows * cols);
    const n = this.#chunk(rows, cols * outB);
    const k = this.#k;
    const L = new Layout(k.heapBase());
    const tpeP = L.take(cols * 4);
    const scratch = L.take(cols * 4);
    const outP = L.take(n * cols * outB);
    this.#ensure(L.end, "fusedMoEAuxLossBackward");
    this.#put(tpeP, plan.tpe, 0, cols);
    const g = Math.fround(Math.fround(gradLoss) * Math.fround(plan.constant));
    for (let t0 = 0; t0 < rows; t0 += n) {
      const m = Math.min(n, rows - t0);
      k.auxLossBackward(g, m, cols, tpeP, DT[dtype], outP, scratch);
      this.#get(outP, out, t0 * cols, m * cols);
    }
    return Promise.resolve(out);
  }

  /** Test hook: runs a SIMD math routine (0 exp, 1 log1p, 2 sigmoid, 3 sqrtsoftplus) over xs. */
  mathCheck(kind: number, xs: Float32Array): Float32Array {
    const n = align16(xs.length);
    const L = new Layout(this.#k.heapBase());
    const p = L.take(n * 4);
    this.#ensure(L.end, "mathCheck");
    this.#bytes().fill(0, p, p + n * 4);
    this.#put(p, xs, 0, xs.length);
    this.#k.mathCheck(kind, p, n);
    const out = new Float32Array(xs.length);
    this.#get(p, out, 0, xs.length);
    return out;
  }
}

function newFloat(dtype: FloatDType, n: number): FloatTensor["data"] {
  return new (ARRAY_OF[dtype] as new (n: number) => FloatTensor["data"])(n);
}

function newRoute(route: RouteFormat, T: number, E: number, K: number): Uint8Array | IndexArray {
  if (route === "bytemap" || route === "bitmap_u8") return new Uint8Array(T * routeRowBytes(route, E, K));
  return new (ARRAY_OF[route] as new (n: number) => IndexArray)(T * K);
}

// Stores a float32 value into a one-element array of a float dtype (bfloat16: round to nearest even).
function writeNarrowed(dst: FloatTensor["data"], v: number): void {
  if (dst instanceof Uint16Array) {
    const bits = new Uint32Array(new Float32Array([v]).buffer)[0] as number;
    dst[0] = (bits & 0x7fffffff) > 0x7f800000 ? (bits >>> 16) | 0x40 : (bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16;
  } else {
    dst[0] = v;
  }
}
