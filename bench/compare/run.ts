/**
 * The comparison itself (bench/compare/main.ts checks the setup, then loads
 * this): moe-router against the JavaScript peers of its CPU backend, a plain
 * TypeScript loop, TensorFlow.js (wasm SIMD and cpu backends) and
 * onnxruntime-node (native C++), on the router shapes of cases.ts. Every
 * peer's outputs are checked against moe-router's before it is timed.
 *
 * @module
 */
import { createRouter, type Router, type TopkOptions } from "../../mod.ts";
import { type Case, type CaseData, caseData, CASES, routerOptions } from "./cases.ts";
import { buildRouterModel } from "./onnx_model.ts";
import { OrtRouter, ortVersion } from "./onnx_peer.ts";
import { plainRouter } from "./plain_loop.ts";
import {
  bestMoe,
  type CaseResult,
  consoleReport,
  type Entry,
  fastestPeer,
  type Impl,
  implLabel,
  markdownReport,
  type Mode,
  msOf,
  type RunInfo,
  speedupSvg,
  type TargetResult,
} from "./report.ts";
import { TfRouter, tfVersions, useTfBackend } from "./tfjs_peer.ts";
import { DEFAULT_BUDGET, measure, type Timed, type TimingBudget } from "./timing.ts";
import { checkPeer, GRAD_TOLERANCE, type PeerOutput, PROBS_TOLERANCE } from "./validate.ts";

const HERE = new URL(".", import.meta.url);
const RESULTS_MD = new URL("../RESULTS.md", HERE);
const SPEEDUPS_SVG = new URL("../speedups.svg", HERE);

// ---------------------------------------------------------------------------
// Command line

const args = new Set(Deno.args);
const caseArg = Deno.args.find((a) => a.startsWith("--cases="))?.slice("--cases=".length);
const quick = args.has("--quick");
const write = !args.has("--no-write") && caseArg === undefined && !quick;
const budget: TimingBudget = quick ? { ...DEFAULT_BUDGET, budgetMs: 250, minRuns: 3, passes: 1 } : DEFAULT_BUDGET;
const cases = caseArg === undefined ? CASES : CASES.filter((c) => caseArg.split(",").includes(c.id));
if (cases.length === 0) {
  throw new Error(`--cases: no case among ${CASES.map((c) => c.id).join(", ")}`);
}
const unknown = Deno.args.filter((a) => !a.startsWith("--cases=") && !["--quick", "--no-write"].includes(a));
if (unknown.length > 0) {
  throw new Error(`unknown argument(s) ${unknown.join(" ")}; see bench/compare/main.ts`);
}

// ---------------------------------------------------------------------------
// moe-router, one thread and all threads

const THREADS = navigator.hardwareConcurrency;

/** A WebAssembly router on `threads` threads, or null where it does not run on that many (router.threads). */
async function wasmRouter(threads: number): Promise<Router | null> {
  const router = await createRouter({ backend: "wasm", threads });
  if (router.threads === threads) return router;
  router.dispose();
  return null;
}

const moeOne: Router = await wasmRouter(1) ?? (() => {
  throw new Error("moe-router did not make a one-thread WebAssembly router");
})();
const moeAll = THREADS > 1 ? await wasmRouter(THREADS) : null;

interface Moe {
  /** Routing alone (saveForBackward: false): the peers' outputs. */
  forward(): Promise<PeerOutput>;
  /** The forward that a backward follows: it keeps the saved state (released at once here). */
  forwardSaving(): Promise<PeerOutput>;
  forwardBackward(): Promise<PeerOutput>;
  backward(): Promise<void>;
  release(): void;
}

