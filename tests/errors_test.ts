/**
 * SPEC section 5 through the public API: every bad argument throws (rejects)
 * with the error class `_validate.ts` documents, and a message that names the
 * argument, the rule and the value received; errors come before any work.
 * Each check runs on a wasm router and on the module-level functions.
 */

import assert from "node:assert";
import * as moduleApi from "../mod.ts";
import { createRouter } from "../mod.ts";
import type { FloatTensor, Router, SavedState, Tensor, TopkOptions } from "../mod.ts";
import { Saved } from "../_backend.ts";
import { WasmBackend } from "../wasm/backend.ts";
import type { RouterOps } from "./_golden_suite.ts";
import { assertTensor } from "./_golden_suite.ts";

type ErrorClass = typeof TypeError | typeof RangeError | typeof Error;

/** Passes a value the types forbid (what a JavaScript caller may do). */
function bad<T>(value: unknown): T {
  return value as T;
}

/** A float32 tensor of `shape` with distinct values (0.1 * i, alternating sign). */
function f32(shape: number[], length = shape.reduce((a, b) => a * b, 1)): Tensor<"float32"> {
  return { data: Float32Array.from({ length }, (_, i) => (i % 2 ? -0.1 : 0.1) * i), shape, dtype: "float32" };
}

/**
 * Asserts that `call` rejects (or throws) an error of exactly class `cls`
 * whose message matches every pattern of `parts`.
 */
async function assertFails(
  call: () => unknown,
  cls: ErrorClass,
  parts: readonly RegExp[],
  label: string,
): Promise<void> {
  let error: unknown;
  try {
    await call();
  } catch (e) {
    error = e;
  }
  assert.ok(error !== undefined, `${label}: expected a ${cls.name}, nothing was thrown`);
  assert.ok(error instanceof Error, `${label}: threw a non-Error ${String(error)}`);
  assert.strictEqual(
    error.constructor,
    cls,
    `${label}: ${error.constructor.name} (${error.message}), expected ${cls.name}`,
  );
  for (const part of parts) {
    assert.match(error.message, part, `${label}: message ${JSON.stringify(error.message)} lacks ${part}`);
  }
  assert.ok(!error.message.includes("\n"), `${label}: message is one line`);
}

const router: Router = await createRouter({ backend: "wasm" });
globalThis.addEventListener("unload", () => router.dispose());

/** Both ways of calling the operations: a wasm router and the module-level functions. */
const APIS: [string, RouterOps][] = [["router", router], ["module", moduleApi]];

/** One row of the table: the call, the class it must throw and the parts of the message. */
interface BadCall {
  name: string;
  call: (api: RouterOps) => unknown;
  cls: ErrorClass;
  parts: RegExp[];
}

/** Registers the rows of `table` as steps, each run through both APIs. */
async function runTable(t: Deno.TestContext, table: BadCall[]): Promise<void> {
  for (const row of table) {
    await t.step(row.name, async () => {
      for (const [apiName, api] of APIS) {
        await assertFails(() => row.call(api), row.cls, row.parts, `${row.name} (${apiName})`);
      }
    });
  }
}

const E = 8;
const logits = f32([2, E]);
const topk = (api: RouterOps, options: Partial<TopkOptions>, x: unknown = logits) =>
  api.fusedTopkWithScoreFunction(bad<FloatTensor>(x), { topk: 2, scoreFunction: "sigmoid", ...options } as TopkOptions);

Deno.test("`fusedTopkWithScoreFunction()` refuses topk outside [1, E] with a RangeError naming the range and the value", async (t) => {
  const table: BadCall[] = [0, E + 1, 2.5, NaN, -1].map((k) => ({
    name: `topk ${k}`,
    call: (api) => topk(api, { topk: k }),
    cls: RangeError,
    parts: [/topk/, /\[1, numExperts=8\]/, new RegExp(`got ${k}`)],
  }));
  table.push({
    name: "topk missing",
    call: (api) => topk(api, { topk: bad<number>(undefined) }),
    cls: RangeError,
    parts: [/topk/, /\[1, numExperts=8\]/, /got undefined/],
  });
  table.push({
    name: "aux scores topk E+1",
    call: (api) => api.fusedComputeScoreForMoEAuxLoss(logits, { topk: E + 1, scoreFunction: "softmax" }),
    cls: RangeError,
    parts: [/topk/, /\[1, numExperts=8\]/, /got 9/],
  });
  await runTable(t, table);
});

