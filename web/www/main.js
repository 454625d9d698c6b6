// The page: controls, streaming text, figures. The model lives in worker.js.
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const worker = new Worker(new URL("worker.js", import.meta.url), { type: "module" });
const CACHE = "bitnet-models";

let nextId = 1;
let loadedName = null;
// Whether the worker holds a conversation for the loaded model (chat mode started one).
let chatReady = false;
const pending = new Map();
let onText = null;
let onStep = null;

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
  if (m.type === "step") {
    onStep?.(m);
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
    chat: info.chat ? "its chat template" : "none (no chat template; Generate only)",
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
  $("tune").disabled = false;
  $("download").disabled = false;
}

function chatMode() {
  return $("mode-chat").checked;
}

// The chat buttons: Send needs a conversation, both need a model at rest.
function enableChat(enabled) {
  $("chat-send").disabled = !(enabled && chatReady);
  $("chat-reset").disabled = !(enabled && loadedName);
}

// Loads `files` ([name, ArrayBuffer] pairs) in the worker; the model before stays on failure.
async function load(name, files) {
  $("model-name").dataset.state = "loading";
  $("generate").disabled = true;
  enableChat(false);
  const copies = files.map(([n, buffer]) => [n, buffer.slice(0)]);
  const reply = await ask(
    { type: "load", name, files: copies, device: params.get("device") ?? "auto" },
    copies.map(([, buffer]) => buffer),
  );
  showModel(name, reply.info);
  // The worker dropped the conversation of the model before.
  chatReady = false;
  if (chatMode()) await startChat();
  else enableChat(true);
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
    enableChat(true);
    showError(error);
  }
}

// The sampling controls, which Generate and Chat share.
function samplingParams() {
  return {
    maxNewTokens: Number($("max-new-tokens").value),
    temperature: Number($("temperature").value),
    topK: Number($("top-k").value),
    topP: Number($("top-p").value),
    seed: Number($("seed").value),
  };
}

function showRecovery(result) {
  if (!result.recovered_from) return;
  $("notice").hidden = false;
  $("notice").textContent = `The GPU device was lost (${result.recovered_from}); the model ` +
    "started again on a new device and generated this.";
  showModel(loadedName, result.model);
}

function appendTurn(role, content) {
  const turn = document.createElement("div");
  turn.className = "turn";
  turn.dataset.role = role;
  turn.textContent = content;
  $("chat-transcript").append(turn);
  turn.scrollIntoView({ block: "nearest" });
  return turn;
}

// A new conversation in the worker (the library's, in the model's template), with the system
// prompt as it is now written; the one before, if any, ends. A model without a chat template
// is an error shown here; Generate still works with it.
async function startChat() {
  showError(null);
  chatReady = false;
  const transcript = $("chat-transcript");
  transcript.replaceChildren();
  transcript.dataset.state = "starting";
  enableChat(false);
  const system = $("chat-system").value.trim() || null;
  try {
    await ask({ type: "chat-start", system });
    chatReady = true;
    if (system) appendTurn("system", system);
    transcript.dataset.state = "ready";
  } catch (error) {
    transcript.dataset.state = "unavailable";
    showError(error);
  } finally {
    enableChat(true);
  }
}

function setMode() {
  const chat = chatMode();
  $("generate-mode").hidden = chat;
  $("generate").hidden = chat;
  $("chat-mode").hidden = !chat;
  $("chat-send").hidden = !chat;
  $("chat-reset").hidden = !chat;
  showError(null);
  if (chat && loadedName && !chatReady) startChat();
}

async function sendChat() {
  const text = $("chat-input").value.trim();
  if (!text || $("chat-send").disabled) return;
  showError(null);
  $("notice").hidden = true;
  const transcript = $("chat-transcript");
  const question = appendTurn("user", text);
  const answer = appendTurn("assistant", "");
  answer.dataset.state = "running";
  transcript.dataset.state = "running";
  $("chat-input").value = "";
  $("generate").disabled = true;
  enableChat(false);
  $("stop").disabled = false;
  onText = (piece) => {
    answer.textContent += piece;
    answer.scrollIntoView({ block: "nearest" });
  };
  const started = performance.now();
  try {
    const { result } = await ask({ type: "chat-send", params: { message: text, ...samplingParams() } });
    showRecovery(result);
    // The transcript is the library's conversation: the messages its template renders next turn.
    transcript.replaceChildren();
    for (const m of result.messages) appendTurn(m.role, m.content);
    transcript.dataset.promptIds = result.prompt_ids.join(",");
    transcript.dataset.prefilled = result.prefilled;
    transcript.dataset.tokenIds = result.generated_ids.join(",");
    transcript.dataset.state = "done";
    $("stats").textContent =
      `prompt: ${result.prompt_ids.length} tokens, ${result.prefilled} of them processed (the rest ` +
      `in the cache from earlier turns) at ${result.prompt_tokens_per_s.toFixed(1)} tokens/s; ` +
      `first token after ${result.first_token_ms.toFixed(0)} ms; ` +
      `${result.generated_ids.length} tokens at ${result.tokens_per_s.toFixed(1)} tokens/s; ` +
      `stopped: ${result.stop}; ${((performance.now() - started) / 1000).toFixed(2)} s in all`;
  } catch (error) {
    // The conversation is as it was before this message: its turn goes, its text comes back.
    question.remove();
    answer.remove();
    $("chat-input").value = text;
    transcript.dataset.state = "error";
    showError(error);
  } finally {
    onText = null;
    $("generate").disabled = false;
    enableChat(true);
    $("stop").disabled = true;
  }
}

