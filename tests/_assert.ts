/**
 * Assertion helpers for numeric arrays: closeness with an absolute and a
 * relative tolerance, and exact equality (BigInt64Array aware).
 *
 * @module
 */

import { AssertionError } from "node:assert";

/** Tolerances of {@linkcode assertClose}: pass when |a - e| <= atol + rtol * |e|. */
export interface Tolerance {
  atol: number;
  rtol: number;
}

/** Formats a value for a failure message (so that -0, NaN and bigint read clearly). */
function show(v: number | bigint | undefined): string {
  if (typeof v === "bigint") return `${v}n`;
  if (Object.is(v, -0)) return "-0";
  return String(v);
}

/**
 * Asserts that two numeric arrays (or two numbers) have the same length and
 * are close element by element: |a - e| <= atol + rtol * |e|. Equal
 * infinities and two NaNs count as equal; a NaN against a number, or an
 * infinity against anything else, does not.
 *
 * @throws {AssertionError} Naming `label`, the first mismatching index with
 *   both values, and how many elements mismatch.
 */
export function assertClose(
  actual: ArrayLike<number> | number,
  expected: ArrayLike<number> | number,
  tolerance: Tolerance,
  label: string,
): void {
  const a = typeof actual === "number" ? [actual] : actual;
  const e = typeof expected === "number" ? [expected] : expected;
  if (a.length !== e.length) {
    throw new AssertionError({ message: `${label}: length ${a.length}, expected ${e.length}` });
  }
  const { atol, rtol } = tolerance;
  let mismatches = 0;
  let first = -1;
  let worst = 0;
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!;
    const y = e[i]!;
    let ok: boolean;
    if (Number.isNaN(x) || Number.isNaN(y)) ok = Number.isNaN(x) && Number.isNaN(y);
    else if (!Number.isFinite(x) || !Number.isFinite(y)) ok = x === y;
    else {
      const allowed = atol + rtol * Math.abs(y);
      ok = Math.abs(x - y) <= allowed;
      if (!ok) worst = Math.max(worst, Math.abs(x - y) / allowed);
    }
    if (!ok) {
      mismatches++;
      if (first < 0) first = i;
    }
  }
  if (mismatches > 0) {
    throw new AssertionError({
      message: `${label}: ${mismatches} of ${a.length} elements differ (atol=${atol}, rtol=${rtol}); ` +
        `first at [${first}]: actual ${show(a[first])}, expected ${show(e[first])}` +
        (worst > 0 ? `; worst error is ${worst.toPrecision(3)}x the tolerance` : ""),
    });
  }
}

/**
 * Asserts that two arrays hold exactly the same values (indices, sets,
 * routing maps). Elements compare as integers across number and bigint
 * arrays (an Int32Array can be checked against a BigInt64Array); NaN equals NaN.
 *
 * @throws {AssertionError} Naming `label`, the first mismatching index with
 *   both values, and how many elements mismatch.
 */
export function assertArrayEqual(
  actual: ArrayLike<number | bigint>,
  expected: ArrayLike<number | bigint>,
  label: string,
): void {
  if (actual.length !== expected.length) {
    throw new AssertionError({ message: `${label}: length ${actual.length}, expected ${expected.length}` });
  }
  let mismatches = 0;
  let first = -1;
  for (let i = 0; i < actual.length; i++) {
    if (!sameValue(actual[i]!, expected[i]!)) {
      mismatches++;
      if (first < 0) first = i;
    }
  }
  if (mismatches > 0) {
    throw new AssertionError({
      message: `${label}: ${mismatches} of ${actual.length} elements differ; ` +
        `first at [${first}]: actual ${show(actual[first])}, expected ${show(expected[first])}`,
    });
  }
}

/** Exact equality of two elements; a bigint equals the number of the same integer value. */
function sameValue(a: number | bigint, b: number | bigint): boolean {
  if (typeof a === "bigint" || typeof b === "bigint") {
    // Compare as bigint when both are integers; a non-integer number never equals a bigint.
    const toBig = (v: number | bigint) => typeof v === "bigint" ? v : Number.isInteger(v) ? BigInt(v) : undefined;
    const x = toBig(a);
    const y = toBig(b);
    return x !== undefined && x === y;
  }
  return a === b || (Number.isNaN(a) && Number.isNaN(b));
}

/**
 * Asserts that two arrays are bit-identical as stored: same typed-array kind,
 * same length, same bytes (so -0 differs from 0 and NaN payloads count).
 */
export function assertBitIdentical(
  actual: ArrayBufferView,
  expected: ArrayBufferView,
  label: string,
): void {
  if (actual.constructor !== expected.constructor) {
    throw new AssertionError({
      message: `${label}: ${actual.constructor.name}, expected ${expected.constructor.name}`,
    });
  }
  const a = new Uint8Array(actual.buffer, actual.byteOffset, actual.byteLength);
  const b = new Uint8Array(expected.buffer, expected.byteOffset, expected.byteLength);
  assertArrayEqual(a, b, `${label} (bytes)`);
}

/** A backend's intermediate as an array: backends may hand it over as a reader of the saved state's copy. */
export function intermediateOf(x: Float32Array | (() => Float32Array) | null): Float32Array {
  if (x === null) throw new Error("the forward kept no intermediate (saveForBackward: false)");
  return typeof x === "function" ? x() : x;
}