Deno.test("logits with no expert, a wrong length or an unsupported dtype are refused", async (t) => {
  await runTable(t, [
    {
      name: "E == 0",
      call: (api) => topk(api, {}, { data: new Float32Array(0), shape: [3, 0], dtype: "float32" }),
      cls: RangeError,
      parts: [/logits/, /at least one expert/, /\[3, 0\]/],
    },
    {
      name: "E == 0 for the aux scores",
      call: (api) =>
        api.fusedComputeScoreForMoEAuxLoss({ data: new Float32Array(0), shape: [0], dtype: "float32" }, {
          topk: 1,
          scoreFunction: "softmax",
        }),
      cls: RangeError,
      parts: [/logits/, /at least one expert/, /\[0\]/],
    },
    {
      name: "data length not matching the shape",
      call: (api) => topk(api, {}, f32([2, E], 15)),
      cls: TypeError,
      parts: [/logits\.data length/, /\[2, 8\]/, /16 elements/, /got 15/],
    },
    {
      name: "a non-integer dimension",
      call: (api) => topk(api, {}, f32([2.5, E], 20)),
      cls: TypeError,
      parts: [/logits\.shape/, /non-negative integers/, /\[2\.5, 8\]/],
    },
    {
      name: "float64 logits",
      call: (api) => topk(api, {}, { data: new Float64Array(16), shape: [2, E], dtype: "float64" }),
      cls: TypeError,
      parts: [/logits\.dtype/, /float32, float16, bfloat16/, /"float64"/],
    },
    {
      name: "int32 logits",
      call: (api) => topk(api, {}, { data: new Int32Array(16), shape: [2, E], dtype: "int32" }),
      cls: TypeError,
      parts: [/logits\.dtype/, /float32, float16, bfloat16/, /"int32"/],
    },
    {
      name: "a Float32Array labelled float16",
      call: (api) => topk(api, {}, { data: new Float32Array(16), shape: [2, E], dtype: "float16" }),
      cls: TypeError,
      parts: [/logits\.data/, /Float16Array/, /float16/, /got Float32Array\(16\)/],
    },
    {
      name: "a Uint16Array labelled float32",
      call: (api) => topk(api, {}, { data: new Uint16Array(16), shape: [2, E], dtype: "float32" }),
      cls: TypeError,
      parts: [/logits\.data/, /Float32Array/, /float32/, /got Uint16Array\(16\)/],
    },
    {
      name: "a plain array of numbers",
      call: (api) => topk(api, {}, { data: Array(16).fill(0), shape: [2, E], dtype: "float32" }),
      cls: TypeError,
      parts: [/logits\.data/, /Float32Array/, /got Array\(16\)/],
    },
    {
      name: "logits that are not an object",
      call: (api) => topk(api, {}, null),
      cls: TypeError,
      parts: [/logits/, /object/, /got null/],
    },
  ]);
});

Deno.test("unknown score functions, map formats and index dtypes are refused with a TypeError listing the choices", async (t) => {
  await runTable(t, [
    {
      name: "score function",
      call: (api) => topk(api, { scoreFunction: bad("relu") }),
      cls: TypeError,
      parts: [/scoreFunction/, /softmax, sigmoid, sqrtsoftplus/, /"relu"/],
    },
    {
      name: "score function of the aux scores",
      call: (api) => api.fusedComputeScoreForMoEAuxLoss(logits, { topk: 2, scoreFunction: bad("tanh") }),
      cls: TypeError,
      parts: [/scoreFunction/, /softmax, sigmoid, sqrtsoftplus/, /"tanh"/],
    },
    {
      name: "routing map format",
      call: (api) => topk(api, { routingMapFormat: bad("bitmap") }),
      cls: TypeError,
      parts: [/routingMapFormat/, /bytemap, bitmap_u8/, /"bitmap"/],
    },
    {
      name: "routing map format of the aux scores",
      call: (api) =>
        api.fusedComputeScoreForMoEAuxLoss(logits, {
          topk: 2,
          scoreFunction: "softmax",
          routingMapFormat: bad("dense"),
        }),
      cls: TypeError,
      parts: [/routingMapFormat/, /bytemap, bitmap_u8/, /"dense"/],
    },
    {
      name: "index dtype",
      call: (api) => topk(api, { indexDtype: bad("uint8") }),
      cls: TypeError,
      parts: [/indexDtype/, /int16, int32, int64/, /"uint8"/],
    },
  ]);
});

Deno.test("an expert bias is refused with softmax, and with a shape other than [E]", async (t) => {
  const bias = f32([E]);
  await runTable(t, [
    {
      name: "bias with softmax",
      call: (api) => topk(api, { scoreFunction: "softmax", expertBias: bias }),
      cls: TypeError,
      parts: [/expertBias/, /sigmoid or sqrtsoftplus/, /"softmax"/],
    },
    {
      name: "bias of shape [4]",
      call: (api) => topk(api, { expertBias: f32([4]) }),
      cls: TypeError,
      parts: [/expertBias\.shape/, /\[8\]/, /got \[4\]/],
    },
    {
      name: "bias of shape [1, 8]",
      call: (api) => topk(api, { expertBias: f32([1, E]) }),
      cls: TypeError,
      parts: [/expertBias\.shape/, /\[8\]/, /got \[1, 8\]/],
    },
    {
      name: "float64 bias",
      call: (api) => topk(api, { expertBias: bad({ data: new Float64Array(E), shape: [E], dtype: "float64" }) }),
      cls: TypeError,
      parts: [/expertBias\.dtype/, /float32, float16, bfloat16/, /"float64"/],
    },
  ]);
});

