// Validation of every public argument, done once at the entry point before
// any kernel runs. Each check throws a TypeError (wrong kind or shape) or a
// RangeError (value out of range) naming the argument, the rule and the value.
import type {
  AuxLossOptions,
  AuxScoresOptions,
  DType,
  FloatDType,
  FloatTensor,
  GpuTensor,
  IndexArray,
  IndexDType,
  RoutingMapFormat,
  ScoreFunction,
  Tensor,
  TokensPerExpertDType,
  TopkOptions,
} from "./_types.ts";
import { ARRAY_OF, BYTES_OF, checkShape, describe, sizeOf } from "./tensor.ts";

/** Routing output of a forward call: a map layout or a dense index dtype. */
export type RouteFormat = RoutingMapFormat | IndexDType;

/** Bytes of one token's routing output: a map row, or K dense indices. */
export function routeRowBytes(route: RouteFormat, E: number, K: number): number {
  switch (route) {
    case "bytemap":
      return E;
    case "bitmap_u8":
      return Math.ceil(E / 8);
    default:
      return K * BYTES_OF[route];
  }
}

/** Everything a backend needs for a top-k forward or backward call. */
export interface TopkPlan {
  readonly shape: readonly number[];
  readonly T: number;
  readonly E: number;
  readonly K: number;
  readonly dtype: FloatDType;
  readonly score: ScoreFunction;
  readonly pre: boolean;
  readonly numGroups: number;
  /** 0: no group limit. */
  readonly groupTopk: number;
  readonly scale: number;
  readonly bias: Float32Array | null;
  /** The expert bias as a GPU-resident tensor (webgpu only; then `bias` is null). */
  readonly biasGpu: GpuTensor<FloatDType> | null;
  readonly route: RouteFormat;
  readonly indicesOut: IndexArray | null;
  /** Caller buffers for probs / intermediate / routing map, written in place. */
  readonly probsOut: FloatTensor["data"] | null;
  readonly intermediateOut: Float32Array | null;
  readonly routingMapOut: Uint8Array | null;
  readonly radixThreshold: number;
  /** false: routing alone (no intermediate, no saved state; see TopkInferenceOptions). */
  readonly save: boolean;
}

/** Everything a backend needs for the aux-loss scores. */
export interface AuxScoresPlan {
  readonly shape: readonly number[];
  readonly T: number;
  readonly E: number;
  readonly K: number;
  readonly dtype: FloatDType;
  readonly score: ScoreFunction;
  readonly route: RoutingMapFormat;
  readonly radixThreshold: number;
}

/** Everything a backend needs for the aux loss. */
export interface AuxLossPlan {
  readonly shape: readonly number[];
  readonly rows: number;
  readonly cols: number;
  readonly dtype: FloatDType;
  /** tokensPerExpert widened to float32. */
  readonly tpe: Float32Array;
  /** numExperts * coeff / (topk * totalNumTokens^2). */
  readonly constant: number;
}

/**
 * An aux-loss plan as {@linkcode planAuxLoss} gives it and the webgpu backend
 * takes it: tokensPerExpert widened on the host, or the caller's GPU-resident
 * tensor (widened on the GPU, read in place by forward and backward).
 */
export interface GpuAuxLossPlan extends Omit<AuxLossPlan, "tpe"> {
  readonly tpe: Float32Array | GpuTensor<TokensPerExpertDType>;
}

/** Whether an aux-loss plan has host tokensPerExpert (every backend takes it). */
export function isHostAuxLossPlan(plan: GpuAuxLossPlan): plan is AuxLossPlan {
  return plan.tpe instanceof Float32Array;
}

const FLOAT_DTYPES: readonly FloatDType[] = ["float32", "float16", "bfloat16"];
const SCORE_FUNCTIONS: readonly ScoreFunction[] = ["softmax", "sigmoid", "sqrtsoftplus"];
const MAP_FORMATS: readonly RoutingMapFormat[] = ["bytemap", "bitmap_u8"];
const INDEX_DTYPES: readonly IndexDType[] = ["int16", "int32", "int64"];
const TPE_DTYPES: readonly TokensPerExpertDType[] = ["int32", "int64", "float32", "bfloat16"];

