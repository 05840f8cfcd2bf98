// The WebAssembly backend: host side of wasm/assembly/router.ts. It lays out
// the module's linear memory for a chunk of tokens, copies inputs in, runs a
// kernel (split across worker threads for big chunks) and copies outputs
// out. Memory is kept between calls and grown only when a larger chunk
// arrives; big batches are cut into chunks of tokens so that it stays bounded
// whatever the batch size. Calls on one backend run one after another (they
// share the memory layout), in the order they were made.
//
// The probs and the top-k gradient are sparse (K nonzeros per token, but for
// pre-softmax gradients): the kernels exchange them as compact (expert,
// value) rows that the host scatters into fresh zeroed arrays, instead of
// copying dense rows out of the module; but for rows of a few vectors
// (DENSE_ROWS_E), which cross the module's boundary dense (the forward's
// probs, the backward's gradProbs and gradLogits): whole rows copied cost
// less than K values a token gathered or scattered here. (Their backward
// runs in one kernel, topkBackwardLanes: ids, gather, arithmetic, scatter.)
import {
  type AuxScoresForwardOut,
  type Backend,
  copier,
  newAuxScoresArrays,
  type TopkForwardOut,
} from "../_backend.ts";
import { type AuxLossPlan, type AuxScoresPlan, type RouteFormat, routeRowBytes, type TopkPlan } from "../_validate.ts";
import type { FloatDType, FloatTensor, IndexArray, RoutingMapFormat, Tensor } from "../_types.ts";
import { ARRAY_OF, BYTES_OF } from "../tensor.ts";
import { ROUTER_WASM_BASE64, ROUTER_WASM_SHARED_BASE64, SHARED_MAX_PAGES } from "./_router_wasm.ts";
import {
  CTL_ABORT,
  CTL_EXITED,
  CTL_NEXT,
  CTL_READY,
  CTL_WORDS,
  hardwareThreads,
  type Job,
  MAILBOX_BYTES,
  ThreadPool,
  threadsAvailable,
} from "./_threads.ts";

type Fn = (...args: number[]) => number;

/** The module's exports (see wasm/assembly/router.ts for each kernel's arguments). */
interface Kernels {
  memory: WebAssembly.Memory;
  heapBase(): number;
  scratchBytes(E: number, K: number, G: number): number;
  mathCheck: Fn;
  topkForward: Fn;
  forwardByLogits: Fn;
  intermediateOf: Fn;
  routeList: Fn;
  scatterRows: Fn;
  gatherChosen: Fn;
  topkBackwardSparse: Fn;
  topkBackwardLanes: Fn;
  topkBackward: Fn;
  auxScoresForward: Fn;
  auxScoresBackward: Fn;
  auxLossColumns: Fn;
  auxLossDot: Fn;
  auxLossBackward: Fn;
}

// codes shared with wasm/assembly/router.ts
const DT = { float32: 0, float16: 1, bfloat16: 2 } as const;
const SCORE = { softmax: 0, sigmoid: 1, sqrtsoftplus: 2 } as const;
const ROUTE: Record<RouteFormat, number> = { bytemap: 0, bitmap_u8: 1, int16: 2, int32: 3, int64: 4 };

/** Default bytes of token data (inputs and outputs) per chunk of tokens. */
export const DEFAULT_CHUNK_BYTES = 16 << 20;
/**
 * The default with worker threads: each chunk boundary stops the workers
 * while this thread takes the last pieces out and copies the next chunk's
 * first pieces in, so fewer, bigger chunks (DeepSeek-V3's 8192 tokens: one).
 */
export const DEFAULT_THREADED_CHUNK_BYTES = 32 << 20;
/**
 * Up to this many experts, the top-k forward's probs and the sparse backward's gradProbs and gradLogits cross the
 * module's boundary as dense rows, gathered and scattered by the kernels (Mixtral, 8192 x 8 top-2: the forward
 * 1.16x faster than with the scatter here; the backward, in one kernel, 2x faster than in four passes).
 */
export const DENSE_ROWS_E = 16;
/** Scratch bytes of topkBackwardLanes: 64 K + 4 K4 + E16 + 4 K, at most 1168 (K <= E <= 16). */
const LANES_BACKWARD_SCRATCH = 1280;
/** Below this many token x expert elements a call stays on one thread (a worker round trip costs ~0.2 ms). */
export const MIN_PARALLEL_ELEMENTS = 1 << 18;
/**
 * Token x expert elements of a piece of a threaded chunk: 512 KiB of float32 logits, a few tenths of a millisecond
 * of kernel (against 2^15, 2^16 and 2^18, same-process A/B on two threads: 2^17 was 1.04-1.11x faster than 2^15 on
 * DeepSeek-V3, without groups, Qwen3 and wide, and level with 2^18: fewer hand-overs, the same balance)
 */
const PIECE_ELEMENTS = 1 << 17;
/** Bytes copied to both the module and the saved state at a time (see the top-k forward's copyIn). */
const SLICE_BYTES = 256 << 10;
/** Bytes of gradProbs rows the sparse backward copies in at a time, for its gather (see gatherChosen). */
const GATHER_SLICE_BYTES = 128 << 10;
/** How long the calling thread spins for the workers' last pieces before it awaits their replies. */
const SPIN_MS = 2;

/**
 * The pieces [a, rows) of a threaded chunk of m tokens on W workers and this
 * thread (see WasmBackend's #pipeline): PIECE_ELEMENTS each, at least 8
 * pieces, and smaller ones at the end (each a share of what is left, down to
 * an eighth), so that the threads finish close together.
 */
export function pieceRanges(m: number, E: number, W: number): Array<[number, number]> {
  const size = Math.max(1, Math.min(Math.ceil(m / 8), Math.ceil(PIECE_ELEMENTS / E)));
  const least = Math.ceil(size / 8);
  const out: Array<[number, number]> = [];
  for (let a = 0; a < m;) {
    const rows = Math.min(m - a, size, Math.max(least, Math.ceil((m - a) / (2 * (W + 1)))));
    out.push([a, rows]);
    a += rows;
  }
  return out;
}

// An intermediate the call does not keep (a new empty array costs a small call about a microsecond)
const NO_FLOATS = new Float32Array(0);

// wasm32 addresses: the module can never hold more than this
const MAX_MEMORY = 4 * 1024 * 1024 * 1024 - 65536;
const PAGE = 65536;
const MAX_TOKEN_SCRATCH = 2 ** 31 - 1;
/** Most worker threads a backend may start (each is a runtime of its own). */
const MAX_THREADS = 256;

