// The demo page in headless Chromium (Debian's chromium, driven by playwright-core), checked
// against the native `bitnet` program: the page must give the tokens `bitnet generate
// --device cpu --temperature 0` gives, on WebGPU and on the CPU path, from the demo model, from
// models opened with the file input, and from a model fine-tuned in the tab and downloaded; its
// chat mode the turns `bitnet chat --json` gives. Needs web/build.sh's web/dist and BITNET_BIN
// (the native binary). Fails, never skips, when something is missing.
import { chromium } from "playwright-core";
import { createServer } from "node:http";
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { extname, join, resolve } from "node:path";
import { tmpdir } from "node:os";
import assert from "node:assert/strict";

const root = resolve(import.meta.dirname, "..", "..");
const dist = join(root, "web", "dist");
const demo = join(root, "models", "demo");
const artifacts = join(root, "web", "test-artifacts");
const bin = process.env.BITNET_BIN ?? join(root, "target", "debug", "bitnet");
const chrome = process.env.CHROMIUM ?? "/usr/bin/chromium";
const TIMEOUT = 600_000;
for (const needed of [join(dist, "index.html"), join(dist, "pkg", "bitnet_web_bg.wasm"), bin, chrome]) {
  statSync(needed);
}
mkdirSync(artifacts, { recursive: true });
const scratch = mkdtempSync(join(tmpdir(), "bitnet-page-"));

