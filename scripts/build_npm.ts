/**
 * Builds the npm package: `deno task build:npm` writes it to `dist/`
 * (`--out DIR` for another folder), ready for `npm pack dist` or
 * `npm publish dist`.
 *
 * - `mod.js`: one ES module bundled by esbuild from `mod.ts`, with the
 *   WebAssembly bytes embedded (base64, as in `wasm/_router_wasm.ts`): no
 *   runtime dependency, no file read, no fetch.
 * - `mod.d.ts` and the declaration files it reaches: emitted by TypeScript
 *   from the same sources (declarations only, no type check: `deno check`
 *   does that), with `.ts` specifiers turned into `.js` and the doc examples
 *   importing "moe-router" instead of "./mod.ts".
 * - `package.json`: generated here; name, version and license come from
 *   `deno.json`, so JSR and npm always publish the same version. The root
 *   package.json stays the private development manifest.
 * - `README.md`: the repository's.
 *
 * Deno-only code (`cli.ts`, reading files) is not reachable from `mod.ts` and
 * so is not in the bundle.
 *
 * @module
 */

const ROOT = new URL("../", import.meta.url);
const BIN = new URL("node_modules/.bin/", ROOT);

/** Options of {@linkcode buildNpm}. */
export interface BuildOptions {
  /** Output folder (default: `dist/` of the repository); emptied first. */
  outDir?: string;
  /** Emit the `.d.ts` files (default true); a bundle-only build skips the TypeScript step. */
  declarations?: boolean;
}

/** What {@linkcode buildNpm} wrote. */
export interface BuildResult {
  /** The output folder. */
  outDir: string;
  /** Path of the bundle, `mod.js`. */
  bundle: string;
  /** Files written, relative to `outDir`, sorted. */
  files: string[];
}

/** The package.json of the npm package, from the name, version and license in deno.json. */
export function npmManifest(deno: { version: string; license: string }): Record<string, unknown> {
  return {
    name: "moe-router",
    version: deno.version,
    description:
      "Fused Mixture-of-Experts router (NVIDIA TransformerEngine semantics): top-k routing, gradients and aux loss on WebAssembly SIMD and WebGPU",
    keywords: ["mixture-of-experts", "moe", "router", "top-k", "webassembly", "webgpu", "transformer-engine"],
    license: deno.license,
    type: "module",
    exports: {
      ".": { types: "./mod.d.ts", default: "./mod.js" },
      "./package.json": "./package.json",
    },
    main: "./mod.js",
    types: "./mod.d.ts",
    sideEffects: false,
    engines: { node: ">=20" },
  };
}

async function run(cmd: string, args: string[]): Promise<void> {
  const { code, stdout, stderr } = await new Deno.Command(cmd, { args, cwd: ROOT, stdout: "piped", stderr: "piped" })
    .output();
  if (code !== 0) {
    const text = new TextDecoder().decode(stderr) || new TextDecoder().decode(stdout);
    throw new Error(`${cmd.split("/").pop()} failed (exit ${code}):\n${text}`);
  }
}

// `.ts` specifiers of relative imports become `.js`; doc examples import the package by name.
function rewriteDeclaration(text: string): string {
  return text
    .replaceAll(`from "./mod.ts"`, `from "moe-router"`)
    .replace(/((?:from|import)\s*\(?\s*["'])(\.{1,2}\/[^"']+)\.ts(["'])/g, "$1$2.js$3");
}

// Copies mod.d.ts and every declaration file it reaches by relative imports.
async function copyDeclarations(from: string, to: string): Promise<string[]> {
  const todo = ["mod.d.ts"];
  const done = new Set<string>();
  while (todo.length > 0) {
    const file = todo.pop()!;
    if (done.has(file)) continue;
    done.add(file);
    const text = rewriteDeclaration(await Deno.readTextFile(`${from}/${file}`));
    const dir = file.includes("/") ? file.slice(0, file.lastIndexOf("/") + 1) : "";
    for (const m of text.matchAll(/(?:from|import)\s*\(?\s*["'](\.{1,2}\/[^"']+)\.js["']/g)) {
      todo.push(new URL(`${m[1]}.d.ts`, `file:///${dir}`).pathname.slice(1));
    }
    await Deno.mkdir(`${to}/${dir}`, { recursive: true });
    await Deno.writeTextFile(`${to}/${file}`, text);
  }
  return [...done];
}

/**
 * Builds the npm package into `outDir`.
 *
 * @returns the folder, the bundle's path and the files written
 * @throws {Error} when esbuild or TypeScript fails (their output is in the message)
 */
export async function buildNpm(options: BuildOptions = {}): Promise<BuildResult> {
  const outDir = options.outDir ?? new URL("dist", ROOT).pathname;
  const deno = JSON.parse(await Deno.readTextFile(new URL("deno.json", ROOT)));
  await Deno.remove(outDir, { recursive: true }).catch((e) => {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  });
  await Deno.mkdir(outDir, { recursive: true });

  // One ES module for every runtime: platform "neutral" assumes neither Node nor a browser;
  // node: built-ins stay imports (the Node-only code path loads node:worker_threads lazily).
  const bundle = `${outDir}/mod.js`;
  await run(new URL("esbuild", BIN).pathname, [
    "mod.ts",
    "--bundle",
    "--format=esm",
    "--platform=neutral",
    "--target=es2022",
    "--external:node:*",
    "--log-level=warning",
    `--outfile=${bundle}`,
  ]);
  const files = ["mod.js", "package.json", "README.md"];

  if (options.declarations ?? true) {
    const tmp = await Deno.makeTempDir({ prefix: "moe-router-dts-" });
    try {
      await run(new URL("tsc", BIN).pathname, [
        "mod.ts",
        "--declaration",
        "--emitDeclarationOnly",
        "--noCheck",
        "--allowImportingTsExtensions",
        "--skipLibCheck",
        "--target",
        "es2022",
        "--module",
        "esnext",
        "--moduleResolution",
        "bundler",
        "--lib",
        "esnext",
        "--rootDir",
        ".",
        "--outDir",
        tmp,
      ]);
      files.push(...await copyDeclarations(tmp, outDir));
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  }

  await Deno.writeTextFile(`${outDir}/package.json`, JSON.stringify(npmManifest(deno), null, 2) + "\n");
  await Deno.copyFile(new URL("README.md", ROOT), `${outDir}/README.md`);
  return { outDir, bundle, files: files.sort() };
}

async function gzipSize(path: string): Promise<number> {
  const stream = (await Deno.open(path)).readable.pipeThrough(new CompressionStream("gzip"));
  let n = 0;
  for await (const chunk of stream) n += chunk.length;
  return n;
}

if (import.meta.main) {
  const i = Deno.args.indexOf("--out");
  const outDir = i >= 0 ? Deno.args[i + 1] : undefined;
  const { outDir: dir, bundle, files } = await buildNpm(outDir === undefined ? {} : { outDir });
  const { size } = await Deno.stat(bundle);
  console.log(`wrote ${dir}: ${files.join(", ")}`);
  console.log(`mod.js: ${size} bytes, ${await gzipSize(bundle)} gzipped`);
}
