/**
 * examples/edge_router.ts as an edge function runs it: a fresh Deno process
 * with no read permission and the network limited to loopback (so start-up
 * can read no file and fetch nothing), on a free port. Golden batches go in
 * as JSON and as binary; bad requests must get a 400 that says what is wrong.
 *
 * @module
 */

import assert from "node:assert";
import { assertArrayEqual, assertClose } from "./_assert.ts";
import { loadCase, type TopkCase, topkOptionsOf } from "./_golden.ts";
import { readmeExample } from "./_readme.ts";
import { sortedRows } from "./reference.ts";

const EXAMPLE = new URL("../examples/edge_router.ts", import.meta.url);

/** Starts the example on a free loopback port; resolves once it listens, with its URL and start time. */
async function startServer(): Promise<
  { url: string; started: number; child: Deno.ChildProcess; stop(): Promise<void> }
> {
  const started = performance.now();
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--no-prompt", "--allow-net=127.0.0.1", EXAMPLE.pathname, "--port=0", "--hostname=127.0.0.1"],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  const timeout = setTimeout(() => child.kill(), 30_000);
  try {
    for (;;) {
      const m = /listening on (http:\/\/127\.0\.0\.1:\d+\/)/.exec(text);
      if (m !== null) {
        return {
          url: m[1]!,
          started,
          child,
          async stop() {
            child.kill("SIGTERM");
            await reader.cancel();
            await child.stderr.cancel();
            await child.status;
          },
        };
      }
      const { value, done } = await reader.read();
      if (done) {
        const err = await new Response(child.stderr).text();
        throw new Error(`the edge example exited before listening:\n${text}${err}`);
      }
      text += value;
    }
  } finally {
    clearTimeout(timeout);
  }
}

/** The query string of a golden case's options. */
function queryOf(c: TopkCase): string {
  const q = new URLSearchParams({ topk: String(c.topk), scoreFunction: c.score_function });
  if (c.use_pre_softmax) q.set("usePreSoftmax", "true");
  if (c.num_groups !== null) q.set("numGroups", String(c.num_groups));
  if (c.group_topk !== null) q.set("groupTopk", String(c.group_topk));
  if (c.scaling_factor !== null) q.set("scalingFactor", String(c.scaling_factor));
  return q.toString();
}

/** A golden case as a binary request body: uint32 T, uint32 E, logits, optional bias. */
function binaryBody(c: TopkCase): Uint8Array<ArrayBuffer> {
  const T = c.num_tokens, E = c.num_experts;
  const bias = c.inputs.expert_bias?.data as Float32Array | undefined;
  const body = new ArrayBuffer(8 + 4 * (T * E + (bias ? E : 0)));
  new Uint32Array(body, 0, 2).set([T, E]);
  new Float32Array(body, 8, T * E).set(c.inputs.logits.data as Float32Array);
  if (bias) new Float32Array(body, 8 + 4 * T * E, E).set(bias);
  return new Uint8Array(body);
}

function checkAnswer(c: TopkCase, probs: Float32Array, indices: Int32Array, label: string): void {
  assertClose(probs, c.expected.probs.data as Float32Array, { atol: c.atol, rtol: c.rtol }, `${label} probs`);
  const sets = sortedRows(indices, c.num_tokens, c.topk);
  assertArrayEqual(sets, c.expected.topk_set.data, `${label} indices`);
}