function bitnet(...args) {
  return execFileSync(bin, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

function nativeIds(model, prompt, tokens) {
  const out = bitnet("generate", "--model", model, "--prompt", prompt, "--max-new-tokens", String(tokens),
    "--temperature", "0", "--device", "cpu", "--json");
  return JSON.parse(out).generated_ids.join(",");
}

const types = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".wasm": "application/wasm", ".json": "application/json" };
const server = createServer((request, response) => {
  const path = join(dist, decodeURIComponent(new URL(request.url, "http://x").pathname));
  try {
    const body = readFileSync(path.endsWith("/") ? join(path, "index.html") : path);
    response.writeHead(200, { "content-type": types[extname(path)] ?? "application/octet-stream" });
    response.end(body);
  } catch {
    response.writeHead(404).end();
  }
});
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
const base = `http://127.0.0.1:${server.address().port}/`;

const flags = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--no-first-run"];

async function browser(webgpu) {
  return chromium.launch({
    executablePath: chrome,
    headless: true,
    args: webgpu ? [...flags, "--enable-unsafe-webgpu"] : [...flags, "--disable-webgpu"],
  });
}

async function waitForModel(page, name) {
  await page.waitForSelector(`#model-name[data-state="ready"]`, { timeout: TIMEOUT });
  if (name) assert.equal(await page.textContent("#model-name"), name);
}

async function generated(page) {
  await page.waitForSelector('#output[data-state="done"], #output[data-state="error"]', { timeout: TIMEOUT });
  const state = await page.getAttribute("#output", "data-state");
  assert.equal(state, "done", `generation failed: ${await page.textContent("#error")}`);
  return page.getAttribute("#output", "data-token-ids");
}

async function generateWith(page, prompt, tokens) {
  await page.fill("#prompt", prompt);
  await page.fill("#max-new-tokens", String(tokens));
  await page.fill("#temperature", "0");
  await page.click("#generate");
  return generated(page);
}

// The page's last chat turn, once it is answered: its ids as the worker reported them and the
// transcript's turns. `streamed` collects the answer's text each time it grew while streaming.
async function chatTurn(page, message) {
  await page.evaluate(() => {
    window.streamed = [];
    const transcript = document.getElementById("chat-transcript");
    window.watcher?.disconnect();
    window.watcher = new MutationObserver(() => {
      const running = transcript.querySelector('.turn[data-state="running"]');
      if (running?.textContent) window.streamed.push(running.textContent);
    });
    window.watcher.observe(transcript, { childList: true, subtree: true, characterData: true });
  });
  await page.fill("#chat-input", message);
  await page.click("#chat-send");
  await page.waitForSelector('#chat-transcript[data-state="done"], #chat-transcript[data-state="error"]', { state: "attached", timeout: TIMEOUT });
  assert.equal(await page.getAttribute("#chat-transcript", "data-state"), "done",
    `the chat turn failed: ${await page.textContent("#error")}`);
  const ids = async (name) => (await page.getAttribute("#chat-transcript", name)).split(",").filter(Boolean).map(Number);
  return {
    promptIds: await ids("data-prompt-ids"),
    generatedIds: await ids("data-token-ids"),
    prefilled: Number(await page.getAttribute("#chat-transcript", "data-prefilled")),
    turns: await page.$$eval("#chat-transcript .turn", (turns) => turns.map((t) => [t.dataset.role, t.textContent])),
    streamed: await page.evaluate(() => window.streamed),
  };
}

function sameTurn(pageTurn, native) {
  assert.deepEqual(pageTurn.promptIds, native.prompt_ids);
  assert.deepEqual(pageTurn.generatedIds, native.generated_ids);
  assert.equal(pageTurn.prefilled, native.prefilled);
  assert.deepEqual(pageTurn.turns.at(-1), ["assistant", native.text]);
}

const results = [];
async function check(name, body) {
  const started = Date.now();
  await body();
  results.push(`ok: ${name} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
  console.log(results.at(-1));
}

const prompt = "It was a dark and stormy night";
const demoIds = nativeIds(demo, prompt, 16);
const gguf = join(scratch, "demo.gguf");
// The demo model's rows (192 weights) are not whole 128-weight I2_S blocks: a file for this
// project's engines only.
bitnet("convert", "--format", "gguf", "--any-row-length", "--input", demo, "--output", gguf);
const ggufIds = nativeIds(gguf, prompt, 16);
const truncated = join(scratch, "broken.gguf");
writeFileSync(truncated, readFileSync(gguf).subarray(0, 4096));

// A chat model: the demo model's weights with the byte-level tokenizer of the chat fixtures
// (265 tokens, within the model's 4096; ids past them are never generated) and Llama 3's
// template in tokenizer_config.json, as a folder and as the GGUF file `convert` writes from it.
const fixtures = join(root, "tests", "fixtures", "chat");
const chatModel = join(scratch, "chat-model");
mkdirSync(chatModel);
const chatConfig = JSON.parse(readFileSync(join(demo, "config.json"), "utf8"));
Object.assign(chatConfig, { bos_token_id: 256, eos_token_id: 257 });
writeFileSync(join(chatModel, "config.json"), JSON.stringify(chatConfig));
writeFileSync(join(chatModel, "model.safetensors"), readFileSync(join(demo, "model.safetensors")));
writeFileSync(join(chatModel, "tokenizer.json"), readFileSync(join(fixtures, "tokenizer.json")));
writeFileSync(join(chatModel, "tokenizer_config.json"), JSON.stringify({
  chat_template: readFileSync(join(fixtures, "llama3.jinja"), "utf8"),
  bos_token: "<|begin_of_text|>",
  eos_token: "<|eot_id|>",
}));
const chatFiles = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
  .map((f) => join(chatModel, f));
const chatGguf = join(scratch, "chat.gguf");
bitnet("convert", "--format", "gguf", "--any-row-length", "--input", chatModel, "--output", chatGguf);
const system = "Be brief.";

// `bitnet chat --json`'s turns, one message a line of its input.
function nativeChat(model, lines, tokens) {
  const out = execFileSync(bin, ["chat", "--model", model, "--json", "--system", system,
    "--max-new-tokens", String(tokens), "--temperature", "0", "--device", "cpu"],
  { encoding: "utf8", input: lines.join("\n") + "\n", stdio: ["pipe", "pipe", "pipe"] });
  return out.trim().split("\n").map((line) => JSON.parse(line));
}
const nativeTurns = nativeChat(chatModel, ["Hello", "And then?", "/reset", "Hello"], 8);
assert.equal(nativeTurns.length, 3);

try {
  const gpu = await browser(true);
  const page = await gpu.newPage();
  const logs = [];
  page.on("console", (m) => logs.push(m.text()));
  page.on("pageerror", (e) => logs.push(String(e)));

  await check("the demo model generates on WebGPU what the native CPU generates", async () => {
    const url = `${base}index.html?prompt=${encodeURIComponent(prompt)}&max_new_tokens=16&temperature=0&autorun=1`;
    await page.goto(url);
    await waitForModel(page);
    assert.match(await page.textContent("#engine"), /WebGPU/, logs.join("\n"));
    assert.equal(await generated(page), demoIds);
    await page.screenshot({ path: join(artifacts, "page.png"), fullPage: true });
  });

  await check("a GGUF file opened with the file input generates as natively", async () => {
    await page.setInputFiles("#model-files", gguf);
    await waitForModel(page, "demo.gguf");
    assert.equal(await generateWith(page, prompt, 16), ggufIds);
  });

  await check("a Hugging Face folder's files opened with the file input generate as natively", async () => {
    await page.setInputFiles("#model-files",
      ["config.json", "model.safetensors", "tokenizer.json"].map((f) => join(demo, f)));
    await waitForModel(page);
    assert.equal(await generateWith(page, prompt, 16), demoIds);
  });

  await check("a malformed file is an error and the page keeps working", async () => {
    const before = await page.textContent("#model-name");
    await page.setInputFiles("#model-files", truncated);
    await page.waitForFunction(() => document.getElementById("error").textContent.length > 0, null, { timeout: TIMEOUT });
    assert.match(await page.textContent("#error"), /broken\.gguf/);
    assert.equal(await page.textContent("#model-name"), before);
    assert.equal(await generateWith(page, prompt, 16), demoIds);
  });

  await check("chat mode with a model without a chat template says so; Generate still works", async () => {
    await page.check("#mode-chat");
    await page.waitForSelector('#chat-transcript[data-state="unavailable"]', { state: "attached", timeout: TIMEOUT });
    assert.match(await page.textContent("#error"), /no chat template/);
    assert.equal(await page.isDisabled("#chat-send"), true);
    await page.check("#mode-generate");
    assert.equal(await generateWith(page, prompt, 16), demoIds);
  });

  await check("chat mode answers in the model's template as `bitnet chat` does, reusing the cache, stopping and starting over", async () => {
    await page.check("#mode-chat");
    await page.fill("#chat-system", system);
    await page.fill("#max-new-tokens", "8");
    await page.fill("#temperature", "0");
    // A model opened in chat mode starts a conversation, its template from tokenizer_config.json.
    await page.setInputFiles("#model-files", chatFiles);
    await page.waitForSelector('#chat-transcript[data-state="ready"]', { state: "attached", timeout: TIMEOUT });
    assert.equal(await page.textContent("#model-name"), "local model");
    const first = await chatTurn(page, "Hello");
    sameTurn(first, nativeTurns[0]);
    assert.equal(first.prefilled, first.promptIds.length);
    assert.deepEqual(first.turns.slice(0, 2), [["system", system], ["user", "Hello"]]);
    assert.equal(first.turns.length, 3);
    // The answer streamed: it grew piece by piece, each text a start of the final one.
    const answer = nativeTurns[0].text;
    assert.ok(first.streamed.length > 1, `streamed ${JSON.stringify(first.streamed)}`);
    for (const text of first.streamed) assert.ok(answer.startsWith(text), `${text} / ${answer}`);

    const second = await chatTurn(page, "And then?");
    sameTurn(second, nativeTurns[1]);
    // The first turn came from the cache: only what follows it was processed.
    assert.ok(second.prefilled <= second.promptIds.length - first.promptIds.length,
      `prefilled ${second.prefilled} of ${second.promptIds.length}`);
    assert.equal(second.turns.length, 5);
    await page.screenshot({ path: join(artifacts, "page-chat.png"), fullPage: true });

    // Stop cuts an answer short; it stays in the conversation as it was cut. The stop reaches
    // the worker after the turn began there (messages are handled in order), however fast the
    // adapter.
    await page.fill("#max-new-tokens", "100");
    await page.fill("#chat-input", "Tell me a long story.");
    await page.click("#chat-send");
    await page.click("#stop");
    await page.waitForSelector('#chat-transcript[data-state="done"]', { state: "attached", timeout: TIMEOUT });
    assert.match(await page.textContent("#stats"), /stopped: stopped/);
    const cut = (await page.getAttribute("#chat-transcript", "data-token-ids")).split(",");
    assert.ok(cut.length < 100, `${cut.length} tokens`);
    assert.equal((await page.$$("#chat-transcript .turn")).length, 7);

    // Reset starts over: the first turn again, all of it processed.
    await page.fill("#max-new-tokens", "8");
    await page.click("#chat-reset");
    await page.waitForSelector('#chat-transcript[data-state="ready"]', { state: "attached", timeout: TIMEOUT });
    assert.deepEqual(await page.$$eval("#chat-transcript .turn", (t) => t.map((e) => e.dataset.role)), ["system"]);
    const again = await chatTurn(page, "Hello");
    sameTurn(again, nativeTurns[2]);
    assert.deepEqual(again.generatedIds, first.generatedIds);
    assert.equal(again.prefilled, again.promptIds.length);
  });

  await check("a GGUF file's tokenizer.chat_template reaches the page's chat", async () => {
    await page.setInputFiles("#model-files", chatGguf);
    await waitForModel(page, "chat.gguf");
    await page.waitForSelector('#chat-transcript[data-state="ready"]', { state: "attached", timeout: TIMEOUT });
    const [native] = nativeChat(chatGguf, ["Hello"], 8);
    const turn = await chatTurn(page, "Hello");
    sameTurn(turn, native);
    // The folder's template, through the GGUF file: the same prompt. (Not the same answer:
    // `convert` pads the file's vocabulary to the model's 4096 ids with [PAD] tokens, which the
    // folder's 265-token tokenizer never lets the model choose.)
    assert.deepEqual(turn.promptIds, nativeTurns[0].prompt_ids);
    await page.check("#mode-generate");
  });

  await check("a lost GPU device is reported and the page generates again on a new one", async () => {
    await page.goto(`${base}index.html?debug=1`);
    await waitForModel(page);
    await page.click("#lose-device");
    assert.equal(await generateWith(page, prompt, 16), demoIds);
    assert.match(await page.textContent("#notice"), /GPU device was lost \(destroyed\)/);
    assert.match(await page.textContent("#engine"), /WebGPU/);
    assert.equal(await generateWith(page, prompt, 16), demoIds);
  });

  await check("fine-tuning in the tab lowers the loss; the downloaded model generates natively as the page does", async () => {
    const text = "The little robot sang a song to the moon every night. ".repeat(12);
    await page.fill("#tune-text", text);
    await page.fill("#tune-steps", "4");
    await page.fill("#tune-lr", "0.003");
    await page.fill("#tune-context", "16");
    await page.fill("#tune-batch", "2");
    await page.click("#tune");
    await page.waitForSelector('#tune-status[data-state="done"], #tune-status[data-state="error"]', { timeout: TIMEOUT });
    assert.equal(await page.getAttribute("#tune-status", "data-state"), "done", await page.textContent("#error"));
    const losses = (await page.getAttribute("#tune-status", "data-losses")).split(",").map(Number);
    assert.equal(losses.length, 4);
    assert.ok(losses[3] < losses[0], `losses ${losses}`);
    // The engine that trained is named: the browser's adapter has no name of its own.
    assert.match(await page.textContent("#tune-status"), /^4 steps on WebGPU: loss /);
    // The same run natively on the CPU: the same windows and update, so the same losses up to
    // float rounding (the first exactly so but for the f32 rounding of each token's loss).
    const textFile = join(scratch, "tune.txt");
    writeFileSync(textFile, text);
    const run = join(scratch, "native-tune");
    bitnet("train", "--model", demo, "--data", textFile, "--out", run, "--steps", "4", "--batch", "2",
      "--context", "16", "--lr", "0.003", "--schedule", "constant", "--warmup", "0", "--weight-decay", "0",
      "--grad-clip", "1", "--no-shuffle", "--device", "cpu");
    const native = readFileSync(join(run, "loss.csv"), "utf8").trim().split("\n").slice(1)
      .map((line) => Number(line.split(",")[1]));
    assert.equal(native.length, 4);
    native.forEach((loss, i) => assert.ok(Math.abs(loss - losses[i]) <= 1e-3 * loss,
      `step ${i + 1}: page ${losses[i]}, native ${loss}`));
    assert.match(await page.textContent("#model-name"), /\(tuned\)$/);
    const tunedPrompt = "The little robot";
    const pageIds = await generateWith(page, tunedPrompt, 12);
    await page.screenshot({ path: join(artifacts, "page-tuned.png"), fullPage: true });
    const folder = join(scratch, "tuned");
    mkdirSync(folder);
    const downloads = [];
    page.on("download", (d) => downloads.push(d.saveAs(join(folder, d.suggestedFilename()))));
    await page.click("#download");
    for (let waited = 0; downloads.length < 3 && waited < 100; waited++) await page.waitForTimeout(100);
    await Promise.all(downloads);
    assert.equal(downloads.length, 3);
    assert.equal(nativeIds(folder, tunedPrompt, 12), pageIds);
    assert.notEqual(nativeIds(demo, tunedPrompt, 12), pageIds, "the tuned model generates as the untuned one");
  });
  await gpu.close();

  await check("without WebGPU the page says so and the CPU path generates and chats as natively", async () => {
    const cpu = await browser(false);
    const page = await cpu.newPage();
    await page.goto(`${base}index.html?prompt=${encodeURIComponent(prompt)}&max_new_tokens=16&temperature=0&autorun=1`);
    await waitForModel(page);
    assert.equal(await page.isVisible("#no-webgpu"), true);
    assert.match(await page.textContent("#engine"), /CPU/);
    assert.equal(await generated(page), demoIds);
    await page.check("#mode-chat");
    await page.fill("#chat-system", system);
    await page.fill("#max-new-tokens", "8");
    await page.setInputFiles("#model-files", chatFiles);
    await page.waitForSelector('#chat-transcript[data-state="ready"]', { state: "attached", timeout: TIMEOUT });
    assert.match(await page.textContent("#engine"), /CPU/);
    sameTurn(await chatTurn(page, "Hello"), nativeTurns[0]);
    await cpu.close();
  });
} finally {
  server.close();
}
console.log(`all ${results.length} page tests passed; screenshot in ${join(artifacts, "page.png")}`);
