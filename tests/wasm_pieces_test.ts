/**
 * Threaded top-k forwards (wasm/backend.ts, #pipeline): a chunk is cut into
 * pieces that the calling thread and the workers take in turn, the calling
 * thread copying pieces in ahead of the workers and results out as they
 * come. Whoever runs a piece, the outputs are those of one thread, bit for
 * bit: checked on batches big enough to take the pieces (at least 2^18
 * elements a chunk), for every score function, routing output, input dtype
 * and caller buffers, with one and two workers, in one chunk and in several.
 *
 * @module
 */
import assert from "node:assert";
import { createRouter } from "../mod.ts";
import type { FloatTensor, Router, TopkOptions } from "../mod.ts";
import { MIN_PARALLEL_ELEMENTS, pieceRanges, WasmBackend } from "../wasm/backend.ts";
import { assertBitIdentical, intermediateOf } from "./_assert.ts";
import { type CrossCase, forwardPaths, mulberry32, normals } from "./_generators.ts";
import { narrowTo } from "./reference.ts";

Deno.test("pieces of a threaded chunk cover it once, in order, smaller at the end", () => {
  for (const W of [1, 2, 7]) {
    for (const E of [1, 8, 100, 256, 1024, 1 << 16]) {
      for (const m of [2, 3, 17, 1000, 4099, 8192, 65537]) {
        const r = pieceRanges(m, E, W);
        let a = 0;
        for (const [from, rows] of r) {
          assert.strictEqual(from, a, `W=${W} E=${E} m=${m}: contiguous`);
          assert.ok(rows >= 1, `W=${W} E=${E} m=${m}: a piece has rows`);
          a += rows;
        }
        assert.strictEqual(a, m, `W=${W} E=${E} m=${m}: every row once`);
        assert.ok(r.length >= Math.min(m, 8), `W=${W} E=${E} m=${m}: at least 8 pieces (${r.length})`);
        for (let i = 1; i < r.length; i++) {
          assert.ok(r[i]![1] <= r[i - 1]![1], `W=${W} E=${E} m=${m}: sizes never grow`);
        }
      }
    }
  }
});

interface Config extends CrossCase {
  callerBuffers: boolean;
}

// the forward's paths, on batches big enough for the workers
function configs(): Config[] {
  return forwardPaths(1)
    .filter((c) => c.T * c.E >= MIN_PARALLEL_ELEMENTS)
    .map((c, i) => ({ ...c, callerBuffers: i % 2 === 0 }));
}

async function outputs(router: Router, c: Config, logits: FloatTensor, grad: FloatTensor) {
  const n = c.T * c.E;
  const options: TopkOptions = { ...c.options };
  if (c.callerBuffers) {
    const o = options as TopkOptions & Record<string, unknown>;
    // the logits' kind of array (Float16Array for float16, Uint16Array for bfloat16), not zeroed
    o.probsOut = new (logits.data.constructor as new (n: number) => Float32Array)(n).fill(7);
    o.intermediateOut = new Float32Array(n).fill(7);
  }
  const r = await router.fusedTopkWithScoreFunction(logits, options);
  const intermediate = intermediateOf(r.intermediate.data as Float32Array | (() => Float32Array));
  const g = await router.fusedTopkWithScoreFunctionBackward(r.saved, grad);
  r.saved.release();
  return { probs: r.probs.data, intermediate, route: (r.routingMap ?? r.indices)!.data, grad: g.data };
}

const backends = new Map<Router, WasmBackend>();

/** A wasm router on `options`, whose backend goes to `backends` (to read its test hooks). */
async function threaded(options: { threads: number; chunkBytes?: number }): Promise<Router> {
  const create = WasmBackend.create;
  let backend: WasmBackend | undefined;
  WasmBackend.create = async (o) => (backend = await create.call(WasmBackend, o));
  try {
    const router = await createRouter({ backend: "wasm", ...options });
    backends.set(router, backend!);
    return router;
  } finally {
    WasmBackend.create = create;
  }
}

Deno.test("threaded forwards give the bits of one thread, whoever runs each piece", async (t) => {
  const one = await createRouter({ backend: "wasm", threads: 1 });
  const routers: Array<[string, Router]> = [
    ["1 worker, default chunks", await threaded({ threads: 2 })],
    // 3 MiB chunks: several per batch, each still big enough for the pieces
    ["2 workers, 3 MiB chunks", await threaded({ threads: 3, chunkBytes: 3 << 20 })],
  ];
  try {
    for (const c of configs()) {
      assert.ok(c.T * c.E >= MIN_PARALLEL_ELEMENTS, "big enough for the workers");
      const rng = mulberry32(c.T + c.E);
      const data = normals(rng, c.T * c.E, 2);
      const logits: FloatTensor = {
        data: c.dtype === "float32" ? data : narrowTo(data, c.dtype),
        shape: [c.T, c.E],
        dtype: c.dtype,
      } as FloatTensor;
      const g = normals(rng, c.T * c.E);
      const grad = { data: c.dtype === "float32" ? g : narrowTo(g, c.dtype), shape: [c.T, c.E], dtype: c.dtype };
      const want = await outputs(one, c, logits, grad as FloatTensor);
      const label = `${c.T}x${c.E} ${c.dtype} ${JSON.stringify({ ...c.options, expertBias: undefined })}` +
        (c.callerBuffers ? " caller buffers" : "");
      await t.step(label, async () => {
        for (const [name, router] of routers) {
          // twice: the second call reuses the first one's saved buffers and warm workers
          for (let k = 0; k < 2; k++) {
            const got = await outputs(router, c, logits, grad as FloatTensor);
            for (const key of ["probs", "intermediate", "route", "grad"] as const) {
              assertBitIdentical(got[key], want[key], `${name}, call ${k}: ${key}`);
            }
          }
        }
      });
    }
    for (const [name, router] of routers) {
      const b = backends.get(router)!;
      assert.ok(b.threads > 1, `${name}: runs workers`);
      // both kinds of piece were checked: a test that only ever saw one would prove little
      assert.ok(b.workerPieces > 0, `${name}: pieces run by workers (${b.workerPieces})`);
      assert.ok(b.ownPieces > 0, `${name}: pieces run by the calling thread (${b.ownPieces})`);
    }
  } finally {
    one.dispose();
    for (const [, r] of routers) r.dispose();
  }
});