Deno.test("every group constraint of SPEC 2.3 is enforced with a RangeError naming both numbers", async (t) => {
  // E = 8 throughout; each row breaks exactly one constraint.
  await runTable(t, [
    {
      name: "numGroups 0",
      call: (api) => topk(api, { topk: 2, numGroups: 0, groupTopk: 1 }),
      cls: RangeError,
      parts: [/numGroups/, /positive integer/, /got 0/],
    },
    {
      name: "numGroups -2",
      call: (api) => topk(api, { topk: 2, numGroups: -2, groupTopk: 1 }),
      cls: RangeError,
      parts: [/numGroups/, /positive integer/, /got -2/],
    },
    {
      name: "groupTopk -1",
      call: (api) => topk(api, { topk: 2, numGroups: 2, groupTopk: -1 }),
      cls: RangeError,
      parts: [/groupTopk/, /positive integer/, /got -1/],
    },
    {
      name: "topk % groupTopk != 0",
      call: (api) => topk(api, { topk: 3, numGroups: 4, groupTopk: 2 }),
      cls: RangeError,
      parts: [/groupTopk must divide topk=3/, /got 2/],
    },
    {
      name: "groupTopk > numGroups",
      call: (api) => topk(api, { topk: 4, numGroups: 2, groupTopk: 4 }),
      cls: RangeError,
      parts: [/groupTopk must be <= numGroups=2/, /got 4/],
    },
    {
      name: "E % numGroups != 0",
      call: (api) => topk(api, { topk: 2, numGroups: 3, groupTopk: 1 }),
      cls: RangeError,
      parts: [/numGroups must divide numExperts=8/, /got 3/],
    },
    {
      name: "topk / groupTopk > E / numGroups",
      call: (api) => topk(api, { topk: 6, numGroups: 4, groupTopk: 2 }),
      cls: RangeError,
      parts: [/topk \/ groupTopk/, /experts per group/, /8\/4=2/, /got 6\/2=3/],
    },
    {
      name: "groupTopk without numGroups",
      call: (api) => topk(api, { topk: 2, groupTopk: 2 }),
      cls: RangeError,
      parts: [/numGroups must be given/, /groupTopk=2/, /got undefined/],
    },
    {
      name: "a fractional numGroups",
      call: (api) => topk(api, { topk: 2, numGroups: 2.5, groupTopk: 1 }),
      cls: RangeError,
      parts: [/numGroups/, /positive integer/, /got 2\.5/],
    },
  ]);
});

Deno.test("int16 indices are refused for more than 32767 experts, whether asked by dtype or by buffer", async (t) => {
  const wide = f32([1, 32768]);
  await runTable(t, [
    {
      name: "indexDtype int16",
      call: (api) => topk(api, { indexDtype: "int16" }, wide),
      cls: RangeError,
      parts: [/int16/, /32767/, /numExperts=32768/],
    },
    {
      name: "an Int16Array indicesOut",
      call: (api) => topk(api, { indicesOut: new Int16Array(2) }, wide),
      cls: RangeError,
      parts: [/int16/, /32767/, /numExperts=32768/],
    },
  ]);
  await t.step("32767 experts still fit int16", async () => {
    const r = await router.fusedTopkWithScoreFunction(f32([1, 32767]), {
      topk: 2,
      scoreFunction: "softmax",
      indexDtype: "int16",
    });
    assertTensor(r.indices, "int16", [1, 2], "indices");
  });
});

