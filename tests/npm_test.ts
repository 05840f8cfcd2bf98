/**
 * The npm package as a user gets it: built by scripts/build_npm.ts, packed
 * by `npm pack`, installed from the tarball into an empty project
 * (`npm install --offline`: the package has no dependencies), then imported
 * by name from Node and from Deno, which route every golden case through it
 * (tests/_remote.ts drives them) and type-check against its declarations.
 *
 * @module
 */

import assert from "node:assert";
import { buildNpm } from "../scripts/build_npm.ts";
import { checkRemoteGolden, PROCESS_MAIN, processTransport, RemoteRouter } from "./_remote.ts";
import { readmeExample } from "./_readme.ts";

const ROOT = new URL("../", import.meta.url);
const decoder = new TextDecoder();

async function run(cmd: string, args: string[], cwd: string): Promise<string> {
  const { code, stdout, stderr } = await new Deno.Command(cmd, { args, cwd, stdout: "piped", stderr: "piped" })
    .output();
  const out = decoder.decode(stdout);
  if (code !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (exit ${code}):\n${out}${decoder.decode(stderr)}`);
  return out;
}

/** Routes the small golden cases through a child process that serves tests/_remote_runner.js. */
async function goldenThroughProcess(cmd: string, args: string[], cwd: string) {
  const child = new Deno.Command(cmd, { args, cwd, stdin: "piped", stdout: "piped", stderr: "inherit" }).spawn();
  const transport = processTransport(child);
  try {
    return await checkRemoteGolden(new RemoteRouter(transport.send, "wasm"));
  } finally {
    const status = await transport.close();
    assert.strictEqual(status.code, 0, `${cmd} exited with ${status.code}`);
  }
}

// A typed consumer: checks that the declarations are found through the exports map and are precise.
const TYPED_CONSUMER = `import { createRouter, tensor } from "moe-router";
import type { IndexDType, Router, Tensor, TopkResult } from "moe-router";

const router: Router = await createRouter({ backend: "wasm" });
const logits: Tensor<"float32"> = tensor(new Float32Array(8), [2, 4]);
const out: TopkResult = await router.fusedTopkWithScoreFunction(logits, {
  topk: 2,
  scoreFunction: "sigmoid",
  indexDtype: "int32",
});
const dtype: IndexDType | undefined = out.indices?.dtype;
// @ts-expect-error scoreFunction is a union of three names
await router.fusedTopkWithScoreFunction(logits, { topk: 2, scoreFunction: "relu" });
export { dtype };
`;

// TypeScript as a Node project sets it up: Node's module resolution, strict, library types checked too.
const TSCONFIG = {
  compilerOptions: {
    target: "es2022",
    module: "nodenext",
    moduleResolution: "nodenext",
    lib: ["es2025", "dom"],
    types: [],
    strict: true,
    noEmit: true,
    skipLibCheck: false,
    skipDefaultLibCheck: true,
  },
  files: ["consumer.ts"],
};

// A DeepSeek-V3-like batch (2^20 elements: worker threads) through the
// package in Node, on 2 threads against 1: worker_threads with eval, and the
// workers' mailboxes, including a call after they went back to their event
// loops (PARK_MS).
const NODE_THREADS = `
import { createRouter } from "moe-router";
const T = 4096, E = 256;
const data = new Float32Array(T * E);
let s = 1;
for (let i = 0; i < data.length; i++) { s = (Math.imul(s, 1103515245) + 12345) >>> 0; data[i] = s / 2 ** 31 - 1; }
const logits = { data, shape: [T, E], dtype: "float32" };
const options = { topk: 8, scoreFunction: "sigmoid", numGroups: 8, groupTopk: 4, indexDtype: "int32" };
const one = await createRouter({ backend: "wasm", threads: 1 });
const two = await createRouter({ backend: "wasm", threads: 2 });
const want = await one.fusedTopkWithScoreFunction(logits, options);
const same = (a, b) => a.length === b.length && a.every((x, i) => Object.is(x, b[i]));
let ok = 0;
for (let i = 0; i < 3; i++) {
  const got = await two.fusedTopkWithScoreFunction(logits, options);
  if (same(got.probs.data, want.probs.data) && same(got.indices.data, want.indices.data)) ok++;
  await new Promise((r) => setTimeout(r, i === 0 ? 250 : 0));
}
console.log("identical: " + ok + " calls");
one.dispose();
two.dispose();
`;

Deno.test({
  name: "the npm tarball installs offline and runs in Node and Deno, matching the golden vectors",
  async fn(t) {
    const tmp = await Deno.makeTempDir({ prefix: "moe-router-npm-" });
    try {
      const dist = `${tmp}/dist`;
      let tarball = "";

      await t.step("the package holds one self-contained bundle, its declarations and an exports map", async () => {
        await buildNpm({ outDir: dist });
        const [pack] = JSON.parse(await run("npm", ["pack", dist, "--json", "--pack-destination", tmp], tmp)) as {
          filename: string;
          files: { path: string }[];
        }[];
        tarball = `${tmp}/${pack!.filename}`;
        const files = pack!.files.map((f) => f.path).sort();
        for (const f of ["README.md", "mod.d.ts", "mod.js", "package.json"]) {
          assert.ok(files.includes(f), `${f} packed`);
        }
        assert.deepStrictEqual(files.filter((f) => !f.endsWith(".d.ts") && !f.endsWith(".md")), [
          "mod.js",
          "package.json",
        ]);

        const manifest = JSON.parse(await Deno.readTextFile(`${dist}/package.json`));
        const deno = JSON.parse(await Deno.readTextFile(new URL("deno.json", ROOT)));
        assert.strictEqual(manifest.version, deno.version, "npm and JSR publish one version");
        assert.deepStrictEqual(manifest.exports["."], { types: "./mod.d.ts", default: "./mod.js" });
        assert.strictEqual(manifest.type, "module");
        assert.strictEqual(manifest.dependencies, undefined, "no runtime dependencies");

        const bundle = await Deno.readTextFile(`${dist}/mod.js`);
        assert.doesNotMatch(bundle, /^\s*import\s[^(]/m, "the bundle has no static imports");
        assert.doesNotMatch(bundle, /\bDeno\.[a-z]/, "the bundle uses no Deno namespace API");
        assert.doesNotMatch(bundle, /deno task route/, "the CLI is not bundled");
        assert.match(bundle, /ROUTER_WASM_BASE64 = "AGFzbQ/, "the WebAssembly bytes are embedded");
      });

      const project = `${tmp}/project`;
      await t.step("npm installs the tarball into an empty project without the network", async () => {
        await Deno.mkdir(project);
        await Deno.writeTextFile(`${project}/package.json`, JSON.stringify({ private: true, type: "module" }));
        await run("npm", ["install", "--offline", "--no-audit", "--no-fund", "--ignore-scripts", tarball], project);
        const installed = JSON.parse(await Deno.readTextFile(`${project}/node_modules/moe-router/package.json`));
        assert.strictEqual(installed.name, "moe-router");
        await Deno.copyFile(new URL("_remote_runner.js", import.meta.url), `${project}/_remote_runner.js`);
        await Deno.writeTextFile(`${project}/main.mjs`, PROCESS_MAIN);
      });

      await t.step("Node routes the golden cases through the package (WebAssembly)", async () => {
        const version = (await run("node", ["--version"], project)).trim();
        const { checked, skipped } = await goldenThroughProcess("node", ["main.mjs"], project);
        console.log(
          `node ${version}: ${checked} golden cases match; float16 skipped (no Float16Array): ${skipped.length}`,
        );
      });

      await t.step("Node runs a big batch on worker threads, with the bits of one thread", async () => {
        await Deno.writeTextFile(`${project}/threads.mjs`, NODE_THREADS);
        const out = await run("node", ["threads.mjs"], project);
        assert.match(out, /^identical: 3 calls$/m, out);
      });

      await t.step("Deno routes the golden cases through the package from node_modules", async () => {
        const args = ["run", "--no-lock", "--allow-read", "main.mjs"];
        const { skipped } = await goldenThroughProcess(Deno.execPath(), args, project);
        assert.deepStrictEqual(skipped, [], "Deno has Float16Array");
      });

      await t.step("Deno and TypeScript (nodenext) type-check a consumer against the package's .d.ts", async () => {
        await Deno.writeTextFile(`${project}/consumer.ts`, TYPED_CONSUMER);
        await run(Deno.execPath(), ["check", "--no-lock", "consumer.ts"], project);
        await Deno.writeTextFile(`${project}/tsconfig.json`, JSON.stringify(TSCONFIG));
        await run(new URL("node_modules/.bin/tsc", ROOT).pathname, ["-p", "tsconfig.json"], project);
      });

      await t.step("the README's npm example runs in Node as written", async () => {
        await Deno.writeTextFile(`${project}/readme_example.mjs`, readmeExample("npm-node"));
        await run("node", ["readme_example.mjs"], project);
      });
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
});
