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

// Each worker has a mailbox in the shared memory, so that a job reaches a
// worker that has just finished one without a message: a message wakes a
// worker's event loop a few tenths of a millisecond late, while a worker
// that waits in Atomics.wait on its mailbox wakes at once. After a job the
// worker waits there (it is "parked") for up to PARK_MS, then goes back to
// its event loop. Int32 words: STATE (LOOP: in its event loop, or running a
// job that came as a message; PARKED; JOB: a job is in the mailbox, or
// running) and MSGS (messages posted to it and not yet taken: while there
// are any, the calling thread posts messages and the worker does not park,
// so jobs run in the order they were posted). From byte 16, float64s: the
// job (export index, id, kind, ctl, who, pieces, arguments per piece, then
// the arguments).
const MB_STATE = 0;
const MB_MSGS = 1;
const LOOP = 0;
const PARKED = 1;
const JOB = 2;
const MB_HEADER = 7;
/** Bytes of each worker's mailbox. */
export const MAILBOX_BYTES = 64 << 10;
/** How long a worker waits on its mailbox after a job before it goes back to its event loop. */
const PARK_MS = 100;

// The worker's whole program. Deno / browsers: `self` with onmessage;
// Node (eval'd CommonJS): require("node:worker_threads").parentPort.
const WORKER_SOURCE = `
const port = typeof require === "function" ? require("node:worker_threads").parentPort : self;
let k, memory, fns, mb, st;
// the pieces loop of a PiecesJob (see PiecesJob); argsOf(p): piece p's arguments
const pieces = (fn, n, argsOf, at, who) => {
  const ctl = new Int32Array(memory.buffer, at, ${CTL_WORDS} + n);
  for (;;) {
    const p = Atomics.add(ctl, ${CTL_NEXT}, 1);
    if (p >= n) break;
    let r = Atomics.load(ctl, ${CTL_READY});
    for (let spin = 0; r <= p && spin < 20000; spin++) r = Atomics.load(ctl, ${CTL_READY});
    for (; r <= p; r = Atomics.load(ctl, ${CTL_READY})) Atomics.wait(ctl, ${CTL_READY}, r);
    if (Atomics.load(ctl, ${CTL_ABORT}) !== 0) break;
    k[fn](...argsOf(p));
    Atomics.store(ctl, ${CTL_WORDS} + p, who);
  }
  return ctl;
};
// a job is over: parked before the calling thread can see it (EXITED, then the reply)
const over = (id, ctl) => {
  Atomics.store(st, ${MB_STATE}, ${PARKED});
  if (ctl) Atomics.add(ctl, ${CTL_EXITED}, 1);
  port.postMessage(id);
};
const fromMailbox = () => {
  const h = new Float64Array(memory.buffer, mb + 16, ${MB_HEADER});
  const [fi, id, kind, at, who, n, per] = h;
  const args = new Float64Array(memory.buffer, mb + 16 + ${MB_HEADER * 8}, n * per);
  const argsOf = (p) => args.subarray(p * per, (p + 1) * per);
  if (kind === 0) {
    k[fns[fi]](...argsOf(0));
    over(id, null);
  } else over(id, pieces(fns[fi], n, argsOf, at, who));
};
const park = () => {
  for (;;) {
    if (Atomics.load(st, ${MB_MSGS}) === 0) Atomics.wait(st, ${MB_STATE}, ${PARKED}, ${PARK_MS});
    // leave unless a job came (messages waiting, the time is up, or the calling thread sent us back)
    if (Atomics.compareExchange(st, ${MB_STATE}, ${PARKED}, ${LOOP}) !== ${JOB}) return;
    fromMailbox();
  }
};
const handle = (m) => {
  if (m.module) {
    memory = m.memory;
    k = new WebAssembly.Instance(m.module, { env: { memory } }).exports;
    fns = WebAssembly.Module.exports(m.module).filter((e) => e.kind === "function").map((e) => e.name);
    mb = m.mailbox;
    st = new Int32Array(memory.buffer, mb, 2);
    over(-1, null);
    park();
    return;
  }
  Atomics.sub(st, ${MB_MSGS}, 1);
  if (m.pieces) over(m.id, pieces(m.fn, m.pieces.length, (p) => m.pieces[p], m.ctl, m.who));
  else {
    k[m.fn](...m.args);
    over(m.id, null);
  }
  park();
};
// (Node has no \`self\`: comparing port with it would throw)
if (typeof require === "function") port.on("message", handle);
else self.onmessage = (e) => handle(e.data);
`;

