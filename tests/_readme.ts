/**
 * The README's copy-paste examples, for the tests that run them where they
 * belong (Node, a browser, an edge server). An example is the fenced block
 * right after a line `<!-- example: NAME -->`; such blocks carry `ignore` so
 * that `deno test --doc` leaves them to those tests.
 *
 * @module
 */

const README = new URL("../README.md", import.meta.url);

/**
 * The code of the README example called `name`.
 *
 * @throws {Error} when the README has no such example
 */
export function readmeExample(name: string): string {
  const text = Deno.readTextFileSync(README);
  const marker = `<!-- example: ${name} -->`;
  const at = text.indexOf(marker);
  if (at < 0) throw new Error(`README.md has no example "${name}" (a line ${marker} before a fenced block)`);
  const m = /^\s*```[^\n]*\n([\s\S]*?)\n```/.exec(text.slice(at + marker.length));
  if (m === null) throw new Error(`README.md example "${name}": no fenced block after the marker`);
  return m[1]!;
}