const compiled: Record<"local" | "shared", Promise<WebAssembly.Module> | undefined> = {
  local: undefined,
  shared: undefined,
};

/** Compiles an embedded variant once per process (asynchronously: browsers refuse big synchronous compiles). */
function compile(variant: "local" | "shared"): Promise<WebAssembly.Module> {
  compiled[variant] ??= (() => {
    return WebAssembly.compile(decodeBase64(variant === "local" ? ROUTER_WASM_BASE64 : ROUTER_WASM_SHARED_BASE64));
  })();
  return compiled[variant];
}

// Uint8Array.fromBase64 where the runtime has it (Deno, current browsers),
// Node's Buffer, else atob: start-up time matters in edge functions.
function decodeBase64(b64: string): Uint8Array<ArrayBuffer> {
  const g = globalThis as {
    Buffer?: { from(s: string, enc: string): Uint8Array<ArrayBuffer> };
  };
  const U8 = Uint8Array as unknown as { fromBase64?(s: string): Uint8Array<ArrayBuffer> };
  if (typeof U8.fromBase64 === "function") return U8.fromBase64(b64);
  if (g.Buffer !== undefined) return new Uint8Array(g.Buffer.from(b64, "base64"));
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes;
}

/** Instantiates the one-thread kernels (own memory). */
export async function instantiateKernels(): Promise<Kernels> {
  const instance = await WebAssembly.instantiate(await compile("local"), {});
  return instance.exports as unknown as Kernels;
}

function align16(n: number): number {
  return Math.ceil(n / 16) * 16;
}

function isMap(route: RouteFormat): route is RoutingMapFormat {
  return route === "bytemap" || route === "bitmap_u8";
}

/** Bump allocator over the module's memory, rebuilt for every call. */
class Layout {
  #next: number;
  constructor(base: number) {
    this.#next = align16(base);
  }
  /** Reserves n bytes (+16 of slack for vector loads and stores past the end), 16-byte aligned. */
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
  /**
   * Bytes of token data per chunk; batches beyond it are cut into chunks of tokens (default: 16 MiB on one
   * thread, 32 MiB with workers).
   */
  chunkBytes?: number;
  /** Threads for big batches (default: the hardware threads); 1 = no workers. */
  threads?: number;
  /**
   * Whether the top-k forward may run small rows (E <= 16, no group limit) four tokens at a time, and give their
   * probs as dense rows, and the top-k backward of small rows run in one four-token kernel on dense rows (default
   * true). A test hook: false keeps every token on the row kernel and every probs and gradient gather and scatter
   * here, which gives the same bits.
   */
  lanes?: boolean;
}

/** What a top-k forward saves for its backward: copies, so that callers may edit their outputs. */
interface TopkPayload {
  /** The routing output as the forward produced it. */
  route: Uint8Array | IndexArray;
  /** The intermediate at each token's chosen experts, ascending expert order (T x K). */
  yasc: Float32Array;
  /** Where the sparse backward runs: those experts, ascending (T x K), so that it need not read them from `route`. */
  ids?: Int32Array | null;
  /** Pre-softmax only: the whole intermediate (every expert gets a gradient). */
  full: Float32Array | null;
  /** The whole intermediate, kept for a caller who reads it later (none when it went to intermediateOut). */
  inter: Float32Array | null;
  /** Instead of `inter`, where the kernel keyed a sigmoid selection by the logits: a copy of their bytes. */
  logits: Uint8Array | null;
}

/**
 * A reader of a post-softmax intermediate (T x E: -inf, but the K-way
 * softmax values at the chosen experts) rebuilt from the saved routing
 * output and the values at the chosen experts in ascending expert order
 * (`yasc`): the forward keeps no T x E array for it.
 */
function postSoftmaxReader(
  route: Uint8Array | IndexArray,
  fmt: RouteFormat,
  T: number,
  E: number,
  K: number,
  yasc: Float32Array,
): () => Float32Array {
  return () => {
    const out = new Float32Array(T * E).fill(-Infinity);
    const ids = new Int32Array(K);
    const rB = routeRowBytes(fmt, E, K);
    for (let t = 0; t < T; t++) {
      let c = 0;
      if (fmt === "bytemap" || fmt === "bitmap_u8") {
        // map rows: the chosen experts come in ascending order
        const row = t * rB;
        for (let e = 0; e < E && c < K; e++) {
          const set = fmt === "bytemap" ? route[row + e] : ((route[row + (e >> 3)] as number) >> (e & 7)) & 1;
          if (set) ids[c++] = e;
        }
      } else {
        for (; c < K; c++) ids[c] = Number(route[t * K + c]);
        ids.sort();
      }
      for (let j = 0; j < c; j++) out[t * E + (ids[j] as number)] = yasc[t * K + j] as number;
    }
    return out;
  };
}

/**
 * A reader of a sigmoid or sqrtsoftplus intermediate (T x E) computed from
 * a copy of the logits' bytes by `k` (a module instance of its own, so that
 * a read between the awaits of a threaded call does not touch that call's
 * memory), with the forward's own sigmoid, bit for bit.
 */
function intermediateReader(
  k: Kernels,
  score: "sigmoid" | "sqrtsoftplus",
  logits: Uint8Array,
  dtype: FloatDType,
  n: number,
): () => Float32Array {
  return () => {
    const out = new Float32Array(n);
    const inB = BYTES_OF[dtype];
    const chunk = 1 << 16;
    const src = align16(k.heapBase());
    const dst = align16(src + chunk * inB + 16);
    const end = dst + chunk * 4 + 16;
    if (k.memory.buffer.byteLength < end) k.memory.grow(Math.ceil((end - k.memory.buffer.byteLength) / PAGE));
    const bytes = new Uint8Array(k.memory.buffer);
    for (let i = 0; i < n; i += chunk) {
      const m = Math.min(chunk, n - i);
      bytes.set(logits.subarray(i * inB, (i + m) * inB), src);
      k.intermediateOf(SCORE[score], src, DT[dtype], m, dst);
      out.set(new Float32Array(k.memory.buffer, dst, m), i);
    }
    return out;
  };
}

/**
 * Buffers of saved states, taken back when a state is released and handed
 * to later forwards of the same byte size. A new buffer pays its page faults
 * on first touch: on the CI VM, whose balloon driver returns freed pages to
 * the host, a new 256 KiB array costs 0.8 ms to fill, a reused one nothing;
 * a DeepSeek-V3 forward saves three of them (the routing output, the chosen
 * values, the intermediate). (Never SharedArrayBuffers, which would let
 * workers copy their pieces out: Deno's garbage collector does not count
 * them, so states dropped without release() piled up, 2 MiB a call.)
 */
