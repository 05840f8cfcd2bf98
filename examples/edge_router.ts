/**
 * An edge function that routes a batch of router logits: a `Deno.serve`
 * handler for Deno Deploy, Supabase Edge Functions and the like. Start-up
 * reads no file and fetches nothing: the WebAssembly kernels are embedded in
 * the module and compiled before the server listens.
 *
 *     deno run --allow-net examples/edge_router.ts [--port=8000] [--hostname=0.0.0.0]
 *
 * `POST` (any path) with the options in the query string:
 * `topk` (required), `scoreFunction` (required: softmax | sigmoid |
 * sqrtsoftplus), `usePreSoftmax`, `numGroups`, `groupTopk`, `scalingFactor`
 * (the names of {@linkcode TopkInferenceOptions}; booleans are `true` / `false`).
 *
 * The body is one of:
 * - `application/json`: `{ "logits": [[...E numbers], ...T rows],
 *   "expertBias": [...E numbers] }` (`expertBias` optional); the answer is
 *   JSON `{ "tokens": T, "experts": E, "topk": K, "probs": [[...E]...],
 *   "indices": [[...K]...] }`.
 * - `application/octet-stream`: little-endian `uint32 T, uint32 E`, then
 *   T * E float32 logits, then optionally E float32 expert biases; the answer
 *   is binary too: `uint32 T, uint32 E, uint32 K`, T * E float32 probs, then
 *   T * K int32 indices.
 *
 * Indices are per token, best first (ties: lower expert index). A bad
 * request gets status 400 and `{ "error": "..." }` naming what is wrong;
 * another method than POST / GET gets 405, an unknown content type 415, a
 * body over 16 MiB 413. `GET` answers this usage text.
 *
 * @module
 */
import { createRouter, type FloatTensor, type TopkInferenceOptions } from "../mod.ts";

/** Largest body accepted, in bytes. */
const MAX_BODY_BYTES = 16 << 20;

const USAGE = `moe-router edge example: POST router logits, get probs and top-k expert indices.
query: topk=K&scoreFunction=softmax|sigmoid|sqrtsoftplus[&usePreSoftmax=true][&numGroups=G&groupTopk=GK][&scalingFactor=F]
body (application/json): {"logits": [[...E numbers], ...], "expertBias": [...E numbers]}
  answer: {"tokens": T, "experts": E, "topk": K, "probs": [[...]], "indices": [[...]]}
body (application/octet-stream): uint32 T, uint32 E, T*E float32 logits[, E float32 expert bias] (little-endian)
  answer: uint32 T, uint32 E, uint32 K, T*E float32 probs, T*K int32 indices
`;

// Compiled while the module loads, before the first request: one router for the process.
// One thread: edge isolates get one CPU, and some have no Worker.
const router = await createRouter({ backend: "wasm", threads: 1 });

/** A request the handler refuses, with its HTTP status. */
class BadRequest extends Error {
  constructor(message: string, readonly status = 400) {
    super(message);
  }
}

const PARAMS = ["topk", "scoreFunction", "usePreSoftmax", "numGroups", "groupTopk", "scalingFactor"];

/** The router options in the query string; the library checks their values. */
function optionsOf(query: URLSearchParams): TopkInferenceOptions {
  for (const key of query.keys()) {
    if (!PARAMS.includes(key)) throw new BadRequest(`unknown query parameter "${key}"; known: ${PARAMS.join(", ")}`);
  }
  const number = (key: string): number | undefined => {
    const raw = query.get(key);
    if (raw === null) return undefined;
    const v = raw.trim() === "" ? NaN : Number(raw);
    if (Number.isNaN(v)) throw new BadRequest(`query parameter ${key} must be a number, got "${raw}"`);
    return v;
  };
  const topk = number("topk");
  if (topk === undefined) throw new BadRequest("query parameter topk is required");
  const scoreFunction = query.get("scoreFunction");
  if (scoreFunction === null) throw new BadRequest("query parameter scoreFunction is required");
  // the score function's name is checked by the library, with the other values
  // routing alone: a server never runs the backward, so nothing is kept for it
  const options: TopkInferenceOptions = {
    topk,
    scoreFunction: scoreFunction as TopkInferenceOptions["scoreFunction"],
    indexDtype: "int32",
    saveForBackward: false,
  };
  for (const key of ["numGroups", "groupTopk", "scalingFactor"] as const) {
    const v = number(key);
    if (v !== undefined) options[key] = v;
  }
  const pre = query.get("usePreSoftmax");
  if (pre !== null) {
    if (pre !== "true" && pre !== "false") {
      throw new BadRequest(`query parameter usePreSoftmax must be true or false, got "${pre}"`);
    }
    options.usePreSoftmax = pre === "true";
  }
  return options;
}

interface Batch {
  logits: FloatTensor;
  expertBias?: FloatTensor;
}