async function generate() {
  showError(null);
  $("notice").hidden = true;
  const output = $("output");
  output.textContent = "";
  output.dataset.state = "running";
  delete output.dataset.tokenIds;
  $("generate").disabled = true;
  enableChat(false);
  $("stop").disabled = false;
  onText = (piece) => { output.textContent += piece; };
  const started = performance.now();
  try {
    const { result } = await ask({ type: "generate", params: { prompt: $("prompt").value, ...samplingParams() } });
    output.textContent = result.text;
    showRecovery(result);
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
    enableChat(true);
    $("stop").disabled = true;
  }
}

// The loss curve: one point per step, the axis from 0 to the largest loss.
function drawLosses(losses) {
  const canvas = $("loss-curve");
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  if (losses.length === 0) return;
  const top = Math.max(...losses) * 1.05;
  const x = (i) => (losses.length === 1 ? 0 : (i / (losses.length - 1)) * (canvas.width - 8)) + 4;
  const y = (loss) => canvas.height - 4 - (loss / top) * (canvas.height - 8);
  g.strokeStyle = "#2563eb";
  g.lineWidth = 2;
  g.beginPath();
  losses.forEach((loss, i) => (i === 0 ? g.moveTo(x(i), y(loss)) : g.lineTo(x(i), y(loss))));
  g.stroke();
  g.fillStyle = "#333";
  g.fillText(`loss ${losses[0].toFixed(3)} → ${losses[losses.length - 1].toFixed(3)}`, 8, 14);
}

async function finetune() {
  showError(null);
  const status = $("tune-status");
  status.dataset.state = "running";
  delete status.dataset.losses;
  for (const id of ["tune", "generate", "download"]) $(id).disabled = true;
  enableChat(false);
  $("tune-stop").disabled = false;
  const losses = [];
  const steps = Number($("tune-steps").value);
  onStep = (m) => {
    losses.push(m.loss);
    drawLosses(losses);
    status.textContent = `step ${m.step} of ${steps}: loss ${m.loss.toFixed(4)}, ${m.tokensPerS.toFixed(0)} tokens/s`;
  };
  try {
    const { result } = await ask({
      type: "finetune",
      params: {
        text: $("tune-text").value,
        steps,
        lr: Number($("tune-lr").value),
        context: Number($("tune-context").value),
        batch: Number($("tune-batch").value),
      },
    });
    status.textContent =
      `${result.steps} steps on ${result.engine}: loss ${result.losses[0].toFixed(4)} → ` +
      `${result.losses[result.losses.length - 1].toFixed(4)}, ${result.tokens_per_s.toFixed(0)} tokens/s. ` +
      "The tuned model now generates above.";
    status.dataset.losses = result.losses.join(",");
    status.dataset.state = "done";
    showModel(`${loadedName.replace(/ \(tuned\)$/, "")} (tuned)`, result.model);
  } catch (error) {
    status.dataset.state = "error";
    status.textContent = "";
    showError(error);
  } finally {
    onStep = null;
    $("tune-stop").disabled = true;
    for (const id of ["tune", "generate", "download"]) $(id).disabled = !loadedName;
    enableChat(true);
  }
}

async function download() {
  showError(null);
  try {
    const { files } = await ask({ type: "export" });
    for (const [name, buffer] of files) {
      const link = document.createElement("a");
      link.href = URL.createObjectURL(new Blob([buffer]));
      link.download = name;
      link.click();
      URL.revokeObjectURL(link.href);
    }
  } catch (error) {
    showError(error);
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
  $("mode-generate").onchange = setMode;
  $("mode-chat").onchange = setMode;
  $("chat-send").onclick = sendChat;
  $("chat-reset").onclick = startChat;
  $("chat-input").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      sendChat();
    }
  };
  $("stop").onclick = () => worker.postMessage({ type: "stop" });
  $("model-files").onchange = (e) => openFiles(e.target.files);
  const drop = $("drop");
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); openFiles(e.dataTransfer.files); };
  $("lose-device").hidden = params.get("debug") !== "1";
  $("lose-device").onclick = () => worker.postMessage({ type: "lose-device" });
  $("tune").onclick = finetune;
  $("tune-stop").onclick = () => worker.postMessage({ type: "stop" });
  $("download").onclick = download;
  const tuneText = $("tune-text");
  tuneText.ondragover = (e) => e.preventDefault();
  tuneText.ondrop = async (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) tuneText.value = await file.text();
  };
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
