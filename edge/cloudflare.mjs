// Cloudflare Workers entry point: Wrangler bundles classifier.wasm as a WebAssembly.Module.
import wasm from "./classifier.wasm";
import { createWorker } from "./worker.mjs";

export default createWorker({ wasm });