/** moe-router's calls on one case: host arrays in, host arrays out, saved state released. */
async function moeCalls(router: Router, c: Case, d: CaseData): Promise<Moe> {
  const shape = [c.tokens, c.experts];
  const logits = { data: d.logits, shape, dtype: "float32" as const };
  const grad = { data: d.gradProbs, shape, dtype: "float32" as const };
  const options: TopkOptions = routerOptions(c);
  const kept = await router.fusedTopkWithScoreFunction(logits, options); // for the backward alone
  const alone = { ...options, saveForBackward: false as const };
  return {
    async forward() {
      const out = await router.fusedTopkWithScoreFunction(logits, alone);
      return { probs: out.probs.data as Float32Array, indices: out.indices!.data as Int32Array };
    },
    async forwardSaving() {
      const out = await router.fusedTopkWithScoreFunction(logits, options);
      out.saved.release();
      return { probs: out.probs.data as Float32Array, indices: out.indices!.data as Int32Array };
    },
    async forwardBackward() {
      const out = await router.fusedTopkWithScoreFunction(logits, options);
      const g = await router.fusedTopkWithScoreFunctionBackward(out.saved, grad);
      out.saved.release();
      return {
        probs: out.probs.data as Float32Array,
        indices: out.indices!.data as Int32Array,
        grad: g.data as Float32Array,
      };
    },
    async backward() {
      await router.fusedTopkWithScoreFunctionBackward(kept.saved, grad);
    },
    release: () => kept.saved.release(),
  };
}

// ---------------------------------------------------------------------------
// One case

const key = (mode: Mode, impl: Impl) => `${mode}:${impl}`;

async function runCase(c: Case): Promise<CaseResult> {
  const t0 = performance.now();
  const d = caseData(c);
  const results: CaseResult["results"] = {
    forward: {},
    "forward+backward": {},
    backward: {},
  };
  const timed: Timed[] = [];
  const cleanup: (() => unknown)[] = [];

  /** Checks a peer's output; when it passes, adds the peer to the timed set. */
  const add = async (
    mode: Mode,
    impl: Impl,
    reference: PeerOutput | null,
    run: () => unknown,
    before?: () => unknown,
  ) => {
    const entry: Entry = {};
    results[mode][impl] = entry;
    const item: Timed = { key: key(mode, impl), run };
    if (before) item.before = before;
    if (reference !== null) {
      await before?.();
      try {
        const t = performance.now();
        const out = (await run()) as PeerOutput;
        item.firstMs = performance.now() - t;
        entry.check = checkPeer(reference, out, c.tokens, c.options.topk);
      } catch (e) {
        entry.check = { ok: false, detail: `threw ${e instanceof Error ? e.message : String(e)}` };
      }
      if (!entry.check.ok) return;
    }
    timed.push(item);
  };

  // moe-router: the reference of every check (its all-threads run is checked against it too)
  const one = await moeCalls(moeOne, c, d);
  cleanup.push(one.release);
  const refForward = await one.forward();
  const refBoth = await one.forwardBackward();
  await add("forward", "moe-1", null, one.forward);
  await add("forward", "moe-1-save", refForward, one.forwardSaving);
  await add("forward+backward", "moe-1", null, one.forwardBackward);
  await add("backward", "moe-1", null, one.backward);
  if (moeAll) {
    const all = await moeCalls(moeAll, c, d);
    cleanup.push(all.release);
    await add("forward", "moe-all", refForward, all.forward);
    await add("forward", "moe-all-save", refForward, all.forwardSaving);
    await add("forward+backward", "moe-all", refBoth, all.forwardBackward);
    await add("backward", "moe-all", null, all.backward);
  } else {
    const note = `n/a: no ${THREADS}-thread router`;
    for (const mode of ["forward", "forward+backward", "backward"] as const) {
      results[mode]["moe-all"] = { note };
    }
    results.forward["moe-all-save"] = { note };
  }

  await add("forward", "plain", refForward, () => plainRouter(c, d.logits));

  for (const backend of ["wasm", "cpu"] as const) {
    await useTfBackend(backend);
    const tf = new TfRouter(c);
    cleanup.push(() => tf.dispose());
    const before = () => useTfBackend(backend);
    const impl = backend === "wasm" ? "tfjs-wasm" : "tfjs-cpu";
    await add("forward", impl, refForward, () => tf.forward(d.logits), before);
    await add("forward+backward", impl, refBoth, () => tf.forwardBackward(d.logits, d.gradProbs), before);
  }

  for (const [impl, threads] of [["ort-1", 1], ["ort-all", THREADS]] as const) {
    if (impl === "ort-all" && THREADS < 2) continue;
    const ort = await OrtRouter.create(c, threads);
    cleanup.push(() => ort.dispose());
    await add("forward", impl, refForward, () => ort.forward(d.logits));
  }

  const timings = await measure(timed, budget);
  for (const mode of ["forward", "forward+backward", "backward"] as const) {
    for (const [impl, entry] of Object.entries(results[mode]) as [Impl, Entry][]) {
      const t = timings.get(key(mode, impl));
      if (t) entry.timing = t;
    }
  }
  for (const f of cleanup) await f();
  // the DeepSeek-V3 case also checks onnxruntime-node in Deno against Node, while its data is at hand
  if (c.id === "dsv3" && !quick) ortNote = await ortUnderNode(c, d);
  const failed = Object.values(results.forward).concat(Object.values(results["forward+backward"]))
    .filter((e) => e.check && !e.check.ok).length;
  const seconds = ((performance.now() - t0) / 1000).toFixed(1);
  console.error(`  ${c.id}: ${seconds} s${failed ? `, ${failed} failed checks` : ""}`);
  return { c, results };
}