/** Default radix threshold: radix top-k when topk >= this. */
export const DEFAULT_RADIX_THRESHOLD = 16;
const THRESHOLD_ENV = "MOE_ROUTER_RADIX_TOPK_THRESHOLD";

let envThreshold: number | null | undefined;
let envError: RangeError | undefined;

// The environment is read once, and only where reading it needs no prompt;
// an invalid value fails every call that relies on it, not just the first.
function thresholdFromEnv(): number | null {
  if (envError !== undefined) throw envError;
  if (envThreshold !== undefined) return envThreshold;
  let raw: string | undefined;
  try {
    const deno = (globalThis as { Deno?: typeof Deno }).Deno;
    if (deno !== undefined) {
      if (deno.permissions.querySync?.({ name: "env", variable: THRESHOLD_ENV }).state === "granted") {
        raw = deno.env.get(THRESHOLD_ENV);
      }
    } else {
      raw = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process?.env?.[THRESHOLD_ENV];
    }
  } catch {
    raw = undefined;
  }
  if (raw !== undefined && raw !== "") {
    const v = Number(raw);
    if (!Number.isInteger(v) || v < 1) {
      envError = new RangeError(`${THRESHOLD_ENV} must be an integer >= 1, got ${JSON.stringify(raw)}`);
      throw envError;
    }
    envThreshold = v;
  } else {
    envThreshold = null;
  }
  return envThreshold;
}

function radixThreshold(value: unknown): number {
  if (value === undefined) return thresholdFromEnv() ?? DEFAULT_RADIX_THRESHOLD;
  if (typeof value !== "number" || !(value >= 1) || (!Number.isInteger(value) && value !== Infinity)) {
    throw new RangeError(`radixTopkThreshold must be an integer >= 1 (or Infinity), got ${describe(value)}`);
  }
  return Math.min(value, 0x7fffffff);
}

function checkObject(name: string, value: unknown): asserts value is Record<string, unknown> {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new TypeError(`${name} must be an object, got ${describe(value)}`);
  }
}

/** Checks a floating tensor: dtype float32 / float16 / bfloat16 with the matching array, shape, rank >= 1. */
export function checkFloatTensor(name: string, t: unknown, rank1 = true): asserts t is FloatTensor {
  checkObject(name, t);
  const dtype = t.dtype;
  if (!FLOAT_DTYPES.includes(dtype as FloatDType)) {
    throw new TypeError(`${name}.dtype must be one of float32, float16, bfloat16, got ${describe(dtype)}`);
  }
  const ctor = ARRAY_OF[dtype as FloatDType];
  if (ctor === undefined) {
    throw new TypeError(`${name}.dtype float16 needs Float16Array, which this runtime lacks; use float32 or bfloat16`);
  }
  if (!(t.data instanceof ctor)) {
    throw new TypeError(`${name}.data must be a ${ctor.name} for dtype ${dtype}, got ${describe(t.data)}`);
  }
  checkShape(name, t as unknown as FloatTensor);
  if (rank1 && (t.shape as number[]).length < 1) {
    throw new TypeError(`${name} must have at least one dimension (the expert axis), got shape []`);
  }
}

function positiveInt(name: string, v: unknown): number {
  if (typeof v !== "number" || !Number.isInteger(v) || v < 1) {
    throw new RangeError(`${name} must be a positive integer, got ${describe(v)}`);
  }
  return v;
}

function tokensAndExperts(name: string, t: { shape: readonly number[] }): { T: number; E: number } {
  const E = t.shape[t.shape.length - 1] ?? 0;
  if (E <= 0) {
    throw new RangeError(
      `${name} must have at least one expert (last dimension > 0), got shape [${t.shape.join(", ")}]`,
    );
  }
  return { T: sizeOf(t.shape) / E, E };
}

function topkIn(K: unknown, E: number): number {
  if (typeof K !== "number" || !Number.isInteger(K) || K < 1 || K > E) {
    throw new RangeError(`topk must be an integer in [1, numExperts=${E}], got ${describe(K)}`);
  }
  return K;
}

function scoreFunction(v: unknown): ScoreFunction {
  if (!SCORE_FUNCTIONS.includes(v as ScoreFunction)) {
    throw new TypeError(`scoreFunction must be one of ${SCORE_FUNCTIONS.join(", ")}, got ${describe(v)}`);
  }
  return v as ScoreFunction;
}

