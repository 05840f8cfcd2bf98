/**
 * Public types of moe-router: tensors, options and results.
 *
 * @module
 */

/** Floating dtypes accepted for logits, probs and gradients. */
export type FloatDType = "float32" | "float16" | "bfloat16";
/** Integer dtypes of the dense top-k index output. */
export type IndexDType = "int16" | "int32" | "int64";
/** Every dtype a tensor of this module can carry. */
export type DType = FloatDType | IndexDType | "uint8";

/** The typed array that holds each dtype (bfloat16 keeps the upper 16 bits of a float32). */
export interface DataOf {
  /** IEEE binary32. */
  float32: Float32Array;
  /** IEEE binary16 (needs a runtime with Float16Array). */
  float16: Float16Array;
  /** The upper 16 bits of a float32. */
  bfloat16: Uint16Array;
  /** 16-bit expert indices. */
  int16: Int16Array;
  /** 32-bit integers: expert indices, token counts. */
  int32: Int32Array;
  /** 64-bit integers: expert indices, token counts. */
  int64: BigInt64Array;
  /** Bytes: routing maps. */
  uint8: Uint8Array;
}

/** Any typed array a tensor may hold. */
export type TensorData = DataOf[DType];
/** A typed array of dense expert indices. */
export type IndexArray = Int16Array | Int32Array | BigInt64Array;

/**
 * A host tensor: a flat typed array in row-major order, its full shape and
 * its dtype. Object literals are accepted wherever a tensor is expected.
 */
export interface Tensor<D extends DType = DType> {
  /** The elements, row-major; its length is the product of `shape`. */
  data: DataOf[D];
  /** The full shape; the last axis is the expert axis where there is one. */
  shape: readonly number[];
  /** The element type, matching the typed array of `data`. */
  dtype: D;
}

/** A floating tensor (logits, probs, gradients). */
export type FloatTensor = Tensor<FloatDType>;

/**
 * A GPU-resident tensor for the WebGPU backend: the data lives in a
 * `GPUBuffer` of the router's device, row-major from offset 0, in the layout
 * of the host dtype (float16 / bfloat16 as 16-bit words, int64 as two
 * little-endian 32-bit words). Input buffers need `GPUBufferUsage.STORAGE`;
 * buffers the router returns have `STORAGE | COPY_SRC | COPY_DST` and belong
 * to the caller.
 */
export interface GpuTensor<D extends DType = DType> {
  /** The buffer holding the elements, row-major from offset 0. */
  buffer: GPUBuffer;
  /** The full shape; the last axis is the expert axis where there is one. */
  shape: readonly number[];
  /** The element type, in the layout of the host dtype. */
  dtype: D;
}

/** How the score of each expert is computed from its logit. */
export type ScoreFunction = "softmax" | "sigmoid" | "sqrtsoftplus";
/** Layout of the routing map: one byte per expert, or one bit (LSB first). */
export type RoutingMapFormat = "bytemap" | "bitmap_u8";
/** Which backend runs the kernels. */
export type BackendName = "wasm" | "webgpu";
/** A backend request: a name, or `"auto"` to let the module pick. */
export type BackendChoice = BackendName | "auto";

/** Options of {@linkcode fusedTopkWithScoreFunction}. */
export interface TopkOptions {
  /** Number of experts chosen per token, in [1, E]. */
  topk: number;
  /** Score function applied to the logits. */
  scoreFunction: ScoreFunction;
  /** softmax only: softmax over all experts before selection (default false: after, over the K chosen). */
  usePreSoftmax?: boolean;
  /** Number of contiguous expert groups for the group limit. */
  numGroups?: number;
  /** Number of groups kept per token (group limit on when > 0). */
  groupTopk?: number;
  /** Factor applied to the chosen values (default 1). */
  scalingFactor?: number;
  /** Per-expert bias added for selection only, shape [E] (sigmoid and sqrtsoftplus only). */
  expertBias?: FloatTensor;
  /** Routing map layout when no dense index output is asked for (default "bytemap"). */
  routingMapFormat?: RoutingMapFormat;
  /** Ask for dense indices [..., K] of this dtype instead of a routing map. */
  indexDtype?: IndexDType;
  /** Caller-owned buffer for the dense indices (length T*K); written in place and returned. Implies dense output. */
  indicesOut?: IndexArray;
  /** Selection switches from naive to radix top-k when topk >= this (default 16, or MOE_ROUTER_RADIX_TOPK_THRESHOLD). */
  radixTopkThreshold?: number;
  /** Throw a RangeError naming the first token and expert whose logit is NaN or infinite (default false). */
  checkFinite?: boolean;
  /** Caller buffer for probs (logits dtype, T*E): written in place and returned, no allocation. */
  probsOut?: FloatTensor["data"];
  /** Caller buffer for the intermediate (T*E): written in place and returned. */
  intermediateOut?: Float32Array;
  /** Caller buffer for the routing map (T*E bytes, or T*ceil(E/8) for bitmap_u8): written in place and returned. */
  routingMapOut?: Uint8Array;
  /**
   * Keep what the backward needs, the intermediate and a saved state (default
   * true). Pass `false` for routing alone, as at inference: see
   * {@linkcode TopkInferenceOptions}.
   */
  saveForBackward?: true;
}

