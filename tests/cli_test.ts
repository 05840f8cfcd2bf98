/**
 * SPEC section 7 through the command line: every golden case through
 * `runCli()` in-process (every routing output, every index dtype), output
 * files read back with their exact numpy dtypes and shapes; and a few real
 * `deno run cli.ts` processes: one golden case end to end, the demo,
 * `--help`, and bad arguments that must print one line to stderr.
 */

import assert from "node:assert";
import { encodeNpy, parseNpy } from "../_npy.ts";
import { type CliIO, runCli } from "../cli.ts";
import type { Tensor } from "../_types.ts";
import { assertArrayEqual, assertBitIdentical, assertClose } from "./_assert.ts";
import { goldenDir, listCases, loadCase } from "./_golden.ts";
import type { AuxLossCase, AuxScoresCase, GoldenCase, TopkCase } from "./_golden.ts";
import { indexDtypesFor } from "./_golden_suite.ts";
import { packBitmap, sortedRows, widen } from "./reference.ts";

const CLI_PATH = decodeURIComponent(new URL("../cli.ts", import.meta.url).pathname);
const REPO_DIR = decodeURIComponent(new URL("../", import.meta.url).pathname);

/** numpy descr of each dtype the CLI writes. */
const DESCR: Record<string, string> = {
  float32: "<f4",
  float16: "<f2",
  uint8: "|u1",
  int16: "<i2",
  int32: "<i4",
  int64: "<i8",
};

/** The outcome of one CLI run: exit status and the lines it printed. */
interface Run {
  code: number;
  out: string[];
  err: string[];
}

/** Runs the CLI in-process, collecting what it prints. */
async function cli(args: string[]): Promise<Run> {
  const out: string[] = [];
  const err: string[] = [];
  const io: CliIO = { out: (line) => out.push(line), err: (line) => err.push(line) };
  const code = await runCli(args, io);
  return { code, out, err };
}

// Mesa's Vulkan driver (probed by the "auto" backend) prints a line to
// stderr when XDG_RUNTIME_DIR is unset: give the child process a valid one,
// as a desktop session would, so that stderr holds the CLI's lines only.
const XDG_RUNTIME_DIR = Deno.env.get("XDG_RUNTIME_DIR") || await Deno.makeTempDir({ prefix: "xdg-" });

/** Runs `deno run cli.ts ...args` as a process; stdout and stderr split into lines. */
async function subprocess(args: string[]): Promise<Run> {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-read", "--allow-write", "--allow-env", CLI_PATH, ...args],
    cwd: REPO_DIR,
    env: { NO_COLOR: "1", XDG_RUNTIME_DIR },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const lines = (bytes: Uint8Array) => {
    const text = new TextDecoder().decode(bytes);
    return text === "" ? [] : text.replace(/\n$/, "").split("\n");
  };
  return { code, out: lines(stdout), err: lines(stderr) };
}

/** Asserts a successful run: status 0, nothing on stderr. */
function assertSuccess(run: Run, label: string): void {
  assert.deepStrictEqual(run.err, [], `${label}: stderr`);
  assert.strictEqual(run.code, 0, `${label}: exit status`);
}

/** Asserts a failed run: non-zero status, exactly one line on stderr matching every pattern, nothing on stdout. */
function assertOneLineError(run: Run, parts: RegExp[], label: string): void {
  assert.notStrictEqual(run.code, 0, `${label}: exit status`);
  assert.strictEqual(run.err.length, 1, `${label}: stderr has ${run.err.length} lines: ${JSON.stringify(run.err)}`);
  for (const part of parts) assert.match(run.err[0]!, part, `${label}: ${JSON.stringify(run.err[0])} lacks ${part}`);
  assert.deepStrictEqual(run.out, [], `${label}: stdout`);
}

/** A .npy file read back: its tensor and its header's descr as written. */
interface NpyFile {
  tensor: Tensor;
  descr: string;
}

async function readNpy(path: string): Promise<NpyFile> {
  const bytes = await Deno.readFile(path);
  const header = new TextDecoder("latin1").decode(bytes.subarray(0, Math.min(bytes.length, 256)));
  const descr = /'descr'\s*:\s*'([^']*)'/.exec(header)?.[1];
  assert.ok(descr !== undefined, `${path}: no descr in the header`);
  return { tensor: parseNpy(bytes), descr };
}

