// The page: controls, streaming text, figures. The model lives in worker.js.
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const worker = new Worker(new URL("worker.js", import.meta.url), { type: "module" });
const CACHE = "bitnet-models";

let nextId = 1;
let loadedName = null;
const pending = new Map();
let onText = null;

// One request to the worker, answered by a message with the same id.
function ask(message, transfer = []) {
  const id = nextId++;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    worker.postMessage({ ...message, id }, transfer);
  });
}

worker.onmessage = (event) => {
  const m = event.data;
  if (m.type === "text") {
    onText?.(m.piece);
    return;
  }
  const waiting = pending.get(m.id);
  if (!waiting) return;
  pending.delete(m.id);
  if (m.type === "error") waiting.reject(new Error(m.message));
  else waiting.resolve(m);
};

function showError(error) {
  $("error").textContent = error ? String(error.message ?? error) : "";
}

function megabytes(bytes) {
  return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

function showModel(name, info) {
  loadedName = name;
  const label = $("model-name");
  label.textContent = name;
  label.dataset.state = "ready";
  $("engine").textContent = info.gpu_bytes > 0 ? "on WebGPU" : "on the CPU (WebAssembly, slower)";
  const facts = {
    adapter: info.adapter || "unnamed (the browser does not say)",
    backend: info.backend,
    features: info.features.join(", ") || "none",
    "GPU memory (weights + KV cache)": info.gpu_bytes > 0 ? megabytes(info.gpu_bytes) : "none",
    model: `${info.layers} layers, hidden ${info.hidden_size}, vocabulary ${info.vocab_size}, context ${info.context}`,
  };
  if (info.fallback) facts["why the CPU"] = info.fallback;
  const list = $("adapter-facts");
  list.replaceChildren();
  for (const [key, value] of Object.entries(facts)) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }
  $("generate").disabled = false;
}

// Loads `files` ([name, ArrayBuffer] pairs) in the worker; the model before stays on failure.
async function load(name, files) {
  $("model-name").dataset.state = "loading";
  $("generate").disabled = true;
  const copies = files.map(([n, buffer]) => [n, buffer.slice(0)]);
  const reply = await ask(
    { type: "load", name, files: copies, device: params.get("device") ?? "auto" },
    copies.map(([, buffer]) => buffer),
  );
  showModel(name, reply.info);
  return reply.info;
}

