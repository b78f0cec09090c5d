// Drives the edge worker with a recording fetch: nothing leaves the process. The tests and
// `homeskillet isolation-report` send it requests and read where the worker would have sent them.
//
//   node probe.mjs < spec.json   → JSON on stdout
//
// spec: { worker: URL of a module exporting createWorker (default: ./worker.mjs beside this file),
//         options: createWorker's (endpoints, maxBodyBytes; fetch is the recording one),
//         env: the env passed to worker.fetch (as Cloudflare does),
//         cases: [{ path, method = "GET", headers = {}, body: text | bodyBytes: n ("x" n times)
//                   | stream: { chunk, chunks } (a streamed body, no Content-Length),
//                   upstream: { status, headers, body } (what the recording fetch answers) }] }
// out:  { error } when createWorker throws, else { results: [{ status, headers, body, error,
//         forwarded: [{ url, method, headers, redirect, body, bodyBytes, followed }], pulled }] }
//
// The recording fetch behaves as fetch does with redirects: unless the request says
// redirect: "manual" (or "error"), a 3xx with a location is followed, and that is recorded too.

const spec = JSON.parse(await new Response(process.stdin).text());
const { createWorker } = await import(spec.worker ?? new URL("./worker.mjs", import.meta.url));
const decoder = new TextDecoder();
let forwarded = [];
let upstream = {};

async function recordingFetch(input, init) {
  const request = new Request(input, init);
  const bytes = request.body ? new Uint8Array(await request.arrayBuffer()) : null;
  forwarded.push({ url: request.url, method: request.method, headers: Object.fromEntries(request.headers),
    redirect: request.redirect, body: bytes && decoder.decode(bytes.subarray(0, 65536)), bodyBytes: bytes?.length ?? null });
  const { status = 200, headers = {}, body = "from upstream" } = upstream;
  if (request.redirect === "follow" && status >= 300 && status < 400 && headers.location) {
    forwarded.push({ url: new URL(headers.location, request.url).href, method: "GET", headers: {}, followed: true });
    return new Response("followed");
  }
  return new Response(body, { status, headers });
}

let worker;
try {
  worker = createWorker({ ...spec.options, fetch: recordingFetch });
} catch (error) {
  process.stdout.write(JSON.stringify({ error: error.message }));
  process.exit(0);
}

const results = [];
for (const c of spec.cases ?? []) {
  forwarded = [];
  upstream = c.upstream ?? {};
  let pulled = 0;
  const init = { method: c.method ?? "GET", headers: c.headers ?? {} };
  if (c.body !== undefined) init.body = c.body;
  if (c.bodyBytes !== undefined) init.body = "x".repeat(c.bodyBytes);
  if (c.stream) {
    const { chunk, chunks } = c.stream;
    init.duplex = "half";
    init.body = new ReadableStream({
      pull(controller) {
        if (pulled >= chunk * chunks) return controller.close();
        pulled += chunk;
        controller.enqueue(new Uint8Array(chunk).fill(120));
      },
    });
  }
  const result = { forwarded };
  try {
    const response = await worker.fetch(new Request("https://edge.example" + c.path, init), spec.env ?? {});
    Object.assign(result, { status: response.status, headers: Object.fromEntries(response.headers),
      body: (await response.text()).slice(0, 65536) });
  } catch (error) {
    result.error = error.message;
  }
  result.pulled = pulled;
  results.push(result);
}
process.stdout.write(JSON.stringify({ results }));
