// The far end of tests/_remote.ts: runs router calls that a Deno test sends
// from another runtime (Node, a browser page, Deno importing the npm
// package) on the moe-router module loaded there. Plain JavaScript with no
// imports, so that every runtime loads it as it is.
//
// A message is JSON: { backend, method, args }. Typed arrays travel as
// { $array: "Float32Array", base64 }, saved states as { $saved: id }, errors
// as { error: { name, message } }.

// Node's atob and btoa are slow on megabytes: its Buffer is used where it exists.
const NodeBuffer = /** @type {any} */ (globalThis).Buffer;

/** @param {ArrayBufferView} a */
function toBase64(a) {
  const bytes = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  if (NodeBuffer) return NodeBuffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64");
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

/** @param {string} name @param {string} base64 */
function fromBase64(name, base64) {
  const Ctor = /** @type {Record<string, any>} */ (globalThis)[name];
  if (typeof Ctor !== "function") throw new TypeError(`${name} is not available in this runtime`);
  if (NodeBuffer) {
    const b = NodeBuffer.from(base64, "base64");
    return new Ctor(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
  }
  const bin = atob(base64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Ctor(bytes.buffer);
}

/**
 * Returns a function that answers one JSON message with one JSON answer.
 *
 * @param {Record<string, any>} mod the moe-router module
 * @returns {(message: string) => Promise<string>}
 */
export function createRunner(mod) {
  /** @type {Map<string, Promise<any>>} */
  const routers = new Map();
  /** @type {Map<number, any>} */
  const saved = new Map();
  let nextId = 1;

  /** @param {any} v @returns {any} */
  const decode = (v) => {
    if (Array.isArray(v)) return v.map(decode);
    if (v === null || typeof v !== "object") return v;
    if (typeof v.$array === "string") return fromBase64(v.$array, v.base64);
    if (typeof v.$saved === "number") return saved.get(v.$saved) ?? { released: true, backend: "unknown" };
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, decode(x)]));
  };
  /** @param {any} v @returns {any} */
  const encode = (v) => {
    if (ArrayBuffer.isView(v)) return { $array: v.constructor.name, base64: toBase64(v) };
    if (Array.isArray(v)) return v.map(encode);
    if (v === null || typeof v !== "object") return v;
    if (typeof v.release === "function" && "backend" in v) {
      const id = nextId++;
      saved.set(id, v);
      return { $saved: id, backend: v.backend };
    }
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, encode(x)]));
  };

  /** @param {string} backend */
  const router = (backend) => {
    let r = routers.get(backend);
    if (r === undefined) {
      r = mod.createRouter({ backend });
      routers.set(backend, r);
    }
    return r;
  };

  /** @param {{ backend: string, method: string, args: any[] }} m */
  const call = async ({ backend, method, args }) => {
    if (method === "release") {
      saved.get(args[0])?.release();
      saved.delete(args[0]);
      return null;
    }
    const r = await router(backend);
    if (method === "info") {
      return { backend: r.backend, reason: r.reason, float16: typeof globalThis.Float16Array === "function" };
    }
    if (typeof r[method] !== "function") throw new TypeError(`unknown router method ${method}`);
    const decoded = decode(args);
    const result = await r[method](...decoded);
    const out = decoded[1]?.indicesOut;
    if (out !== undefined && result.indices?.data !== out) {
      throw new Error("indicesOut: the router did not return the caller's buffer");
    }
    return result;
  };

  return async (message) => {
    try {
      return JSON.stringify({ value: encode(await call(JSON.parse(message))) });
    } catch (e) {
      const error = e instanceof Error ? e : new Error(String(e));
      return JSON.stringify({ error: { name: error.name, message: error.message } });
    }
  };
}
