/**
 * Reading and writing numpy `.npy` files (format versions 1.0, 2.0 and 3.0,
 * little-endian, C order) as {@linkcode Tensor}s.
 *
 * Supported dtypes: `<f4` (float32), `<f2` (float16), `|u1` (uint8), `|b1`
 * (bool, read as uint8 0/1), `<i2` (int16), `<i4` (int32), `<i8` (int64).
 * Everything else (float64, unsigned 16/32/64-bit, big-endian, structured and
 * object arrays, Fortran order) is refused with a `TypeError` naming it.
 *
 * @module
 */

import type { DType, Tensor } from "./_types.ts";

/** The magic string that starts every .npy file: `\x93NUMPY`. */
const MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59] as const;
/** numpy pads the preamble (magic, version, length, header) to this many bytes. */
const HEADER_ALIGN = 64;

/** How one numpy dtype maps onto a tensor dtype. */
interface NpyType {
  dtype: DType;
  itemSize: number;
}

/** Tensor dtype for each supported numpy `descr`; `|b1` reads as uint8. */
const FROM_DESCR: Readonly<Record<string, NpyType>> = {
  "<f4": { dtype: "float32", itemSize: 4 },
  "<f2": { dtype: "float16", itemSize: 2 },
  "|u1": { dtype: "uint8", itemSize: 1 },
  "|b1": { dtype: "uint8", itemSize: 1 },
  "<i2": { dtype: "int16", itemSize: 2 },
  "<i4": { dtype: "int32", itemSize: 4 },
  "<i8": { dtype: "int64", itemSize: 8 },
};

/** numpy `descr` written for each tensor dtype that .npy can hold. */
const TO_DESCR: Readonly<Partial<Record<DType | "bool", string>>> = {
  float32: "<f4",
  float16: "<f2",
  uint8: "|u1",
  bool: "|b1",
  int16: "<i2",
  int32: "<i4",
  int64: "<i8",
};

/**
 * Parses the bytes of a `.npy` file into a tensor whose data is a fresh,
 * aligned typed array (the input bytes are not referenced).
 *
 * Bool arrays (`|b1`) come back as `uint8` tensors of 0/1; a 0-d array has
 * shape `[]` and one element.
 *
 * @param bytes The whole file.
 * @returns The tensor, in C order.
 * @throws {TypeError} When the bytes are not a .npy file, the header is
 *   malformed, the array is in Fortran order, the dtype is not supported
 *   (the message names it) or the data is shorter or longer than the shape says.
 *
 * @example Round trip through encodeNpy
 * ```ts
 * import { encodeNpy, parseNpy } from "./_npy.ts";
 * import assert from "node:assert";
 *
 * const bytes = encodeNpy({ data: new Int32Array([1, 2, 3, 4, 5, 6]), shape: [2, 3], dtype: "int32" });
 * const t = parseNpy(bytes);
 * assert.deepStrictEqual(t.shape, [2, 3]);
 * assert.strictEqual(t.dtype, "int32");
 * assert.deepStrictEqual(t.data, new Int32Array([1, 2, 3, 4, 5, 6]));
 * ```
 */
