/**
 * Timing: warm-up, then the median of repeated calls. The implementations
 * of one case are measured in a few passes, each pass giving every
 * implementation a block of consecutive calls (in an order rotated from pass
 * to pass), so that a drift of the load of the machine (which is shared)
 * touches all of them alike rather than whichever happened to run last. Blocks rather than single interleaved
 * calls: ONNX Runtime's worker threads spin for a while after a call, and
 * would slow down whatever ran right after them.
 *
 * @module
 */

/** One timed thing: a name, a call (sync or async), and what to do before a block of calls. */
export interface Timed {
  key: string;
  run: () => unknown;
  /** Called before each block of calls (e.g. to switch the TensorFlow.js backend). */
  before?: () => unknown;
  /** Milliseconds of a call already made (the output check): a slow item then needs no more warm-up. */
  firstMs?: number;
}

/** Medians and spread of the calls of one {@linkcode Timed}. */
export interface Timing {
  /** Median milliseconds per call. */
  ms: number;
  /** Fastest call, milliseconds. */
  minMs: number;
  /** Calls measured (after warm-up). */
  runs: number;
}

/** How long to measure each implementation. */
export interface TimingBudget {
  /** Measured time to aim for per implementation, ms (runs are added until it is reached). */
  budgetMs: number;
  /** Fewest measured calls. */
  minRuns: number;
  /** Most measured calls. */
  maxRuns: number;
  /** Warm-up: calls before measuring (at least this many, and at least `warmupMs`). */
  warmupRuns: number;
  warmupMs: number;
  /** Passes over the implementations; each block starts with one unmeasured call (except for slow ones). */
  passes: number;
}

/**
 * The default budget: about a second of calls per implementation, in 10 passes (blocks of up to 30 calls: on this
 * VM one vCPU slows down for stretches of seconds to minutes, and with 3 passes one block caught in such a stretch
 * moved a median by a third; each implementation's calls are now spread over the whole case).
 */
export const DEFAULT_BUDGET: TimingBudget = {
  budgetMs: 1000,
  minRuns: 9,
  maxRuns: 300,
  warmupRuns: 3,
  warmupMs: 400,
  passes: 10,
};

async function once(f: () => unknown): Promise<number> {
  const t0 = performance.now();
  await f();
  return performance.now() - t0;
}

/**
 * Warms up each of `items`, plans its number of calls (the budget divided by
 * its time per call, within [minRuns, maxRuns]; at least 3 for one slower
 * than a third of the budget, which is warmed up by one call, or by none when
 * its `firstMs` says it was called already), then measures them in `passes`
 * passes.
 */
export async function measure(
  items: readonly Timed[],
  budget: TimingBudget,
): Promise<Map<string, Timing>> {
  const perPass = new Map<string, number>();
  const left = new Map<string, number>(); // calls still to measure: a slow one's few calls go to the first passes
  const slow = new Set<string>();
  for (const item of items) {
    await item.before?.();
    let spent = 0;
    let last = item.firstMs ?? Infinity;
    const warm = item.firstMs !== undefined &&
      item.firstMs > budget.budgetMs / 3; // slow, and called once already
    for (
      let i = 0;
      !warm && i < 50 && (i < budget.warmupRuns || spent < budget.warmupMs);
      i++
    ) {
      last = await once(item.run);
      spent += last;
      if (last > budget.budgetMs / 3) break; // slow: one warm-up call is enough
    }
    const fit = Math.floor(budget.budgetMs / Math.max(last, 1e-3));
    const runs = Math.min(
      budget.maxRuns,
      Math.max(fit, last > budget.budgetMs / 3 ? 3 : budget.minRuns),
    );
    perPass.set(item.key, Math.ceil(runs / budget.passes));
    left.set(item.key, runs);
    if (last > budget.budgetMs / 10) slow.add(item.key);
  }
  const times = new Map<string, number[]>(items.map((i) => [i.key, []]));
  for (let pass = 0; pass < budget.passes; pass++) {
    // each pass starts at a different item, so that none always runs first or always follows the same one
    const start = Math.floor(pass * items.length / budget.passes);
    for (const item of [...items.slice(start), ...items.slice(0, start)]) {
      const count = Math.min(perPass.get(item.key)!, left.get(item.key)!);
      if (count <= 0) continue;
      left.set(item.key, left.get(item.key)! - count);
      await item.before?.();
      if (!slow.has(item.key)) await item.run(); // settles caches, and the threads of whatever ran before
      const t = times.get(item.key)!;
      for (let i = 0; i < count; i++) {
        t.push(await once(item.run));
      }
    }
  }
  const out = new Map<string, Timing>();
  for (const [key, t] of times) {
    t.sort((a, b) => a - b);
    const mid = t.length >> 1;
    const ms = t.length % 2 ? t[mid]! : (t[mid - 1]! + t[mid]!) / 2;
    out.set(key, { ms, minMs: t[0]!, runs: t.length });
  }
  return out;
}