interface Thread {
  /** Posts a message; resolves with the worker's reply to it (replies come in order). */
  call(message: unknown): Promise<number>;
  /** The reply to a job given through the mailbox, or by `send` (replies come in order). */
  expect(): Promise<number>;
  /** Posts a message whose reply `expect` already awaits. */
  send(message: unknown): void;
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
      expect: () => replies.wait(),
      send: (m) => w.postMessage(m),
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
    expect: () => replies.wait(),
    send: (m) => w.postMessage(m),
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

  readonly #fns: string[];

  constructor(
    private readonly module: WebAssembly.Module,
    private readonly memory: WebAssembly.Memory,
    /** Workers beside the calling thread. */
    readonly size: number,
    /** Where the workers' mailboxes are in the memory (size * MAILBOX_BYTES, zeroed, never used otherwise). */
    private readonly mailboxes: number,
  ) {
    this.#fns = WebAssembly.Module.exports(module).filter((e) => e.kind === "function").map((e) => e.name);
  }

  async #start(): Promise<Thread[]> {
    if (this.#threads.length > 0) return this.#threads;
    this.#starting ??= (async () => {
      const threads = await Promise.all(Array.from({ length: this.size }, spawn));
      new Uint8Array(this.memory.buffer, this.mailboxes, this.size * MAILBOX_BYTES).fill(0);
      await Promise.all(
        threads.map((t, w) =>
          t.call({ module: this.module, memory: this.memory, mailbox: this.mailboxes + w * MAILBOX_BYTES })
        ),
      );
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
        await this.#post(threads[w] as Thread, w, { id: ++this.#seq, ...job });
      });
    } finally {
      this.#armIdle();
    }
  }

  // A job to worker w: through its mailbox where it is parked and no
  // message is waiting for it (and the job fits), else as a message.
  #post(t: Thread, w: number, job: (Job | PiecesJob) & { id: number }): Promise<number> {
    const at = this.mailboxes + w * MAILBOX_BYTES;
    const st = new Int32Array(this.memory.buffer, at, 2);
    if (Atomics.load(st, MB_MSGS) === 0 && Atomics.load(st, MB_STATE) === PARKED) {
      const list = "pieces" in job ? job.pieces : [job.args];
      const per = list[0]?.length ?? 0;
      const fi = this.#fns.indexOf(job.fn);
      if (fi >= 0 && (MB_HEADER + list.length * per) * 8 + 16 <= MAILBOX_BYTES) {
        const f = new Float64Array(this.memory.buffer, at + 16, MB_HEADER + list.length * per);
        const pieces = "pieces" in job;
        f.set([fi, job.id, pieces ? 1 : 0, pieces ? job.ctl : 0, pieces ? job.who : 0, list.length, per]);
        list.forEach((args, p) => f.set(args, MB_HEADER + p * per));
        const reply = t.expect();
        if (Atomics.compareExchange(st, MB_STATE, PARKED, JOB) === PARKED) {
          Atomics.notify(st, MB_STATE);
          return reply;
        }
        // it left for its event loop meanwhile: the message gives it the job (and settles `reply`)
        Atomics.add(st, MB_MSGS, 1);
        t.send(job);
        return reply;
      }
    }
    Atomics.add(st, MB_MSGS, 1);
    // a parked worker would not see the message before PARK_MS: send it back to its event loop
    if (Atomics.compareExchange(st, MB_STATE, PARKED, LOOP) === PARKED) Atomics.notify(st, MB_STATE);
    return t.call(job);
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
