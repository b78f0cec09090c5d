// An edge worker (the fetch-handler shape of Cloudflare Workers and Deno Deploy) that classifies a
// request before it reaches Homeskillet, and forwards it only where Homeskillet serves it:
//
//   POST /classify   body: JSON {"text": "..."} (or "prompt"), or plain text
//                    → 200 {"label": ..., "probabilities": {...}}, answered here
//   a path of ROUTES with one of its methods
//                    the request's prompt is classified (JSON "prompt" / "text" / "input", the
//                    last of OpenAI-style "messages", else the body as text) and the request is
//                    forwarded to the endpoint configured for its task type (or "default"): the
//                    endpoint's base URL + the path, as strings, without the query; only the
//                    headers of FORWARDED_HEADERS, plus x-homeskillet-task-type: <label>; with
//                    redirect: "manual", so an upstream 3xx comes back to the client as it is
//   anything else    404 (a path not served) or 405 with `allow` (a method not served), answered
//                    here: the worker is no proxy to anywhere else
//
// Bodies (here and /classify): at most maxBodyBytes (default 1 MiB), by Content-Length first and
// while a streamed body is read; over it, 413.
//
// Endpoints: HOMESKILLET_ENDPOINTS, a JSON object {"code": "https://gpu-pool.example", ...,
// "default": "https://homeskillet.example"}, from the worker's env (Cloudflare), Deno.env or
// process.env, or createWorker({ endpoints }). Each base URL is https (http only for a loopback
// host: tests, development), without credentials, query or fragment; anything else is an error
// when the worker is created (createWorker) or on its first request (env).
// The body cap: createWorker({ maxBodyBytes }) or HOMESKILLET_EDGE_MAX_BODY_BYTES, from the same places.

import { loadClassifier } from "./classifier.mjs";

/** The paths the worker forwards, and their methods (/mcp: MCP's Streamable HTTP transport). */
export const ROUTES = new Map([
  ["/v1/chat/completions", ["POST"]],
  ["/v1/completions", ["POST"]],
  ["/v1/models", ["GET"]],
  ["/mcp", ["POST", "GET", "DELETE"]],
]);

/** The client headers the upstream gets (never cookie, host, x-forwarded-*, cf-*, ...). */
export const FORWARDED_HEADERS = [
  "accept", "authorization", "content-type", "last-event-id", "mcp-protocol-version", "mcp-session-id", "user-agent",
];

export const MAX_BODY_BYTES = 1024 * 1024;

const json = (value, status = 200, headers = {}) =>
  new Response(JSON.stringify(value), { status, headers: { "content-type": "application/json", ...headers } });

const LOOPBACK = /^(localhost|127(\.\d{1,3}){3}|\[::1\])$/;

/** A base URL checked and without its trailing slash; `name` says which one in the error (the URL
 * itself is never in it: it may hold a credential). */
