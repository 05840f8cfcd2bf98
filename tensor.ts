/**
 * Building and checking host tensors: `{ data, shape, dtype }` objects.
 *
 * @module
 */
import type { DataOf, DType, Tensor } from "./_types.ts";

// deno-lint-ignore no-explicit-any
type AnyArrayCtor = new (n: number) => any;

/** Typed-array constructor of each dtype; float16 is absent where the runtime has no Float16Array. */
export const ARRAY_OF: Readonly<Record<DType, AnyArrayCtor | undefined>> = {
  float32: Float32Array,
  // Float16Array is missing on older runtimes (Node 20): float16 is then unsupported there
  float16: (globalThis as { Float16Array?: AnyArrayCtor }).Float16Array,
  bfloat16: Uint16Array,
  int16: Int16Array,
  int32: Int32Array,
  int64: BigInt64Array,
  uint8: Uint8Array,
};

/** Bytes per element of each dtype. */
export const BYTES_OF: Readonly<Record<DType, number>> = {
  float32: 4,
  float16: 2,
  bfloat16: 2,
  int16: 2,
  int32: 4,
  int64: 8,
  uint8: 1,
};

/** Name of the typed array behind a value, for error messages. */
export function describe(value: unknown): string {
  if (value === null) return "null";
  if (ArrayBuffer.isView(value)) return `${value.constructor.name}(${(value as { length?: number }).length ?? "?"})`;
  if (Array.isArray(value)) return `Array(${value.length})`;
  if (typeof value === "object") return (value as object).constructor?.name ?? "object";
  if (typeof value === "string") return JSON.stringify(value);
  return String(value);
}

/** The dtype a typed array stands for by default (Uint16Array: bfloat16). */
export function dtypeOf(data: ArrayBufferView): DType | undefined {
  for (const [dtype, ctor] of Object.entries(ARRAY_OF)) {
    if (ctor !== undefined && data.constructor === ctor) return dtype as DType;
  }
  return undefined;
}

/**
 * Builds a tensor from a typed array. The dtype follows from the array
 * (`Float32Array` float32, `Float16Array` float16, `Uint16Array` bfloat16,
 * `Int16Array` int16, `Int32Array` int32, `BigInt64Array` int64, `Uint8Array`
 * uint8) unless given; the shape defaults to `[data.length]`.
 *
 * @param data the elements, row-major; kept, not copied
 * @param shape the full shape; its product must equal `data.length`
 * @returns `{ data, shape, dtype }`
 * @throws {TypeError} when the array type or the shape does not fit
 *
 * @example Build a [2, 3] float32 tensor
 * ```ts
 * import { tensor } from "./mod.ts";
 * import assert from "node:assert";
 *
 * const t = tensor(new Float32Array(6), [2, 3]);
 * assert.deepStrictEqual(t.shape, [2, 3]);
 * assert.strictEqual(t.dtype, "float32");
 * ```
 */
export function tensor(data: Float32Array, shape?: readonly number[]): Tensor<"float32">;
/** A float16 tensor of a Float16Array. */
export function tensor(data: Float16Array, shape?: readonly number[]): Tensor<"float16">;
/** A bfloat16 tensor of a Uint16Array (the upper 16 bits of each float32). */
export function tensor(data: Uint16Array, shape?: readonly number[]): Tensor<"bfloat16">;
/** An int16 tensor of an Int16Array. */
export function tensor(data: Int16Array, shape?: readonly number[]): Tensor<"int16">;
/** An int32 tensor of an Int32Array. */
export function tensor(data: Int32Array, shape?: readonly number[]): Tensor<"int32">;
/** An int64 tensor of a BigInt64Array. */
export function tensor(data: BigInt64Array, shape?: readonly number[]): Tensor<"int64">;
/** A uint8 tensor of a Uint8Array. */
export function tensor(data: Uint8Array, shape?: readonly number[]): Tensor<"uint8">;
/** A tensor of the given dtype; `data` must be that dtype's typed array. */
export function tensor<D extends DType>(data: DataOf[D], shape: readonly number[], dtype: D): Tensor<D>;
export function tensor<D extends DType>(
  data: DataOf[D],
  shape: readonly number[] = [data.length],
  dtype?: D,
): Tensor<D> {
  const inferred = dtypeOf(data);
  const d = dtype ?? (inferred as D | undefined);
  if (d === undefined) {
    throw new TypeError(`tensor data must be a typed array of a supported dtype, got ${describe(data)}`);
  }
  const t = { data, shape: [...shape], dtype: d };
  checkShape("tensor", t);
  if (ARRAY_OF[d] === undefined || data.constructor !== ARRAY_OF[d]) {
    throw new TypeError(
      `tensor dtype ${d} needs ${ARRAY_OF[d]?.name ?? "a Float16Array (missing in this runtime)"} data, got ${
        describe(data)
      }`,
    );
  }
  return t;
}

/** Number of elements of a shape. */
export function sizeOf(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Checks that `t.shape` is a list of non-negative integers whose product is `t.data.length`. */
export function checkShape(name: string, t: { data: { length: number }; shape: readonly number[] }): void {
  if (!Array.isArray(t.shape)) {
    throw new TypeError(`${name}.shape must be an array of non-negative integers, got ${describe(t.shape)}`);
  }
  for (const d of t.shape) {
    if (!Number.isSafeInteger(d) || d < 0) {
      throw new TypeError(`${name}.shape must hold non-negative integers, got [${t.shape.join(", ")}]`);
    }
  }
  const n = sizeOf(t.shape);
  if (n !== t.data.length) {
    throw new TypeError(
      `${name}.data length must match shape [${t.shape.join(", ")}] (${n} elements), got ${t.data.length}`,
    );
  }
}

/** Allocates a zeroed tensor of a dtype and shape. */
export function empty<D extends DType>(dtype: D, shape: readonly number[]): Tensor<D> {
  const ctor = ARRAY_OF[dtype];
  if (ctor === undefined) throw new TypeError(`dtype ${dtype} is not supported by this runtime (no Float16Array)`);
  return { data: new ctor(sizeOf(shape)) as DataOf[D], shape: [...shape], dtype };
}
