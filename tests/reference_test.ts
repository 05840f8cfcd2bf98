/**
 * Proves tests/reference.ts before the library is tested against it: against
 * every golden case, and on small hand-checked examples of its rules.
 */

import assert from "node:assert";
import { assertArrayEqual, assertClose } from "./_assert.ts";
import { listCases, loadCase, topkOptionsOf } from "./_golden.ts";
import type { AuxLossCase, AuxScoresCase, TopkCase } from "./_golden.ts";
import {
  bf16ToF32,
  f32ToBf16,
  packBitmap,
  refAuxLoss,
  refAuxLossBackward,
  refAuxScoresBackward,
  refAuxScoresForward,
  refTopkBackward,
  refTopkForward,
  roundTo,
  selectToken,
  sortedRows,
  widen,
} from "./reference.ts";
import type { RefTopkOptions } from "./reference.ts";

function checkTopk(c: TopkCase): void {
  const { num_tokens: T, num_experts: E, topk: K, dtype } = c;
  const tolerance = { atol: c.atol, rtol: c.rtol };
  const { expertBias, ...options } = topkOptionsOf(c);
  const refOptions: RefTopkOptions = { ...options, expertBias: expertBias && widen(expertBias) };
  const forward = refTopkForward(widen(c.inputs.logits), T, E, refOptions);

  assertArrayEqual(sortedRows(forward.routing, T, K), c.expected.topk_set.data, "chosen sets");
  assertArrayEqual(forward.bytemap, c.expected.routing_map.data, "routing map");
  assertClose(roundTo(forward.probs, dtype), widen(c.expected.probs), tolerance, "probs");
  assertClose(forward.intermediate, c.expected.intermediate.data, tolerance, "intermediate");
  const grad = refTopkBackward(forward, widen(c.inputs.grad_probs));
  assertClose(roundTo(grad, dtype), widen(c.expected.grad_logits), tolerance, "grad_logits");
}

function checkAuxScores(c: AuxScoresCase): void {
  const { num_tokens: T, num_experts: E, topk: K } = c;
  const tolerance = { atol: c.atol, rtol: c.rtol };
  const forward = refAuxScoresForward(widen(c.inputs.logits), T, E, { topk: K, scoreFunction: c.score_function });

  assertArrayEqual(sortedRows(forward.routing, T, K), c.expected.topk_set.data, "chosen sets");
  assertArrayEqual(forward.bytemap, c.expected.routing_map.data, "routing map");
  assertClose(forward.scores, c.expected.scores.data, tolerance, "scores");
  const grad = refAuxScoresBackward(forward, widen(c.inputs.grad_scores));
  assertClose(roundTo(grad, c.dtype), widen(c.expected.grad_logits), tolerance, "grad_logits");
}

function checkAuxLoss(c: AuxLossCase): void {
  const tolerance = { atol: c.atol, rtol: c.rtol };
  const options = { totalNumTokens: c.total_num_tokens, numExperts: c.num_experts, topk: c.topk, coeff: c.coeff };
  const tokensPerExpert = widen(c.inputs.tokens_per_expert);
  const loss = refAuxLoss(widen(c.inputs.probs), c.num_tokens, c.num_cols, tokensPerExpert, options);
  assertClose(loss, c.expected.aux_loss.data, tolerance, "aux_loss");
  const grad = refAuxLossBackward(c.num_tokens, c.num_cols, tokensPerExpert, options, c.grad_aux_loss);
  assertClose(grad, c.expected.grad_probs.data, tolerance, "grad_probs");
}

Deno.test("reference matches every golden vector", async (t) => {
  const names = listCases();
  assert.ok(names.length > 0, "no golden cases found");
  for (const name of names) {
    await t.step(name, () => {
      const c = loadCase(name);
      switch (c.op) {
        case "topk":
          return checkTopk(c);
        case "aux_scores":
          return checkAuxScores(c);
        case "aux_loss":
          return checkAuxLoss(c);
      }
    });
  }
});