class SavedBuffers {
  #free = new Map<number, ArrayBuffer[]>();
  #bytes = 0;
  constructor(readonly maxBytes: number) {}

  take(bytes: number): ArrayBuffer {
    const b = this.#free.get(bytes)?.pop();
    if (b === undefined) return new ArrayBuffer(bytes);
    this.#bytes -= bytes;
    return b;
  }

  give(b: ArrayBuffer): void {
    if (b.byteLength === 0 || this.#bytes + b.byteLength > this.maxBytes) return;
    const list = this.#free.get(b.byteLength);
    if (list === undefined) this.#free.set(b.byteLength, [b]);
    else list.push(b);
    this.#bytes += b.byteLength;
  }

  clear(): void {
    this.#free.clear();
    this.#bytes = 0;
  }
}

/** Bytes of saved-state buffers a backend keeps for reuse. */
const SAVED_BUFFER_BYTES = 64 << 20;

// a copy of `src` in a buffer of the pool
function pooledCopy<A extends Uint8Array | IndexArray | Float32Array>(pool: SavedBuffers, src: A): A {
  const C = src.constructor as new (b: ArrayBuffer) => A;
  const dst = new C(pool.take(src.byteLength));
  (dst as Float32Array).set(src as Float32Array);
  return dst;
}

/** Runs the router kernels in WebAssembly on host arrays. */
export class WasmBackend implements Backend {
  readonly name = "wasm" as const;
  #k: Kernels;
  #chunkBytes: number;
  #pool: ThreadPool | null;
  #maxBytes: number;
  #queue: Promise<unknown> = Promise.resolve();
  /** Calls queued or running (see #serial). */
  #pending = 0;
  #lanes: boolean;
  #laneTokens = 0;
  /**
   * A module instance of this thread's own, on unshared memory, made on first need: it computes sigmoid
   * intermediates on demand (intermediateReader) and runs the work of #onThisThread. Each use is synchronous
   * and lays its regions out afresh, so the two never meet.
   */
  #local: Kernels | null = null;
  #logitsKeyed = 0;

  private constructor(k: Kernels, chunkBytes: number, pool: ThreadPool | null, maxBytes: number, lanes: boolean) {
    this.#k = k;
    this.#chunkBytes = chunkBytes;
    this.#pool = pool;
    this.#maxBytes = maxBytes;
    this.#lanes = lanes;
  }

  /**
   * Creates a backend with its own module instance. With threads > 1 (and a
   * runtime that shares WebAssembly memory with workers) it runs the shared
   * variant, and big batches are split across worker threads.
   */
  static async create(options: WasmBackendOptions = {}): Promise<WasmBackend> {
    const threads = options.threads ?? await hardwareThreads();
    const lanes = options.lanes ?? true;
    if (!Number.isInteger(threads) || threads < 1 || threads > MAX_THREADS) {
      throw new RangeError(`threads must be an integer in [1, ${MAX_THREADS}], got ${threads}`);
    }
    if (threads > 1 && threadsAvailable()) {
      const chunkBytes = options.chunkBytes ?? DEFAULT_THREADED_CHUNK_BYTES;
      const module = await compile("shared");
      const memory = new WebAssembly.Memory({ initial: 16, maximum: SHARED_MAX_PAGES, shared: true });
      const instance = await WebAssembly.instantiate(module, { env: { memory } });
      const k = { ...(instance.exports as unknown as Kernels), memory };
      // the workers' mailboxes, below every call's layout (see #base)
      const mailboxes = align16(k.heapBase());
      const end = mailboxes + (threads - 1) * MAILBOX_BYTES;
      if (end > memory.buffer.byteLength) memory.grow(Math.ceil((end - memory.buffer.byteLength) / PAGE));
      const pool = new ThreadPool(module, memory, threads - 1, mailboxes);
      return new WasmBackend(k, chunkBytes, pool, SHARED_MAX_PAGES * PAGE, lanes);
    }
    const chunkBytes = options.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    return new WasmBackend(await instantiateKernels(), chunkBytes, null, MAX_MEMORY, lanes);
  }

  /** Threads a big batch runs on (1: no workers). */
  get threads(): number {
    return (this.#pool?.size ?? 0) + 1;
  }

  /** Test hook: tokens of this thread's top-k forward calls that ran four at a time (see {@linkcode WasmBackendOptions.lanes}). */
  get laneTokens(): number {
    return this.#laneTokens;
  }

  /** Test hook: pieces of threaded top-k forwards that workers ran (see #pipeline). */
  get workerPieces(): number {
    return this.#workerPieces;
  }

  /** Test hook: pieces of threaded top-k forwards that the calling thread ran. */
  get ownPieces(): number {
    return this.#ownPieces;
  }

  #workerPieces = 0;
  #ownPieces = 0;

  /** Test hook: top-k forward calls whose sigmoid selection the kernel keyed by the logits (no intermediate). */
  get logitsKeyedCalls(): number {
    return this.#logitsKeyed;
  }

  /** Bytes of linear memory the module holds now. */
  get memoryBytes(): number {
    return this.#k.memory.buffer.byteLength;
  }

  dispose(): void {
    this.#pool?.close();
    this.#pool = null;
    this.#saved.clear();
    this.#disposed = true;
  }

  #disposed = false;

  #saved = new SavedBuffers(SAVED_BUFFER_BYTES);

  /**
   * Takes back the buffers of a payload whose saved state was released:
   * queued behind the calls already made, so that a backward still reading
   * them finishes first.
   */
  recycle(payload: unknown): void {
    let buffers: Array<ArrayBufferView | null> = [];
    if (payload instanceof Float32Array) buffers = [payload];
    else if (typeof payload === "object" && payload !== null && "yasc" in payload) {
      const p = payload as TopkPayload;
      buffers = [p.route, p.yasc, p.ids ?? null, p.full, p.inter === p.full ? null : p.inter, p.logits];
    }
    void this.#serial(() => {
      if (this.#disposed) return;
      for (const a of buffers) if (a !== null) this.#saved.give(a.buffer as ArrayBuffer);
    });
  }