Deno.test("a caller index buffer of the wrong length, type or dtype, or aliasing the logits, is refused", async (t) => {
  const shared = new ArrayBuffer(16 * 4 + 4 * 4);
  const aliasLogits: Tensor<"float32"> = { data: new Float32Array(shared, 0, 16), shape: [2, E], dtype: "float32" };
  await runTable(t, [
    {
      name: "length T*K - 1",
      call: (api) => topk(api, { indicesOut: new Int32Array(3) }),
      cls: TypeError,
      parts: [/indicesOut/, /2\*2 = 4 elements/, /got 3/],
    },
    {
      name: "a Float32Array",
      call: (api) => topk(api, { indicesOut: bad(new Float32Array(4)) }),
      cls: TypeError,
      parts: [/indicesOut/, /Int16Array, Int32Array or BigInt64Array/, /got Float32Array\(4\)/],
    },
    {
      name: "a Uint8Array",
      call: (api) => topk(api, { indicesOut: bad(new Uint8Array(4)) }),
      cls: TypeError,
      parts: [/indicesOut/, /Int16Array, Int32Array or BigInt64Array/, /got Uint8Array\(4\)/],
    },
    {
      name: "a plain array",
      call: (api) => topk(api, { indicesOut: bad([0, 0, 0, 0]) }),
      cls: TypeError,
      parts: [/indicesOut/, /Int16Array, Int32Array or BigInt64Array/, /got Array\(4\)/],
    },
    {
      name: "an Int16Array with indexDtype int32",
      call: (api) => topk(api, { indexDtype: "int32", indicesOut: new Int16Array(4) }),
      cls: TypeError,
      parts: [/indicesOut/, /int32/, /got Int16Array\(4\)/],
    },
    {
      name: "a BigInt64Array with indexDtype int16",
      call: (api) => topk(api, { indexDtype: "int16", indicesOut: new BigInt64Array(4) }),
      cls: TypeError,
      parts: [/indicesOut/, /int16/, /got BigInt64Array\(4\)/],
    },
    {
      name: "aliasing the logits buffer",
      call: (api) => topk(api, { indicesOut: new Int32Array(shared, 8 * 4, 4) }, aliasLogits),
      cls: TypeError,
      parts: [/indicesOut/, /share memory/, /logits/],
    },
  ]);
  await t.step("a buffer in the same ArrayBuffer but after the logits is accepted", async () => {
    const out = new Int32Array(shared, 16 * 4, 4);
    const r = await router.fusedTopkWithScoreFunction(aliasLogits, {
      topk: 2,
      scoreFunction: "sigmoid",
      indicesOut: out,
    });
    assert.strictEqual(r.indices?.data, out);
  });
});

Deno.test("a routing map format together with dense indices is refused", async (t) => {
  await runTable(t, [
    {
      name: "with indexDtype",
      call: (api) => topk(api, { routingMapFormat: "bitmap_u8", indexDtype: "int32" }),
      cls: TypeError,
      parts: [/routingMapFormat/, /dense indices/, /got both/],
    },
    {
      name: "with indicesOut",
      call: (api) => topk(api, { routingMapFormat: "bytemap", indicesOut: new Int32Array(4) }),
      cls: TypeError,
      parts: [/routingMapFormat/, /dense indices/, /got both/],
    },
  ]);
});

Deno.test("options out of range are refused: radixTopkThreshold, scalingFactor, usePreSoftmax with sigmoid", async (t) => {
  await runTable(t, [
    ...[0, 1.5, -Infinity, NaN].map((v): BadCall => ({
      name: `radixTopkThreshold ${v}`,
      call: (api) => topk(api, { radixTopkThreshold: v }),
      cls: RangeError,
      parts: [/radixTopkThreshold/, /integer >= 1/, new RegExp(`got ${v}`)],
    })),
    {
      name: "radixTopkThreshold 0 for the aux scores",
      call: (api) =>
        api.fusedComputeScoreForMoEAuxLoss(logits, { topk: 2, scoreFunction: "sigmoid", radixTopkThreshold: 0 }),
      cls: RangeError,
      parts: [/radixTopkThreshold/, /integer >= 1/, /got 0/],
    },
    ...[NaN, Infinity].map((v): BadCall => ({
      name: `scalingFactor ${v}`,
      call: (api) => topk(api, { scalingFactor: v }),
      cls: RangeError,
      parts: [/scalingFactor/, /finite number/, new RegExp(`got ${v}`)],
    })),
    {
      name: "usePreSoftmax with sigmoid",
      call: (api) => topk(api, { usePreSoftmax: true }),
      cls: TypeError,
      parts: [/usePreSoftmax/, /"softmax" only/, /"sigmoid"/],
    },
    {
      name: "options that are not an object",
      call: (api) => api.fusedTopkWithScoreFunction(logits, bad(null)),
      cls: TypeError,
      parts: [/options/, /object/, /got null/],
    },
  ]);
});

Deno.test("the top-k backward refuses a gradient of another shape or dtype", async (t) => {
  await runTable(t, [
    {
      name: "gradProbs [8, 2] for logits [2, 8]",
      call: async (api) => {
        const { saved } = await topk(api, {});
        return api.fusedTopkWithScoreFunctionBackward(saved, f32([E, 2]));
      },
      cls: TypeError,
      parts: [/gradProbs\.shape/, /\[2, 8\]/, /got \[8, 2\]/],
    },
    {
      name: "gradProbs [16] for logits [2, 8]",
      call: async (api) => {
        const { saved } = await topk(api, {});
        return api.fusedTopkWithScoreFunctionBackward(saved, f32([16]));
      },
      cls: TypeError,
      parts: [/gradProbs\.shape/, /\[2, 8\]/, /got \[16\]/],
    },
    {
      name: "float16 gradProbs for float32 logits",
      call: async (api) => {
        const { saved } = await topk(api, {});
        return api.fusedTopkWithScoreFunctionBackward(saved, {
          data: new Float16Array(16),
          shape: [2, E],
          dtype: "float16",
        });
      },
      cls: TypeError,
      parts: [/gradProbs\.dtype/, /float32/, /got float16/],
    },
    {
      name: "float32 gradProbs for bfloat16 logits",
      call: async (api) => {
        const { saved } = await topk(api, {}, { data: new Uint16Array(16), shape: [2, E], dtype: "bfloat16" });
        return api.fusedTopkWithScoreFunctionBackward(saved, f32([2, E]));
      },
      cls: TypeError,
      parts: [/gradProbs\.dtype/, /bfloat16/, /got float32/],
    },
    {
      name: "gradProbs whose data does not match its shape",
      call: async (api) => {
        const { saved } = await topk(api, {});
        return api.fusedTopkWithScoreFunctionBackward(saved, f32([2, E], 12));
      },
      cls: TypeError,
      parts: [/gradProbs\.data length/, /16 elements/, /got 12/],
    },
  ]);
});

