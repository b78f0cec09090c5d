// The Homeskillet request classifier in JavaScript: a thin host for classifier.wasm (the same
// binary the Python flow runs through wasmtime), so probabilities are bit-identical everywhere.
//
//   import { loadClassifier } from "./classifier.mjs";
//   const classifier = await loadClassifier();
//   classifier.classify("Translate 'good night' into German.");
//   // → { label: "translate", probabilities: { multiple_choice: …, factual_qa: …, … } }
//
// Input: a string (encoded as UTF-8; lone surrogates become U+FFFD) or bytes (Uint8Array /
// ArrayBuffer, passed as they are, invalid UTF-8 included). Only the first MAX_INPUT bytes count.

export const MAX_INPUT = 65536;

async function wasmModule(source) {
  if (source instanceof WebAssembly.Module) return source;
  if (source instanceof ArrayBuffer || ArrayBuffer.isView(source)) return WebAssembly.compile(source);
  const url = source instanceof URL || typeof source === "string" ? new URL(source, import.meta.url)
    : new URL("./classifier.wasm", import.meta.url);
  if (url.protocol === "file:") {
    const { readFile } = await import("node:fs/promises"); // Node, Deno, Bun
    return WebAssembly.compile(await readFile(url));
  }
  const response = await fetch(url);
  return WebAssembly.compile(await response.arrayBuffer());
}

/** Load the classifier. `source`: a WebAssembly.Module (Cloudflare Workers: `import wasm from
 * "./classifier.wasm"`), the .wasm bytes, or its URL; default: classifier.wasm beside this file. */
export async function loadClassifier(source) {
  const instance = await WebAssembly.instantiate(await wasmModule(source), {});
  const e = instance.exports;
  if (e.max_input() !== MAX_INPUT) throw new Error("classifier.wasm does not match classifier.mjs");
  const labels = new TextDecoder()
    .decode(new Uint8Array(e.memory.buffer, e.labels_ptr(), e.labels_len()))
    .split("\n");
  const encoder = new TextEncoder();

  /** [index of the most probable label, Float32Array of probabilities in label order]. */
  function raw(text) {
    let bytes;
    if (typeof text === "string") {
      // every UTF-16 unit gives >= 1 byte; +1 keeps a cut surrogate pair beyond the first MAX_INPUT bytes
      bytes = encoder.encode(text.length > MAX_INPUT ? text.slice(0, MAX_INPUT + 1) : text);
    } else if (text instanceof ArrayBuffer) {
      bytes = new Uint8Array(text);
    } else if (ArrayBuffer.isView(text)) {
      bytes = new Uint8Array(text.buffer, text.byteOffset, text.byteLength);
    } else {
      throw new TypeError("classify() takes a string or bytes");
    }
    const n = Math.min(bytes.length, MAX_INPUT);
    new Uint8Array(e.memory.buffer, e.input_ptr(), n).set(bytes.subarray(0, n));
    const best = e.classify(n);
    return [best, new Float32Array(e.memory.buffer, e.probs_ptr(), labels.length).slice()];
  }

  return {
    labels,
    raw,
    classify(text) {
      const [best, p] = raw(text);
      const probabilities = {};
      labels.forEach((label, k) => { probabilities[label] = p[k]; });
      return { label: labels[best], probabilities };
    },
  };
}