function mapFormat(v: unknown): RoutingMapFormat {
  if (v === undefined) return "bytemap";
  if (!MAP_FORMATS.includes(v as RoutingMapFormat)) {
    throw new TypeError(`routingMapFormat must be one of ${MAP_FORMATS.join(", ")}, got ${describe(v)}`);
  }
  return v as RoutingMapFormat;
}

const INDEX_ARRAY_DTYPE = new Map<unknown, IndexDType>([
  [Int16Array, "int16"],
  [Int32Array, "int32"],
  [BigInt64Array, "int64"],
]);

function overlaps(a: ArrayBufferView, b: ArrayBufferView): boolean {
  return a.buffer === b.buffer && a.byteOffset < b.byteOffset + b.byteLength &&
    b.byteOffset < a.byteOffset + a.byteLength;
}

/**
 * With checkFinite, throws a RangeError naming the first non-finite logit's
 * token and expert. Host tensors only: the data must be read to be checked.
 */
function checkFinite(flag: unknown, logits: FloatTensor, E: number): void {
  if (flag === undefined || flag === false) return;
  if (flag !== true) throw new TypeError(`checkFinite must be a boolean, got ${describe(flag)}`);
  const d = logits.data;
  let bad = -1;
  if (d instanceof Uint16Array) {
    // bfloat16: exponent bits all ones = infinity or NaN
    for (let i = 0; i < d.length; i++) {
      if (((d[i] as number) & 0x7f80) === 0x7f80) {
        bad = i;
        break;
      }
    }
  } else {
    for (let i = 0; i < d.length; i++) {
      if (!Number.isFinite(d[i])) {
        bad = i;
        break;
      }
    }
  }
  if (bad >= 0) {
    const v = d instanceof Uint16Array
      ? new Float32Array(new Uint32Array([(d[bad] as number) << 16]).buffer)[0]
      : d[bad];
    throw new RangeError(
      `logits must be finite (checkFinite), got ${v} at token ${Math.floor(bad / E)}, expert ${bad % E}`,
    );
  }
}

// Options that only host logits take (caller output buffers, checkFinite):
// refused, unless absent or false, when the logits are GPU-resident.
function refuseHostOnly(o: Record<string, unknown>, names: readonly string[]): void {
  for (const name of names) {
    if (o[name] !== undefined && o[name] !== false) {
      throw new TypeError(
        `${name} applies to host logits; with GPU-resident logits the outputs are new GpuTensors, got ${name} with a GpuTensor`,
      );
    }
  }
}

