/**
 * Command line for moe-router (SPEC section 7): `deno task route [flags]`.
 *
 * With no flags it routes an embedded DeepSeek-V3-like batch and prints the
 * backend, timings and a routing summary. With flags it reads and writes
 * numpy .npy files; run with `--help` for the list.
 *
 * @module
 */
import { encodeNpy, parseNpy } from "./_npy.ts";
import type { BackendChoice, FloatTensor, IndexDType, RoutingMapFormat, Tensor, TopkOptions } from "./_types.ts";
import { createRouter, type Router } from "./router.ts";

const USAGE = `usage: deno task route [--op topk|aux-scores|aux-loss] [flags] --out DIR
  topk:       --logits L.npy --topk K --score-function softmax|sigmoid|sqrtsoftplus [--pre-softmax]
              [--num-groups G --group-topk GK] [--scaling-factor F] [--expert-bias B.npy]
              [--routing-map-format bytemap|bitmap_u8] [--index-dtype int16|int32|int64]
              [--grad-probs G.npy] [--radix-topk-threshold N]
  aux-scores: --logits L.npy --topk K --score-function S [--routing-map-format F] [--grad-scores G.npy]
  aux-loss:   --probs P.npy --tokens-per-expert N.npy --total-num-tokens n --num-experts E
              --topk K --coeff c [--grad-aux-loss g]
  common:     [--backend auto|webgpu|wasm] --out DIR
With no arguments: route a synthetic DeepSeek-V3-like batch (8192 x 256, top-8, sigmoid,
8 groups / top-4, bias, scale 2.5) and print a summary.`;

/** A bad command line or input file: printed as one line, exit status 2. */
export class CliError extends Error {}

/** Where the CLI writes; tests pass their own. */
export interface CliIO {
  /** Writes one line of output. */
  out(line: string): void;
  /** Writes one line of diagnostics. */
  err(line: string): void;
}

const FLAGS: Record<string, "value" | "switch"> = {
  "op": "value",
  "logits": "value",
  "topk": "value",
  "score-function": "value",
  "pre-softmax": "switch",
  "num-groups": "value",
  "group-topk": "value",
  "scaling-factor": "value",
  "expert-bias": "value",
  "routing-map-format": "value",
  "index-dtype": "value",
  "grad-probs": "value",
  "grad-scores": "value",
  "probs": "value",
  "tokens-per-expert": "value",
  "total-num-tokens": "value",
  "num-experts": "value",
  "coeff": "value",
  "grad-aux-loss": "value",
  "backend": "value",
  "out": "value",
  "radix-topk-threshold": "value",
  "help": "switch",
};

const ALLOWED: Record<string, readonly string[]> = {
  topk: [
    "logits",
    "topk",
    "score-function",
    "pre-softmax",
    "num-groups",
    "group-topk",
    "scaling-factor",
    "expert-bias",
    "routing-map-format",
    "index-dtype",
    "grad-probs",
    "radix-topk-threshold",
  ],
  "aux-scores": ["logits", "topk", "score-function", "routing-map-format", "grad-scores", "radix-topk-threshold"],
  "aux-loss": ["probs", "tokens-per-expert", "total-num-tokens", "num-experts", "topk", "coeff", "grad-aux-loss"],
};

function parseArgs(args: readonly string[]): Map<string, string> {
  const flags = new Map<string, string>();
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] as string;
    if (!arg.startsWith("--")) throw new CliError(`unexpected argument ${JSON.stringify(arg)}: flags start with --`);
    let name = arg.slice(2);
    let value: string | undefined;
    const eq = name.indexOf("=");
    if (eq >= 0) {
      value = name.slice(eq + 1);
      name = name.slice(0, eq);
    }
    const kind = FLAGS[name];
    if (kind === undefined) throw new CliError(`unknown flag --${name} (see --help)`);
    if (flags.has(name)) throw new CliError(`--${name} given twice`);
    if (kind === "switch") {
      if (value !== undefined) throw new CliError(`--${name} takes no value, got ${JSON.stringify(value)}`);
      flags.set(name, "");
      continue;
    }
    if (value === undefined) {
      value = args[++i];
      if (value === undefined || value.startsWith("--")) throw new CliError(`--${name} needs a value`);
    }
    flags.set(name, value);
  }
  return flags;
}

