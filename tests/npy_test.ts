import assert from "node:assert";
import { encodeNpy, parseNpy } from "../_npy.ts";
import type { Tensor } from "../_types.ts";
import { assertArrayEqual } from "./_assert.ts";
import { goldenDir, listCases } from "./_golden.ts";

/** A .npy file with the given header dict, format version and data bytes. */
function npyBytes(dict: string, data: Uint8Array, major = 1): Uint8Array {
  const preamble = major === 1 ? 10 : 12;
  const header = dict.padEnd(Math.ceil((preamble + dict.length + 1) / 64) * 64 - preamble - 1, " ") + "\n";
  const out = new Uint8Array(preamble + header.length + data.length);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, major, 0]);
  const view = new DataView(out.buffer);
  if (major === 1) view.setUint16(8, header.length, true);
  else view.setUint32(8, header.length, true);
  out.set(new TextEncoder().encode(header), preamble);
  out.set(data, preamble + header.length);
  return out;
}

const bytesOf = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

Deno.test("encodeNpy then parseNpy gives back every supported dtype, shape and value", () => {
  const tensors: Tensor[] = [
    { data: new Float32Array([1.5, -2, Infinity, NaN, 0, -0]), shape: [2, 3], dtype: "float32" },
    { data: new Float16Array([0.5, -65504, 6e-8]), shape: [3], dtype: "float16" },
    { data: new Uint8Array([0, 1, 255, 7]), shape: [1, 2, 2], dtype: "uint8" },
    { data: new Int16Array([-32768, 32767]), shape: [2, 1], dtype: "int16" },
    { data: new Int32Array([-(2 ** 31), 2 ** 31 - 1, 5]), shape: [3], dtype: "int32" },
    { data: new BigInt64Array([-(2n ** 63n), 2n ** 63n - 1n]), shape: [2], dtype: "int64" },
    { data: new Float32Array([3.25]), shape: [], dtype: "float32" },
    { data: new Float32Array(0), shape: [0, 4], dtype: "float32" },
  ];
  for (const tensor of tensors) {
    const back = parseNpy(encodeNpy(tensor));
    assert.strictEqual(back.dtype, tensor.dtype);
    assert.deepStrictEqual(back.shape, tensor.shape);
    assert.strictEqual(back.data.constructor, tensor.data.constructor);
    assertArrayEqual(bytesOf(back.data), bytesOf(tensor.data), `${tensor.dtype} [${tensor.shape}]`);
  }
});

Deno.test("encodeNpy writes what numpy writes: every golden file encodes back to its own bytes", () => {
  const dir = goldenDir();
  let files = 0;
  for (const name of listCases()) {
    for (const entry of Deno.readDirSync(new URL(`${name}/`, dir))) {
      if (!entry.name.endsWith(".npy")) continue;
      const bytes = Deno.readFileSync(new URL(`${name}/${entry.name}`, dir));
      assertArrayEqual(encodeNpy(parseNpy(bytes)), bytes, `${name}/${entry.name}`);
      files++;
    }
  }
  assert.ok(files > 0, "no golden .npy files found");
});

Deno.test("parseNpy reads bool arrays as uint8 and version 2.0 headers", () => {
  const bool = parseNpy(
    npyBytes("{'descr': '|b1', 'fortran_order': False, 'shape': (3,), }", new Uint8Array([1, 0, 1])),
  );
  assert.strictEqual(bool.dtype, "uint8");
  assertArrayEqual(bool.data, [1, 0, 1], "bool data");

  const v2 = parseNpy(
    npyBytes("{'descr': '<i4', 'fortran_order': False, 'shape': (1, 2), }", bytesOf(new Int32Array([7, -8])), 2),
  );
  assert.deepStrictEqual(v2.shape, [1, 2]);
  assertArrayEqual(v2.data, [7, -8], "v2 data");

  const encoded = encodeNpy({ data: new Uint8Array([1, 0]), shape: [2], dtype: "bool" });
  assert.match(new TextDecoder().decode(encoded.subarray(10, 64)), /'descr': '\|b1'/);
});

Deno.test("parseNpy copies the data into a fresh aligned array, even from an odd offset", () => {
  const file = encodeNpy({ data: new Float32Array([1, 2, 3]), shape: [3], dtype: "float32" });
  const shifted = new Uint8Array(file.length + 1);
  shifted.set(file, 1);
  const tensor = parseNpy(shifted.subarray(1));
  assert.ok(tensor.data instanceof Float32Array);
  assert.strictEqual(tensor.data.byteOffset, 0);
  assert.notStrictEqual(tensor.data.buffer, shifted.buffer);
  assertArrayEqual(tensor.data, [1, 2, 3], "data");
});

Deno.test("parseNpy refuses Fortran order, unsupported dtypes and bad lengths with a TypeError naming them", () => {
  const header = (descr: string, fortran = "False", shape = "(2,)") =>
    `{'descr': '${descr}', 'fortran_order': ${fortran}, 'shape': ${shape}, }`;
  const eight = new Uint8Array(8);
  assert.throws(() => parseNpy(npyBytes(header("<f4", "True"), eight)), {
    name: "TypeError",
    message: /fortran_order/,
  });
  for (const descr of ["<f8", "<u2", ">f4", "<c8", "|O"]) {
    assert.throws(() => parseNpy(npyBytes(header(descr), new Uint8Array(32))), {
      name: "TypeError",
      message: new RegExp(`'${descr.replace("|", "\\|")}'`),
    });
  }
  assert.throws(
    () => parseNpy(npyBytes("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", eight)),
    { name: "TypeError", message: /dtype/ },
  );
  assert.throws(() => parseNpy(npyBytes(header("<f4"), new Uint8Array(4))), { name: "TypeError", message: /8 bytes/ });
  assert.throws(() => parseNpy(npyBytes(header("<f4"), new Uint8Array(12))), { name: "TypeError", message: /got 12/ });
  assert.throws(() => parseNpy(new Uint8Array([1, 2, 3])), { name: "TypeError", message: /magic/ });
  assert.throws(() => parseNpy(npyBytes(header("<f4"), eight, 4)), { name: "TypeError", message: /version/ });
});

Deno.test("encodeNpy refuses bfloat16 and a data length that does not match the shape", () => {
  assert.throws(() => encodeNpy({ data: new Uint16Array(2), shape: [2], dtype: "bfloat16" }), {
    name: "TypeError",
    message: /bfloat16/,
  });
  assert.throws(() => encodeNpy({ data: new Float32Array(3), shape: [2, 2], dtype: "float32" }), {
    name: "TypeError",
    message: /4/,
  });
});