Deno.test("reference ranks higher scores first, ties toward the lower index, NaN last", () => {
  const r = [1, 3, NaN, 3, 2, -Infinity];
  assert.deepStrictEqual(selectToken(r, { topk: 6, scoreFunction: "sigmoid" }).chosen, [1, 3, 4, 0, 5, 2]);
  assert.deepStrictEqual(selectToken([NaN, NaN, 0], { topk: 2, scoreFunction: "sigmoid" }).chosen, [2, 0]);
});

Deno.test("reference group limit keeps the groups with the largest top-(K/GK) sums, ties toward the lower group", () => {
  // 4 groups of 2; K=2, GK=2: one expert per group counts. Group scores 5, 9, 9, 1 keep groups 1 and 2.
  const r = [5, 0, 9, 0, 0, 9, 1, 0];
  const selection = selectToken(r, { topk: 2, scoreFunction: "sigmoid", numGroups: 4, groupTopk: 2 });
  assert.deepStrictEqual(Array.from(selection.groupScores ?? []), [5, 9, 9, 1]);
  assert.deepStrictEqual(selection.chosen, [2, 5]);
  // K=4, GK=2: two experts per group count. Sums 5, 9, 9, 1 again; the 4 best of groups 1 and 2.
  const four = selectToken(r, { topk: 4, scoreFunction: "sigmoid", numGroups: 4, groupTopk: 2 });
  assert.deepStrictEqual(four.chosen, [2, 5, 3, 4]);
  assert.throws(() => selectToken(r, { topk: 3, scoreFunction: "sigmoid", numGroups: 4, groupTopk: 2 }), RangeError);
});

Deno.test("reference normalises sigmoid values over the chosen experts and selects on the biased score", () => {
  const x = new Float32Array([0, 2, -1, 1]);
  const bias = new Float32Array([0.5, 0, 0, 0]);
  const forward = refTopkForward(x, 1, 4, { topk: 2, scoreFunction: "sigmoid", expertBias: bias, scalingFactor: 2 });
  const s = (v: number) => 1 / (1 + Math.exp(-v));
  // r = [1.0, 0.881, 0.269, 0.731]: experts 0 and 1 win; values use the unbiased scores.
  assert.deepStrictEqual(Array.from(forward.routing), [0, 1]);
  const sum = s(0) + s(2);
  assertClose(forward.probs, [2 * s(0) / sum, 2 * s(2) / sum, 0, 0], { atol: 0, rtol: 1e-6 }, "probs");
});

Deno.test("reference softmax after selection keeps -Infinity outside the chosen experts", () => {
  const forward = refTopkForward(new Float32Array([0, Math.log(3), -5]), 1, 3, { topk: 2, scoreFunction: "softmax" });
  assertClose(forward.intermediate, [0.25, 0.75, -Infinity], { atol: 0, rtol: 1e-6 }, "intermediate");
  assertClose(forward.probs, [0.25, 0.75, 0], { atol: 0, rtol: 1e-6 }, "probs");
});

Deno.test("packBitmap sets bit e%8 of byte e/8, LSB first, with zero padding", () => {
  const bytemap = new Uint8Array(2 * 10);
  for (const e of [0, 3, 9]) bytemap[e] = 1;
  bytemap[10 + 8] = 1;
  assertArrayEqual(packBitmap(bytemap, 2, 10), [0b1001, 0b10, 0, 0b1], "bitmap");
});

Deno.test("bfloat16 narrowing rounds to nearest, ties to even", () => {
  assert.strictEqual(f32ToBf16(1), 0x3f80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even 1.
  assert.strictEqual(f32ToBf16(1 + 2 ** -8), 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: goes up.
  assert.strictEqual(f32ToBf16(1 + 3 * 2 ** -8), 0x3f82);
  assert.strictEqual(f32ToBf16(1 + 2 ** -8 + 2 ** -20), 0x3f81);
  assert.strictEqual(bf16ToF32(0xc040), -3);
  assert.ok(Number.isNaN(bf16ToF32(f32ToBf16(NaN))));
  assert.strictEqual(bf16ToF32(f32ToBf16(-Infinity)), -Infinity);
});