/** Reads every file of an output folder, checking the set of names is exactly `names`. */
async function readOutputs(dir: string, names: string[]): Promise<Map<string, NpyFile>> {
  const found: string[] = [];
  for await (const entry of Deno.readDir(dir)) found.push(entry.name);
  assert.deepStrictEqual(found.sort(), [...names].sort(), `files in ${dir}`);
  const files = new Map<string, NpyFile>();
  for (const name of names) files.set(name, await readNpy(`${dir}/${name}`));
  return files;
}

/** Asserts a file's dtype (by its numpy descr, one of `descrs`) and shape; returns its tensor. */
function expectFile(files: Map<string, NpyFile>, name: string, descrs: string[], shape: number[]): Tensor {
  const file = files.get(name);
  assert.ok(file !== undefined, `${name}: missing`);
  assert.ok(descrs.includes(file.descr), `${name}: descr '${file.descr}', expected ${descrs.join(" or ")}`);
  assert.deepStrictEqual([...file.tensor.shape], shape, `${name}: shape`);
  return file.tensor;
}

/** Paths of a case's input files (from its case.json). */
function inputPaths(name: string): Record<string, string> {
  const dir = new URL(`${name}/`, goldenDir());
  const json = JSON.parse(Deno.readTextFileSync(new URL("case.json", dir))) as { inputs: Record<string, string> };
  return Object.fromEntries(
    Object.entries(json.inputs).map(([key, file]) => [key, decodeURIComponent(new URL(file, dir).pathname)]),
  );
}

/** The CLI flags of a top-k case, without the output choice and --out. */
function topkFlags(c: TopkCase): string[] {
  const paths = inputPaths(c.name);
  const flags = ["--logits", paths.logits!, "--topk", String(c.topk), "--score-function", c.score_function];
  if (c.use_pre_softmax) flags.push("--pre-softmax");
  if (c.num_groups !== null && c.group_topk !== null) {
    flags.push("--num-groups", String(c.num_groups), "--group-topk", String(c.group_topk));
  }
  if (c.scaling_factor !== null) flags.push("--scaling-factor", String(c.scaling_factor));
  if (c.expert_bias) flags.push("--expert-bias", paths.expert_bias!);
  flags.push("--grad-probs", paths.grad_probs!);
  return flags;
}

/** Checks the outputs of one top-k run against the case; `route` is the routing output asked for. */
async function checkTopkOutputs(c: TopkCase, dir: string, route: string): Promise<void> {
  const { num_tokens: T, num_experts: E, topk: K, dtype } = c;
  const tolerance = { atol: c.atol, rtol: c.rtol };
  const dense = route.startsWith("int");
  const routeFile = dense ? "topk_indices.npy" : "routing_map.npy";
  const files = await readOutputs(dir, ["probs.npy", routeFile, "intermediate.npy", "grad_logits.npy"]);
  const probs = expectFile(files, "probs.npy", [DESCR[dtype]!], [T, E]);
  assertClose(widen(probs), widen(c.expected.probs), tolerance, `${route} probs`);
  const intermediate = expectFile(files, "intermediate.npy", ["<f4"], [T, E]);
  assertClose(intermediate.data as Float32Array, c.expected.intermediate.data, tolerance, `${route} intermediate`);
  const grad = expectFile(files, "grad_logits.npy", [DESCR[dtype]!], [T, E]);
  assertClose(widen(grad), widen(c.expected.grad_logits), tolerance, `${route} grad_logits`);
  if (route === "bytemap") {
    const map = expectFile(files, routeFile, ["|u1", "|b1"], [T, E]);
    assertArrayEqual(map.data as Uint8Array, c.expected.routing_map.data, "bytemap");
  } else if (route === "bitmap_u8") {
    const map = expectFile(files, routeFile, ["|u1"], [T, Math.ceil(E / 8)]);
    assertArrayEqual(map.data as Uint8Array, packBitmap(c.expected.routing_map.data, T, E), "bitmap_u8");
  } else {
    const indices = expectFile(files, routeFile, [DESCR[route]!], [T, K]);
    assertArrayEqual(sortedRows(indices.data as Int32Array, T, K), c.expected.topk_set.data, `${route} sets`);
  }
}