export function endpointBase(value, name = "endpoint") {
  let url;
  try {
    url = new URL(value);
  } catch {
    throw new Error(`${name}: not a URL`);
  }
  if (url.protocol !== "https:" && !(url.protocol === "http:" && LOOPBACK.test(url.hostname)))
    throw new Error(`${name}: must be https (http only for a loopback host), not ${url.protocol}`);
  if (url.username || url.password) throw new Error(`${name}: must not hold credentials`);
  if (url.search || url.hash || /[?#]/.test(value)) throw new Error(`${name}: must have no query or fragment`);
  return url.origin + url.pathname.replace(/\/+$/, "");
}

/** Task type → checked base URL, from an object or its JSON text. */
export function parseEndpoints(value) {
  if (typeof value === "string") {
    try {
      value = JSON.parse(value);
    } catch {
      throw new Error("HOMESKILLET_ENDPOINTS: not JSON");
    }
  }
  if (value === null || typeof value !== "object" || Array.isArray(value))
    throw new Error("HOMESKILLET_ENDPOINTS: must be an object of task type → base URL");
  return Object.fromEntries(Object.entries(value).map(([label, base]) => [label, endpointBase(base, `endpoint "${label}"`)]));
}

export function parseMaxBodyBytes(value) {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 0) throw new Error("HOMESKILLET_EDGE_MAX_BODY_BYTES: must be a whole number of bytes");
  return n;
}

const setting = (name, env) => env?.[name] ?? globalThis.Deno?.env?.get?.(name) ?? globalThis.process?.env?.[name];

/** The body's bytes, or null when it is over `max` (declared or as read; reading stops there). */
export async function readBody(request, max) {
  if (Number(request.headers.get("content-length")) > max) return null;
  if (!request.body) return new Uint8Array(0);
  const reader = request.body.getReader();
  const chunks = [];
  let size = 0;
  for (let read = await reader.read(); !read.done; read = await reader.read()) {
    size += read.value.byteLength;
    if (size > max) {
      await reader.cancel();
      return null;
    }
    chunks.push(read.value);
  }
  const bytes = new Uint8Array(size);
  chunks.reduce((at, chunk) => (bytes.set(chunk, at), at + chunk.byteLength), 0);
  return bytes;
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
 * (task type → base URL; checked here), maxBodyBytes, fetch (the function that forwards; default:
 * globalThis.fetch). */
export function createWorker(options = {}) {
  let classifier;
  const classify = async (text) => (await (classifier ??= loadClassifier(options.wasm))).classify(text);
  const fixedEndpoints = options.endpoints === undefined ? undefined : parseEndpoints(options.endpoints);
  const fixedMax = options.maxBodyBytes === undefined ? undefined : parseMaxBodyBytes(options.maxBodyBytes);
  const parsed = new Map(); // the environment's text → its checked endpoints
  const endpointsFor = (env) => {
    if (fixedEndpoints) return fixedEndpoints;
    const text = setting("HOMESKILLET_ENDPOINTS", env);
    if (text === undefined) return {};
    if (!parsed.has(text)) parsed.set(text, parseEndpoints(text));
    return parsed.get(text);
  };
  const maxBodyFor = (env) => {
    const value = fixedMax ?? setting("HOMESKILLET_EDGE_MAX_BODY_BYTES", env);
    return value === undefined ? MAX_BODY_BYTES : parseMaxBodyBytes(value);
  };
  const tooLarge = (max) => json({ error: `the body is over ${max} bytes` }, 413);

  return {
    async fetch(request, env = {}) {
      const { pathname } = new URL(request.url);
      if (pathname === "/classify") {
        if (request.method !== "POST") return json({ error: "POST a text to /classify" }, 405, { allow: "POST" });
        const max = maxBodyFor(env);
        const body = await readBody(request, max);
        if (body === null) return tooLarge(max);
        return json(await classify(promptOf(new TextDecoder().decode(body), request.headers.get("content-type") ?? "")));
      }
      const methods = ROUTES.get(pathname);
      if (!methods) return json({ error: "not found" }, 404);
      if (!methods.includes(request.method))
        return json({ error: `${request.method} is not served on ${pathname}` }, 405, { allow: methods.join(", ") });
      const endpoints = endpointsFor(env);
      const max = maxBodyFor(env);
      let body = null;
      if (request.method !== "GET") {
        body = await readBody(request, max);
        if (body === null) return tooLarge(max);
      }
      const text = body ? promptOf(new TextDecoder().decode(body), request.headers.get("content-type") ?? "") : "";
      const { label } = await classify(text);
      // an MCP session lives on one server: every request of it goes to the default endpoint
      const base = pathname === "/mcp" ? endpoints.default : endpoints[label] ?? endpoints.default;
      if (!base) return json({ error: `no endpoint configured for task type ${label}`, label }, 502);
      const headers = new Headers();
      for (const name of FORWARDED_HEADERS) if (request.headers.has(name)) headers.set(name, request.headers.get(name));
      headers.set("x-homeskillet-task-type", label);
      const forward = options.fetch ?? globalThis.fetch;
      return forward(new Request(base + pathname, { method: request.method, headers, body, redirect: "manual" }));
    },
  };
}

export default createWorker();
