/**
 * The router as a user would write it by hand in TypeScript: one token at a
 * time, scores into a scratch row, K rounds of arg-max, no SIMD, no tricks.
 *
 * @module
 */
import type { Case } from "./cases.ts";
import type { PeerOutput } from "./validate.ts";

/** Forward of the router for every token of `logits` [T, E]. */
export function plainRouter(c: Case, logits: Float32Array): PeerOutput {
  const { tokens: T, experts: E } = c;
  const {
    topk: K,
    scoreFunction,
    numGroups = 0,
    groupTopk = 0,
    scalingFactor = 1,
    expertBias,
  } = c.options;
  const probs = new Float32Array(T * E);
  const indices = new Int32Array(T * K);
  const scores = new Float32Array(E); // s: sigmoid(x), or x itself for post-softmax
  const sel = new Float32Array(E); // r = s + bias; -Infinity once taken or excluded
  const groupSize = numGroups > 0 ? E / numGroups : E;
  const groupScores = new Float64Array(numGroups);
  const kept = new Uint8Array(numGroups);
  const top = new Float64Array(K);

  for (let t = 0; t < T; t++) {
    const row = t * E;
    for (let e = 0; e < E; e++) {
      const x = logits[row + e]!;
      const s = scoreFunction === "sigmoid" ? 1 / (1 + Math.exp(-x)) : x;
      scores[e] = s;
      sel[e] = expertBias ? s + expertBias[e]! : s;
    }

    // group limit: a group's score is the sum of its K/GK best; keep the GK best groups
    if (groupTopk > 0) {
      const perGroup = K / groupTopk;
      for (let g = 0; g < numGroups; g++) {
        // the perGroup largest of the group, kept sorted in `top` (insertion)
        let n = 0;
        for (let e = g * groupSize; e < (g + 1) * groupSize; e++) {
          const v = sel[e]!;
          if (n === perGroup && v <= top[n - 1]!) continue;
          let i = n < perGroup ? n++ : n - 1;
          while (i > 0 && top[i - 1]! < v) {
            top[i] = top[i - 1]!;
            i--;
          }
          top[i] = v;
        }
        let sum = 0;
        for (let i = 0; i < perGroup; i++) sum += top[i]!;
        groupScores[g] = sum;
      }
      kept.fill(0);
      for (let k = 0; k < groupTopk; k++) {
        let best = -1;
        for (let g = 0; g < numGroups; g++) {
          if (!kept[g] && (best < 0 || groupScores[g]! > groupScores[best]!)) {
            best = g;
          }
        }
        kept[best] = 1;
      }
      for (let g = 0; g < numGroups; g++) {
        if (!kept[g]) sel.fill(-Infinity, g * groupSize, (g + 1) * groupSize);
      }
    }

    // top-k: K rounds of arg-max (strict >, so ties go to the lower index)
    for (let k = 0; k < K; k++) {
      let best = 0;
      for (let e = 1; e < E; e++) if (sel[e]! > sel[best]!) best = e;
      indices[t * K + k] = best;
      sel[best] = -Infinity;
    }

    // values of the chosen: normalised sigmoid, or softmax over the K chosen logits
    let sum = 0;
    if (scoreFunction === "sigmoid") {
      for (let k = 0; k < K; k++) sum += scores[indices[t * K + k]!]!;
      const norm = K > 1 ? scalingFactor / (sum + 1e-20) : scalingFactor;
      for (let k = 0; k < K; k++) {
        const e = indices[t * K + k]!;
        probs[row + e] = scores[e]! * norm;
      }
    } else {
      const max = scores[indices[t * K]!]!; // the first chosen is the largest
      for (let k = 0; k < K; k++) {
        sum += Math.exp(scores[indices[t * K + k]!]! - max);
      }
      for (let k = 0; k < K; k++) {
        const e = indices[t * K + k]!;
        probs[row + e] = Math.exp(scores[e]! - max) / sum * scalingFactor;
      }
    }
  }
  return { probs, indices };
}