async function checkTopkCase(c: TopkCase, outRoot: string): Promise<void> {
  const routes = ["bytemap", "bitmap_u8", ...indexDtypesFor(c.num_experts)];
  for (const route of routes) {
    const choice = route === "bytemap"
      ? []
      : route === "bitmap_u8"
      ? ["--routing-map-format", "bitmap_u8"]
      : ["--index-dtype", route];
    const dir = `${outRoot}/${c.name}/${route}`; // missing: the CLI creates it
    assertSuccess(await cli([...topkFlags(c), ...choice, "--out", dir]), `${c.name} ${route}`);
    await checkTopkOutputs(c, dir, route);
  }
}

async function checkAuxScoresCase(c: AuxScoresCase, outRoot: string): Promise<void> {
  const { num_tokens: T, num_experts: E } = c;
  const tolerance = { atol: c.atol, rtol: c.rtol };
  const paths = inputPaths(c.name);
  for (const format of ["bytemap", "bitmap_u8"] as const) {
    const dir = `${outRoot}/${c.name}/${format}`;
    const args = ["--op", "aux-scores", "--logits", paths.logits!, "--topk", String(c.topk)];
    args.push("--score-function", c.score_function, "--grad-scores", paths.grad_scores!, "--out", dir);
    if (format === "bitmap_u8") args.push("--routing-map-format", "bitmap_u8");
    assertSuccess(await cli(args), `${c.name} ${format}`);
    const files = await readOutputs(dir, ["scores.npy", "routing_map.npy", "grad_logits.npy"]);
    const scores = expectFile(files, "scores.npy", ["<f4"], [T, E]);
    assertClose(scores.data as Float32Array, c.expected.scores.data, tolerance, "scores");
    if (format === "bytemap") {
      const map = expectFile(files, "routing_map.npy", ["|u1", "|b1"], [T, E]);
      assertArrayEqual(map.data as Uint8Array, c.expected.routing_map.data, "bytemap");
    } else {
      const map = expectFile(files, "routing_map.npy", ["|u1"], [T, Math.ceil(E / 8)]);
      assertArrayEqual(map.data as Uint8Array, packBitmap(c.expected.routing_map.data, T, E), "bitmap_u8");
    }
    const grad = expectFile(files, "grad_logits.npy", [DESCR[c.dtype]!], [T, E]);
    assertClose(widen(grad), widen(c.expected.grad_logits), tolerance, "grad_logits");
  }
}

async function checkAuxLossCase(c: AuxLossCase, outRoot: string): Promise<void> {
  const tolerance = { atol: c.atol, rtol: c.rtol };
  const paths = inputPaths(c.name);
  const dir = `${outRoot}/${c.name}`;
  const run = await cli([
    "--op",
    "aux-loss",
    "--probs",
    paths.probs!,
    "--tokens-per-expert",
    paths.tokens_per_expert!,
    "--total-num-tokens",
    String(c.total_num_tokens),
    "--num-experts",
    String(c.num_experts),
    "--topk",
    String(c.topk),
    "--coeff",
    String(c.coeff),
    "--grad-aux-loss",
    String(c.grad_aux_loss),
    "--out",
    dir,
  ]); // deno-fmt-ignore
  assertSuccess(run, c.name);
  const files = await readOutputs(dir, ["aux_loss.npy", "grad_probs.npy"]);
  const probsDescr = DESCR[c.inputs.probs.dtype]!;
  const loss = expectFile(files, "aux_loss.npy", [probsDescr], []);
  assertClose(widen(loss), c.expected.aux_loss.data, tolerance, "aux_loss");
  const grad = expectFile(files, "grad_probs.npy", [probsDescr], [c.num_tokens, c.num_cols]);
  assertClose(widen(grad), c.expected.grad_probs.data, tolerance, "grad_probs");
}

