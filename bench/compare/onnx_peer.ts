/**
 * The router as an ONNX graph (onnx_model.ts) run by onnxruntime-node, the
 * native C++ ONNX Runtime, on its CPU execution provider.
 *
 * @module
 */
import * as ort from "onnxruntime-node";
import type { Case } from "./cases.ts";
import { buildRouterModel, NAMES } from "./onnx_model.ts";
import type { PeerOutput } from "./validate.ts";

/** onnxruntime-node's version. */
export function ortVersion(): string {
  return `onnxruntime-node ${ort.env.versions.node ?? "?"}`;
}

/** An ONNX Runtime session of one case's graph, with a fixed number of intra-op threads. */
export class OrtRouter {
  readonly #c: Case;
  readonly #session: ort.InferenceSession;

  private constructor(c: Case, session: ort.InferenceSession) {
    this.#c = c;
    this.#session = session;
  }

  /** Builds the graph of `c` and opens a session on `threads` intra-op threads. */
  static async create(c: Case, threads: number): Promise<OrtRouter> {
    const model = buildRouterModel({ experts: c.experts, options: c.options });
    const session = await ort.InferenceSession.create(model, {
      executionProviders: ["cpu"],
      graphOptimizationLevel: "all",
      executionMode: "sequential",
      intraOpNumThreads: threads,
      interOpNumThreads: 1,
      // no pool thread left spinning after a run: on 2 cores it would take a core
      // from whatever is timed next (onnxruntime's one-thread session included)
      extra: { session: { intra_op: { allow_spinning: "0" } } },
    });
    return new OrtRouter(c, session);
  }

  /** Forward: probs [T, E] and the chosen experts [T, K] (int64). */
  async forward(logits: Float32Array): Promise<PeerOutput> {
    const input = new ort.Tensor("float32", logits, [this.#c.tokens, this.#c.experts]);
    const out = await this.#session.run({ [NAMES.logits]: input });
    const probs = out[NAMES.probs];
    const indices = out[NAMES.indices];
    if (!probs || !indices) {
      throw new Error("the ONNX session did not return probs and indices");
    }
    return {
      probs: probs.data as Float32Array,
      indices: indices.data as BigInt64Array,
    };
  }

  /** Closes the session. */
  async dispose(): Promise<void> {
    await this.#session.release();
  }
}
