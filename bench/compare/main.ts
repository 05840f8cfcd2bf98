/**
 * `deno task bench:compare`: moe-router against its JavaScript peers (a plain
 * TypeScript loop, TensorFlow.js, onnxruntime-node) on the CPU. Prints the
 * tables, and writes bench/RESULTS.md and bench/speedups.svg.
 *
 * Setup once: `npm ci --prefix bench/compare` (the peers are dependencies of
 * bench/compare/package.json only, not of the module).
 *
 * Flags: `--cases=dsv3,qwen3` (a subset, by id) and `--quick` (shorter
 * timing) make a try-out run that only prints; `--no-write` prints only.
 *
 * @module
 */

// the peers are npm packages installed next to this file: say how, rather than fail to resolve them
const installed = await Deno.stat(new URL("node_modules/onnxruntime-node/package.json", import.meta.url)).then(
  () => true,
  () => false,
);
if (!installed) {
  console.error("bench/compare: the peers are not installed; run `npm ci --prefix bench/compare` first");
  Deno.exit(1);
}
await import("./run.ts");
