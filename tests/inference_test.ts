/**
 * Routing alone (`saveForBackward: false`): no intermediate and no saved
 * state in the result, and probs and the routing output bit for bit those of
 * a forward that saves, on every path that forward can take: the
 * WebAssembly row kernel (sigmoid keyed by the logits included), the
 * four-token kernel with dense rows, threads taking pieces, several chunks,
 * every score function, input dtype and routing output, caller buffers; the
 * WebGPU backend with host and GPU-resident logits. Selections are also
 * checked against the plain TypeScript reference, and bad values of the
 * option are refused.
 *
 * @module
 */
import assert from "node:assert";
import { createRouter, readGpuTensor, toGpuTensor } from "../mod.ts";
import type { FloatTensor, Router, TopkInferenceOptions, TopkOptions } from "../mod.ts";
import { assertBitIdentical } from "./_assert.ts";
import { type CrossCase, forwardPaths, mulberry32, normals, routableTensor } from "./_generators.ts";
import { narrowTo, refTopkForward, sortedRows, widen } from "./reference.ts";

const hasGpu = (await navigator.gpu?.requestAdapter()) != null;

type Config = CrossCase;

// token counts: scale 1 gives batches the workers take, smaller ones stay on one thread
const configs = forwardPaths;

function logitsOf(c: Config): FloatTensor {
  const data = normals(mulberry32(c.T * 31 + c.E), c.T * c.E, 2);
  return {
    data: c.dtype === "float32" ? data : narrowTo(data, c.dtype),
    shape: [c.T, c.E],
    dtype: c.dtype,
  } as FloatTensor;
}

function label(c: Config): string {
  return `${c.T}x${c.E} ${c.dtype} ${
    JSON.stringify({ ...c.options, expertBias: c.options.expertBias ? "[E]" : undefined })
  }`;
}

// the routing output of a result, whichever it is
function routeOf(r: { routingMap?: { data: Uint8Array }; indices?: { data: ArrayBufferView } }): ArrayBufferView {
  return (r.routingMap ?? r.indices)!.data;
}

/** The inference forward against the saving one: bits, and nothing kept. */
async function check(router: Router, c: Config, logits: FloatTensor, callerBuffers: boolean): Promise<void> {
  const want = await router.fusedTopkWithScoreFunction(logits, c.options);
  want.saved.release();
  const before = new Uint8Array(logits.data.buffer.slice(0));
  const options: TopkInferenceOptions = { ...c.options, saveForBackward: false };
  const n = c.T * c.E;
  const isMap = c.options.indexDtype === undefined;
  if (callerBuffers) {
    // not zeroed: the forward must write every element
    options.probsOut = new (logits.data.constructor as new (n: number) => Float32Array)(n).fill(7);
    if (isMap) {
      options.routingMapOut = new Uint8Array(c.options.routingMapFormat === "bitmap_u8" ? c.T * Math.ceil(c.E / 8) : n)
        .fill(7);
    }
  }
  // twice: the second call runs on what the first one left (pools, warm workers)
  for (let k = 0; k < 2; k++) {
    const got = await router.fusedTopkWithScoreFunction(logits, options);
    assert.ok(!("saved" in got) && !("intermediate" in got), "nothing kept for a backward");
    // and the type says so (the option picks the overload): a backward cannot be handed a state
    // @ts-expect-error: TopkInferenceResult has no saved state
    void got.saved;
    assertBitIdentical(got.probs.data, want.probs.data, `call ${k}: probs`);
    assertBitIdentical(routeOf(got), routeOf(want), `call ${k}: routing output`);
    if (callerBuffers) {
      assert.strictEqual(got.probs.data, options.probsOut, "probs in the caller's buffer");
      if (isMap) assert.strictEqual(got.routingMap!.data, options.routingMapOut, "routing map in the caller's buffer");
    }
    assert.deepStrictEqual(got.probs.shape, [c.T, c.E]);
  }
  assertBitIdentical(new Uint8Array(logits.data.buffer), before, "logits untouched");
}

Deno.test("routing alone gives the bits of a saving forward on the WebAssembly backend", async (t) => {
  const routers: Array<[string, Router, number]> = [
    ["1 thread", await createRouter({ backend: "wasm", threads: 1 }), 0.25],
    // batches of 2^18 elements and more take the workers; 3 MiB chunks: several a batch
    ["2 threads", await createRouter({ backend: "wasm", threads: 2 }), 1],
    ["3 threads, 3 MiB chunks", await createRouter({ backend: "wasm", threads: 3, chunkBytes: 3 << 20 }), 1],
  ];
  try {
    for (const [name, router, scale] of routers) {
      for (const [i, c] of configs(scale).entries()) {
        await t.step(
          `${name}: ${label(c)}${i % 2 ? " caller buffers" : ""}`,
          () => check(router, c, logitsOf(c), i % 2 === 1),
        );
      }
    }
  } finally {
    for (const [, r] of routers) r.dispose();
  }
});

