// Worker threads for the WebAssembly backend: each worker instantiates the
// shared-memory variant of the kernels on the backend's one shared memory
// and runs kernel calls the main thread posts to it (a function name and
// its numeric arguments). Deno and browsers get Web Workers from a Blob URL,
// Node gets worker_threads with eval: no separate worker file, so bundles and
// edge runtimes need nothing beside the module. Idle workers are ended after
// IDLE_MS so that they never keep a process alive.

/** A kernel call: export name and numeric arguments. */
export interface Job {
  fn: string;
  args: number[];
}

/**
 * Pieces of a batch that threads take in turn (see {@linkcode ThreadPool.session}):
 * `pieces[p]` is the arguments of kernel `fn` for piece p on this worker, and
 * `ctl` the byte offset in the shared memory of the control words
 * (CTL_WORDS, then one per piece).
 */
export interface PiecesJob {
  fn: string;
  pieces: number[][];

  ctl: number;
  /** The value the worker stores in a piece's word when the piece is done (never 0). */
  who: number;
}

// Control words of a PiecesJob, as int32 indices: the calling thread
// publishes how many pieces are copied in (READY: workers wait on it) and
// may set ABORT; every thread takes the next piece from NEXT; a worker adds
// 1 to EXITED when it stops, which the calling thread sees sooner than the
// worker's reply.
/** Pieces ready to run (copied in). */
export const CTL_READY = 0;
/** The next piece to take. */
export const CTL_NEXT = 1;
/** Nonzero: stop taking pieces. */
export const CTL_ABORT = 2;
/** Workers that have stopped taking pieces (each adds 1 as it leaves; the job's reply comes later). */
export const CTL_EXITED = 3;
/** Control words before the per-piece words. */
export const CTL_WORDS = 4;

/** Workers end after this long without work (the next big call starts them again). */
export const IDLE_MS = 2000;

// The worker's whole program. Deno / browsers: `self` with onmessage;
// Node (eval'd CommonJS): require("node:worker_threads").parentPort.
const WORKER_SOURCE = `
const port = typeof require === "function" ? require("node:worker_threads").parentPort : self;
let k, memory;
const handle = (m) => {
  if (m.module) {
    memory = m.memory;
    k = new WebAssembly.Instance(m.module, { env: { memory } }).exports;
    port.postMessage(-1);
    return;
  }
  if (m.pieces) {
    const ctl = new Int32Array(memory.buffer, m.ctl, ${CTL_WORDS} + m.pieces.length);
    for (;;) {
      const p = Atomics.add(ctl, ${CTL_NEXT}, 1);
      if (p >= m.pieces.length) break;
      let r = Atomics.load(ctl, ${CTL_READY});
      for (let spin = 0; r <= p && spin < 20000; spin++) r = Atomics.load(ctl, ${CTL_READY});
      for (; r <= p; r = Atomics.load(ctl, ${CTL_READY})) Atomics.wait(ctl, ${CTL_READY}, r);
      if (Atomics.load(ctl, ${CTL_ABORT}) !== 0) break;
      k[m.fn](...m.pieces[p]);
      Atomics.store(ctl, ${CTL_WORDS} + p, m.who);
    }
    Atomics.add(ctl, ${CTL_EXITED}, 1);
    port.postMessage(m.id);
    return;
  }
  k[m.fn](...m.args);
  port.postMessage(m.id);
};
if (port === self) self.onmessage = (e) => handle(e.data);
else port.on("message", handle);
`;

interface Thread {
  /** Posts a message; resolves with the worker's reply to it (replies come in order). */
  call(message: unknown): Promise<number>;
  terminate(): void;
}

type NodeWorker = {
  on(event: string, f: (v: unknown) => void): void;
  postMessage(m: unknown): void;
  terminate(): void;
  unref(): void;
};

function isNode(): boolean {
  const g = globalThis as { Deno?: unknown; process?: { versions?: { node?: string } } };
  return g.Deno === undefined && typeof g.process?.versions?.node === "string";
}

let blobUrl: string | undefined;