async function fetchBytes(url, progress) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${response.statusText}`);
  const total = Number(response.headers.get("content-length")) || 0;
  const reader = response.body.getReader();
  const parts = [];
  let done = 0;
  for (;;) {
    const { value, done: finished } = await reader.read();
    if (finished) break;
    parts.push(value);
    done += value.length;
    progress?.(done, total);
  }
  return new Blob(parts).arrayBuffer();
}

function showProgress(done, total) {
  const bar = $("load-progress");
  bar.hidden = total === 0 || done >= total;
  bar.max = total || 1;
  bar.value = done;
}

async function loadDemo() {
  const manifest = await (await fetch("models/demo/manifest.json")).json();
  const files = [];
  for (const file of manifest.files) {
    files.push([file, await fetchBytes(`models/demo/${file}`, showProgress)]);
  }
  await load(manifest.name, files);
}

// Cache: a model is stored only after it loaded, its manifest last, so a failed or partial
// store never lists; a store that fails is taken back.
async function cacheModel(name, files) {
  if (!("caches" in self)) return;
  const cache = await caches.open(CACHE);
  const keys = files.map(([file]) => `models/${encodeURIComponent(name)}/${encodeURIComponent(file)}`);
  try {
    for (let i = 0; i < files.length; i++) await cache.put(keys[i], new Response(files[i][1]));
    const manifest = { name, files: files.map(([file]) => file) };
    await cache.put(`models/${encodeURIComponent(name)}/manifest.json`, Response.json(manifest));
  } catch (error) {
    for (const key of keys) await cache.delete(key);
    throw error;
  }
  await listCached();
}

async function listCached() {
  const select = $("cached-models");
  select.replaceChildren();
  if (!("caches" in self)) return;
  const cache = await caches.open(CACHE);
  for (const request of await cache.keys()) {
    if (!request.url.endsWith("/manifest.json")) continue;
    const manifest = await (await cache.match(request)).json();
    const option = document.createElement("option");
    option.value = request.url;
    option.textContent = manifest.name;
    select.append(option);
  }
  $("cached").hidden = select.options.length === 0;
}

async function loadCached() {
  const cache = await caches.open(CACHE);
  const manifestUrl = $("cached-models").value;
  const manifest = await (await cache.match(manifestUrl)).json();
  const base = manifestUrl.slice(0, -"manifest.json".length);
  const files = [];
  for (const file of manifest.files) {
    const response = await cache.match(base + encodeURIComponent(file));
    if (!response) throw new Error(`the cached copy of ${manifest.name} lacks ${file}; delete it`);
    files.push([file, await response.arrayBuffer()]);
  }
  await load(manifest.name, files);
}

async function deleteCached() {
  const cache = await caches.open(CACHE);
  const manifestUrl = $("cached-models").value;
  const base = manifestUrl.slice(0, -"manifest.json".length);
  await cache.delete(manifestUrl);
  for (const request of await cache.keys()) {
    if (request.url.startsWith(base)) await cache.delete(request);
  }
  await listCached();
}

async function openFiles(fileList) {
  showError(null);
  $("model-name").dataset.state = "loading";
  try {
    const files = [];
    let done = 0;
    const total = [...fileList].reduce((sum, f) => sum + f.size, 0);
    for (const file of fileList) {
      files.push([file.name, await file.arrayBuffer()]);
      done += file.size;
      showProgress(done, total);
    }
    const gguf = files.find(([n]) => n.endsWith(".gguf"));
    const name = gguf ? gguf[0] : (fileList[0]?.webkitRelativePath?.split("/")[0] || "local model");
    await load(name, files);
    await cacheModel(name, files);
  } catch (error) {
    $("model-name").dataset.state = loadedName ? "ready" : "empty";
    $("generate").disabled = !loadedName;
    showError(error);
  }
}

async function generate() {
  showError(null);
  const output = $("output");
  output.textContent = "";
  output.dataset.state = "running";
  delete output.dataset.tokenIds;
  $("generate").disabled = true;
  $("stop").disabled = false;
  onText = (piece) => { output.textContent += piece; };
  const started = performance.now();
  try {
    const { result } = await ask({
      type: "generate",
      params: {
        prompt: $("prompt").value,
        maxNewTokens: Number($("max-new-tokens").value),
        temperature: Number($("temperature").value),
        topK: Number($("top-k").value),
        topP: Number($("top-p").value),
        seed: Number($("seed").value),
      },
    });
    output.textContent = result.text;
    output.dataset.tokenIds = result.generated_ids.join(",");
    output.dataset.state = "done";
    $("stats").textContent =
      `prompt: ${result.prompt_ids.length} tokens at ${result.prompt_tokens_per_s.toFixed(1)} tokens/s; ` +
      `first token after ${result.first_token_ms.toFixed(0)} ms; ` +
      `${result.generated_ids.length} tokens at ${result.tokens_per_s.toFixed(1)} tokens/s; ` +
      `stopped: ${result.stop}; ${((performance.now() - started) / 1000).toFixed(2)} s in all`;
  } catch (error) {
    output.dataset.state = "error";
    showError(error);
  } finally {
    onText = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

async function start() {
  if (!navigator.gpu || !(await navigator.gpu.requestAdapter().catch(() => null))) {
    $("no-webgpu").hidden = false;
    $("no-webgpu-why").textContent = navigator.gpu
      ? "It has the WebGPU API but no adapter (disabled, or no usable GPU)."
      : "It has no navigator.gpu.";
  }
  for (const [param, id] of [["prompt", "prompt"], ["max_new_tokens", "max-new-tokens"],
    ["temperature", "temperature"], ["top_k", "top-k"], ["top_p", "top-p"], ["seed", "seed"]]) {
    if (params.has(param)) $(id).value = params.get(param);
  }
  $("generate").onclick = generate;
  $("stop").onclick = () => worker.postMessage({ type: "stop" });
  $("model-files").onchange = (e) => openFiles(e.target.files);
  const drop = $("drop");
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); openFiles(e.dataTransfer.files); };
  $("cached-load").onclick = () => loadCached().catch(showError);
  $("cached-delete").onclick = () => deleteCached().catch(showError);
  await listCached().catch(showError);
  try {
    await loadDemo();
  } catch (error) {
    $("model-name").textContent = "none";
    $("model-name").dataset.state = "empty";
    showError(`the demo model did not load: ${error.message}; open one above`);
    return;
  }
  if (params.get("autorun") === "1") await generate();
}

start();