/** Validates the arguments of the top-k forward and resolves defaults. */
export function planTopk(logits: unknown, options: unknown): TopkPlan {
  const gpu = isGpuTensor(logits);
  if (gpu) checkGpuTensor("logits", logits, FLOAT_DTYPES);
  else checkFloatTensor("logits", logits);
  checkObject("options", options);
  const o = options as Partial<TopkOptions>;
  if (gpu) refuseHostOnly(o, ["indicesOut", "probsOut", "intermediateOut", "routingMapOut", "checkFinite"]);
  const { T, E } = tokensAndExperts("logits", logits);
  const K = topkIn(o.topk, E);
  const score = scoreFunction(o.scoreFunction);
  const saveOption = (o as { saveForBackward?: unknown }).saveForBackward;
  const save = saveOption === undefined ? true : saveOption;
  if (typeof save !== "boolean") {
    throw new TypeError(`saveForBackward must be a boolean, got ${describe(save)}`);
  }
  if (!save && o.intermediateOut !== undefined) {
    throw new TypeError(
      `intermediateOut needs saveForBackward (the intermediate is what a backward uses), got intermediateOut with saveForBackward: false`,
    );
  }

  const pre = o.usePreSoftmax ?? false;
  if (typeof pre !== "boolean") throw new TypeError(`usePreSoftmax must be a boolean, got ${describe(pre)}`);
  if (pre && score !== "softmax") {
    throw new TypeError(
      `usePreSoftmax applies to scoreFunction "softmax" only, got scoreFunction ${JSON.stringify(score)}`,
    );
  }

  // group limit: on when groupTopk is given and > 0 (numGroups alone is ignored, as in TransformerEngine)
  let numGroups = 0;
  let groupTopk = 0;
  if (o.groupTopk !== undefined && o.groupTopk !== 0) {
    groupTopk = positiveInt("groupTopk", o.groupTopk);
    if (o.numGroups === undefined) {
      throw new RangeError(`numGroups must be given with groupTopk=${groupTopk}, got undefined`);
    }
    numGroups = positiveInt("numGroups", o.numGroups);
    if (groupTopk > numGroups) throw new RangeError(`groupTopk must be <= numGroups=${numGroups}, got ${groupTopk}`);
    if (E % numGroups !== 0) throw new RangeError(`numGroups must divide numExperts=${E}, got ${numGroups}`);
    if (K % groupTopk !== 0) throw new RangeError(`groupTopk must divide topk=${K}, got ${groupTopk}`);
    if (K / groupTopk > E / numGroups) {
      throw new RangeError(
        `topk / groupTopk must be <= experts per group (${E}/${numGroups}=${E / numGroups}), got ${K}/${groupTopk}=${
          K / groupTopk
        }`,
      );
    }
  } else if (o.numGroups !== undefined) {
    positiveInt("numGroups", o.numGroups);
  }

  const scale = o.scalingFactor ?? 1;
  if (typeof scale !== "number" || !Number.isFinite(scale)) {
    throw new RangeError(`scalingFactor must be a finite number, got ${describe(scale)}`);
  }

  let bias: Float32Array | null = null;
  let biasGpu: GpuTensor<FloatDType> | null = null;
  if (o.expertBias !== undefined) {
    if (score === "softmax") {
      throw new TypeError(
        `expertBias is supported with scoreFunction sigmoid or sqrtsoftplus only, got scoreFunction "softmax"`,
      );
    }
    const b: unknown = o.expertBias;
    if (isGpuTensor(b)) checkGpuTensor("expertBias", b, FLOAT_DTYPES);
    else checkFloatTensor("expertBias", b);
    if (b.shape.length !== 1 || b.shape[0] !== E) {
      throw new TypeError(`expertBias.shape must be [${E}], got [${b.shape.join(", ")}]`);
    }
    if (isGpuTensor(b)) biasGpu = b as GpuTensor<FloatDType>;
    else bias = biasCopy(b as FloatTensor);
  }

  let route: RouteFormat = mapFormat(o.routingMapFormat);
  let indicesOut: IndexArray | null = null;
  if (o.indexDtype !== undefined) {
    if (!INDEX_DTYPES.includes(o.indexDtype)) {
      throw new TypeError(`indexDtype must be one of ${INDEX_DTYPES.join(", ")}, got ${describe(o.indexDtype)}`);
    }
    route = o.indexDtype;
  }
  if (o.indicesOut !== undefined) {
    const dt = INDEX_ARRAY_DTYPE.get((o.indicesOut as object | null)?.constructor);
    if (dt === undefined) {
      throw new TypeError(
        `indicesOut must be an Int16Array, Int32Array or BigInt64Array, got ${describe(o.indicesOut)}`,
      );
    }
    if (o.indexDtype !== undefined && dt !== o.indexDtype) {
      throw new TypeError(
        `indicesOut must be the ${o.indexDtype} array indexDtype asks for, got ${describe(o.indicesOut)}`,
      );
    }
    if (o.indicesOut.length !== T * K) {
      throw new TypeError(
        `indicesOut must have tokens*topk = ${T}*${K} = ${T * K} elements, got ${o.indicesOut.length}`,
      );
    }
    if (overlaps(o.indicesOut, (logits as FloatTensor).data)) {
      throw new TypeError(`indicesOut must not share memory with logits.data, got an array over the same bytes`);
    }
    route = dt;
    indicesOut = o.indicesOut;
  }
  if (route === "int16" && E > 32767) {
    throw new RangeError(`indexDtype int16 holds expert ids up to 32767, got numExperts=${E}; use int32`);
  }
  if (o.routingMapFormat !== undefined && (route === "int16" || route === "int32" || route === "int64")) {
    throw new TypeError(`routingMapFormat and dense indices (indexDtype / indicesOut) exclude each other, got both`);
  }
  const inputs: ArrayBufferView[] = gpu
    ? []
    : [logits.data, ...(bias !== null ? [(o.expertBias as FloatTensor).data] : [])];
  const outs: ArrayBufferView[] = indicesOut ? [indicesOut] : [];
  const probsOut = outputBuffer<FloatTensor["data"]>(
    "probsOut",
    o.probsOut,
    ARRAY_OF[logits.dtype],
    T * E,
    inputs,
    outs,
  );
  const intermediateOut = outputBuffer<Float32Array>(
    "intermediateOut",
    o.intermediateOut,
    Float32Array,
    T * E,
    inputs,
    outs,
  );
  const isMap = route === "bytemap" || route === "bitmap_u8";
  if (o.routingMapOut !== undefined && !isMap) {
    throw new TypeError(`routingMapOut needs a routing map output, got dense indices (indexDtype / indicesOut)`);
  }
  const mapLength = T * (route === "bitmap_u8" ? Math.ceil(E / 8) : E);
  const routingMapOut = outputBuffer<Uint8Array>("routingMapOut", o.routingMapOut, Uint8Array, mapLength, inputs, outs);

  if (!gpu) checkFinite(o.checkFinite, logits as FloatTensor, E);
  return {
    shape: [...logits.shape],
    T,
    E,
    K,
    dtype: logits.dtype as FloatDType,
    score,
    pre,
    numGroups,
    groupTopk,
    scale,
    bias,
    biasGpu,
    route,
    indicesOut,
    probsOut,
    intermediateOut,
    routingMapOut,
    radixThreshold: radixThreshold(o.radixTopkThreshold),
    save,
  };
}