Deno.test("the aux-scores backward refuses gradScores that are not float32 or of another shape", async (t) => {
  await runTable(t, [
    {
      name: "float16 gradScores",
      call: async (api) => {
        const { saved } = await api.fusedComputeScoreForMoEAuxLoss(logits, { topk: 2, scoreFunction: "softmax" });
        return api.fusedComputeScoreForMoEAuxLossBackward(
          saved,
          bad({ data: new Float16Array(16), shape: [2, E], dtype: "float16" }),
        );
      },
      cls: TypeError,
      parts: [/gradScores\.dtype/, /float32/, /got float16/],
    },
    {
      name: "bfloat16 gradScores after bfloat16 logits",
      call: async (api) => {
        const bf16 = { data: new Uint16Array(16), shape: [2, E], dtype: "bfloat16" } as const;
        const { saved } = await api.fusedComputeScoreForMoEAuxLoss(bf16, { topk: 2, scoreFunction: "sigmoid" });
        return api.fusedComputeScoreForMoEAuxLossBackward(saved, bad(bf16));
      },
      cls: TypeError,
      parts: [/gradScores\.dtype/, /float32/, /got bfloat16/],
    },
    {
      name: "gradScores [2, 4] for logits [2, 8]",
      call: async (api) => {
        const { saved } = await api.fusedComputeScoreForMoEAuxLoss(logits, { topk: 2, scoreFunction: "softmax" });
        return api.fusedComputeScoreForMoEAuxLossBackward(saved, f32([2, 4]));
      },
      cls: TypeError,
      parts: [/gradScores\.shape/, /\[2, 8\]/, /got \[2, 4\]/],
    },
  ]);
});

Deno.test("a backward refuses a saved state from another op, a foreign object, a released state or another backend", async (t) => {
  const auxLossArgs = [
    f32([2, E]),
    { data: new Int32Array(E), shape: [E], dtype: "int32" },
    { totalNumTokens: 2, numExperts: E, topk: 2, coeff: 1 },
  ] as const;
  await runTable(t, [
    {
      name: "top-k backward with an aux-loss state",
      call: async (api) => {
        const { saved } = await api.fusedMoEAuxLoss(...auxLossArgs);
        return api.fusedTopkWithScoreFunctionBackward(saved, f32([2, E]));
      },
      cls: TypeError,
      parts: [/saved/, /fusedTopkWithScoreFunction/, /got a state from fusedMoEAuxLoss/],
    },
    {
      name: "aux-scores backward with a top-k state",
      call: async (api) => {
        const { saved } = await topk(api, {});
        return api.fusedComputeScoreForMoEAuxLossBackward(saved, f32([2, E]));
      },
      cls: TypeError,
      parts: [/saved/, /fusedComputeScoreForMoEAuxLoss/, /got a state from fusedTopkWithScoreFunction/],
    },
    {
      name: "aux-loss backward with an aux-scores state",
      call: async (api) => {
        const { saved } = await api.fusedComputeScoreForMoEAuxLoss(logits, { topk: 2, scoreFunction: "softmax" });
        return api.fusedMoEAuxLossBackward(saved, 1);
      },
      cls: TypeError,
      parts: [/saved/, /fusedMoEAuxLoss/, /got a state from fusedComputeScoreForMoEAuxLoss/],
    },
    {
      name: "a plain object",
      call: (api) => api.fusedTopkWithScoreFunctionBackward(bad({}), f32([2, E])),
      cls: TypeError,
      parts: [/saved/, /saved state returned by fusedTopkWithScoreFunction/, /got Object/],
    },
    {
      name: "a look-alike object",
      call: (api) =>
        api.fusedTopkWithScoreFunctionBackward(
          { backend: "wasm", released: false, release() {} } satisfies SavedState,
          f32([2, E]),
        ),
      cls: TypeError,
      parts: [/saved/, /saved state returned by fusedTopkWithScoreFunction/, /got Object/],
    },
    {
      name: "undefined",
      call: (api) => api.fusedMoEAuxLossBackward(bad(undefined), 1),
      cls: TypeError,
      parts: [/saved/, /saved state returned by fusedMoEAuxLoss/, /got undefined/],
    },
    {
      name: "a released top-k state",
      call: async (api) => {
        const { saved } = await topk(api, {});
        saved.release();
        return api.fusedTopkWithScoreFunctionBackward(saved, f32([2, E]));
      },
      cls: TypeError,
      parts: [/saved/, /released/],
    },
    {
      name: "a released aux-scores state",
      call: async (api) => {
        const { saved } = await api.fusedComputeScoreForMoEAuxLoss(logits, { topk: 2, scoreFunction: "softmax" });
        saved.release();
        return api.fusedComputeScoreForMoEAuxLossBackward(saved, f32([2, E]));
      },
      cls: TypeError,
      parts: [/saved/, /released/],
    },
    {
      name: "a released aux-loss state",
      call: async (api) => {
        const { saved } = await api.fusedMoEAuxLoss(...auxLossArgs);
        saved.release();
        return api.fusedMoEAuxLossBackward(saved, 1);
      },
      cls: TypeError,
      parts: [/saved/, /released/],
    },
    {
      name: "a state of the webgpu backend",
      call: async (api) => {
        const { saved } = await topk(api, {});
        const plan = (saved as Saved<unknown>).plan;
        return api.fusedTopkWithScoreFunctionBackward(new Saved("webgpu", "topk", plan, null), f32([2, E]));
      },
      cls: TypeError,
      parts: [/saved/, /webgpu/, /wasm/],
    },
  ]);
  await t.step("a state from another wasm router is accepted (same backend)", async () => {
    const other = await createRouter({ backend: "wasm" });
    try {
      const r = await other.fusedTopkWithScoreFunction(logits, { topk: 2, scoreFunction: "sigmoid" });
      const g = await router.fusedTopkWithScoreFunctionBackward(r.saved, f32([2, E]));
      assertTensor(g, "float32", [2, E], "gradLogits");
    } finally {
      other.dispose();
    }
  });
});

