/**
 * The JSR package: `deno publish --dry-run` (offline: it checks types, slow
 * types and the file list without uploading) passes and publishes exactly
 * the library, every export is documented (`deno doc --lint`), and the
 * README's JSR example runs with the specifier pointed at this checkout.
 *
 * @module
 */

import assert from "node:assert";
import { readmeExample } from "./_readme.ts";

const ROOT = new URL("../", import.meta.url);
const decoder = new TextDecoder();

async function deno(args: string[]): Promise<{ code: number; out: string }> {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args,
    cwd: ROOT,
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).output();
  return { code, out: decoder.decode(stdout) + decoder.decode(stderr) };
}

const config = JSON.parse(Deno.readTextFileSync(new URL("deno.json", ROOT))) as {
  name: string;
  version: string;
  exports: Record<string, string>;
};

Deno.test("deno.json names the JSR package, its version and its entry points", () => {
  assert.match(config.name, /^@[a-z0-9-]+\/[a-z0-9-]+$/);
  assert.match(config.version, /^\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?$/);
  assert.deepStrictEqual(config.exports, { ".": "./mod.ts", "./cli": "./cli.ts" });
});

Deno.test("deno publish --dry-run passes and publishes the library, not its tests or tooling", async () => {
  const { code, out } = await deno(["publish", "--dry-run", "--allow-dirty"]);
  assert.strictEqual(code, 0, out);
  const root = ROOT.href;
  const files = [...out.matchAll(/^\s+(file:\/\/\S+)/gm)].map((m) => m[1]!.slice(root.length)).sort();
  for (const f of ["mod.ts", "router.ts", "ops.ts", "tensor.ts", "cli.ts", "wasm/backend.ts", "wasm/_router_wasm.ts"]) {
    assert.ok(files.includes(f), `${f} is published (got ${files.join(", ")})`);
  }
  for (const target of Object.values(config.exports)) assert.ok(files.includes(target.slice(2)), `${target} published`);
  assert.ok(files.includes("README.md") && files.includes("deno.json"));
  const unwanted = files.filter((f) =>
    /^(tests|bench|scripts|examples|dist|node_modules|\.ci)\//.test(f) || f.startsWith("wasm/assembly/") ||
    f === "wasm/build.ts" || f.startsWith("package")
  );
  assert.deepStrictEqual(unwanted, [], "published files that are not the library");
  assert.ok(files.every((f) => f.endsWith(".ts") || f === "README.md" || f === "deno.json"), files.join(", "));
});

Deno.test("every export of the JSR entry points carries documentation", async () => {
  const { code, out } = await deno(["doc", "--lint", ...Object.values(config.exports)]);
  assert.strictEqual(code, 0, out);
});

Deno.test("the README's Deno / JSR example runs as written (the jsr: specifier pointed at this checkout)", async () => {
  const code = readmeExample("deno-jsr").replaceAll(
    `"jsr:${config.name}"`,
    JSON.stringify(new URL("mod.ts", ROOT).href),
  );
  assert.ok(!code.includes("jsr:"), "the example imports the package by its jsr: specifier");
  const file = await Deno.makeTempFile({ suffix: ".ts" });
  try {
    await Deno.writeTextFile(file, code);
    const { code: status, out } = await deno(["run", "--no-prompt", file]);
    assert.strictEqual(status, 0, out);
  } finally {
    await Deno.remove(file);
  }
});