function fromJson(text: string): Batch {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch (e) {
    throw new BadRequest(`body is not valid JSON: ${(e as Error).message}`);
  }
  const { logits, expertBias } = (typeof body === "object" && body !== null ? body : {}) as Record<string, unknown>;
  if (!Array.isArray(logits) || logits.length === 0 || !logits.every(Array.isArray)) {
    throw new BadRequest(`body.logits must be a non-empty array of rows (arrays of numbers)`);
  }
  const rows = logits as unknown[][];
  const E = rows[0]!.length;
  const data = new Float32Array(rows.length * E);
  rows.forEach((row, t) => {
    if (row.length !== E) {
      throw new BadRequest(`body.logits rows must have equal lengths: row 0 has ${E}, row ${t} has ${row.length}`);
    }
    row.forEach((v, e) => {
      if (typeof v !== "number") {
        throw new BadRequest(`body.logits[${t}][${e}] must be a number, got ${JSON.stringify(v)}`);
      }
      data[t * E + e] = v;
    });
  });
  const batch: Batch = { logits: { data, shape: [rows.length, E], dtype: "float32" } };
  if (expertBias !== undefined) {
    if (!Array.isArray(expertBias) || !expertBias.every((v) => typeof v === "number")) {
      throw new BadRequest(`body.expertBias must be an array of numbers`);
    }
    batch.expertBias = { data: Float32Array.from(expertBias), shape: [expertBias.length], dtype: "float32" };
  }
  return batch;
}

function fromBinary(body: ArrayBuffer): Batch {
  if (body.byteLength < 8) {
    throw new BadRequest(`binary body must start with uint32 tokens, uint32 experts; got ${body.byteLength} bytes`);
  }
  const view = new DataView(body);
  const T = view.getUint32(0, true);
  const E = view.getUint32(4, true);
  const n = T * E;
  const withBias = 8 + 4 * (n + E);
  if (body.byteLength !== 8 + 4 * n && body.byteLength !== withBias) {
    throw new BadRequest(
      `binary body for ${T} tokens x ${E} experts must be ${
        8 + 4 * n
      } bytes (or ${withBias} with an expert bias), got ${body.byteLength}`,
    );
  }
  // copied: the body's bytes after the 8-byte header are float32 little-endian, as on every platform this runs on
  const floats = new Float32Array(body.slice(8));
  const batch: Batch = { logits: { data: floats.subarray(0, n), shape: [T, E], dtype: "float32" } };
  if (body.byteLength === withBias) batch.expertBias = { data: floats.subarray(n), shape: [E], dtype: "float32" };
  return batch;
}

function json(value: unknown, status = 200): Response {
  return new Response(JSON.stringify(value), { status, headers: { "content-type": "application/json" } });
}

async function route(request: Request): Promise<Response> {
  const options = optionsOf(new URL(request.url).searchParams);
  const type = (request.headers.get("content-type") ?? "").split(";")[0]!.trim().toLowerCase();
  if (type !== "application/json" && type !== "application/octet-stream") {
    throw new BadRequest(`content-type must be application/json or application/octet-stream, got "${type}"`, 415);
  }
  const declared = Number(request.headers.get("content-length") ?? 0);
  if (declared > MAX_BODY_BYTES) throw new BadRequest(`body is over ${MAX_BODY_BYTES} bytes`, 413);
  const body = await request.arrayBuffer();
  if (body.byteLength > MAX_BODY_BYTES) throw new BadRequest(`body is over ${MAX_BODY_BYTES} bytes`, 413);
  const binary = type === "application/octet-stream";
  const batch = binary ? fromBinary(body) : fromJson(new TextDecoder().decode(body));
  if (batch.expertBias !== undefined) options.expertBias = batch.expertBias;

  const out = await router.fusedTopkWithScoreFunction(batch.logits, options);
  const [T, E] = batch.logits.shape as [number, number];
  const K = options.topk;
  const probs = out.probs.data as Float32Array;
  const indices = out.indices!.data as Int32Array;
  if (binary) {
    const answer = new ArrayBuffer(12 + 4 * (T * E + T * K));
    const view = new DataView(answer);
    view.setUint32(0, T, true);
    view.setUint32(4, E, true);
    view.setUint32(8, K, true);
    new Float32Array(answer, 12, T * E).set(probs);
    new Int32Array(answer, 12 + 4 * T * E, T * K).set(indices);
    return new Response(answer, { headers: { "content-type": "application/octet-stream" } });
  }
  const rows = <A extends Float32Array | Int32Array>(a: A, w: number) =>
    Array.from({ length: T }, (_, t) => Array.from(a.subarray(t * w, (t + 1) * w)));
  return json({ tokens: T, experts: E, topk: K, probs: rows(probs, E), indices: rows(indices, K) });
}

/** Answers one request: routes a POSTed batch, or explains itself on GET. */
async function handler(request: Request): Promise<Response> {
  if (request.method === "GET") return new Response(USAGE, { headers: { "content-type": "text/plain" } });
  if (request.method !== "POST") {
    return json({ error: `method must be POST (or GET for usage), got ${request.method}` }, 405);
  }
  try {
    return await route(request);
  } catch (e) {
    // the library's argument errors (TypeError, RangeError) are the client's mistakes too
    if (e instanceof BadRequest) return json({ error: e.message }, e.status);
    if (e instanceof TypeError || e instanceof RangeError) return json({ error: e.message }, 400);
    return json({ error: `internal error: ${(e as Error).message}` }, 500);
  }
}

// Edge platforms ignore the port and hostname; --port=0 takes a free port (the tests do).
const flag = (name: string) => Deno.args.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
Deno.serve({
  port: Number(flag("port") ?? 8000),
  hostname: flag("hostname") ?? "0.0.0.0",
  onListen: ({ hostname, port }) => console.log(`moe-router edge example listening on http://${hostname}:${port}/`),
}, handler);
