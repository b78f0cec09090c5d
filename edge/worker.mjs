// An edge worker (the fetch-handler shape of Cloudflare Workers and Deno Deploy) that classifies a
// request before it reaches Homeskillet:
//
//   POST /classify   body: JSON {"text": "..."} (or "prompt"), or plain text
//                    → 200 {"label": ..., "probabilities": {...}}, answered here
//   anything else    the request's prompt is classified (JSON "prompt" / "text" / "input", the
//                    last of OpenAI-style "messages", else the body as text) and the request is
//                    forwarded, path and query kept, to the endpoint configured for its task type
//                    (or "default"), with the header x-homeskillet-task-type: <label>.
//
// Endpoints: HOMESKILLET_ENDPOINTS, a JSON object {"code": "https://gpu-pool.example", ...,
// "default": "https://homeskillet.example"}, from the worker's env (Cloudflare), Deno.env or
// process.env, or createWorker({ endpoints }).

import { loadClassifier } from "./classifier.mjs";

const json = (value, status = 200, headers = {}) =>
  new Response(JSON.stringify(value), { status, headers: { "content-type": "application/json", ...headers } });

function configuredEndpoints(options, env) {
  let value = options.endpoints ?? env?.HOMESKILLET_ENDPOINTS
    ?? globalThis.Deno?.env?.get?.("HOMESKILLET_ENDPOINTS") ?? globalThis.process?.env?.HOMESKILLET_ENDPOINTS;
  if (typeof value === "string") value = JSON.parse(value);
  return value ?? {};
}

/** The prompt inside a request body (parsed JSON or plain text). */
export function promptOf(body, contentType = "") {
  if (contentType.includes("json") || /^\s*[{[]/.test(body)) {
    try {
      const data = JSON.parse(body);
      if (typeof data === "string") return data;
      for (const key of ["text", "prompt", "input"]) if (typeof data?.[key] === "string") return data[key];
      const messages = Array.isArray(data?.messages) ? data.messages : [];
      const last = messages.filter((m) => m?.role !== "system" && m?.role !== "assistant").at(-1);
      if (typeof last?.content === "string") return last.content;
      if (Array.isArray(last?.content)) return last.content.map((p) => p?.text ?? "").join("\n");
    } catch {
      // not JSON after all: classify the text as it is
    }
  }
  return body;
}

/** A worker; options: wasm (a WebAssembly.Module, bytes or URL for loadClassifier), endpoints
 * (task type → base URL), fetch (the function that forwards; default: globalThis.fetch). */
export function createWorker(options = {}) {
  let classifier;
  const classify = async (text) => (await (classifier ??= loadClassifier(options.wasm))).classify(text);

  return {
    async fetch(request, env = {}) {
      const url = new URL(request.url);
      if (url.pathname === "/classify") {
        if (request.method !== "POST") return json({ error: "POST a text to /classify" }, 405, { allow: "POST" });
        const body = await request.text();
        return json(await classify(promptOf(body, request.headers.get("content-type") ?? "")));
      }
      const body = ["GET", "HEAD"].includes(request.method) ? null : await request.arrayBuffer();
      const text = body ? promptOf(new TextDecoder().decode(body), request.headers.get("content-type") ?? "") : "";
      const { label } = await classify(text);
      const endpoints = configuredEndpoints(options, env);
      const base = endpoints[label] ?? endpoints.default;
      if (!base) return json({ error: `no endpoint configured for task type ${label}`, label }, 502);
      const target = new URL(url.pathname.replace(/^\//, "") + url.search, base.endsWith("/") ? base : base + "/");
      const headers = new Headers(request.headers);
      headers.set("x-homeskillet-task-type", label);
      headers.delete("host");
      const forward = options.fetch ?? globalThis.fetch;
      return forward(new Request(target, { method: request.method, headers, body }));
    },
  };
}

export default createWorker();
