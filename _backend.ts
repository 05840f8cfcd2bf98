// The contract between the router (validation, tensors, saved state) and a
// backend (kernels). Plans are validated; backends never re-check arguments.
import { type AuxLossPlan, type AuxScoresPlan, routeRowBytes, type TopkPlan } from "./_validate.ts";
import type { BackendName, FloatTensor, IndexArray, SavedState, Tensor } from "./_types.ts";

/**
 * An intermediate on the host: the array (the caller's `intermediateOut`,
 * or one the caller owns), or, only when no `intermediateOut` was given, a
 * reader that copies it out of the saved state's own buffer on first use
 * (most callers never read it: it is part of the state the backward uses).
 */
export type HostIntermediate = Float32Array | (() => Float32Array);

/** A reader that copies `kept` (made here, so that the closure holds that array alone). */
export function copier(kept: Float32Array): () => Float32Array {
  return () => kept.slice();
}

/** Flat outputs of a top-k forward; `payload` is what the backward needs. */
export interface TopkForwardOut {
  probs: FloatTensor["data"];
  /** null where the plan saves nothing (plan.save false), like the payload. */
  intermediate: HostIntermediate | null;
  /** uint8 map, or the dense index array (the caller's indicesOut when given). */
  route: Uint8Array | IndexArray;
  payload: unknown;
}

/** Flat outputs of the aux-loss scores forward. */
export interface AuxScoresForwardOut {
  scores: Float32Array;
  intermediate: HostIntermediate;
  route: Uint8Array;
  payload: unknown;
}

/** The host arrays an aux-scores forward fills: scores [T, E] and the routing map [T, row bytes]. */
export function newAuxScoresArrays(plan: AuxScoresPlan): { scores: Float32Array; route: Uint8Array } {
  const { T, E, K, route } = plan;
  return { scores: new Float32Array(T * E), route: new Uint8Array(T * routeRowBytes(route, E, K)) };
}

/** A set of kernels that runs the router ops on host arrays. */
export interface Backend {
  readonly name: BackendName;
  topkForward(plan: TopkPlan, logits: FloatTensor): Promise<TopkForwardOut>;
  /** `out`: a caller buffer the backend may write into directly (the router copies otherwise). */
  topkBackward(
    plan: TopkPlan,
    payload: unknown,
    grad: FloatTensor,
    out?: FloatTensor["data"] | null,
  ): Promise<FloatTensor["data"]>;
  auxScoresForward(plan: AuxScoresPlan, logits: FloatTensor): Promise<AuxScoresForwardOut>;
  auxScoresBackward(plan: AuxScoresPlan, payload: unknown, grad: Tensor<"float32">): Promise<FloatTensor["data"]>;
  auxLossForward(plan: AuxLossPlan, probs: FloatTensor): Promise<FloatTensor["data"]>;
  auxLossBackward(plan: AuxLossPlan, gradLoss: number): Promise<FloatTensor["data"]>;
  /** Takes back what a host payload holds once its saved state is released (optional). */
  recycle?(payload: unknown): void;
  dispose(): void;
}

/** Which forward a saved state came from. */
export type SavedOp = "topk" | "auxScores" | "auxLoss";

const OP_NAMES: Record<SavedOp, string> = {
  topk: "fusedTopkWithScoreFunction",
  auxScores: "fusedComputeScoreForMoEAuxLoss",
  auxLoss: "fusedMoEAuxLoss",
};

/** The saved state of a forward call: plan, backend payload, owner. */
export class Saved<P> implements SavedState {
  #payload: unknown;
  #released = false;
  #onRelease: ((payload: unknown) => void) | undefined;

  /**
   * `gpuResident`: the forward took GPU-resident inputs and gave GpuTensors
   * (its payload is on the GPU; the aux-loss backward then gives a GpuTensor).
   */
  constructor(
    readonly backend: Backend["name"],
    readonly op: SavedOp,
    readonly plan: P,
    payload: unknown,
    readonly gpuResident: boolean = false,
    onRelease?: (payload: unknown) => void,
  ) {
    // Only release() hands the payload back: a state the garbage collector
    // takes just frees its arrays (a FinalizationRegistry would hold every
    // payload until its cleanup task runs, which a loop of awaited calls
    // never yields to, so memory grew without bound).
    this.#payload = payload;
    this.#onRelease = onRelease;
  }

  get released(): boolean {
    return this.#released;
  }

  release(): void {
    if (this.#released) return;
    this.#released = true;
    const p = this.#payload;
    this.#payload = undefined;
    this.#onRelease?.(p);
  }

  /** The payload, after checking the state fits the backward asking for it. */
  static take<P>(
    saved: unknown,
    op: SavedOp,
    backend: Backend["name"],
  ): { plan: P; payload: unknown; gpuResident: boolean } {
    if (!(saved instanceof Saved)) {
      throw new TypeError(`saved must be the saved state returned by ${OP_NAMES[op]}, got ${describeSaved(saved)}`);
    }
    if (saved.op !== op) {
      throw new TypeError(`saved must come from ${OP_NAMES[op]}, got a state from ${OP_NAMES[saved.op as SavedOp]}`);
    }
    if (saved.backend !== backend) {
      throw new TypeError(`saved comes from the ${saved.backend} backend, this router runs ${backend}`);
    }
    if (saved.#released) throw new TypeError(`saved was released and cannot be used for backward`);
    return { plan: saved.plan as P, payload: saved.#payload, gpuResident: saved.gpuResident };
  }
}

function describeSaved(v: unknown): string {
  if (v === null || v === undefined) return String(v);
  return typeof v === "object" ? (v.constructor?.name ?? "object") : typeof v;
}