function need(flags: Map<string, string>, name: string): string {
  const v = flags.get(name);
  if (v === undefined) throw new CliError(`--${name} is required for --op ${flags.get("op") ?? "topk"}`);
  return v;
}

function integer(flags: Map<string, string>, name: string, required = true): number | undefined {
  const raw = required ? need(flags, name) : flags.get(name);
  if (raw === undefined) return undefined;
  const v = Number(raw);
  if (raw.trim() === "" || !Number.isInteger(v)) {
    throw new CliError(`--${name} must be an integer, got ${JSON.stringify(raw)}`);
  }
  return v;
}

function number(flags: Map<string, string>, name: string, required = true): number | undefined {
  const raw = required ? need(flags, name) : flags.get(name);
  if (raw === undefined) return undefined;
  const v = Number(raw);
  if (raw.trim() === "" || !Number.isFinite(v)) {
    throw new CliError(`--${name} must be a finite number, got ${JSON.stringify(raw)}`);
  }
  return v;
}

async function readNpy(flag: string, path: string): Promise<Tensor> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (e) {
    throw new CliError(`--${flag}: cannot read ${path}: ${(e as Error).message}`);
  }
  try {
    return parseNpy(bytes);
  } catch (e) {
    throw new CliError(`--${flag}: ${path} is not a supported .npy file: ${(e as Error).message}`);
  }
}

async function readFloat(flag: string, path: string): Promise<FloatTensor> {
  const t = await readNpy(flag, path);
  if (t.dtype !== "float32" && t.dtype !== "float16") {
    throw new CliError(`--${flag}: ${path} must hold float32 (<f4) or float16 (<f2), got ${t.dtype}`);
  }
  return t as FloatTensor;
}

/**
 * Runs the CLI with the given arguments; returns the exit status.
 *
 * @param args the command-line arguments, without the program name
 * @param io where lines go (default: the console)
 */
export async function runCli(args: readonly string[], io: CliIO = consoleIO): Promise<number> {
  let router: Router | undefined;
  try {
    const flags = parseArgs(args);
    if (flags.has("help")) {
      io.out(USAGE);
      return 0;
    }
    const backend = (flags.get("backend") ?? "auto") as BackendChoice;
    if (!["auto", "wasm", "webgpu"].includes(backend)) {
      throw new CliError(`--backend must be auto, webgpu or wasm, got ${JSON.stringify(backend)}`);
    }
    if (args.length === 0 || (flags.size === 1 && flags.has("backend"))) {
      router = await createRouter({ backend });
      await demo(router, io);
      return 0;
    }
    const op = flags.get("op") ?? "topk";
    const allowed = ALLOWED[op];
    if (allowed === undefined) {
      throw new CliError(`--op must be topk, aux-scores or aux-loss, got ${JSON.stringify(op)}`);
    }
    for (const name of flags.keys()) {
      if (name !== "op" && name !== "backend" && name !== "out" && !allowed.includes(name)) {
        throw new CliError(`--${name} does not apply to --op ${op}`);
      }
    }
    const out = need(flags, "out");
    router = await createRouter({ backend });
    const files = op === "topk"
      ? await topk(router, flags)
      : op === "aux-scores"
      ? await auxScores(router, flags)
      : await auxLoss(router, flags);
    try {
      await Deno.mkdir(out, { recursive: true });
      for (const [name, t] of files) await Deno.writeFile(`${out}/${name}`, encodeNpy(t));
    } catch (e) {
      throw new CliError(`--out: cannot write to ${out}: ${(e as Error).message}`);
    }
    io.out(`${op} on ${router.backend}: wrote ${[...files.keys()].join(", ")} to ${out}`);
    return 0;
  } catch (e) {
    if (e instanceof CliError || e instanceof TypeError || e instanceof RangeError) {
      io.err(`error: ${e.message}`);
      return 2;
    }
    io.err(`error: ${(e as Error)?.message ?? String(e)}`);
    return 1;
  } finally {
    router?.dispose();
  }
}

type Outputs = Map<string, Tensor | { data: Uint8Array; shape: readonly number[]; dtype: "bool" }>;

// .npy has no bfloat16: outputs in float32 / float16 only, which is all the CLI reads
function asNpy(t: FloatTensor): Tensor {
  return t as Tensor;
}

