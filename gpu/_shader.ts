// A small typed shader builder: it owns the boilerplate of every kernel (the
// uniform struct, binding numbers, specialisation constants, the entry point
// and the folded workgroup id), so that a kernel's WGSL is only its body.
// Sizes travel as uniforms (one pipeline serves every shape); constants are
// only what changes the code, and they are part of the pipeline key.

/** Scalar type of a uniform field; every field is 4 bytes, so the struct packs without holes. */
export type UniformType = "u32" | "i32" | "f32";

/** One storage binding of a kernel. */
export interface StorageBinding {
  name: string;
  /** WGSL element type: `f32`, `u32`, `atomic<u32>`. */
  elem: string;
  access: "read" | "read_write";
}

/** A kernel: its uniforms, bindings, constants, helpers and body. */
export interface KernelSource {
  /** Label of the pipeline (its key), for error messages and captures. */
  label: string;
  /** Uniform fields, in struct order. `gridX` (the folded grid width) is always added. */
  uniforms: readonly (readonly [string, UniformType])[];
  /** Storage bindings, numbered from 1 in this order (binding 0 is the uniform block). */
  storage: readonly StorageBinding[];
  /** Specialisation constants written as WGSL `const`s (booleans and u32). */
  consts: Readonly<Record<string, number | boolean>>;
  /** Module-scope WGSL: workgroup variables and helper functions. */
  helpers: string;
  /** Body of `main`; `wg` (the flat workgroup index) and `li` (local index) are in scope. */
  body: string;
  /** Threads per workgroup. */
  workgroupSize: number;
}

/** Builds the WGSL text of a kernel. */
export function buildShader(k: KernelSource): string {
  const fields = [...k.uniforms, ["gridX", "u32"] as const].map(([n, t]) => `  ${n}: ${t},`).join("\n");
  const consts = Object.entries(k.consts)
    .map(([n, v]) => typeof v === "boolean" ? `const ${n}: bool = ${v};` : `const ${n}: u32 = ${v >>> 0}u;`)
    .join("\n");
  const storage = k.storage
    .map((b, i) => `@group(0) @binding(${i + 1}) var<storage, ${b.access}> ${b.name}: array<${b.elem}>;`)
    .join("\n");
  return `// ${k.label}
struct Params {
${fields}
}
@group(0) @binding(0) var<uniform> P: Params;
${storage}
${consts}
const WG: u32 = ${k.workgroupSize}u;
${k.helpers}
@compute @workgroup_size(${k.workgroupSize})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
  let wg = wid.x + wid.y * P.gridX;
${k.body}
}
`;
}

/** Values of a kernel's uniforms (gridX is filled in by the launcher). */
export type UniformValues = Readonly<Record<string, number>>;

/** Bytes of one uniform block of a kernel, rounded up to 16 as WGSL requires. */
export function uniformBytes(k: Pick<KernelSource, "uniforms">): number {
  return Math.ceil(((k.uniforms.length + 1) * 4) / 16) * 16;
}

/**
 * Packs uniform values into `view` at `offset`, following the struct the
 * shader declares; every declared field must be given (gridX included), and
 * nothing else.
 */
export function packUniforms(
  k: Pick<KernelSource, "uniforms" | "label">,
  values: UniformValues,
  view: DataView,
  offset: number,
): void {
  const fields = [...k.uniforms, ["gridX", "u32"] as const];
  for (const name of Object.keys(values)) {
    if (!fields.some(([n]) => n === name)) throw new Error(`${k.label}: uniform ${name} is not declared`);
  }
  fields.forEach(([name, type], i) => {
    const v = values[name];
    if (v === undefined) throw new Error(`${k.label}: uniform ${name} is missing`);
    const at = offset + 4 * i;
    if (type === "f32") view.setFloat32(at, v, true);
    else if (type === "i32") view.setInt32(at, v, true);
    else {
      if (!(v >= 0 && v <= 0xffffffff && Number.isInteger(v))) {
        throw new Error(`${k.label}: uniform ${name}=${v} is not a u32`);
      }
      view.setUint32(at, v, true);
    }
  });
}

/** Splits a count of workgroups into a 2-D grid that fits `maxPerDim` per dimension. */
export function foldGrid(n: number, maxPerDim: number): [number, number] {
  if (n <= maxPerDim) return [Math.max(1, n), 1];
  const y = Math.ceil(n / maxPerDim);
  if (y > maxPerDim) throw new RangeError(`${n} workgroups exceed the device's ${maxPerDim}x${maxPerDim} grid`);
  return [Math.ceil(n / y), y];
}