/**
 * Options of {@linkcode fusedTopkWithScoreFunction} for routing alone
 * (inference, or any call whose backward never runs): `saveForBackward:
 * false` keeps nothing for a backward, so the result has no `intermediate`
 * and no `saved` state ({@linkcode TopkInferenceResult}), and the forward
 * skips their work (the WebAssembly backend: the copy of the logits or the
 * intermediate rows the state keeps, and the state's copies of the routing
 * output). probs and the routing output are bit for bit those of a forward
 * that saves. `intermediateOut` does not apply.
 */
export interface TopkInferenceOptions extends Omit<TopkOptions, "saveForBackward" | "intermediateOut"> {
  /** false: keep nothing for a backward. */
  saveForBackward: false;
}

/** Options of {@linkcode fusedComputeScoreForMoEAuxLoss}. */
export interface AuxScoresOptions {
  /** Number of experts marked in the routing map per token, in [1, E]. */
  topk: number;
  /** Score function applied to the logits. */
  scoreFunction: ScoreFunction;
  /** Routing map layout (default "bytemap"). */
  routingMapFormat?: RoutingMapFormat;
  /** Selection switches from naive to radix top-k when topk >= this. */
  radixTopkThreshold?: number;
  /** Throw a RangeError naming the first token and expert whose logit is NaN or infinite (default false). */
  checkFinite?: boolean;
}

/** Options of {@linkcode fusedMoEAuxLoss}. */
export interface AuxLossOptions {
  /** Number of tokens the loss is normalised by. */
  totalNumTokens: number;
  /** Number of experts. */
  numExperts: number;
  /** Experts per token. */
  topk: number;
  /** Loss coefficient. */
  coeff: number;
}

/**
 * State saved by a forward call for its backward call. Opaque: pass it back
 * to the backward of the same router; `release()` frees it early (a released
 * state is refused by backward).
 */
export interface SavedState {
  /** The backend that produced the state. */
  readonly backend: BackendName;
  /** True once released. */
  readonly released: boolean;
  /**
   * True when the forward ran on GPU-resident inputs (logits, probs) and gave
   * GpuTensors: what the state keeps is on the GPU, and the aux-loss backward
   * returns a GpuTensor (see {@linkcode GpuSavedState}).
   */
  readonly gpuResident?: boolean;
  /**
   * Frees what the state holds; idempotent. On the WebAssembly backend the
   * state's buffers then serve later forwards (a state that is only dropped
   * is garbage-collected with them): releasing after the last backward saves
   * a forward the cost of new arrays. Read the forward's `intermediate`
   * first: it is copied out of the state on demand.
   */
  release(): void;
}

/**
 * The saved state of a forward call on GPU-resident inputs (its outputs are
 * GpuTensors). What it keeps stays on the GPU; for the aux loss, whose
 * gradient is a scalar, it also decides where the backward's result goes:
 * `gradProbs` is a GpuTensor.
 */
export interface GpuSavedState extends SavedState {
  /** Always true for a state of a GPU-resident forward. */
  readonly gpuResident: true;
}

/** Result of {@linkcode fusedTopkWithScoreFunction}. */
export interface TopkResult {
  /** [..., E], logits dtype: scaled values at the chosen experts, 0 elsewhere. */
  probs: FloatTensor;
  /** Routing map ([..., E] bytemap or [..., ceil(E/8)] bitmap_u8), when no dense output was asked for. */
  routingMap?: Tensor<"uint8">;
  /** Dense indices [..., K] (descending selection score, ties by lower index), when asked for. */
  indices?: Tensor<IndexDType>;
  /**
   * [..., E] float32, saved for backward (see SPEC section 2.7). Without
   * `intermediateOut`, `data` is copied out of the saved state on first
   * read: read it before `saved.release()`.
   */
  intermediate: Tensor<"float32">;
  /** State for {@linkcode fusedTopkWithScoreFunctionBackward}. */
  saved: SavedState;
}

/** Result of {@linkcode fusedTopkWithScoreFunction} with `saveForBackward: false`: probs and the routing output. */
export type TopkInferenceResult = Omit<TopkResult, "intermediate" | "saved">;

/**
 * Options of {@linkcode fusedTopkWithScoreFunction} on GPU-resident logits:
 * those of {@linkcode TopkOptions} but the caller output buffers (the outputs
 * are new GpuTensors) and `checkFinite`; the bias may be GPU-resident too.
 */