// The replies a thread still owes, oldest first: a worker handles its
// messages in order, so each reply settles the oldest call.
class Replies {
  #pending: Array<{ resolve(v: number): void; reject(e: unknown): void }> = [];
  wait(): Promise<number> {
    return new Promise((resolve, reject) => this.#pending.push({ resolve, reject }));
  }
  reply(v: number): void {
    this.#pending.shift()?.resolve(v);
  }
  fail(e: unknown): void {
    for (const p of this.#pending.splice(0)) p.reject(e);
  }
}

async function spawn(): Promise<Thread> {
  const replies = new Replies();
  if (isNode()) {
    const { Worker } = await import("node:worker_threads" as string) as {
      Worker: new (src: string, o: { eval: boolean }) => NodeWorker;
    };
    const w = new Worker(WORKER_SOURCE, { eval: true });
    w.unref();
    w.on("message", (v) => replies.reply(v as number));
    w.on("error", (e) => replies.fail(e));
    return {
      call: (m) => {
        const r = replies.wait();
        w.postMessage(m);
        return r;
      },
      terminate: () => w.terminate(),
    };
  }
  blobUrl ??= URL.createObjectURL(new Blob([WORKER_SOURCE], { type: "text/javascript" }));
  const w = new Worker(blobUrl, { type: "module" });
  w.onmessage = (e) => replies.reply(e.data as number);
  w.onerror = (e) => {
    e.preventDefault();
    replies.fail(new Error(`moe-router worker failed: ${e.message}`));
  };
  return {
    call: (m) => {
      const r = replies.wait();
      w.postMessage(m);
      return r;
    },
    terminate: () => w.terminate(),
  };
}

/** Whether this runtime can share a WebAssembly memory with workers. */
export function threadsAvailable(): boolean {
  try {
    if ((globalThis as { crossOriginIsolated?: boolean }).crossOriginIsolated === false) return false;
    if (typeof SharedArrayBuffer !== "function") return false;
    if (!isNode() && typeof Worker !== "function") return false;
    new WebAssembly.Memory({ initial: 1, maximum: 1, shared: true });
    return true;
  } catch {
    return false;
  }
}

/** The number of hardware threads (Node 20 has no navigator: os.availableParallelism), or 1 where unknown. */
export async function hardwareThreads(): Promise<number> {
  const n = (globalThis as { navigator?: { hardwareConcurrency?: number } }).navigator?.hardwareConcurrency;
  if (typeof n === "number" && n >= 1) return Math.floor(n);
  if (isNode()) {
    try {
      const os = await import("node:os" as string) as { availableParallelism?(): number; cpus(): unknown[] };
      return Math.max(1, os.availableParallelism?.() ?? os.cpus().length);
    } catch {
      return 1;
    }
  }
  return 1;
}

/** Worker threads sharing one memory; started on first use, ended when idle. */
export class ThreadPool {
  #threads: Thread[] = [];
  #starting: Promise<Thread[]> | null = null;
  #idle: ReturnType<typeof setTimeout> | undefined;
  #seq = 0;
  #closed = false;

  constructor(
    private readonly module: WebAssembly.Module,
    private readonly memory: WebAssembly.Memory,
    /** Workers beside the calling thread. */
    readonly size: number,
  ) {}

  async #start(): Promise<Thread[]> {
    if (this.#threads.length > 0) return this.#threads;
    this.#starting ??= (async () => {
      const threads = await Promise.all(Array.from({ length: this.size }, spawn));
      await Promise.all(threads.map((t) => t.call({ module: this.module, memory: this.memory })));
      this.#threads = threads;
      this.#starting = null;
      return threads;
    })();
    return await this.#starting;
  }

  /**
   * Runs jobs[0] on the calling thread and the others on workers, all at
   * once; resolves when every job is done.
   */
  async run(jobs: Job[], local: (job: Job) => void): Promise<void> {
    await this.session(async (post) => {
      const done = jobs.slice(1).map((job, i) => post(i, job));
      try {
        local(jobs[0] as Job);
      } finally {
        await Promise.all(done);
      }
    });
  }

  /**
   * Gives `work` the workers for a while: post(w, job) queues a job on
   * worker w (w < size) and resolves when it is done; jobs on one worker run
   * in the order they were posted, so the caller can hand out a batch in
   * pieces and take each piece's results as soon as it is done. A
   * PiecesJob instead has the worker take pieces of a batch from the shared
   * control words until none is left (it waits, in Atomics.wait, for each
   * piece it takes to be ready), marking each done there; it resolves once
   * the worker has stopped. Resolves with work's result once it settles
   * (work must await every job it posts).
   */
  async session<R>(work: (post: (w: number, job: Job | PiecesJob) => Promise<void>) => Promise<R>): Promise<R> {
    if (this.#closed) throw new Error("the WebAssembly backend was disposed");
    clearTimeout(this.#idle);
    const threads = await this.#start();
    try {
      return await work(async (w, job) => {
        await (threads[w] as Thread).call({ id: ++this.#seq, ...job });
      });
    } finally {
      this.#armIdle();
    }
  }

  #armIdle(): void {
    const id = setTimeout(() => this.#stop(), IDLE_MS);
    this.#idle = id;
    // the timer must not keep a process alive by itself (Deno: unrefTimer, Node: unref)
    const deno = (globalThis as { Deno?: { unrefTimer?(id: number): void } }).Deno;
    if (typeof id === "number") deno?.unrefTimer?.(id);
    else (id as { unref?(): void }).unref?.();
  }

  #stop(): void {
    for (const t of this.#threads) t.terminate();
    this.#threads = [];
  }

  /** Ends the workers; later runs throw. */
  close(): void {
    this.#closed = true;
    clearTimeout(this.#idle);
    this.#stop();
  }
}