Deno.test("a disposed router refuses every call with an Error that says it was disposed", async (t) => {
  const r = await createRouter({ backend: "wasm" });
  const forward = await r.fusedTopkWithScoreFunction(logits, { topk: 2, scoreFunction: "sigmoid" });
  const scores = await r.fusedComputeScoreForMoEAuxLoss(logits, { topk: 2, scoreFunction: "softmax" });
  const loss = await r.fusedMoEAuxLoss(f32([2, E]), { data: new Int32Array(E), shape: [E], dtype: "int32" }, {
    totalNumTokens: 2,
    numExperts: E,
    topk: 2,
    coeff: 1,
  });
  r.dispose();
  r.dispose(); // idempotent
  const calls: [string, () => unknown][] = [
    ["forward", () => r.fusedTopkWithScoreFunction(logits, { topk: 2, scoreFunction: "sigmoid" })],
    ["backward", () => r.fusedTopkWithScoreFunctionBackward(forward.saved, f32([2, E]))],
    ["aux scores", () => r.fusedComputeScoreForMoEAuxLoss(logits, { topk: 2, scoreFunction: "softmax" })],
    ["aux scores backward", () => r.fusedComputeScoreForMoEAuxLossBackward(scores.saved, f32([2, E]))],
    [
      "aux loss",
      () =>
        r.fusedMoEAuxLoss(f32([2, E]), { data: new Int32Array(E), shape: [E], dtype: "int32" }, {
          totalNumTokens: 2,
          numExperts: E,
          topk: 2,
          coeff: 1,
        }),
    ],
    ["aux loss backward", () => r.fusedMoEAuxLossBackward(loss.saved, 1)],
  ];
  for (const [name, call] of calls) {
    await t.step(name, () => assertFails(call, Error, [/router/, /disposed/, /createRouter/], name));
  }
});