export type GpuTopkOptions =
  & Omit<TopkOptions, "expertBias" | "indicesOut" | "probsOut" | "intermediateOut" | "routingMapOut" | "checkFinite">
  & {
    /** Per-expert bias, shape [E], on the host or on the router's device. */
    expertBias?: FloatTensor | GpuTensor<FloatDType>;
  };

/** {@linkcode GpuTopkOptions} for routing alone: see {@linkcode TopkInferenceOptions}. */
export type GpuTopkInferenceOptions = Omit<GpuTopkOptions, "saveForBackward"> & {
  /** false: keep nothing for a backward. */
  saveForBackward: false;
};

/**
 * Result of {@linkcode fusedTopkWithScoreFunction} on GPU-resident logits
 * with `saveForBackward: false`: probs and the routing output, new
 * GpuTensors the caller owns.
 */
export type GpuTopkInferenceResult = Omit<GpuTopkResult, "intermediate" | "saved">;

/**
 * Result of {@linkcode fusedTopkWithScoreFunction} on GPU-resident logits:
 * the same outputs as {@linkcode TopkResult}, as new GpuTensors the caller
 * owns (usage STORAGE | COPY_SRC | COPY_DST). The saved state keeps
 * `intermediate` and the routing output on the GPU: destroy or overwrite
 * them only after the backward call (or `saved.release()`).
 */
export interface GpuTopkResult {
  /** [..., E], logits dtype. */
  probs: GpuTensor<FloatDType>;
  /** Routing map, when no dense output was asked for. */
  routingMap?: GpuTensor<"uint8">;
  /** Dense indices [..., K], when asked for (int64 as two little-endian 32-bit words). */
  indices?: GpuTensor<IndexDType>;
  /** [..., E] float32, saved for backward. */
  intermediate: GpuTensor<"float32">;
  /** State for {@linkcode fusedTopkWithScoreFunctionBackward}. */
  saved: GpuSavedState;
}

/** Result of {@linkcode fusedComputeScoreForMoEAuxLoss}. */
export interface AuxScoresResult {
  /** [..., E] float32 normalised scores. */
  scores: Tensor<"float32">;
  /** Top-K routing map of the scores. */
  routingMap: Tensor<"uint8">;
  /** [..., E] float32, saved for backward; `data` is copied out of the saved state on first read (before `saved.release()`). */
  intermediate: Tensor<"float32">;
  /** State for {@linkcode fusedComputeScoreForMoEAuxLossBackward}. */
  saved: SavedState;
}

/** Result of {@linkcode fusedMoEAuxLoss}. */
export interface AuxLossResult {
  /** The loss, a 0-d tensor (shape []) in the probs dtype. */
  loss: FloatTensor;
  /** State for {@linkcode fusedMoEAuxLossBackward}. */
  saved: SavedState;
}

/**
 * Options of {@linkcode fusedComputeScoreForMoEAuxLoss} on GPU-resident
 * logits: those of {@linkcode AuxScoresOptions} but `checkFinite` (the data
 * is not read on the host).
 */
export type GpuAuxScoresOptions = Omit<AuxScoresOptions, "checkFinite">;

/**
 * Result of {@linkcode fusedComputeScoreForMoEAuxLoss} on GPU-resident
 * logits: the outputs of {@linkcode AuxScoresResult} as new GpuTensors the
 * caller owns (usage STORAGE | COPY_SRC | COPY_DST). The saved state keeps
 * `intermediate` on the GPU: destroy or overwrite it only after the backward
 * call (or `saved.release()`).
 */
export interface GpuAuxScoresResult {
  /** [..., E] float32 normalised scores. */
  scores: GpuTensor<"float32">;
  /** Top-K routing map of the scores ([..., E] bytemap or [..., ceil(E/8)] bitmap_u8). */
  routingMap: GpuTensor<"uint8">;
  /** [..., E] float32, saved for backward. */
  intermediate: GpuTensor<"float32">;
  /** State for {@linkcode fusedComputeScoreForMoEAuxLossBackward}. */
  saved: GpuSavedState;
}

/**
 * Result of {@linkcode fusedMoEAuxLoss} on GPU-resident probs: the loss as a
 * new 0-d GpuTensor the caller owns (one element of the probs dtype in a
 * 4-byte buffer, usage STORAGE | COPY_SRC | COPY_DST). A GPU-resident
 * tokensPerExpert is read in place by the backward too: keep it unchanged
 * until the backward call.
 */
export interface GpuAuxLossResult {
  /** The loss, a 0-d GpuTensor (shape []) in the probs dtype. */
  loss: GpuTensor<FloatDType>;
  /** State for {@linkcode fusedMoEAuxLossBackward}: its gradProbs is a GpuTensor. */
  saved: GpuSavedState;
}

/** Dtypes accepted for the tokens-per-expert counts of the aux loss. */
export type TokensPerExpertDType = "int32" | "int64" | "float32" | "bfloat16";
