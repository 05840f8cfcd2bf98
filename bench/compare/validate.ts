/**
 * Checks a peer's outputs against moe-router's before the peer is timed:
 * the same chosen set for every token, probs (and gradients) close.
 *
 * @module
 */

/** What a peer returns for one call (host arrays). */
export interface PeerOutput {
  /** [T, E] probs: the scaled values at the chosen experts, 0 elsewhere. */
  probs: Float32Array;
  /** [T, K] chosen experts, in any order within a token. */
  indices: Int32Array | BigInt64Array;
  /** [T, E] gradient of sum(probs * gradProbs) with respect to the logits (forward+backward only). */
  grad?: Float32Array;
}

/** Relative tolerance on probs (and absolute floor, for values near 0). */
export const PROBS_TOLERANCE = { rtol: 1e-4, atol: 1e-7 };
/**
 * Tolerance on gradients: relative, with an absolute floor scaled by the
 * largest |gradient| of the reference (gradients cancel: g / S - D / S^2).
 */
export const GRAD_TOLERANCE = { rtol: 1e-3, atolOfMax: 1e-5 };

/** Result of {@linkcode checkPeer}: `ok`, and a line saying what was compared or what differs. */
export interface Check {
  ok: boolean;
  detail: string;
}

/** Compares `got` with the reference `want` (moe-router's outputs) for T tokens, K experts each. */
export function checkPeer(want: PeerOutput, got: PeerOutput, tokens: number, topk: number): Check {
  if (got.indices.length !== tokens * topk) {
    return {
      ok: false,
      detail: `indices: ${got.indices.length} values, expected ${tokens * topk}`,
    };
  }
  const a = new Float64Array(topk);
  const b = new Float64Array(topk);
  let badTokens = 0;
  let firstBad = -1;
  for (let t = 0; t < tokens; t++) {
    for (let k = 0; k < topk; k++) {
      a[k] = Number(want.indices[t * topk + k]);
      b[k] = Number(got.indices[t * topk + k]);
    }
    a.sort();
    b.sort();
    if (a.some((v, k) => v !== b[k])) {
      if (firstBad < 0) firstBad = t;
      badTokens++;
    }
  }
  if (badTokens > 0) {
    return {
      ok: false,
      detail: `chosen sets differ on ${badTokens} tokens (first: token ${firstBad})`,
    };
  }

  const probs = compare(want.probs, got.probs, PROBS_TOLERANCE.rtol, PROBS_TOLERANCE.atol);
  if (!probs.ok) return { ok: false, detail: `probs: ${probs.detail}` };
  let detail = `sets equal, probs max rel err ${probs.maxRel.toExponential(1)}`;
  if (want.grad && got.grad) {
    let max = 0;
    for (const v of want.grad) max = Math.max(max, Math.abs(v));
    const grad = compare(want.grad, got.grad, GRAD_TOLERANCE.rtol, GRAD_TOLERANCE.atolOfMax * max);
    if (!grad.ok) return { ok: false, detail: `gradient: ${grad.detail}` };
    detail += `, grad max err ${(grad.maxAbs / max).toExponential(1)} of max |grad|`;
  }
  return { ok: true, detail };
}

function compare(want: Float32Array, got: Float32Array, rtol: number, atol: number) {
  if (want.length !== got.length) {
    return {
      ok: false,
      detail: `${got.length} values, expected ${want.length}`,
      maxRel: NaN,
      maxAbs: NaN,
    };
  }
  let maxRel = 0;
  let maxAbs = 0;
  for (let i = 0; i < want.length; i++) {
    const w = want[i]!;
    const g = got[i]!;
    const err = Math.abs(w - g);
    if (!(err <= rtol * Math.abs(w) + atol)) {
      return {
        ok: false,
        detail: `element ${i}: got ${g}, expected ${w}`,
        maxRel: NaN,
        maxAbs: NaN,
      };
    }
    maxAbs = Math.max(maxAbs, err);
    if (w !== 0) maxRel = Math.max(maxRel, err / Math.abs(w));
  }
  return { ok: true, detail: "", maxRel, maxAbs };
}