/**
 * Checks a caller-owned output buffer: the typed array an output needs, of
 * the output's length, sharing no memory with the inputs or other outputs
 * (recorded in `outs`). Returns it, or null when not given.
 */
export function outputBuffer<A extends ArrayBufferView & { length: number }>(
  name: string,
  value: unknown,
  // deno-lint-ignore no-explicit-any
  ctor: (new (n: number) => any) | undefined,
  length: number,
  inputs: readonly ArrayBufferView[],
  outs: ArrayBufferView[],
): A | null {
  if (value === undefined) return null;
  if (ctor === undefined || !(value instanceof ctor)) {
    throw new TypeError(`${name} must be a ${ctor?.name ?? "typed array"}, got ${describe(value)}`);
  }
  const v = value as A;
  if (v.length !== length) throw new TypeError(`${name} must have ${length} elements, got ${v.length}`);
  for (const other of [...inputs, ...outs]) {
    if (overlaps(v, other)) {
      throw new TypeError(`${name} must not share memory with an input or another output, got an overlapping array`);
    }
  }
  outs.push(v);
  return v;
}

/** Validates the arguments of the aux-loss scores (host or GPU-resident logits). */
export function planAuxScores(logits: unknown, options: unknown): AuxScoresPlan {
  const gpu = isGpuTensor(logits);
  if (gpu) checkGpuTensor("logits", logits, FLOAT_DTYPES);
  else checkFloatTensor("logits", logits);
  checkObject("options", options);
  const o = options as Partial<AuxScoresOptions>;
  if (gpu) refuseHostOnly(o, ["checkFinite"]);
  const { T, E } = tokensAndExperts("logits", logits);
  const K = topkIn(o.topk, E);
  const score = scoreFunction(o.scoreFunction);
  const route = mapFormat(o.routingMapFormat);
  const threshold = radixThreshold(o.radixTopkThreshold);
  if (!gpu) checkFinite(o.checkFinite, logits, E);
  return {
    shape: [...logits.shape],
    T,
    E,
    K,
    dtype: logits.dtype as FloatDType,
    score,
    route,
    radixThreshold: threshold,
  };
}

/**
 * Validates the arguments of the aux loss (probs and tokensPerExpert on the
 * host or GPU-resident) and widens host tokensPerExpert.
 */