function checkCase(c: GoldenCase, outRoot: string): Promise<void> {
  switch (c.op) {
    case "topk":
      return checkTopkCase(c, outRoot);
    case "aux_scores":
      return checkAuxScoresCase(c, outRoot);
    case "aux_loss":
      return checkAuxLossCase(c, outRoot);
  }
}

/** A .npy file of any descr, header padded to 64 bytes as numpy writes it. */
function npyBytes(descr: string, shape: number[], data: Uint8Array): Uint8Array {
  const dims = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(", ")})`;
  const dict = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${dims}, }`;
  const header = dict.padEnd(Math.ceil((10 + dict.length + 1) / 64) * 64 - 11, " ") + "\n";
  const out = new Uint8Array(10 + header.length + data.length);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);
  new DataView(out.buffer).setUint16(8, header.length, true);
  out.set(new TextEncoder().encode(header), 10);
  out.set(data, 10 + header.length);
  return out;
}

/** Deterministic float32 values (a small LCG mapped to [-2, 2)). */
function values(n: number, seed: number): Float32Array {
  let s = seed >>> 0;
  return Float32Array.from({ length: n }, () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return (s / 2 ** 32) * 4 - 2;
  });
}

async function writeTensor(path: string, tensor: Tensor): Promise<string> {
  await Deno.writeFile(path, encodeNpy(tensor));
  return path;
}

// ---------------------------------------------------------------------------

Deno.test("`runCli()` reproduces every golden case, with every routing output and index dtype", async (t) => {
  const names = listCases();
  assert.ok(names.length > 0, "no golden cases found");
  const outRoot = await Deno.makeTempDir({ prefix: "moe_router_cli_" });
  try {
    for (const name of names) {
      await t.step(name, () => checkCase(loadCase(name), outRoot));
    }
  } finally {
    await Deno.remove(outRoot, { recursive: true });
  }
});