Deno.test("`fusedMoEAuxLoss()` refuses bad probs, counts and options", async (t) => {
  const probs = f32([3, 4]);
  const counts = { data: new Int32Array([1, 2, 3, 4]), shape: [4], dtype: "int32" } as const;
  const options = { totalNumTokens: 3, numExperts: 4, topk: 1, coeff: 0.5 };
  await runTable(t, [
    {
      name: "1-D probs",
      call: (api) => api.fusedMoEAuxLoss(f32([4]), counts, options),
      cls: TypeError,
      parts: [/probs/, /2-D/, /got shape \[4\]/],
    },
    {
      name: "3-D probs",
      call: (api) => api.fusedMoEAuxLoss(f32([1, 3, 4]), counts, options),
      cls: TypeError,
      parts: [/probs/, /2-D/, /got shape \[1, 3, 4\]/],
    },
    {
      name: "float64 probs",
      call: (api) =>
        api.fusedMoEAuxLoss(bad({ data: new Float64Array(12), shape: [3, 4], dtype: "float64" }), counts, options),
      cls: TypeError,
      parts: [/probs\.dtype/, /float32, float16, bfloat16/, /"float64"/],
    },
    {
      name: "int16 counts",
      call: (api) => api.fusedMoEAuxLoss(probs, { data: new Int16Array(4), shape: [4], dtype: "int16" }, options),
      cls: TypeError,
      parts: [/tokensPerExpert\.dtype/, /int32, int64, float32, bfloat16/, /"int16"/],
    },
    {
      name: "float16 counts",
      call: (api) => api.fusedMoEAuxLoss(probs, { data: new Float16Array(4), shape: [4], dtype: "float16" }, options),
      cls: TypeError,
      parts: [/tokensPerExpert\.dtype/, /int32, int64, float32, bfloat16/, /"float16"/],
    },
    {
      name: "counts whose array does not match their dtype",
      call: (api) =>
        api.fusedMoEAuxLoss(probs, bad({ data: new Float32Array(4), shape: [4], dtype: "int32" }), options),
      cls: TypeError,
      parts: [/tokensPerExpert\.data/, /Int32Array/, /got Float32Array\(4\)/],
    },
    {
      name: "3 counts for 4 columns",
      call: (api) => api.fusedMoEAuxLoss(probs, { data: new Int32Array(3), shape: [3], dtype: "int32" }, options),
      cls: TypeError,
      parts: [/tokensPerExpert\.shape/, /\[4\]/, /got \[3\]/],
    },
    {
      name: "numExperts not dividing the columns",
      call: (api) => api.fusedMoEAuxLoss(probs, counts, { ...options, numExperts: 3 }),
      cls: RangeError,
      parts: [/numExperts must divide/, /\(4\)/, /got 3/],
    },
    ...[NaN, Infinity, -Infinity].map((coeff): BadCall => ({
      name: `coeff ${coeff}`,
      call: (api) => api.fusedMoEAuxLoss(probs, counts, { ...options, coeff }),
      cls: RangeError,
      parts: [/coeff/, /finite number/, new RegExp(`got ${coeff}`)],
    })),
    {
      name: "totalNumTokens 0",
      call: (api) => api.fusedMoEAuxLoss(probs, counts, { ...options, totalNumTokens: 0 }),
      cls: RangeError,
      parts: [/totalNumTokens/, /positive integer/, /got 0/],
    },
    {
      name: "topk 0",
      call: (api) => api.fusedMoEAuxLoss(probs, counts, { ...options, topk: 0 }),
      cls: RangeError,
      parts: [/topk/, /positive integer/, /got 0/],
    },
    {
      name: "a gradLoss that is not a number",
      call: async (api) => {
        const { saved } = await api.fusedMoEAuxLoss(probs, counts, options);
        return api.fusedMoEAuxLossBackward(saved, bad("1"));
      },
      cls: TypeError,
      parts: [/gradLoss/, /number or a one-element float tensor/, /"1"/],
    },
  ]);
});

Deno.test("`createRouter()` refuses an unknown backend and a bad chunk size", async (t) => {
  await t.step(
    'backend "cuda"',
    () =>
      assertFails(
        () => createRouter({ backend: bad("cuda") }),
        TypeError,
        [/backend/, /auto, wasm, webgpu/, /"cuda"/],
        "cuda",
      ),
  );
  for (const chunkBytes of [0, -1, 1.5]) {
    await t.step(`chunkBytes ${chunkBytes}`, () =>
      assertFails(
        () => createRouter({ backend: "wasm", chunkBytes }),
        RangeError,
        [/chunkBytes/, /positive integer/, new RegExp(`got ${chunkBytes}`)],
        `chunkBytes ${chunkBytes}`,
      ));
  }
});