export function planAuxLoss(probs: unknown, tokensPerExpert: unknown, options: unknown): GpuAuxLossPlan {
  if (isGpuTensor(probs)) checkGpuTensor("probs", probs, FLOAT_DTYPES);
  else checkFloatTensor("probs", probs);
  checkObject("options", options);
  const o = options as Partial<AuxLossOptions>;
  if (probs.shape.length !== 2) {
    throw new TypeError(`probs must be 2-D [tokens, cols], got shape [${probs.shape.join(", ")}]`);
  }
  const rows = probs.shape[0] as number;
  const cols = probs.shape[1] as number;
  if (cols <= 0) throw new RangeError(`probs must have at least one column, got shape [${probs.shape.join(", ")}]`);
  checkObject("tokensPerExpert", tokensPerExpert);
  const tpeGpu = isGpuTensor(tokensPerExpert);
  const tpe = tokensPerExpert as unknown as Tensor | GpuTensor;
  if (tpeGpu) checkGpuTensor("tokensPerExpert", tokensPerExpert, TPE_DTYPES, false);
  else {
    const t = tpe as Tensor;
    if (!TPE_DTYPES.includes(t.dtype as TokensPerExpertDType)) {
      throw new TypeError(`tokensPerExpert.dtype must be one of ${TPE_DTYPES.join(", ")}, got ${describe(t.dtype)}`);
    }
    const ctor = ARRAY_OF[t.dtype];
    if (ctor === undefined || !(t.data instanceof ctor)) {
      throw new TypeError(
        `tokensPerExpert.data must be a ${ctor?.name} for dtype ${t.dtype}, got ${describe(t.data)}`,
      );
    }
    checkShape("tokensPerExpert", t);
  }
  if (tpe.shape.length !== 1 || tpe.shape[0] !== cols) {
    throw new TypeError(
      `tokensPerExpert.shape must be [${cols}] (the columns of probs), got [${tpe.shape.join(", ")}]`,
    );
  }
  const numExperts = positiveInt("numExperts", o.numExperts);
  if (cols % numExperts !== 0) {
    throw new RangeError(`numExperts must divide the columns of probs (${cols}), got ${numExperts}`);
  }
  const topk = positiveInt("topk", o.topk);
  const totalNumTokens = positiveInt("totalNumTokens", o.totalNumTokens);
  const coeff = o.coeff;
  if (typeof coeff !== "number" || !Number.isFinite(coeff)) {
    throw new RangeError(`coeff must be a finite number, got ${describe(coeff)}`);
  }
  return {
    shape: [...probs.shape],
    rows,
    cols,
    dtype: probs.dtype as FloatDType,
    tpe: tpeGpu ? tokensPerExpert as GpuTensor<TokensPerExpertDType> : toFloat32(tpe as Tensor<TokensPerExpertDType>),
    constant: (numExperts * coeff) / (topk * totalNumTokens * totalNumTokens),
  };
}

/** Whether a value is a GPU-resident tensor: an object whose `buffer` is a GPUBuffer. */
export function isGpuTensor(v: unknown): v is GpuTensor {
  const ctor = (globalThis as { GPUBuffer?: abstract new (...a: never[]) => unknown }).GPUBuffer;
  return typeof v === "object" && v !== null && ctor !== undefined &&
    (v as { buffer?: unknown }).buffer instanceof ctor;
}

const GPU_USAGE_STORAGE = 0x80; // GPUBufferUsage.STORAGE

/**
 * Checks a GPU-resident input tensor: its dtype among `dtypes`, its shape
 * (rank >= 1 unless `rank1` is false), a buffer of at least the tensor's
 * bytes (rounded up to 4), with GPUBufferUsage.STORAGE, not mapped.
 */
export function checkGpuTensor(name: string, t: GpuTensor, dtypes: readonly DType[], rank1 = true): void {
  if (!dtypes.includes(t.dtype)) {
    throw new TypeError(`${name}.dtype must be one of ${dtypes.join(", ")}, got ${describe(t.dtype)}`);
  }
  if (!Array.isArray(t.shape) || t.shape.some((d) => !Number.isSafeInteger(d) || d < 0)) {
    throw new TypeError(`${name}.shape must be an array of non-negative integers, got ${describe(t.shape)}`);
  }
  if (rank1 && t.shape.length < 1) {
    throw new TypeError(`${name} must have at least one dimension (the expert axis), got shape []`);
  }
  const n = sizeOf(t.shape);
  const bytes = Math.ceil((n * BYTES_OF[t.dtype]) / 4) * 4;
  const b = t.buffer;
  if (b.size < bytes) {
    throw new TypeError(
      `${name}.buffer must hold at least ${bytes} bytes (${n} ${t.dtype} elements, rounded up to 4), got ${b.size}`,
    );
  }
  if ((b.usage & GPU_USAGE_STORAGE) === 0) {
    throw new TypeError(
      `${name}.buffer must have GPUBufferUsage.STORAGE (0x80) in its usage, got usage 0x${b.usage.toString(16)}`,
    );
  }
  if (b.mapState !== "unmapped") {
    throw new TypeError(`${name}.buffer must be unmapped while the router uses it, got mapState "${b.mapState}"`);
  }
}

