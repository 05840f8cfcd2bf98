/**
 * Same-process A/B of two builds of the WebAssembly kernels: the top-k
 * forward kernel alone (no host copies, no allocation), on the cases of
 * bench:compare, in alternating blocks of calls, with the two builds'
 * outputs compared. On a shared machine only a ratio measured this way
 * means anything.
 *
 * ```sh
 * git stash    # or check out the baseline
 * node node_modules/assemblyscript/bin/asc.js wasm/assembly/router.ts --outFile /tmp/a.wasm \
 *   --optimizeLevel 3 --shrinkLevel 0 --runtime stub --noAssert --use abort= --enable simd
 * git stash pop
 * # the same command with --outFile /tmp/b.wasm, then:
 * deno run --allow-read bench/kernel_ab.ts /tmp/a.wasm /tmp/b.wasm dsv3,qwen3
 * ```
 *
 * @module
 */
import { type Case, caseData, CASES } from "./compare/cases.ts";

/** The kernel exports this script calls. */
interface Kernels {
  memory: WebAssembly.Memory;
  heapBase(): number;
  topkForward(...args: number[]): number;
}

/** One build laid out for one case: `run` calls the forward kernel on all tokens, `digest` hashes its outputs. */
interface Bench {
  run(): void;
  digest(): number;
}

const ROUTE_INT32 = 3;
const SCORE = { softmax: 0, sigmoid: 1 } as const;

function prepare(k: Kernels, c: Case, logits: Float32Array): Bench {
  const T = c.tokens, E = c.experts, K = c.options.topk;
  const region = (bytes: number, at: number) => Math.ceil((at + bytes + 64) / 16) * 16;
  const scratch = Math.ceil(k.heapBase() / 16) * 16;
  const bias = region(65536, scratch);
  const inP = region(4 * E, bias);
  const interP = region(4 * T * E, inP);
  const valsP = region(4 * T * E, interP);
  const listP = region(4 * T * K, valsP);
  const yascP = region(4 * T * K, listP);
  const end = region(4 * T * K, yascP);
  if (k.memory.buffer.byteLength < end) k.memory.grow(Math.ceil((end - k.memory.buffer.byteLength) / 65536));
  new Float32Array(k.memory.buffer, inP, T * E).set(logits);
  if (c.options.expertBias) new Float32Array(k.memory.buffer, bias, E).set(c.options.expertBias);
  const o = c.options;
  return {
    run: () =>
      k.topkForward(
        inP,
        0, // float32
        T,
        E,
        K,
        SCORE[o.scoreFunction],
        0, // not pre-softmax
        o.numGroups ?? 0,
        o.groupTopk ?? 0,
        o.scalingFactor ?? 1,
        o.expertBias ? bias : 0,
        ROUTE_INT32,
        16, // radix from top-16, the default
        valsP,
        listP,
        yascP,
        interP,
        listP, // int32 indices are written over the list
        scratch,
        0, // no dense probs rows
        1, // four-token lanes where they apply
        BY_LOGITS ? 1 : 0, // sigmoid selection from the logits' order (builds without it ignore the argument)
      ),
    digest: () => {
      let h = 0;
      // with BY_LOGITS the kernel leaves the intermediate to the host
      const regions: Array<[number, number]> = [[listP, T * K], [valsP, T * K], [yascP, T * K]];
      if (!BY_LOGITS) regions.push([interP, T * E]);
      for (const [p, n] of regions) {
        const words = new Uint32Array(k.memory.buffer, p, n);
        for (let i = 0; i < n; i++) h = (Math.imul(h, 31) + (words[i] as number)) >>> 0;
      }
      return h;
    },
  };
}

/** MOE_AB_BY_LOGITS=1: ask both builds for the sigmoid selection from the logits' order (no intermediate). */
const BY_LOGITS = Deno.env.get("MOE_AB_BY_LOGITS") === "1";

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1] as number;

const [fileA, fileB, ids = "dsv3,qwen3"] = Deno.args;
if (fileA === undefined || fileB === undefined) {
  console.error("usage: deno run --allow-read bench/kernel_ab.ts A.wasm B.wasm [case,case...]");
  Deno.exit(2);
}
const builds = await Promise.all(
  [fileA, fileB].map(async (f) =>
    (await WebAssembly.instantiate(await Deno.readFile(f), {})).instance.exports as unknown as Kernels
  ),
);
for (const id of ids.split(",")) {
  const c = CASES.find((x) => x.id === id);
  if (c === undefined) throw new Error(`unknown case ${id}: ${CASES.map((x) => x.id).join(", ")}`);
  const { logits } = caseData(c);
  const benches = builds.map((k) => prepare(k, c, logits));
  const times: number[][] = [[], []];
  for (const b of benches) for (let i = 0; i < 3; i++) b.run();
  for (let block = 0; block < 8; block++) {
    benches.forEach((b, j) => {
      for (let i = 0; i < 8; i++) {
        const t = performance.now();
        b.run();
        times[j]!.push(performance.now() - t);
      }
    });
  }
  const [a, b] = times.map(median) as [number, number];
  const same = benches[0]!.digest() === benches[1]!.digest();
  console.log(
    `${id}: A ${a.toFixed(3)} ms, B ${b.toFixed(3)} ms, A/B ${(a / b).toFixed(3)}x; outputs ${
      same ? "identical" : "DIFFER"
    }`,
  );
}