Deno.test("routing alone chooses the reference's experts", async () => {
  const router = await createRouter({ backend: "wasm", threads: 1 });
  try {
    for (const c of configs(0.05)) {
      // rows with a margin at every selection boundary: the reference computes in float64
      const logits = routableTensor(c, c.T + c.E);
      const options: TopkInferenceOptions = { ...c.options, indexDtype: "int32", saveForBackward: false };
      delete options.routingMapFormat;
      const got = await router.fusedTopkWithScoreFunction(logits, options);
      const ref = refTopkForward(widen(logits), c.T, c.E, {
        topk: c.options.topk,
        scoreFunction: c.options.scoreFunction,
        usePreSoftmax: c.options.usePreSoftmax,
        numGroups: c.options.numGroups,
        groupTopk: c.options.groupTopk,
        scalingFactor: c.options.scalingFactor,
        expertBias: c.options.expertBias ? widen(c.options.expertBias) : undefined,
      });
      const K = c.options.topk;
      assert.deepStrictEqual(
        sortedRows(got.indices!.data as Int32Array, c.T, K),
        sortedRows(ref.routing, c.T, K),
        `${label(c)}: chosen experts`,
      );
    }
  } finally {
    router.dispose();
  }
});

Deno.test({
  name: "routing alone gives the bits of a saving forward on WebGPU, host and GPU-resident logits",
  ignore: !hasGpu,
  async fn(t) {
    const router = await createRouter({ backend: "webgpu" });
    const device = router.device!;
    try {
      for (const [i, c] of configs(0.05).entries()) {
        const logits = logitsOf(c);
        await t.step(`host: ${label(c)}`, () => check(router, c, logits, i % 2 === 1));
        await t.step(`GPU-resident: ${label(c)}`, async () => {
          const x = toGpuTensor(device, logits);
          const options = { ...c.options, saveForBackward: false as const };
          const want = await router.fusedTopkWithScoreFunction(x, c.options);
          const got = await router.fusedTopkWithScoreFunction(x, options);
          assert.ok(!("saved" in got) && !("intermediate" in got), "nothing kept for a backward");
          const route = (r: typeof got) => (r.routingMap ?? r.indices)!;
          assertBitIdentical(
            (await readGpuTensor(device, got.probs)).data,
            (await readGpuTensor(device, want.probs)).data,
            "probs",
          );
          assertBitIdentical(
            (await readGpuTensor(device, route(got))).data,
            (await readGpuTensor(device, route(want))).data,
            "routing output",
          );
          for (const b of [got.probs, route(got), want.probs, route(want), want.intermediate]) b.buffer.destroy();
          want.saved.release();
          x.buffer.destroy();
        });
      }
    } finally {
      router.dispose();
    }
  },
});

Deno.test("saveForBackward takes a boolean, and no intermediateOut when false", async () => {
  const router = await createRouter({ backend: "wasm", threads: 1 });
  try {
    const logits: FloatTensor = { data: new Float32Array([1, 2, 3, 4]), shape: [1, 4], dtype: "float32" };
    const options = { topk: 2, scoreFunction: "softmax" as const };
    for (const bad of [0, "false", null]) {
      await assert.rejects(
        router.fusedTopkWithScoreFunction(logits, { ...options, saveForBackward: bad } as unknown as TopkOptions),
        (e: Error) => e instanceof TypeError && e.message.startsWith("saveForBackward must be a boolean, got"),
      );
    }
    await assert.rejects(
      router.fusedTopkWithScoreFunction(
        logits,
        { ...options, saveForBackward: false, intermediateOut: new Float32Array(4) } as unknown as TopkOptions,
      ),
      (e: Error) =>
        e instanceof TypeError && e.message.includes("intermediateOut needs saveForBackward") &&
        e.message.includes("saveForBackward: false"),
    );
    // true is the default, spelled out
    const r = await router.fusedTopkWithScoreFunction(logits, { ...options, saveForBackward: true });
    assert.ok(r.saved && r.intermediate.data.length === 4);
  } finally {
    router.dispose();
  }
});