export function parseNpy(bytes: Uint8Array): Tensor {
  // Preamble: magic (6), version (2), header length (2 or 4, little-endian).
  if (bytes.length < 10 || MAGIC.some((b, i) => bytes[i] !== b)) {
    throw new TypeError("npy bytes must start with the magic string \\x93NUMPY, got something else");
  }
  const major = bytes[6]!;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let headerStart: number;
  let headerLength: number;
  if (major === 1) {
    headerStart = 10;
    headerLength = view.getUint16(8, true);
  } else if (major === 2 || major === 3) {
    if (bytes.length < 12) throw new TypeError("npy header is truncated");
    headerStart = 12;
    headerLength = view.getUint32(8, true);
  } else {
    throw new TypeError(`npy format version must be 1.0, 2.0 or 3.0, got ${major}.${bytes[7]}`);
  }
  const dataStart = headerStart + headerLength;
  if (dataStart > bytes.length) {
    throw new TypeError(`npy header is truncated: it declares ${headerLength} bytes, the file has ${bytes.length}`);
  }
  const header = new TextDecoder(major === 3 ? "utf-8" : "latin1").decode(
    bytes.subarray(headerStart, dataStart),
  );

  // Header: a Python dict literal with the keys descr, fortran_order and shape.
  const descr = /['"]descr['"]\s*:\s*['"]([^'"]*)['"]/.exec(header)?.[1];
  const fortran = /['"]fortran_order['"]\s*:\s*(True|False)/.exec(header)?.[1];
  const shapeText = /['"]shape['"]\s*:\s*\(([^)]*)\)/.exec(header)?.[1];
  if (descr === undefined) {
    const raw = /['"]descr['"]\s*:\s*([^,}]*)/.exec(header)?.[1]?.trim() ?? "(missing)";
    throw new TypeError(`npy dtype must be one of ${Object.keys(FROM_DESCR).join(", ")}, got ${raw}`);
  }
  if (fortran === undefined || shapeText === undefined) {
    throw new TypeError(`npy header must hold descr, fortran_order and shape, got ${header.trim()}`);
  }
  if (fortran === "True") {
    throw new TypeError("npy array must be in C order (fortran_order False), got fortran_order True");
  }
  const type = FROM_DESCR[descr];
  if (type === undefined) {
    throw new TypeError(`npy dtype must be one of ${Object.keys(FROM_DESCR).join(", ")}, got '${descr}'`);
  }
  const shape = shapeText.split(",").map((s) => s.trim()).filter((s) => s !== "").map((s) => {
    const n = Number(s.replace(/L$/, ""));
    if (!Number.isSafeInteger(n) || n < 0) {
      throw new TypeError(`npy shape must hold non-negative integers, got (${shapeText})`);
    }
    return n;
  });

  // Data: copied into a fresh buffer so that the typed array is aligned.
  const count = shape.reduce((a, b) => a * b, 1);
  const byteLength = count * type.itemSize;
  if (bytes.length - dataStart !== byteLength) {
    throw new TypeError(
      `npy data must be ${byteLength} bytes for shape (${shape.join(", ")}) of '${descr}', got ${
        bytes.length - dataStart
      }`,
    );
  }
  const buffer = bytes.slice(dataStart, dataStart + byteLength).buffer;
  return { data: typedArrayOf(type.dtype, buffer), shape, dtype: type.dtype } as Tensor;
}

/** A typed array of `dtype` over the whole of `buffer` (the host is assumed little-endian, as every current one is). */
function typedArrayOf(dtype: DType, buffer: ArrayBuffer): Tensor["data"] {
  switch (dtype) {
    case "float32":
      return new Float32Array(buffer);
    case "float16":
      if (typeof Float16Array === "undefined") {
        throw new TypeError("npy dtype '<f2' (float16) needs Float16Array, which this runtime lacks");
      }
      return new Float16Array(buffer);
    case "uint8":
      return new Uint8Array(buffer);
    case "int16":
      return new Int16Array(buffer);
    case "int32":
      return new Int32Array(buffer);
    case "int64":
      return new BigInt64Array(buffer);
    case "bfloat16":
      return new Uint16Array(buffer);
  }
}

/**
 * Encodes a tensor as the bytes of a `.npy` file (version 1.0, or 2.0 when
 * the header does not fit in 64 KiB), little-endian, C order.
 *
 * A `{ data: Uint8Array, dtype: "bool" }` tensor is written as `|b1` (its
 * bytes as they are; they should be 0 or 1).
 *
 * @param tensor The tensor; its shape may be `[]` (a 0-d array of one element).
 * @returns The file bytes.
 * @throws {TypeError} For bfloat16 (numpy has no such dtype: widen to float32
 *   first) or a data length that does not match the shape.
 *
 * @example Writing a 0-d float32 array
 * ```ts
 * import { encodeNpy, parseNpy } from "./_npy.ts";
 * import assert from "node:assert";
 *
 * const bytes = encodeNpy({ data: new Float32Array([0.5]), shape: [], dtype: "float32" });
 * assert.strictEqual(bytes.length % 64, 4); // 64-byte preamble, then 4 bytes of data
 * const t = parseNpy(bytes);
 * assert.deepStrictEqual(t.shape, []);
 * assert.strictEqual(t.data[0], 0.5);
 * ```
 */
export function encodeNpy(
  tensor: Tensor | { data: Uint8Array; shape: readonly number[]; dtype: "bool" },
): Uint8Array {
  const descr = TO_DESCR[tensor.dtype];
  if (descr === undefined) {
    throw new TypeError(
      `tensor dtype must be one of ${
        Object.keys(TO_DESCR).join(", ")
      } to be written as npy, got ${tensor.dtype} (widen bfloat16 to float32 first)`,
    );
  }
  const count = tensor.shape.reduce((a, b) => a * b, 1);
  if (tensor.data.length !== count) {
    throw new TypeError(
      `tensor data length must be ${count} for shape [${tensor.shape.join(", ")}], got ${tensor.data.length}`,
    );
  }
  const shape = tensor.shape.length === 1 ? `(${tensor.shape[0]},)` : `(${tensor.shape.join(", ")})`;
  const dict = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${shape}, }`;

  // Header padded with spaces and ended by a newline so that the data starts
  // at a multiple of HEADER_ALIGN bytes.
  const paddedTo = (preamble: number) => Math.ceil((preamble + dict.length + 1) / HEADER_ALIGN) * HEADER_ALIGN;
  const major = paddedTo(10) - 10 <= 0xffff ? 1 : 2;
  const preamble = major === 1 ? 10 : 12;
  const total = paddedTo(preamble);
  const header = dict.padEnd(total - preamble - 1, " ") + "\n";

  const data = new Uint8Array(tensor.data.buffer, tensor.data.byteOffset, tensor.data.byteLength);
  const out = new Uint8Array(total + data.length);
  out.set(MAGIC, 0);
  out[6] = major;
  out[7] = 0;
  const view = new DataView(out.buffer);
  if (major === 1) view.setUint16(8, header.length, true);
  else view.setUint32(8, header.length, true);
  for (let i = 0; i < header.length; i++) out[preamble + i] = header.charCodeAt(i);
  out.set(data, total);
  return out;
}