/** Checks a gradient tensor (host, or GPU-resident) against the forward's shape and dtype. */
export function checkGrad(
  name: string,
  grad: unknown,
  shape: readonly number[],
  dtype: FloatDType,
): asserts grad is FloatTensor | GpuTensor<FloatDType> {
  if (isGpuTensor(grad)) checkGpuTensor(name, grad, FLOAT_DTYPES);
  else checkFloatTensor(name, grad, shape.length > 0);
  if (grad.dtype !== dtype) {
    throw new TypeError(`${name}.dtype must be ${dtype} (the forward's dtype), got ${grad.dtype}`);
  }
  if (grad.shape.length !== shape.length || grad.shape.some((d, i) => d !== shape[i])) {
    throw new TypeError(
      `${name}.shape must be [${shape.join(", ")}] (the forward's shape), got [${grad.shape.join(", ")}]`,
    );
  }
}

/**
 * The gradient of the aux loss: a number, a one-element host float tensor
 * (its value, widened), or a one-element GPU-resident float tensor (checked
 * and returned; the kernel reads it in place).
 */
export function checkGradLoss(v: unknown): number | GpuTensor<FloatDType> {
  if (typeof v === "number") return v;
  if (isGpuTensor(v)) {
    checkGpuTensor("gradLoss", v, FLOAT_DTYPES, false);
    if (sizeOf(v.shape) !== 1) {
      throw new TypeError(
        `gradLoss must be a one-element tensor (shape [] or [1]), got a GpuTensor of shape [${v.shape.join(", ")}]`,
      );
    }
    return v as GpuTensor<FloatDType>;
  }
  if (typeof v === "object" && v !== null && ArrayBuffer.isView((v as Tensor).data)) {
    const d = (v as Tensor).data;
    if (d.length === 1) {
      if (d instanceof Uint16Array) {
        return new Float32Array(new Uint32Array([(d[0] as number) << 16]).buffer)[0] as number;
      }
      return Number(d[0]);
    }
  }
  throw new TypeError(
    `gradLoss must be a number or a one-element float tensor (host or GpuTensor), got ${describe(v)}`,
  );
}

// The float32 copy of each float32 expertBias array the forward has seen, with its bits: a call whose bias holds
// the same bits as the last copy shares that copy (plans only read it), since a new array costs more than the
// comparison (a 16-token decode call with a 256-expert bias: 1.06x, same-process A/B); changed bits get a new copy.
const biasCopies = new WeakMap<Float32Array, { copy: Float32Array; bits: Uint32Array }>();

/** A float32 copy of an expertBias tensor's values, never written once made (it may serve several plans). */
function biasCopy(t: FloatTensor): Float32Array {
  if (t.dtype !== "float32") return toFloat32(t);
  const d = t.data as Float32Array;
  const bits = new Uint32Array(d.buffer, d.byteOffset, d.length);
  const seen = biasCopies.get(d);
  if (seen !== undefined && seen.bits.length === bits.length) {
    let same = true;
    for (let i = 0; i < bits.length; i++) {
      if (bits[i] !== seen.bits[i]) {
        same = false;
        break;
      }
    }
    if (same) return seen.copy;
  }
  const copy = d.slice();
  biasCopies.set(d, { copy, bits: new Uint32Array(copy.buffer) });
  return copy;
}

/** Widens a float or integer tensor to a fresh Float32Array (bfloat16 by bits, int64 through Number). */
export function toFloat32(t: Tensor<FloatDType | TokensPerExpertDType>): Float32Array {
  const d = t.data;
  if (t.dtype === "bfloat16") {
    const out = new Float32Array(d.length);
    new Uint32Array(out.buffer).set(d as Uint16Array);
    const bits = new Uint32Array(out.buffer);
    for (let i = 0; i < bits.length; i++) bits[i] = (bits[i] as number) << 16;
    return out;
  }
  if (t.dtype === "int64") return Float32Array.from(d as BigInt64Array, (v) => Number(v));
  return Float32Array.from(d as Float32Array);
}