async function topk(router: Router, flags: Map<string, string>): Promise<Outputs> {
  const logits = await readFloat("logits", need(flags, "logits"));
  const options: TopkOptions = {
    topk: integer(flags, "topk") as number,
    scoreFunction: need(flags, "score-function") as TopkOptions["scoreFunction"],
  };
  if (flags.has("pre-softmax")) options.usePreSoftmax = true;
  const numGroups = integer(flags, "num-groups", false);
  const groupTopk = integer(flags, "group-topk", false);
  if ((numGroups === undefined) !== (groupTopk === undefined)) {
    throw new CliError(
      `--num-groups and --group-topk go together, got only --${numGroups === undefined ? "group-topk" : "num-groups"}`,
    );
  }
  if (numGroups !== undefined) options.numGroups = numGroups;
  if (groupTopk !== undefined) options.groupTopk = groupTopk;
  const scale = number(flags, "scaling-factor", false);
  if (scale !== undefined) options.scalingFactor = scale;
  const biasPath = flags.get("expert-bias");
  if (biasPath !== undefined) options.expertBias = await readFloat("expert-bias", biasPath);
  const fmt = flags.get("routing-map-format");
  if (fmt !== undefined) options.routingMapFormat = fmt as RoutingMapFormat;
  const indexDtype = flags.get("index-dtype");
  if (indexDtype !== undefined) options.indexDtype = indexDtype as IndexDType;
  const threshold = integer(flags, "radix-topk-threshold", false);
  if (threshold !== undefined) options.radixTopkThreshold = threshold;
  const gradPath = flags.get("grad-probs");
  const grad = gradPath === undefined ? undefined : await readFloat("grad-probs", gradPath);

  const r = await router.fusedTopkWithScoreFunction(logits, options);
  const files: Outputs = new Map();
  files.set("probs.npy", asNpy(r.probs));
  if (r.indices) files.set("topk_indices.npy", r.indices);
  if (r.routingMap) files.set("routing_map.npy", r.routingMap);
  files.set("intermediate.npy", r.intermediate);
  if (grad) files.set("grad_logits.npy", asNpy(await router.fusedTopkWithScoreFunctionBackward(r.saved, grad)));
  return files;
}

async function auxScores(router: Router, flags: Map<string, string>): Promise<Outputs> {
  const logits = await readFloat("logits", need(flags, "logits"));
  const fmt = flags.get("routing-map-format");
  const threshold = integer(flags, "radix-topk-threshold", false);
  const r = await router.fusedComputeScoreForMoEAuxLoss(logits, {
    topk: integer(flags, "topk") as number,
    scoreFunction: need(flags, "score-function") as TopkOptions["scoreFunction"],
    ...(fmt === undefined ? {} : { routingMapFormat: fmt as RoutingMapFormat }),
    ...(threshold === undefined ? {} : { radixTopkThreshold: threshold }),
  });
  const files: Outputs = new Map();
  files.set("scores.npy", r.scores);
  files.set("routing_map.npy", r.routingMap);
  const gradPath = flags.get("grad-scores");
  if (gradPath !== undefined) {
    const grad = await readNpy("grad-scores", gradPath);
    if (grad.dtype !== "float32") {
      throw new CliError(`--grad-scores: ${gradPath} must hold float32 (<f4), got ${grad.dtype}`);
    }
    files.set(
      "grad_logits.npy",
      asNpy(await router.fusedComputeScoreForMoEAuxLossBackward(r.saved, grad as Tensor<"float32">)),
    );
  }
  return files;
}

async function auxLoss(router: Router, flags: Map<string, string>): Promise<Outputs> {
  const probs = await readFloat("probs", need(flags, "probs"));
  const tpe = await readNpy("tokens-per-expert", need(flags, "tokens-per-expert"));
  const r = await router.fusedMoEAuxLoss(probs, tpe, {
    totalNumTokens: integer(flags, "total-num-tokens") as number,
    numExperts: integer(flags, "num-experts") as number,
    topk: integer(flags, "topk") as number,
    coeff: number(flags, "coeff") as number,
  });
  const files: Outputs = new Map();
  files.set("aux_loss.npy", asNpy(r.loss));
  files.set(
    "grad_probs.npy",
    asNpy(await router.fusedMoEAuxLossBackward(r.saved, number(flags, "grad-aux-loss", false) ?? 1)),
  );
  return files;
}

// ---- the no-argument demo --------------------------------------------------

const DEMO = { tokens: 8192, experts: 256, topk: 8, groups: 8, groupTopk: 4, scale: 2.5 };