// ---------------------------------------------------------------------------
// Targets of issue 4

function targetsOf(results: readonly CaseResult[]): TargetResult[] {
  const targets: TargetResult[] = [];
  const ratio = (num: number | undefined, den: number | undefined) =>
    num === undefined || den === undefined ? undefined : num / den;
  const fmt = (ms: number | undefined) => ms === undefined ? "n/a" : `${ms.toFixed(2)} ms`;
  const x = (r: number | undefined) => r === undefined ? "n/a" : `${r.toFixed(2)}x`;

  const dsv3 = results.find((r) => r.c.id === "dsv3");
  if (dsv3) {
    const one = msOf(dsv3, "forward", "moe-1");
    const vs = (impl: Impl, min: number) => {
      const peer = msOf(dsv3, "forward", impl);
      const r = ratio(peer, one);
      targets.push({
        target: `DeepSeek-V3 forward, 1 thread: at least ${min}x faster than ${implLabel(impl, THREADS)}`,
        measured: `${fmt(one)} vs ${fmt(peer)}: ${x(r)}`,
        met: r === undefined ? false : r >= min,
      });
    };
    vs("ort-1", 6);
    vs("plain", 15);
    const all = msOf(dsv3, "forward", "moe-all");
    const r = ratio(one, all);
    targets.push({
      target: `DeepSeek-V3 forward, ${THREADS} threads: at least 1.7x faster than 1 thread (${THREADS} cores)`,
      measured: all === undefined ? `n/a: no ${THREADS}-thread router` : `${fmt(one)} vs ${fmt(all)}: ${x(r)}`,
      met: r === undefined ? false : r >= 1.7,
    });
  }
  for (const res of results) {
    if (res.c.id === "dsv3") continue;
    const ours = bestMoe(res, "forward");
    const peer = fastestPeer(res, "forward");
    const r = ratio(peer?.ms, ours?.ms);
    targets.push({
      target: `${res.c.id} forward: at least 3x faster than the fastest peer`,
      measured: ours && peer
        ? `${fmt(ours.ms)} (${ours.impl === "moe-1" ? "1 thread" : `${THREADS} threads`}) vs ${
          implLabel(peer.impl, THREADS)
        } ${fmt(peer.ms)}: ${x(r)}`
        : "n/a",
      met: r === undefined ? false : r >= 3,
    });
  }
  for (const res of results) {
    for (const impl of ["moe-1", "moe-all"] as const) {
      // the forward a backward follows: the one that saves its state
      const f = msOf(res, "forward", `${impl}-save`);
      const b = msOf(res, "backward", impl);
      if (impl === "moe-all" && b === undefined) continue;
      const r = ratio(f, b);
      const threads = impl === "moe-1" ? "1 thread" : `${THREADS} threads`;
      targets.push({
        target: `${res.c.id} backward at least 2x faster than the saving forward (${threads})`,
        measured: `forward ${fmt(f)}, backward ${fmt(b)}: ${x(r)}`,
        met: r === undefined ? false : r >= 2,
      });
    }
  }
  return targets;
}

