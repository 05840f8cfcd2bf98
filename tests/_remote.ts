/**
 * The six router operations of a moe-router that runs elsewhere (a Node
 * process, a browser page, a Deno process importing the npm package), driven
 * through `tests/_remote_runner.js` on the far side. The calls and results
 * travel as JSON with typed arrays in base64, so `checkGoldenCase` checks the
 * far side's results exactly as it checks the local library.
 *
 * @module
 */

import type { BackendName, SavedState } from "../mod.ts";
import { checkGoldenCase, type RouterOps } from "./_golden_suite.ts";
import { type GoldenCase, listCases, loadCase } from "./_golden.ts";

/** Sends one JSON message to the far side and resolves with its JSON answer. */
export type Transport = (message: string) => Promise<string>;

const ERRORS: Record<string, ErrorConstructor> = { TypeError, RangeError, Error };

function toBase64(a: ArrayBufferView): string {
  const bytes = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

function fromBase64(name: string, base64: string): ArrayBufferView {
  const Ctor = (globalThis as unknown as Record<string, new (b: ArrayBuffer) => ArrayBufferView>)[name];
  if (typeof Ctor !== "function") throw new TypeError(`unknown typed array ${name}`);
  const bin = atob(base64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Ctor(bytes.buffer);
}

/** Golden cases of at most this many logits travel to the far side (the full set runs locally in golden_test.ts). */
export const REMOTE_CASE_ELEMENTS = 8192;

/** The golden cases small enough to send to another runtime: every op, dtype and algorithm is among them. */
export function smallGoldenCases(): GoldenCase[] {
  return listCases().map(loadCase).filter((c) => c.num_tokens * c.num_experts <= REMOTE_CASE_ELEMENTS);
}

/**
 * Checks `remote` against the small golden cases; float16 cases are skipped
 * (and named in the result) where the far runtime has no Float16Array.
 */
export async function checkRemoteGolden(remote: RemoteRouter): Promise<{ checked: number; skipped: string[] }> {
  const info = await remote.info();
  if (info.backend !== remote.backend) {
    throw new Error(`the far router runs ${info.backend}, expected ${remote.backend} (${info.reason})`);
  }
  const skipped: string[] = [];
  let checked = 0;
  for (const c of smallGoldenCases()) {
    if (c.dtype === "float16" && !info.float16) {
      skipped.push(c.name);
      continue;
    }
    try {
      await checkGoldenCase(remote, c, remote.backend);
    } catch (e) {
      throw new Error(`golden case ${c.name}: ${(e as Error).message}`, { cause: e });
    }
    checked++;
  }
  if (checked === 0) throw new Error("no golden case was checked");
  return { checked, skipped };
}

/** A saved state that lives on the far side. */
class RemoteSaved implements SavedState {
  #released = false;
  constructor(readonly id: number, readonly backend: BackendName, private readonly remote: RemoteRouter) {}
  get released(): boolean {
    return this.#released;
  }
  release(): void {
    if (this.#released) return;
    this.#released = true;
    this.remote.release(this.id);
  }
}

/** {@linkcode RouterOps} whose calls run on the far end of a {@linkcode Transport}. */
export class RemoteRouter implements RouterOps {
  constructor(private readonly send: Transport, readonly backend: BackendName) {}

  #encode(v: unknown): unknown {
    if (ArrayBuffer.isView(v)) return { $array: v.constructor.name, base64: toBase64(v) };
    if (v instanceof RemoteSaved) return { $saved: v.id };
    if (Array.isArray(v)) return v.map((x) => this.#encode(x));
    if (v === null || typeof v !== "object") return v;
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, this.#encode(x)]));
  }

  #decode(v: unknown): unknown {
    if (Array.isArray(v)) return v.map((x) => this.#decode(x));
    if (v === null || typeof v !== "object") return v;
    const o = v as Record<string, unknown>;
    if (typeof o.$array === "string") return fromBase64(o.$array, o.base64 as string);
    if (typeof o.$saved === "number") return new RemoteSaved(o.$saved, o.backend as BackendName, this);
    return Object.fromEntries(Object.entries(o).map(([k, x]) => [k, this.#decode(x)]));
  }

  /** Runs one method on the far side; its errors are rethrown here with their class and message. */
  async call(method: string, ...args: unknown[]): Promise<unknown> {
    const message = JSON.stringify({ backend: this.backend, method, args: this.#encode(args) });
    const answer = JSON.parse(await this.send(message)) as {
      value?: unknown;
      error?: { name: string; message: string };
    };
    if (answer.error) throw new (ERRORS[answer.error.name] ?? Error)(`remote: ${answer.error.message}`);
    return this.#decode(answer.value);
  }

  /** The far router's backend, the reason it was chosen, and whether its runtime has Float16Array. */
  info(): Promise<{ backend: BackendName; reason: string; float16: boolean }> {
    return this.call("info") as Promise<{ backend: BackendName; reason: string; float16: boolean }>;
  }

  /** Frees a far saved state (the transport keeps messages in order). */
  release(id: number): void {
    this.call("release", id).catch(() => {});
  }

  // A caller's indicesOut stays here: the far side writes its own copy (and checks it got
  // that buffer back); the result is copied into the caller's buffer, which is returned.
  #topk = async (logits: unknown, options: Record<string, unknown>) => {
    const result = await this.call("fusedTopkWithScoreFunction", logits, options) as { indices?: { data: unknown } };
    const out = options.indicesOut as { set(a: unknown): void } | undefined;
    if (out !== undefined && result.indices !== undefined) {
      out.set(result.indices.data);
      result.indices.data = out;
    }
    return result;
  };

  fusedTopkWithScoreFunction: RouterOps["fusedTopkWithScoreFunction"] = (logits, options) =>
    this.#topk(logits, options as unknown as Record<string, unknown>) as ReturnType<
      RouterOps["fusedTopkWithScoreFunction"]
    >;
  fusedTopkWithScoreFunctionBackward: RouterOps["fusedTopkWithScoreFunctionBackward"] = (saved, grad) =>
    this.call("fusedTopkWithScoreFunctionBackward", saved, grad) as ReturnType<
      RouterOps["fusedTopkWithScoreFunctionBackward"]
    >;
  fusedComputeScoreForMoEAuxLoss: RouterOps["fusedComputeScoreForMoEAuxLoss"] = (logits, options) =>
    this.call("fusedComputeScoreForMoEAuxLoss", logits, options) as ReturnType<
      RouterOps["fusedComputeScoreForMoEAuxLoss"]
    >;
  fusedComputeScoreForMoEAuxLossBackward: RouterOps["fusedComputeScoreForMoEAuxLossBackward"] = (saved, grad) =>
    this.call("fusedComputeScoreForMoEAuxLossBackward", saved, grad) as ReturnType<
      RouterOps["fusedComputeScoreForMoEAuxLossBackward"]
    >;
  fusedMoEAuxLoss: RouterOps["fusedMoEAuxLoss"] = (probs, tokensPerExpert, options) =>
    this.call("fusedMoEAuxLoss", probs, tokensPerExpert, options) as ReturnType<RouterOps["fusedMoEAuxLoss"]>;
  fusedMoEAuxLossBackward: RouterOps["fusedMoEAuxLossBackward"] = (saved, gradLoss) =>
    this.call("fusedMoEAuxLossBackward", saved, gradLoss) as ReturnType<RouterOps["fusedMoEAuxLossBackward"]>;
}

/**
 * A transport to a child process that runs `tests/_remote_runner.js` on
 * stdin / stdout, one JSON message per line. `close()` ends its stdin and
 * waits for it to exit.
 */
export function processTransport(child: Deno.ChildProcess): { send: Transport; close(): Promise<Deno.CommandStatus> } {
  const writer = child.stdin.getWriter();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  const encoder = new TextEncoder();
  // Answers can be megabytes: chunks are kept in a list, and only the newest is searched for the newline.
  let chunks: string[] = [];
  const readLine = async (): Promise<string> => {
    for (;;) {
      const last = chunks.at(-1) ?? "";
      const nl = last.indexOf("\n");
      if (nl >= 0) {
        const line = chunks.slice(0, -1).join("") + last.slice(0, nl);
        chunks = nl + 1 < last.length ? [last.slice(nl + 1)] : [];
        return line;
      }
      const { value, done } = await lines.read();
      if (done) throw new Error(`the remote process ended before answering`);
      chunks.push(value);
    }
  };
  let queue: Promise<unknown> = Promise.resolve();
  const send: Transport = (message) => {
    const answer = queue.then(async () => {
      await writer.write(encoder.encode(message + "\n"));
      return readLine();
    });
    queue = answer.catch(() => {});
    return answer;
  };
  return {
    send,
    async close() {
      await queue;
      await writer.close();
      await lines.cancel();
      return child.status;
    },
  };
}

/** The program a child process runs: the runner on stdin / stdout, for Node and Deno alike. */
export const PROCESS_MAIN = `import process from "node:process";
import { createInterface } from "node:readline";
import { createRunner } from "./_remote_runner.js";
import * as mod from "moe-router";

const handle = createRunner(mod);
for await (const line of createInterface({ input: process.stdin })) {
  process.stdout.write((await handle(line)) + "\\n");
}
`;