Deno.test("`runCli()` keeps the leading dimensions of 3-D logits on every output file", async (t) => {
  const tmp = await Deno.makeTempDir({ prefix: "moe_router_cli_" });
  const lead = [4, 3];
  const E = 20;
  const K = 4;
  const n = 12 * E;
  try {
    const x = values(n, 1);
    const g = values(n, 2);
    const logits3 = await writeTensor(`${tmp}/logits3.npy`, { data: x, shape: [...lead, E], dtype: "float32" });
    const logits2 = await writeTensor(`${tmp}/logits2.npy`, { data: x, shape: [12, E], dtype: "float32" });
    const grad3 = await writeTensor(`${tmp}/grad3.npy`, { data: g, shape: [...lead, E], dtype: "float32" });
    const grad2 = await writeTensor(`${tmp}/grad2.npy`, { data: g, shape: [12, E], dtype: "float32" });
    const bias = await writeTensor(`${tmp}/bias.npy`, {
      data: values(E, 3).map((v) => v / 20),
      shape: [E],
      dtype: "float32",
    });
    const common = ["--topk", String(K), "--score-function", "sigmoid", "--expert-bias", bias];
    common.push("--num-groups", "4", "--group-topk", "2", "--scaling-factor", "2.5");

    const routes: [string, string[], string, number][] = [
      ["bytemap", [], "routing_map.npy", E],
      ["bitmap_u8", ["--routing-map-format", "bitmap_u8"], "routing_map.npy", Math.ceil(E / 8)],
      ["int32", ["--index-dtype", "int32"], "topk_indices.npy", K],
    ];
    for (const [route, choice, routeFile, last] of routes) {
      await t.step(`top-k ${route}`, async () => {
        const names = ["probs.npy", routeFile, "intermediate.npy", "grad_logits.npy"];
        assertSuccess(
          await cli(["--logits", logits3, "--grad-probs", grad3, ...common, ...choice, "--out", `${tmp}/${route}3`]),
          route,
        );
        assertSuccess(
          await cli(["--logits", logits2, "--grad-probs", grad2, ...common, ...choice, "--out", `${tmp}/${route}2`]),
          route,
        );
        const shaped = await readOutputs(`${tmp}/${route}3`, names);
        const flat = await readOutputs(`${tmp}/${route}2`, names);
        for (const name of names) {
          const lastDim = name === routeFile ? last : E;
          const a = expectFile(shaped, name, [flat.get(name)!.descr], [...lead, lastDim]);
          const b = expectFile(flat, name, [flat.get(name)!.descr], [12, lastDim]);
          assertBitIdentical(a.data, b.data, `${route} ${name} vs the flat batch`);
        }
      });
    }
    await t.step("aux scores", async () => {
      const names = ["scores.npy", "routing_map.npy", "grad_logits.npy"];
      const args = ["--op", "aux-scores", "--topk", String(K), "--score-function", "sqrtsoftplus"];
      assertSuccess(await cli([...args, "--logits", logits3, "--grad-scores", grad3, "--out", `${tmp}/aux3`]), "aux3");
      assertSuccess(await cli([...args, "--logits", logits2, "--grad-scores", grad2, "--out", `${tmp}/aux2`]), "aux2");
      const shaped = await readOutputs(`${tmp}/aux3`, names);
      const flat = await readOutputs(`${tmp}/aux2`, names);
      for (const name of names) {
        const a = expectFile(shaped, name, [flat.get(name)!.descr], [...lead, E]);
        assertBitIdentical(a.data, flat.get(name)!.tensor.data, `aux ${name} vs the flat batch`);
      }
    });
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("`--out` creates a missing directory and writes into an existing one", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moe_router_cli_" });
  try {
    const logits = await writeTensor(`${tmp}/logits.npy`, { data: values(32, 4), shape: [4, 8], dtype: "float32" });
    const args = ["--logits", logits, "--topk", "2", "--score-function", "softmax", "--index-dtype", "int64"];
    const nested = `${tmp}/a/b/c`;
    const first = await cli([...args, "--out", nested]);
    assertSuccess(first, "missing directory");
    assert.ok(first.out.length === 1 && first.out[0]!.includes(nested), `stdout names the folder: ${first.out}`);
    const files = ["probs.npy", "topk_indices.npy", "intermediate.npy"];
    const before = await readOutputs(nested, files);

    // Again into the now existing folder, with a stale file already there.
    await Deno.writeTextFile(`${nested}/probs.npy`, "stale");
    assertSuccess(await cli([...args, "--out", nested]), "existing directory");
    const after = await readOutputs(nested, files);
    for (const name of files) {
      assertBitIdentical(after.get(name)!.tensor.data, before.get(name)!.tensor.data, `${name} rewritten`);
    }
    assertSuccess(await cli([...args, `--out=${tmp}`]), "the temp folder itself, --out=DIR form");
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("bad arguments print one line naming the problem and exit non-zero, in-process and as a process", async (t) => {
  const tmp = await Deno.makeTempDir({ prefix: "moe_router_cli_" });
  try {
    const E = 8;
    const logits = await writeTensor(`${tmp}/logits.npy`, { data: values(4 * E, 5), shape: [4, E], dtype: "float32" });
    const bias = await writeTensor(`${tmp}/bias.npy`, { data: new Float32Array(E), shape: [E], dtype: "float32" });
    const text = `${tmp}/notes.npy`;
    await Deno.writeTextFile(text, "these are not numbers\n");
    const f64 = `${tmp}/logits_f64.npy`;
    await Deno.writeFile(f64, npyBytes("<f8", [4, E], new Uint8Array(new Float64Array(4 * E).buffer)));
    const out = `${tmp}/out`;
    const topk = ["--logits", logits, "--score-function", "softmax"];

    const cases: [string, string[], RegExp[]][] = [
      ["unknown flag", ["--bogus", "1", "--out", out], [/unknown flag --bogus/]],
      ["missing --out", [...topk, "--topk", "2"], [/--out/, /required/]],
      ["missing --logits", ["--topk", "2", "--score-function", "softmax", "--out", out], [/--logits/, /required/]],
      ["non-integer --topk", [...topk, "--topk", "2.5", "--out", out], [/--topk/, /integer/, /2\.5/]],
      ["--topk that is not a number", [...topk, "--topk", "two", "--out", out], [/--topk/, /integer/, /two/]],
      ["--topk 0", [...topk, "--topk", "0", "--out", out], [/topk/, /\[1, numExperts=8\]/, /got 0/]],
      ["--topk E + 1", [...topk, "--topk", "9", "--out", out], [/topk/, /\[1, numExperts=8\]/, /got 9/]],
      ["--topk given twice", [...topk, "--topk", "2", "--topk", "3", "--out", out], [/--topk/, /twice/]],
      ["a file that does not exist", [
        "--logits",
        `${tmp}/nope.npy`,
        "--score-function",
        "softmax",
        "--topk",
        "2",
        "--out",
        out,
      ], [
        /--logits/,
        /nope\.npy/,
      ]],
      ["a file that is not .npy", ["--logits", text, "--score-function", "softmax", "--topk", "2", "--out", out], [
        /--logits/,
        /notes\.npy/,
        /npy/,
      ]],
      ["a float64 .npy", ["--logits", f64, "--score-function", "softmax", "--topk", "2", "--out", out], [
        /--logits/,
        /logits_f64\.npy/,
        /<f8/,
      ]],
      ["bias with softmax", [...topk, "--topk", "2", "--expert-bias", bias, "--out", out], [
        /expertBias/,
        /sigmoid or sqrtsoftplus/,
        /softmax/,
      ]],
      ["an unknown score function", ["--logits", logits, "--score-function", "relu", "--topk", "2", "--out", out], [
        /scoreFunction/,
        /relu/,
      ]],
      ["a flag of another op", [...topk, "--topk", "2", "--grad-scores", logits, "--out", out], [
        /--grad-scores/,
        /topk/,
      ]],
    ];

    await t.step("in-process", async () => {
      for (const [name, args, parts] of cases) assertOneLineError(await cli(args), parts, name);
    });
    await t.step("as processes", async () => {
      const runs = await Promise.all(cases.map(([, args]) => subprocess(args)));
      cases.forEach(([name, , parts], i) => assertOneLineError(runs[i]!, parts, name));
    });
    await t.step("nothing was written for a bad run", async () => {
      await assert.rejects(() => Deno.stat(out), Deno.errors.NotFound);
    });
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("`deno run cli.ts` routes a golden case end to end, prints --help, and runs the demo", async (t) => {
  const tmp = await Deno.makeTempDir({ prefix: "moe_router_cli_" });
  try {
    const names = listCases();
    const name = names.find((n) => {
      const c = loadCase(n);
      return c.op === "topk" && c.expert_bias && c.num_groups !== null;
    }) ?? names.find((n) => n.startsWith("topk_"));
    assert.ok(name !== undefined, "a top-k golden case");
    const c = loadCase(name) as TopkCase;
    const dir = `${tmp}/new/folder`;
    const [golden, help, demo] = await Promise.all([
      subprocess([...topkFlags(c), "--index-dtype", "int32", "--out", dir]),
      subprocess(["--help"]),
      subprocess([]),
    ]);

    await t.step(`golden case ${name}`, async () => {
      assertSuccess(golden, name);
      await checkTopkOutputs(c, dir, "int32");
    });
    await t.step("--help lists every flag of SPEC 7", () => {
      assertSuccess(help, "--help");
      const text = help.out.join("\n");
      assert.match(text, /usage/i);
      const flags = [
        "op",
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
        "grad-scores",
        "probs",
        "tokens-per-expert",
        "total-num-tokens",
        "num-experts",
        "coeff",
        "grad-aux-loss",
        "backend",
        "out",
      ]; // deno-fmt-ignore
      for (const flag of flags) assert.ok(text.includes(`--${flag}`), `--help mentions --${flag}`);
    });
    await t.step("no arguments: the demo prints the backend, timings and a load summary", () => {
      assertSuccess(demo, "demo");
      const text = demo.out.join("\n");
      assert.match(text, /8192 tokens x 256 experts/);
      assert.match(text, /backend: (wasm|webgpu) \(.+\)/);
      assert.match(text, /forward \d+(\.\d+)? ms/);
      assert.match(text, /backward \d+(\.\d+)? ms/);
      assert.match(text, /load per expert.*min \d+.*max \d+/);
      assert.match(text, /mean routed weight per token: 2\.5000/);
    });
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});