// Deterministic synthetic logits: normal draws (Box-Muller on a small PRNG)
// plus a per-expert popularity offset, so that the load summary has shape.
function demoBatch(): { logits: FloatTensor; bias: FloatTensor } {
  let s = 0x9e3779b9;
  const rand = () => {
    s = (s + 0x6d2b79f5) | 0;
    let t = Math.imul(s ^ (s >>> 15), 1 | s);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const { tokens: T, experts: E } = DEMO;
  const popularity = Float32Array.from({ length: E }, () => 0.5 * (rand() - 0.5));
  const data = new Float32Array(T * E);
  for (let i = 0; i < data.length; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - rand()));
    const a = 2 * Math.PI * rand();
    data[i] = r * Math.cos(a) + (popularity[i % E] as number);
    data[i + 1] = r * Math.sin(a) + (popularity[(i + 1) % E] as number);
  }
  const bias = Float32Array.from({ length: E }, () => 0.01 * (rand() - 0.5));
  return {
    logits: { data, shape: [T, E], dtype: "float32" },
    bias: { data: bias, shape: [E], dtype: "float32" },
  };
}

async function demo(router: Router, io: CliIO): Promise<void> {
  const { logits, bias } = demoBatch();
  const { tokens: T, experts: E, topk: K } = DEMO;
  const options: TopkOptions = {
    topk: K,
    scoreFunction: "sigmoid",
    numGroups: DEMO.groups,
    groupTopk: DEMO.groupTopk,
    scalingFactor: DEMO.scale,
    expertBias: bias,
    indexDtype: "int32",
  };
  io.out(
    `moe-router demo: ${T} tokens x ${E} experts, top-${K}, sigmoid, ${DEMO.groups} groups / top-${DEMO.groupTopk}, bias, scale ${DEMO.scale}`,
  );
  io.out(`backend: ${router.backend} (${router.reason})`);
  // the first call pays for memory growth; time the second
  await router.fusedTopkWithScoreFunction(logits, options);
  let t0 = performance.now();
  const r = await router.fusedTopkWithScoreFunction(logits, options);
  const fwd = performance.now() - t0;
  const grad = { data: new Float32Array(T * E).fill(1 / (T * K)), shape: [T, E], dtype: "float32" as const };
  t0 = performance.now();
  await router.fusedTopkWithScoreFunctionBackward(r.saved, grad);
  const bwd = performance.now() - t0;
  io.out(
    `forward ${fwd.toFixed(2)} ms (${((fwd * 1e6) / (T * E)).toFixed(2)} ns per token x expert), backward ${
      bwd.toFixed(2)
    } ms`,
  );

  const load = new Float64Array(E);
  const groupsUsed = new Float64Array(DEMO.groups);
  const idx = r.indices!.data as Int32Array;
  for (let t = 0; t < T; t++) {
    const seen = new Set<number>();
    for (let k = 0; k < K; k++) {
      const e = idx[t * K + k] as number;
      load[e]!++;
      seen.add(Math.floor(e / (E / DEMO.groups)));
    }
    for (const g of seen) groupsUsed[g]!++;
  }
  const mean = (T * K) / E;
  const sorted = [...load].sort((a, b) => a - b);
  const cv = Math.sqrt(load.reduce((s, v) => s + (v - mean) ** 2, 0) / E) / mean;
  io.out(
    `load per expert (tokens): min ${sorted[0]} / median ${sorted[E >> 1]} / max ${
      sorted[E - 1]
    }, mean ${mean}, coefficient of variation ${cv.toFixed(3)}`,
  );
  const busiest = [...load.keys()].sort((a, b) => (load[b] as number) - (load[a] as number)).slice(0, 5);
  io.out(`busiest experts: ${busiest.map((e) => `${e} (${load[e]})`).join(", ")}`);
  io.out(`tokens per group: ${[...groupsUsed].join(" ")} (each token uses <= ${DEMO.groupTopk} groups)`);
  let sum = 0;
  for (let i = 0; i < r.probs.data.length; i++) sum += r.probs.data[i] as number;
  io.out(`mean routed weight per token: ${(sum / T).toFixed(4)} (scale ${DEMO.scale})`);
}

const consoleIO: CliIO = { out: (l) => console.log(l), err: (l) => console.error(l) };

if (import.meta.main) {
  Deno.exit(await runCli(Deno.args));
}