Deno.test({
  name: "the edge example starts without file or network access and routes JSON and binary batches",
  async fn(t) {
    // bias, groups and scaling; softmax before selection with groups
    const grouped = loadCase("topk_sigmoid_T129_E32_K8_G8x4_bias_s2.5") as TopkCase;
    const preSoftmax = loadCase("topk_softmax_pre_T129_E32_K8_G8x4") as TopkCase;
    assert.ok(topkOptionsOf(grouped).expertBias, "the grouped case has a bias");

    const server = await startServer();
    const post = (query: string, body: BodyInit, type = "application/octet-stream") =>
      fetch(`${server.url}?${query}`, { method: "POST", headers: { "content-type": type }, body });
    try {
      await t.step("the first request is answered: a binary batch with bias and groups", async () => {
        const res = await post(queryOf(grouped), binaryBody(grouped));
        const answer = await res.arrayBuffer();
        const coldStart = performance.now() - server.started;
        assert.strictEqual(res.status, 200, new TextDecoder().decode(answer));
        assert.strictEqual(res.headers.get("content-type"), "application/octet-stream");
        const T = grouped.num_tokens, E = grouped.num_experts, K = grouped.topk;
        assert.deepStrictEqual([...new Uint32Array(answer, 0, 3)], [T, E, K]);
        assert.strictEqual(answer.byteLength, 12 + 4 * (T * E + T * K));
        checkAnswer(
          grouped,
          new Float32Array(answer, 12, T * E),
          new Int32Array(answer, 12 + 4 * T * E, T * K),
          "binary",
        );
        console.log(`edge example cold start (process start to first answer): ${coldStart.toFixed(0)} ms`);
      });

      await t.step("a JSON batch with options in the query string", async () => {
        const E = preSoftmax.num_experts;
        const logits = preSoftmax.inputs.logits.data as Float32Array;
        const rows = Array.from({ length: preSoftmax.num_tokens }, (_, r) => [...logits.subarray(r * E, (r + 1) * E)]);
        const res = await post(queryOf(preSoftmax), JSON.stringify({ logits: rows }), "application/json");
        const answer = await res.json();
        assert.strictEqual(res.status, 200, JSON.stringify(answer));
        assert.deepStrictEqual([answer.tokens, answer.experts, answer.topk], [
          preSoftmax.num_tokens,
          E,
          preSoftmax.topk,
        ]);
        checkAnswer(preSoftmax, Float32Array.from(answer.probs.flat()), Int32Array.from(answer.indices.flat()), "json");
      });

      await t.step("bad requests get a 400 that names the problem", async () => {
        const json = (logits: unknown, extra: Record<string, unknown> = {}) => JSON.stringify({ logits, ...extra });
        const cases: [string, BodyInit, string, RegExp][] = [
          ["scoreFunction=sigmoid", json([[1, 2]]), "application/json", /topk is required/],
          ["topk=3&scoreFunction=sigmoid", json([[1, 2]]), "application/json", /topk must be .*got 3/],
          ["topk=two&scoreFunction=sigmoid", json([[1, 2]]), "application/json", /topk must be a number, got "two"/],
          ["topk=1&scoreFunction=relu", json([[1, 2]]), "application/json", /scoreFunction must be .*"relu"/],
          ["topk=1&scoreFunction=sigmoid&k=1", json([[1, 2]]), "application/json", /unknown query parameter "k"/],
          ["topk=1&scoreFunction=softmax", json([[1, 2]], { expertBias: [0, 0] }), "application/json", /expertBias/],
          ["topk=1&scoreFunction=sigmoid&usePreSoftmax=yes", json([[1, 2]]), "application/json", /true or false/],
          [
            "topk=2&scoreFunction=sigmoid&numGroups=3&groupTopk=1",
            json([[1, 2, 3, 4]]),
            "application/json",
            /numGroups|group/,
          ],
          ["topk=1&scoreFunction=sigmoid", "{not json", "application/json", /not valid JSON/],
          ["topk=1&scoreFunction=sigmoid", json([[1, 2], [3]]), "application/json", /equal lengths/],
          ["topk=1&scoreFunction=sigmoid", json([[1, "x"]]), "application/json", /logits\[0\]\[1\] must be a number/],
          ["topk=1&scoreFunction=sigmoid", json([]), "application/json", /non-empty array of rows/],
          [
            "topk=1&scoreFunction=sigmoid",
            new Uint8Array([2, 0, 0, 0, 4, 0, 0, 0, 1]),
            "application/octet-stream",
            /must be 40 bytes \(or 56 with an expert bias\), got 9/,
          ],
          [
            "topk=1&scoreFunction=sigmoid",
            new Uint8Array(4),
            "application/octet-stream",
            /must start with uint32 tokens/,
          ],
        ];
        for (const [query, body, type, message] of cases) {
          const res = await post(query, body, type);
          const answer = await res.json();
          assert.strictEqual(res.status, 400, `${query}: status ${res.status} ${JSON.stringify(answer)}`);
          assert.match(answer.error, message, query);
        }
        const wrongType = await post("topk=1&scoreFunction=sigmoid", "1,2", "text/csv");
        assert.strictEqual(wrongType.status, 415);
        assert.match((await wrongType.json()).error, /content-type must be/);
        const wrongMethod = await fetch(server.url, { method: "PUT", body: "x" });
        assert.strictEqual(wrongMethod.status, 405);
        await wrongMethod.body?.cancel();
        const usage = await fetch(server.url);
        assert.match(await usage.text(), /POST router logits/);
      });

      await t.step("the README's edge client example works against the server", async () => {
        const code = readmeExample("edge-client").replaceAll("http://localhost:8000/", server.url);
        const file = await Deno.makeTempFile({ suffix: ".ts" });
        try {
          await Deno.writeTextFile(file, code);
          const { code: status, stderr } = await new Deno.Command(Deno.execPath(), {
            args: ["run", "--no-prompt", "--allow-net=127.0.0.1", file],
            stdout: "null",
            stderr: "piped",
          }).output();
          assert.strictEqual(status, 0, new TextDecoder().decode(stderr));
        } finally {
          await Deno.remove(file);
        }
      });
    } finally {
      await server.stop();
    }

    await t.step("the example type-checks", async () => {
      const { code, stderr } = await new Deno.Command(Deno.execPath(), {
        args: ["check", EXAMPLE.pathname],
        stdout: "null",
        stderr: "piped",
      }).output();
      assert.strictEqual(code, 0, new TextDecoder().decode(stderr));
    });
  },
});
