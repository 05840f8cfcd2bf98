// Times an ONNX model under Node.js, to check that onnxruntime-node run from
// Deno (through Node-API) is as fast as under Node, its home runtime.
// Usage: node ort_node.mjs MODEL.onnx LOGITS.f32 T E THREADS[,THREADS...] RUNS
// Prints one JSON line: { node, results: { [threads]: median ms } }.
import * as ort from "onnxruntime-node";
import { readFileSync } from "node:fs";

const [modelPath, dataPath, t, e, threadList, runs] = process.argv.slice(2);
const model = readFileSync(modelPath);
const bytes = readFileSync(dataPath);
const logits = new Float32Array(
  bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length),
);
const shape = [Number(t), Number(e)];
const results = {};
for (const threads of threadList.split(",").map(Number)) {
  const session = await ort.InferenceSession.create(model, {
    executionProviders: ["cpu"],
    graphOptimizationLevel: "all",
    executionMode: "sequential",
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    // no pool thread left spinning after a run: on 2 cores it would take a core
    // from whatever is timed next (onnxruntime's one-thread session included)
    extra: { session: { intra_op: { allow_spinning: "0" } } },
  });
  const times = [];
  for (let i = 0; i < 5 + Number(runs); i++) {
    const t0 = performance.now();
    await session.run({ logits: new ort.Tensor("float32", logits, shape) });
    if (i >= 5) times.push(performance.now() - t0);
  }
  times.sort((a, b) => a - b);
  results[threads] = times[times.length >> 1];
  await session.release();
}
console.log(JSON.stringify({ node: process.version, results }));