  // Runs calls one at a time: they share the memory layout, and a threaded
  // call awaits its workers between the kernel and the copy out.
  // An idle backend starts the call at once: a hop through the queue cost a
  // 16-token call a microtask or two.
  #serial<R>(work: () => R | Promise<R>): Promise<R> {
    let run: Promise<R>;
    if (this.#pending === 0) {
      try {
        run = Promise.resolve(work());
      } catch (e) {
        run = Promise.reject(e);
      }
    } else {
      run = this.#queue.then(work, work);
    }
    this.#pending++;
    const done = () => {
      this.#pending--;
    };
    this.#queue = run.then(done, done);
    return run;
  }

  // Where a call's layout starts: past the workers' mailboxes.
  #base(): number {
    return align16(this.#k.heapBase()) + (this.#pool?.size ?? 0) * MAILBOX_BYTES;
  }

  // Grows linear memory to `end` bytes, with a clear error beyond the backend's reach.
  #ensure(end: number, what: string): void {
    if (end > this.#maxBytes) {
      throw new RangeError(
        `${what} needs ${end} bytes of WebAssembly memory for one token chunk, beyond this backend's limit of ${this.#maxBytes} bytes`,
      );
    }
    const have = this.#k.memory.buffer.byteLength;
    if (end > have) this.#k.memory.grow(Math.ceil((end - have) / PAGE));
  }

  // How many tokens fit one chunk, given the token data bytes per token.
  #chunk(T: number, perToken: number): number {
    const most = Math.max(1, Math.min(T, Math.floor(this.#chunkBytes / Math.max(1, perToken))));
    // chunks of even size: no small last chunk that runs alone
    return Math.ceil(T / Math.ceil(T / most));
  }

  // Row ranges [a, a + n) of a chunk of m tokens, one per thread that runs it.
  #ranges(m: number, E: number): Array<[number, number]> {
    const parts = this.#pool !== null && m * E >= MIN_PARALLEL_ELEMENTS ? Math.min(this.threads, m) : 1;
    const per = Math.ceil(m / parts);
    const out: Array<[number, number]> = [];
    for (let a = 0; a < m; a += per) out.push([a, Math.min(per, m - a)]);
    return out;
  }

  // One chunk of m tokens on this thread and the workers. The chunk is cut
  // into pieces (pieceRanges) that the threads take in turn from shared
  // control words at `ctl` (see PiecesJob), so the split follows whatever
  // each thread really does: this thread alone can copy the caller's arrays
  // in and out, and it does so between pieces of its own, copying pieces in
  // a little ahead of the workers (which wait for them) and taking results
  // out as they come. `start` runs once the workers have pieces to work on
  // (the call's output allocation: off the workers' critical path). Pieces:
  // rows [a, a + rows); thread j (0: this one) runs job(a, rows, j).
  async #pipeline(
    pool: ThreadPool,
    m: number,
    E: number,
    ctl: number,
    start: () => void,
    copyIn: (a: number, rows: number) => void,
    job: (a: number, rows: number, j: number) => Job,
    copyOut: (a: number, rows: number, j: number) => void,
  ): Promise<void> {
    const W = pool.size;
    const ranges = pieceRanges(m, E, W);
    const n = ranges.length;
    const words = new Int32Array(this.#k.memory.buffer, ctl, CTL_WORDS + n);
    words.fill(0);
    const fn = job(0, 0, 0).fn;
    const local = this.#k[fn as keyof Kernels] as Fn;
    let ready = 0; // pieces copied in
    const lead = () => {
      copyIn(...(ranges[ready] as [number, number]));
      Atomics.store(words, CTL_READY, ++ready);
      Atomics.notify(words, CTL_READY);
    };
    const taken = new Uint8Array(n); // results copied out
    let low = 0; // every piece below is taken
    const drain = () => {
      for (let p = low; p < n; p++) {
        if (taken[p]) continue;
        const who = Atomics.load(words, CTL_WORDS + p);
        if (who === 0) continue;
        copyOut(...(ranges[p] as [number, number]), who - 1);
        taken[p] = 1;
        if (who === 1) this.#ownPieces++;
        else this.#workerPieces++;
      }
      while (low < n && taken[low]) low++;
    };
    await pool.session(async (post) => {
      const loops = Array.from(
        { length: W },
        (_, w) => post(w, { fn, pieces: ranges.map(([a, rows]) => job(a, rows, w + 1).args), ctl, who: w + 2 }),
      );
      try {
        // enough pieces for the workers to run while this thread allocates
        // (a new [T, E] array takes about a tenth of the kernels' time)
        while (ready < Math.min(n, 2 * W + Math.ceil(n / 4))) lead();
        start();
        for (;;) {
          drain();
          const next = Atomics.load(words, CTL_NEXT);
          if (next >= n) break;
          // pieces ready for the workers even after this thread takes one:
          // a worker that has to wait loses the time its wake-up takes
          if (ready < n && ready - next < 2 * W + 1) {
            lead();
            continue;
          }
          const p = Atomics.add(words, CTL_NEXT, 1);
          if (p >= n) break;
          while (ready <= p) lead();
          local(...job(...(ranges[p] as [number, number]), 0).args);
          Atomics.store(words, CTL_WORDS + p, 1);
        }
        // a worker may still wait for pieces it has taken
        while (ready < n) lead();
      } catch (e) {
        Atomics.store(words, CTL_ABORT, 1);
        Atomics.store(words, CTL_READY, n);
        Atomics.notify(words, CTL_READY);
        await Promise.allSettled(loops);
        throw e;
      }
      // the workers' last pieces: their exit (shared memory) is seen sooner
      // than their replies; the replies are still awaited when the workers
      // are slow, which also surfaces a worker's failure
      const deadline = performance.now() + SPIN_MS;
      while (Atomics.load(words, CTL_EXITED) < W && performance.now() < deadline) drain();
      if (Atomics.load(words, CTL_EXITED) < W) await Promise.all(loops);
      drain();
    });
  }

  // Runs kernel `fn` on each row range, range j on thread j (j = 0: this
  // thread); argsFor(a, n, j) gives its arguments. A kernel may write a
  // vector past the end of its last row, so outputs written that way get a
  // region per thread (see #scratch).
  async #exec(
    fn: keyof Kernels,
    ranges: Array<[number, number]>,
    argsFor: (a: number, n: number, j: number) => number[],
  ): Promise<void> {
    const call = (job: Job) => (this.#k[job.fn as keyof Kernels] as Fn)(...job.args);
    const jobs = ranges.map(([a, n], j): Job => ({ fn, args: argsFor(a, n, j) }));
    if (jobs.length === 1) call(jobs[0] as Job);
    else await (this.#pool as ThreadPool).run(jobs, call);
  }

  // Scratch bytes of one token, computed here in float64 (the kernel's own
  // scratchBytes is 32-bit and wraps for huge E); the two agree wherever the
  // kernel's can be trusted, which is checked.
  #scratchBytes(E: number, K: number, G: number, what: string): number {
    const r16 = Math.ceil(E / 16) * 16;
    const k4 = Math.ceil(K / 4) * 16;
    const g4 = Math.ceil(G / 4) * 16;
    const tops = Math.ceil(Math.max(G, 1) / 4) * 128; // lane lists of the fused pass
    const bytes = 5 * (r16 * 4) + Math.max(1024, r16) + 3 * k4 + 3 * g4 + 5 * k4 + 64 + tops + 272 + 64;
    // the kernels address one token's scratch with 32-bit offsets
    if (bytes > MAX_TOKEN_SCRATCH) {
      throw new RangeError(
        `${what} needs ${bytes} bytes of WebAssembly scratch memory per token for E=${E}, beyond the kernels' limit of ${MAX_TOKEN_SCRATCH} bytes (32-bit offsets)`,
      );
    }
    if (bytes * this.threads > this.#maxBytes) {
      throw new RangeError(
        `${what} needs ${
          bytes * this.threads
        } bytes of WebAssembly scratch memory for E=${E}, beyond this backend's limit of ${this.#maxBytes} bytes`,
      );
    }
    if (this.#k.scratchBytes(E, K, G) !== bytes) throw new Error(`moe-router: scratch layouts disagree for E=${E}`);
    return bytes;
  }

  // Regions of `bytes`, one per thread that may run a chunk.
  #scratch(L: Layout, bytes: number): number[] {
    const out: number[] = [];
    for (let j = 0; j < this.threads; j++) out.push(L.take(bytes));
    return out;
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

  // An integer view of memory holding the raw bits of `dtype` elements.
  #bits(dtype: FloatDType, ptr: number, n: number): Uint32Array | Uint16Array {
    return dtype === "float32"
      ? new Uint32Array(this.#k.memory.buffer, ptr, n)
      : new Uint16Array(this.#k.memory.buffer, ptr, n);
  }

  topkForward(plan: TopkPlan, logits: FloatTensor): Promise<TopkForwardOut> {
    return this.#serial(() => this.#topkForward(plan, logits));
  }

  async #topkForward(plan: TopkPlan, logits: FloatTensor): Promise<TopkForwardOut> {
    const { T, E, K, dtype, route } = plan;
    const inB = BYTES_OF[dtype];
    const rB = routeRowBytes(route, E, K);
    const dense = this.#lanes && E <= DENSE_ROWS_E;
    const n = this.#chunk(T, E * inB + 4 * E + rB + K * (inB + 8) + (dense ? E * inB : 0));
    const k = this.#k;
    const L = new Layout(this.#base());
    const scratch = this.#scratch(L, this.#scratchBytes(E, K, plan.numGroups, "fusedTopkWithScoreFunction"));
    const bias = plan.bias ? L.take(4 * align16(E)) : 0;
    const inP = L.take(n * E * inB);
    // the intermediate goes to the caller's buffer, or else to the saved state's own (copied out on demand),
    // but for: post-softmax's (-inf but at the chosen experts), which the routing output and the chosen values
    // (kept anyway) give back on demand; and sigmoid's and sqrtsoftplus's, which a copy of the logits, made
    // while they are copied in, gives back on demand (cheaper than copying the kernel's out, and the sigmoid
    // selection keyed by the logits computes only the chosen experts' sigmoid)
    // (routing alone, plan.save false: no intermediate at all, nor anything else the state keeps)
    const save = plan.save;
    const own = plan.intermediateOut === null;
    const post = save && own && plan.score === "softmax" && !plan.pre;
    const fromLogits = save && own && plan.score !== "softmax" && !dense;
    // the kernel's intermediate rows, per thread (row vectors spill past the row end); none where the host
    // makes the intermediate itself, or none is wanted, and the kernel keeps each token's row in its scratch
    const hostInter = fromLogits || post || !save;
    const interP = this.#scratch(L, hostInter && !dense ? 0 : n * E * 4);
    const valsP = L.take(n * K * inB);
    const listP = L.take(n * K * 4);
    // the chosen experts' intermediate for the sparse backward: none without a backward to come (the
    // four-token kernel of dense rows writes it anyway)
    const yascP = save || dense ? L.take(n * K * 4) : 0;
    // int32 indices are the list itself: the kernel writes them over it (same values), no second region to fill
    const routeP = route === "int32" ? listP : L.take(n * rB);
    const probsP = dense ? L.take(n * E * inB) : 0;
    // the chosen experts in ascending order, for the sparse backward (see topkBackward)
    const sparseBackward = save && !(plan.score === "softmax" && plan.pre) && !dense;
    const ascP = sparseBackward ? L.take(n * K * 4) : 0;
    // the control words of a threaded chunk's pieces (the last chunk may be smaller, and be cut differently)
    // (none where no chunk is big enough for the workers: small calls skip the bookkeeping)
    const last = T - (Math.ceil(T / n) - 1) * n;
    const threaded = this.#pool !== null && n * E >= MIN_PARALLEL_ELEMENTS && n >= 2;
    const pieces = threaded ? Math.max(...[n, last].map((m) => pieceRanges(m, E, this.threads - 1).length)) : 0;
    const ctlP = threaded ? L.take(4 * (CTL_WORDS + pieces)) : 0;
    this.#ensure(L.end, "fusedTopkWithScoreFunction");
    if (plan.bias) {
      this.#bytes().fill(0, bias, bias + 4 * align16(E));
      this.#put(bias, plan.bias, 0, E);
    }
    const byLogits = hostInter && !dense && plan.score === "sigmoid" &&
      k.forwardByLogits(E, K, plan.groupTopk, SCORE.sigmoid, bias) !== 0;
    if (byLogits) this.#logitsKeyed++;
    if (fromLogits) this.#local ??= await instantiateKernels();
    // outputs only once the work is known to fit, and (on threads) once the
    // workers have pieces to work on, since a new [T, E] array costs the
    // calling thread a while; caller buffers are used as they are (probs
    // zeroed first where it is scattered into)
    const allocate = () => {
      const probs = (dense ? plan.probsOut : plan.probsOut?.fill(0)) ?? newFloat(dtype, T * E);
      const routeOut = plan.indicesOut ?? plan.routingMapOut ?? newRoute(route, T, E, K);
      return { probs, probsBits: rawBits(probs), routeOut: routeOut as Uint8Array | IndexArray };
    };
    let outs: ReturnType<typeof allocate> | null = null;
    const start = () => {
      outs ??= allocate();
    };
    // the saved state
    const ours = save && own && !post && !fromLogits;
    const intermediate = plan.intermediateOut ??
      (ours ? new Float32Array(this.#saved.take(T * E * 4)) : NO_FLOATS);
    const yasc = save ? new Float32Array(this.#saved.take(T * K * 4)) : null;
    const ids = sparseBackward ? new Int32Array(this.#saved.take(T * K * 4)) : null;
    const savedLogits = fromLogits ? new Uint8Array(this.#saved.take(T * E * inB)) : null;
    const routeElems = isMap(route) ? rB : K;
    // the state's copy of the routing output, taken out of the module with the caller's
    const RouteArray = (isMap(route) ? Uint8Array : ARRAY_OF[route]) as unknown as new (
      b: ArrayBuffer,
    ) => Uint8Array | IndexArray;
    const savedRoute = save
      ? new RouteArray(this.#saved.take(T * routeElems * (isMap(route) ? 1 : BYTES_OF[route])))
      : null;
    const list = new Int32Array(k.memory.buffer, listP, n * K);
    const vals = this.#bits(dtype, valsP, n * K);
    for (let t0 = 0; t0 < T; t0 += n) {
      const m = Math.min(n, T - t0);
      // rows [a, a + rows) of this chunk: copy in, kernel arguments (thread j), copy out
      const copyIn = (a: number, rows: number) => {
        if (savedLogits === null) {
          this.#put(inP + a * E * inB, logits.data, (t0 + a) * E, rows * E);
          return;
        }
        // with the state's copy of the logits, in slices that are still in cache for the second copy (and, on
        // threads, while the workers run)
        const mem = this.#bytes();
        const src = new Uint8Array(logits.data.buffer, logits.data.byteOffset, logits.data.byteLength);
        for (let b = (t0 + a) * E * inB, end = (t0 + a + rows) * E * inB; b < end; b += SLICE_BYTES) {
          const slice = src.subarray(b, Math.min(b + SLICE_BYTES, end));
          mem.set(slice, inP + b - t0 * E * inB);
          savedLogits.set(slice, b);
        }
      };
      const argsFor = (a: number, rows: number, j: number) => [
        inP + a * E * inB,
        DT[dtype],
        rows,
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
        valsP + a * K * inB,
        listP + a * K * 4,
        yascP ? yascP + a * K * 4 : 0,
        (interP[j] as number) + a * E * 4,
        routeP + a * rB,
        scratch[j] as number,
        dense ? probsP + a * E * inB : 0,
        this.#lanes ? 1 : 0,
        hostInter ? 1 : 0, // the host makes the intermediate itself
        ascP ? ascP + a * K * 4 : 0,
      ];
      const copyOut = (a: number, rows: number, j: number) => {
        const { routeOut, probs, probsBits } = outs as NonNullable<typeof outs>;
        if (intermediate.length) this.#get((interP[j] as number) + a * E * 4, intermediate, (t0 + a) * E, rows * E);
        this.#get(routeP + a * rB, routeOut, (t0 + a) * routeElems, rows * routeElems);
        if (savedRoute) this.#get(routeP + a * rB, savedRoute, (t0 + a) * routeElems, rows * routeElems);
        if (yasc) this.#get(yascP + a * K * 4, yasc, (t0 + a) * K, rows * K);
        if (ids) this.#get(ascP + a * K * 4, ids, (t0 + a) * K, rows * K);
        if (dense) {
          this.#get(probsP + a * E * inB, probs, (t0 + a) * E, rows * E);
          return;
        }
        // probs: scatter the K values of each token into the zeroed rows
        for (let t = a; t < a + rows; t++) {
          const row = (t0 + t) * E;
          for (let c = t * K, end = c + K; c < end; c++) probsBits[row + (list[c] as number)] = vals[c] as number;
        }
      };
      if (this.#pool === null || m * E < MIN_PARALLEL_ELEMENTS || m < 2) {
        start();
        copyIn(0, m);
        this.#laneTokens += (k.topkForward as Fn)(...argsFor(0, m, 0));
        copyOut(0, m, 0);
      } else {
        await this.#pipeline(
          this.#pool,
          m,
          E,
          ctlP,
          start,
          copyIn,
          (a, rows, j) => ({ fn: "topkForward", args: argsFor(a, rows, j) }),
          copyOut,
        );
      }
    }
    start(); // T = 0: no chunk
    const { routeOut, probs } = outs as unknown as NonNullable<typeof outs>;
    if (savedRoute === null || yasc === null) return { probs, intermediate: null, route: routeOut, payload: null };
    const payload: TopkPayload = {
      route: savedRoute,
      yasc,
      ids,
      full: plan.score === "softmax" && plan.pre ? (own ? intermediate : pooledCopy(this.#saved, intermediate)) : null,
      inter: ours ? intermediate : null,
      logits: savedLogits,
    };
    const lazy = post
      ? postSoftmaxReader(payload.route, route, T, E, K, yasc)
      : fromLogits
      ? intermediateReader(this.#local as Kernels, plan.score as "sigmoid", payload.logits as Uint8Array, dtype, T * E)
      : copier(intermediate);
    return { probs, intermediate: own ? lazy : intermediate, route: routeOut, payload };
  }

  topkBackward(
    plan: TopkPlan,
    payload: unknown,
    grad: FloatTensor,
    out: FloatTensor["data"] | null = null,
  ): Promise<FloatTensor["data"]> {
    const saved = payload as TopkPayload;
    return this.#serial(() =>
      saved.full
        ? this.#topkBackwardDense(plan, saved, grad, out)
        : this.#onThisThread(() => this.#topkBackwardSparse(plan, saved, grad, out))
    );
  }

  // Runs work that this thread does alone (no worker takes part) on a
  // module instance of this thread's own, with unshared memory, where the
  // backend has workers: the sparse backward ran 15-30% slower on the
  // workers' shared memory (same process: DeepSeek-V3 2.13 ms against 1.64
  // on a one-thread backend; 1.93 against 1.91 this way). The cause is not
  // isolated: copies into shared memory and typed-array reads from it
  // measure as fast as unshared ones alone. The work runs synchronously,
  // with #k pointing at that instance until it returns.
  async #onThisThread<R>(work: () => R): Promise<R> {
    if (this.#pool === null) return work();
    const local = this.#local ??= await instantiateKernels();
    const shared = this.#k;
    this.#k = local;
    try {
      return work();
    } finally {
      this.#k = shared;
    }
  }

  // Every expert but pre-softmax's: read the chosen experts back from the
  // routing output (any format), gather gradProbs there, run the compact
  // kernel, scatter into zeroed rows; for small rows, all of it in one
  // kernel on dense rows.
  #topkBackwardSparse(
    plan: TopkPlan,
    saved: TopkPayload,
    grad: FloatTensor,
    outBuf: FloatTensor["data"] | null,
  ): FloatTensor["data"] {
    const { T, E, K, dtype, route } = plan;
    if (this.#lanes && E <= DENSE_ROWS_E) return this.#topkBackwardLanes(plan, saved, grad, outBuf);
    const inB = BYTES_OF[dtype];
    const rB = routeRowBytes(route, E, K);
    const out = outBuf?.fill(0) ?? newFloat(dtype, T * E);
    const outBits = rawBits(out);
    const n = this.#chunk(T, rB + K * (2 * inB + 16));
    // gradProbs rows go in by slices of about GATHER_SLICE_BYTES, gathered from the cache
    const slice = Math.max(1, Math.min(n, Math.floor(GATHER_SLICE_BYTES / (E * inB))));
    const k = this.#k;
    const L = new Layout(this.#base());
    const listScratch = L.take(align16(E) + 4 * K);
    const gradP = L.take(slice * E * inB);
    const routeP = L.take(n * rB);
    const listP = L.take(n * K * 4);
    const gvP = L.take(n * K * inB);
    const yvP = L.take(n * K * 4);
    const outP = L.take(n * K * inB);
    const aP = L.take(n * K * 4);
    const daP = L.take(n * K * 4);
    this.#ensure(L.end, "fusedTopkWithScoreFunctionBackward");
    const routeElems = isMap(route) ? rB : K;
    for (let t0 = 0; t0 < T; t0 += n) {
      const m = Math.min(n, T - t0);
      if (saved.ids) this.#put(listP, saved.ids, t0 * K, m * K);
      else {
        this.#put(routeP, saved.route, t0 * routeElems, m * routeElems);
        k.routeList(ROUTE[route], m, E, K, routeP, listP, listScratch);
      }
      this.#put(yvP, saved.yasc, t0 * K, m * K);
      for (let a = 0; a < m; a += slice) {
        const rows = Math.min(slice, m - a);
        this.#put(gradP, grad.data, (t0 + a) * E, rows * E);
        k.gatherChosen(gradP, DT[dtype], rows, E, K, listP + a * K * 4, gvP + a * K * inB);
      }
      const list = new Int32Array(k.memory.buffer, listP, m * K);
      // on this thread only: the compact kernel is a small part of the call
      // (the gather and scatter around it run here anyway), and workers made
      // it slower (bench:compare, 2 cores: DSv3 2.67 ms against 2.49 on one
      // thread, Qwen3 1.60 against 1.42)
      k.topkBackwardSparse(DT[dtype], m, K, SCORE[plan.score], plan.scale, gvP, yvP, outP, aP, daP);
      const ov = this.#bits(dtype, outP, m * K);
      for (let t = 0; t < m; t++) {
        const row = (t0 + t) * E;
        for (let c = t * K, end = c + K; c < end; c++) {
          const e = list[c] as number;
          if (e >= 0) outBits[row + e] = ov[c] as number;
        }
      }
    }
    return out;
  }

  // Small rows (E <= DENSE_ROWS_E): gradProbs, the routing output and the
  // saved intermediate in, dense gradLogits rows out, one kernel between
  // (topkBackwardLanes), on this thread.
  #topkBackwardLanes(
    plan: TopkPlan,
    saved: TopkPayload,
    grad: FloatTensor,
    outBuf: FloatTensor["data"] | null,
  ): FloatTensor["data"] {
    const { T, E, K, dtype, route } = plan;
    const inB = BYTES_OF[dtype];
    const rB = routeRowBytes(route, E, K);
    const out = outBuf ?? newFloat(dtype, T * E);
    const n = this.#chunk(T, rB + 4 * K + 2 * E * inB);
    const k = this.#k;
    const L = new Layout(this.#base());
    const scratch = L.take(LANES_BACKWARD_SCRATCH);
    const routeP = L.take(n * rB);
    const yvP = L.take(n * K * 4);
    const gradP = L.take(n * E * inB);
    const outP = L.take(n * E * inB);
    this.#ensure(L.end, "fusedTopkWithScoreFunctionBackward");
    const routeElems = isMap(route) ? rB : K;
    for (let t0 = 0; t0 < T; t0 += n) {
      const m = Math.min(n, T - t0);
      this.#put(routeP, saved.route, t0 * routeElems, m * routeElems);
      this.#put(yvP, saved.yasc, t0 * K, m * K);
      this.#put(gradP, grad.data, t0 * E, m * E);
      k.topkBackwardLanes(
        gradP,
        DT[dtype],
        m,
        E,
        K,
        SCORE[plan.score],
        plan.scale,
        ROUTE[route],
        routeP,
        yvP,
        outP,
        scratch,
      );
      this.#get(outP, out, t0 * E, m * E);
    }
    return out;
  }

  // Pre-softmax: every expert gets a gradient; dense rows.
  async #topkBackwardDense(
    plan: TopkPlan,
    saved: TopkPayload,
    grad: FloatTensor,
    outBuf: FloatTensor["data"] | null,
  ): Promise<FloatTensor["data"]> {
    const { T, E, K, dtype, route } = plan;
    const inB = BYTES_OF[dtype];
    const rB = routeRowBytes(route, E, K);
    const out = outBuf ?? newFloat(dtype, T * E);
    const n = this.#chunk(T, 2 * E * inB + 4 * E + rB);
    const L = new Layout(this.#base());
    const scratch = this.#scratch(L, this.#scratchBytes(E, K, 0, "fusedTopkWithScoreFunctionBackward"));
    const gradP = L.take(n * E * inB);
    const interP = L.take(n * E * 4);
    const routeP = L.take(n * rB);
    const outP = L.take(n * E * inB);
    this.#ensure(L.end, "fusedTopkWithScoreFunctionBackward");
    const routeElems = isMap(route) ? rB : K;
    for (let t0 = 0; t0 < T; t0 += n) {
      const m = Math.min(n, T - t0);
      this.#put(gradP, grad.data, t0 * E, m * E);
      this.#put(interP, saved.full as Float32Array, t0 * E, m * E);
      this.#put(routeP, saved.route, t0 * routeElems, m * routeElems);
      await this.#exec("topkBackward", this.#ranges(m, E), (a, rows, j) => [
        gradP + a * E * inB,
        DT[dtype],
        rows,
        E,
        K,
        SCORE[plan.score],
        plan.pre ? 1 : 0,
        plan.scale,
        interP + a * E * 4,
        ROUTE[route],
        routeP + a * rB,
        outP + a * E * inB,
        scratch[j] as number,
      ]);
      this.#get(outP, out, t0 * E, m * E);
    }
    return out;
  }

  auxScoresForward(plan: AuxScoresPlan, logits: FloatTensor): Promise<AuxScoresForwardOut> {
    return this.#serial(async () => {
      const { T, E, K, dtype, route } = plan;
      const inB = BYTES_OF[dtype];
      const rB = routeRowBytes(route, E, K);
      const { scores, route: routeOut } = newAuxScoresArrays(plan);
      // the saved state's own intermediate (the backward's input), copied out for a caller on demand
      const intermediate = new Float32Array(this.#saved.take(T * E * 4));
      const n = this.#chunk(T, E * inB + 8 * E + rB);
      const L = new Layout(this.#base());
      const scratch = this.#scratch(L, this.#scratchBytes(E, K, 0, "fusedComputeScoreForMoEAuxLoss"));
      const inP = L.take(n * E * inB);
      const scoresP = L.take(n * E * 4);
      const interP = L.take(n * E * 4);
      const routeP = L.take(n * rB);
      this.#ensure(L.end, "fusedComputeScoreForMoEAuxLoss");
      for (let t0 = 0; t0 < T; t0 += n) {
        const m = Math.min(n, T - t0);
        this.#put(inP, logits.data, t0 * E, m * E);
        await this.#exec("auxScoresForward", this.#ranges(m, E), (a, rows, j) => [
          inP + a * E * inB,
          DT[dtype],
          rows,
          E,
          K,
          SCORE[plan.score],
          ROUTE[route],
          plan.radixThreshold,
          scoresP + a * E * 4,
          interP + a * E * 4,
          routeP + a * rB,
          scratch[j] as number,
        ]);
        this.#get(scoresP, scores, t0 * E, m * E);
        this.#get(interP, intermediate, t0 * E, m * E);
        this.#get(routeP, routeOut, t0 * rB, m * rB);
      }
      return { scores, intermediate: copier(intermediate), route: routeOut, payload: intermediate };
    });
  }

  auxScoresBackward(plan: AuxScoresPlan, payload: unknown, grad: Tensor<"float32">): Promise<FloatTensor["data"]> {
    return this.#serial(async () => {
      const { T, E, dtype } = plan;
      const intermediate = payload as Float32Array;
      const outB = BYTES_OF[dtype];
      const out = newFloat(dtype, T * E);
      const n = this.#chunk(T, 8 * E + E * outB);
      const L = new Layout(this.#base());
      const scratch = this.#scratch(L, this.#scratchBytes(E, 1, 0, "fusedComputeScoreForMoEAuxLossBackward"));
      const gradP = L.take(n * E * 4);
      const interP = L.take(n * E * 4);
      const outP = L.take(n * E * outB);
      this.#ensure(L.end, "fusedComputeScoreForMoEAuxLossBackward");
      for (let t0 = 0; t0 < T; t0 += n) {
        const m = Math.min(n, T - t0);
        this.#put(gradP, grad.data, t0 * E, m * E);
        this.#put(interP, intermediate, t0 * E, m * E);
        await this.#exec("auxScoresBackward", this.#ranges(m, E), (a, rows, j) => [
          gradP + a * E * 4,
          rows,
          E,
          SCORE[plan.score],
          interP + a * E * 4,
          DT[dtype],
          outP + a * E * outB,
          scratch[j] as number,
        ]);
        this.#get(outP, out, t0 * E, m * E);
      }
      return out;
    });
  }

  // The aux loss reads each element once; it stays on one thread. Column
  // sums accumulate across chunks, so chunking never changes the result.
  auxLossForward(plan: AuxLossPlan, probs: FloatTensor): Promise<FloatTensor["data"]> {
    return this.#serial(() => {
      const { rows, cols, dtype } = plan;
      const inB = BYTES_OF[dtype];
      const n = this.#chunk(rows, cols * inB);
      const k = this.#k;
      const L = new Layout(this.#base());
      const tpeP = L.take(cols * 4);
      const colsumP = L.take(cols * 4);
      const inP = L.take(n * cols * inB);
      this.#ensure(L.end, "fusedMoEAuxLoss");
      this.#put(tpeP, plan.tpe, 0, cols);
      this.#bytes().fill(0, colsumP, colsumP + cols * 4);
      for (let t0 = 0; t0 < rows; t0 += n) {
        const m = Math.min(n, rows - t0);
        this.#put(inP, probs.data, t0 * cols, m * cols);
        k.auxLossColumns(inP, DT[dtype], m, cols, colsumP);
      }
      const total = k.auxLossDot(cols, tpeP, colsumP);
      const loss = newFloat(dtype, 1);
      writeNarrowed(loss, Math.fround(total * Math.fround(plan.constant)));
      return loss;
    });
  }

  auxLossBackward(plan: AuxLossPlan, gradLoss: number): Promise<FloatTensor["data"]> {
    return this.#serial(() => {
      const { rows, cols, dtype } = plan;
      const outB = BYTES_OF[dtype];
      const out = newFloat(dtype, rows * cols);
      const n = this.#chunk(rows, cols * outB);
      const k = this.#k;
      const L = new Layout(this.#base());
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
      return out;
    });
  }

  /**
   * Test hook: runs a SIMD math routine over xs (0 exp, 1 log1p, 2 sigmoid, 3 sqrtsoftplus, 4 exp of x <= 0,
   * 5 the forward's sigmoid).
   */
  mathCheck(kind: number, xs: Float32Array): Float32Array {
    const n = align16(xs.length);
    const L = new Layout(this.#base());
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

// The raw bits of a float array: scatter and gather move bits, never values
// (no NaN payload rewriting, no float16 conversion on the way).
function rawBits(data: FloatTensor["data"]): Uint32Array | Uint16Array {
  return data instanceof Float32Array
    ? new Uint32Array(data.buffer, data.byteOffset, data.length)
    : new Uint16Array(data.buffer, data.byteOffset, data.length);
}

function newRoute(route: RouteFormat, T: number, E: number, K: number): Uint8Array | IndexArray {
  if (isMap(route)) return new Uint8Array(T * routeRowBytes(route, E, K));
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