// ---------------------------------------------------------------------------
// Machine, versions, and the ONNX Runtime cross-check under Node

async function commandOutput(cmd: string, cmdArgs: string[]): Promise<string | null> {
  try {
    const out = await new Deno.Command(cmd, { args: cmdArgs, stdout: "piped", stderr: "null" }).output();
    return out.success ? new TextDecoder().decode(out.stdout).trim() : null;
  } catch {
    return null;
  }
}

async function machineInfo(): Promise<string[]> {
  const cpuinfo = await Deno.readTextFile("/proc/cpuinfo").catch(() => "");
  const model = cpuinfo.match(/^model name\s*:\s*(.*)$/m)?.[1] ?? "unknown";
  const flags = cpuinfo.match(/^flags\s*:\s*(.*)$/m)?.[1]?.split(" ") ?? [];
  const simd = ["avx2", "avx512f", "fma"].filter((f) => flags.includes(f)).join(", ");
  const mem = (await Deno.readTextFile("/proc/meminfo").catch(() => "")).match(/^MemTotal:\s*(\d+) kB/m)?.[1];
  const nproc = (await commandOutput("nproc", [])) ?? String(THREADS);
  const node = await commandOutput("node", ["--version"]);
  return [
    `CPU: ${model}${simd ? ` (${simd})` : ""}; \`nproc\`: ${nproc}; navigator.hardwareConcurrency: ${THREADS}`,
    `memory: ${
      mem ? `${(Number(mem) / 1048576).toFixed(0)} GiB` : "unknown"
    }; OS: ${Deno.build.os} ${Deno.osRelease()}`,
    `Deno ${Deno.version.deno} (V8 ${Deno.version.v8}, TypeScript ${Deno.version.typescript})` +
    (node ? `; Node ${node} (ONNX Runtime cross-check)` : ""),
    `${tfVersions()} (tfjs-backend-wasm, tfjs-backend-cpu), ${ortVersion()}`,
    `moe-router at ${await commandOutput("git", ["describe", "--always", "--dirty"]) ?? "unknown commit"}`,
  ];
}

/** What a fresh 8 MiB output array costs here (page faults), against reusing one: it weighs on every [T, E] output. */
function freshMemoryCost(): string {
  const n = 2 * 1024 * 1024;
  const kept = new Float32Array(n);
  const fresh: number[] = [];
  const reused: number[] = [];
  for (let i = 0; i < 15; i++) {
    let t = performance.now();
    new Float32Array(n).fill(i);
    fresh.push(performance.now() - t);
    t = performance.now();
    kept.fill(i);
    reused.push(performance.now() - t);
  }
  const median = (v: number[]) => v.sort((a, b) => a - b)[v.length >> 1]!.toFixed(2);
  return `filling a new 8 MiB Float32Array: ${median(fresh)} ms (median of 15); filling a reused one: ` +
    `${median(reused)} ms (first-touch page faults: they weigh on every implementation that allocates [T, E] ` +
    "outputs per call)";
}

const loadavg = async () => (await Deno.readTextFile("/proc/loadavg").catch(() => "")).split(" ").slice(0, 3).join(" ");