Deno.test("errors are raised before any work: no kernel call and no memory growth for a huge batch", async (t) => {
  // Catch the backend the router creates, to watch its memory and its kernel calls.
  const create = WasmBackend.create;
  let backend: WasmBackend | undefined;
  WasmBackend.create = async (options) => (backend = await create.call(WasmBackend, options));
  let r: Router;
  try {
    r = await createRouter({ backend: "wasm" });
  } finally {
    WasmBackend.create = create;
  }
  assert.ok(backend !== undefined, "the router's backend was caught");
  const wasm = backend;
  const calls: string[] = [];
  for (
    const op of ["topkForward", "topkBackward", "auxScoresForward", "auxScoresBackward", "auxLossForward"] as const
  ) {
    const original = wasm[op] as (...args: unknown[]) => unknown;
    Object.defineProperty(wasm, op, {
      value: (...args: unknown[]) => {
        calls.push(op);
        return original.apply(wasm, args);
      },
    });
  }

  // 64 MiB of valid logits ([16384, 1024] float32); the bad option is the last one validated.
  const T = 16384;
  const big: Tensor<"float32"> = { data: new Float32Array(T * 1024), shape: [T, 1024], dtype: "float32" };
  const before = wasm.memoryBytes;
  const quick = async (name: string, call: () => unknown, cls: ErrorClass, parts: RegExp[]) => {
    await t.step(name, async () => {
      const start = performance.now();
      await assertFails(call, cls, parts, name);
      const ms = performance.now() - start;
      assert.ok(ms < 100, `${name}: took ${ms.toFixed(1)} ms`);
      assert.deepStrictEqual(calls, [], `${name}: kernels called`);
      assert.strictEqual(wasm.memoryBytes, before, `${name}: WebAssembly memory grew`);
    });
  };
  try {
    await quick(
      "forward with a bad radixTopkThreshold",
      () => r.fusedTopkWithScoreFunction(big, { topk: 8, scoreFunction: "sigmoid", radixTopkThreshold: 0 }),
      RangeError,
      [/radixTopkThreshold/],
    );
    await quick(
      "forward with a caller buffer one element short",
      () =>
        r.fusedTopkWithScoreFunction(big, { topk: 8, scoreFunction: "sigmoid", indicesOut: new Int32Array(T * 8 - 1) }),
      TypeError,
      [/indicesOut/],
    );
    await quick(
      "aux scores with topk 0",
      () => r.fusedComputeScoreForMoEAuxLoss(big, { topk: 0, scoreFunction: "softmax" }),
      RangeError,
      [/topk/],
    );
    await quick(
      "aux loss with a NaN coeff",
      () =>
        r.fusedMoEAuxLoss(big, { data: new Int32Array(1024), shape: [1024], dtype: "int32" }, {
          totalNumTokens: T,
          numExperts: 1024,
          topk: 8,
          coeff: NaN,
        }),
      RangeError,
      [/coeff/],
    );
    const small = await r.fusedTopkWithScoreFunction(f32([2, E]), { topk: 2, scoreFunction: "sigmoid" });
    calls.length = 0;
    const afterSmall = wasm.memoryBytes;
    await quick(
      "backward with a huge gradient of the wrong shape",
      () => r.fusedTopkWithScoreFunctionBackward(small.saved, big),
      TypeError,
      [/gradProbs\.shape/],
    );
    assert.strictEqual(afterSmall, before, "a small forward needed no growth either");
  } finally {
    r.dispose();
  }
});

Deno.test("an empty batch (no tokens) returns empty outputs with the leading dimensions kept", async (t) => {
  for (const shape of [[0, E], [2, 0, E]]) {
    const lead = shape.slice(0, -1);
    const empty: Tensor<"float32"> = { data: new Float32Array(0), shape, dtype: "float32" };
    await t.step(`[${shape}] top-k forward and backward, every routing output`, async () => {
      const layouts: [string, Partial<TopkOptions>, number[]][] = [
        ["bytemap", {}, [...lead, E]],
        ["bitmap_u8", { routingMapFormat: "bitmap_u8" }, [...lead, 1]],
        ["int16", { indexDtype: "int16" }, [...lead, 2]],
        ["int64", { indexDtype: "int64" }, [...lead, 2]],
        ["indicesOut", { indicesOut: new Int32Array(0) }, [...lead, 2]],
      ];
      for (const [name, options, routeShape] of layouts) {
        const r = await topk(router, options, empty);
        assertTensor(r.probs, "float32", shape, `${name} probs`);
        assertTensor(r.intermediate, "float32", shape, `${name} intermediate`);
        if (r.routingMap) assertTensor(r.routingMap, "uint8", routeShape, `${name} routingMap`);
        else assert.deepStrictEqual(r.indices?.shape, routeShape, `${name} indices`);
        const g = await router.fusedTopkWithScoreFunctionBackward(r.saved, empty);
        assertTensor(g, "float32", shape, `${name} gradLogits`);
      }
    });
    await t.step(`[${shape}] aux scores forward and backward`, async () => {
      const r = await router.fusedComputeScoreForMoEAuxLoss(empty, { topk: 2, scoreFunction: "sigmoid" });
      assertTensor(r.scores, "float32", shape, "scores");
      assertTensor(r.routingMap, "uint8", shape, "routingMap");
      const g = await router.fusedComputeScoreForMoEAuxLossBackward(r.saved, empty);
      assertTensor(g, "float32", shape, "gradLogits");
    });
  }
  await t.step("[0, 8] aux loss is 0 with an empty gradient", async () => {
    const r = await router.fusedMoEAuxLoss(
      { data: new Float32Array(0), shape: [0, E], dtype: "float32" },
      { data: new Int32Array(E).fill(1), shape: [E], dtype: "int32" },
      { totalNumTokens: 1, numExperts: E, topk: 2, coeff: 1 },
    );
    assertTensor(r.loss, "float32", [], "loss");
    assert.strictEqual(r.loss.data[0], 0);
    assertTensor(await router.fusedMoEAuxLossBackward(r.saved, 1), "float32", [0, E], "gradProbs");
  });
});