/** The DeepSeek-V3 graph timed under Node and under Deno, same data, same loop. */
async function ortUnderNode(c: Case, d: CaseData): Promise<string | null> {
  const dir = await Deno.makeTempDir({ prefix: "moe-compare-" });
  try {
    const model = `${dir}/router.onnx`;
    const data = `${dir}/logits.f32`;
    await Deno.writeFile(model, buildRouterModel({ experts: c.experts, options: c.options }));
    await Deno.writeFile(data, new Uint8Array(d.logits.buffer, d.logits.byteOffset, d.logits.byteLength));
    const threads = THREADS > 1 ? [1, THREADS] : [1];
    const runs = 30;
    const script = new URL("ort_node.mjs", HERE).pathname;
    const json = await commandOutput("node", [
      script,
      model,
      data,
      `${c.tokens}`,
      `${c.experts}`,
      `${threads}`,
      `${runs}`,
    ]);
    if (json === null) return null;
    const node = JSON.parse(json) as { node: string; results: Record<string, number> };
    const parts: string[] = [];
    for (const t of threads) {
      const ort = await OrtRouter.create(c, t);
      const times: number[] = [];
      for (let i = 0; i < 5 + runs; i++) {
        const t0 = performance.now();
        await ort.forward(d.logits);
        if (i >= 5) times.push(performance.now() - t0);
      }
      await ort.dispose();
      times.sort((a, b) => a - b);
      const deno = times[times.length >> 1]!;
      parts.push(
        `${t} thread${t > 1 ? "s" : ""}: ${deno.toFixed(2)} ms in Deno, ${node.results[t]?.toFixed(2)} ms in Node`,
      );
    }
    return `onnxruntime-node runs in Deno through Node-API. Cross-check on ${c.id}, the same graph and data timed ` +
      `by the same loop (median of ${runs}) in Deno and in Node ${node.node}: ${parts.join("; ")}.`;
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

// ---------------------------------------------------------------------------
// Run

const started = new Date();
const loadBefore = await loadavg();
const machine = await machineInfo();
const memoryCost = freshMemoryCost();
console.error(memoryCost);
const tfWasm = await useTfBackend("wasm");
await useTfBackend("cpu");
console.error(
  `moe-router threads: 1${moeAll ? ` and ${THREADS}` : " (no multi-thread router: all-threads column n/a)"}`,
);
console.error(`TensorFlow.js wasm backend: ${tfWasm}`);
console.error(`cases: ${cases.map((c) => c.id).join(", ")}${quick ? " (quick)" : ""}`);

let ortNote: string | null = null;
const results: CaseResult[] = [];
for (const c of cases) results.push(await runCase(c));
const loadAfter = await loadavg();

const targets = targetsOf(results);
console.log();
console.log(consoleReport(results, targets, THREADS));
if (ortNote) console.log(`\n${ortNote}`);

if (write) {
  const info: RunInfo = {
    date: started.toISOString().slice(0, 16).replace("T", " ") + " UTC",
    machine: [...machine, memoryCost, `load average (1, 5, 15 min) before: ${loadBefore}; after: ${loadAfter}`],
    setup: setupText(),
    notes: notesText(tfWasm, ortNote),
  };
  await Deno.writeTextFile(RESULTS_MD, markdownReport(results, targets, THREADS, info));
  await Deno.writeTextFile(SPEEDUPS_SVG, speedupSvg(results, THREADS));
  // keep the generated files in the repository's format (deno fmt formats markdown and SVG, and CI checks it)
  const config = new URL("../../deno.json", HERE).pathname;
  const files = [RESULTS_MD.pathname, SPEEDUPS_SVG.pathname];
  await new Deno.Command(Deno.execPath(), { args: ["fmt", "-q", "--config", config, ...files] }).output();
  console.log(`\nwrote ${RESULTS_MD.pathname} and ${SPEEDUPS_SVG.pathname}`);
}

for (const r of [moeOne, moeAll]) r?.dispose();

function setupText(): string[] {
  return [
    "Every implementation takes the logits as a `Float32Array` [T, E] and returns host arrays: probs [T, E] " +
    "(float32) and the chosen experts [T, K]; copies in and out are part of each call (TensorFlow.js: " +
    "`tf.tensor2d` and `dataSync`; ONNX Runtime: an `ort.Tensor` over the array and its outputs; moe-router: into " +
    "and out of its WebAssembly memory). No implementation is given output buffers to reuse. " +
    "moe-router is asked for dense int32 indices (`indexDtype`), like the peers, and for routing alone " +
    '(`saveForBackward: false`): probs and indices, what the peers return. The rows "saving for backward" ' +
    "time the default forward, which also keeps the state a backward needs (the intermediate, or a copy of " +
    "the logits it is computed from, and copies of the routing output); the backward's ratios and the " +
    "forward+backward rows use that forward. moe-router runs as " +
    `\`createRouter({ backend: "wasm", threads: 1 })\` and \`threads: ${THREADS}\`.`,
    "",
    "Logits are seeded normals (`routableLogits` of tests/_generators.ts: each row is redrawn until every " +
    "selection boundary has a margin of 2e-6 relative, so that correct implementations choose the same " +
    "experts); DeepSeek-V3's bias is N(0, 0.01). Before it is timed, each peer's output is checked against " +
    "moe-router's: the same set of chosen experts for every token, probs within " +
    `${PROBS_TOLERANCE.rtol} relative (+${PROBS_TOLERANCE.atol} absolute), and gradients within ` +
    `${GRAD_TOLERANCE.rtol} relative (+${GRAD_TOLERANCE.atolOfMax} of the largest). A peer that fails is ` +
    "reported as failing and not timed.",
    "",
    `Timing: warm-up (at least ${budget.warmupMs} ms of calls, one call for slow ones), then calls for about ` +
    `${budget.budgetMs / 1000} s per implementation (at least ${budget.minRuns}, at least 3 for slow ones), in ` +
    `${budget.passes} passes over the implementations of a case, in an order rotated from pass to pass, so that ` +
    "a change of the machine's load touches them all; the median of all calls is reported.",
  ];
}

function notesText(tfWasm: string, ortNote: string | null): string[] {
  const notes = [
    "**plain TypeScript loop** (bench/compare/plain_loop.ts): what a user writes by hand: per token, scores " +
    "into a scratch row, group scores by insertion of the top K/GK, K rounds of arg-max, normalise.",
    `**TensorFlow.js** (bench/compare/tfjs_peer.ts): wasm backend: ${tfWasm} (the backend has no threads ` +
    "under Deno or Node). Forward: sigmoid, add, group limit (reshape, topk, sum, topk of the groups, oneHot " +
    "mask), topk, gather, normalise, scatterND. Forward+backward: `tf.grad` of sum(probs * gradProbs); " +
    "TensorFlow.js has no gradient for TopK, so the selection runs first, off the tape, and gather / scatter " +
    "get their gradients through `tf.customGrad` (the wasm backend has no UnsortedSegmentSum kernel for the " +
    "built-in gather gradient). `oneHot(..., 'float32')` on the wasm backend of 4.22.0 returns integer bit " +
    "patterns (1 reads as 1.4e-45), so the group mask is made in int32 and cast.",
    "**onnxruntime-node** (bench/compare/onnx_model.ts, onnx_peer.ts): the ONNX graph is encoded by hand " +
    "(protobuf, opset 17), grouped graph included: Sigmoid, Add, Reshape, TopK, ReduceSum, TopK of the groups, " +
    "ScatterElements of 0 into a -inf [T, G] tensor added to the scores, TopK, GatherElements, ReduceSum, Add, " +
    "Div, Mul, ScatterElements into zeros (softmax cases: TopK, Softmax, ScatterElements). CPU execution " +
    "provider, all graph optimisations, sequential, `intraOpNumThreads` 1 and " +
    `${THREADS}, \`session.intra_op.allow_spinning\` 0 (by default its pool threads keep spinning after a run, ` +
    "taking one of the 2 cores from whatever is timed next). Its indices are int64. Its one-thread medians " +
    "swing from run to run on this VM (23-53 ms on dsv3, with or without spinning; the cross-check below times " +
    "it alone).",
  ];
  if (ortNote) notes.push(ortNote);
  notes.push(
    "This machine is shared with other work; the load averages above say how busy it was. Rerun " +
      "`deno task bench:compare` for numbers of your own.",
  );
  return notes;
}
