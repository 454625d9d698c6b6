// The Web Worker that owns the model: wasm, tokenizer and GPU context live here, so the page
// never freezes. Messages in: load, generate, chat-start, chat-send, finetune, export, stop,
// lose-device. Messages out: loaded, text, step, chat-started, done, tuned, exported, error.
import init, { Demo } from "./pkg/bitnet_web.js";

const ready = init();
let demo = null;

self.onmessage = async (event) => {
  const message = event.data;
  try {
    await ready;
    demo ??= new Demo();
    if (message.type === "load") {
      const files = message.files.map(([name, buffer]) => [name, new Uint8Array(buffer)]);
      const info = JSON.parse(await demo.load(files, message.device));
      self.postMessage({ type: "loaded", id: message.id, name: message.name, info });
    } else if (message.type === "generate") {
      const p = message.params;
      const result = await demo.generate(
        p.prompt, p.maxNewTokens, p.temperature, p.topK, p.topP, p.seed,
        (piece) => self.postMessage({ type: "text", id: message.id, piece }),
      );
      self.postMessage({ type: "done", id: message.id, result: JSON.parse(result) });
    } else if (message.type === "chat-start") {
      demo.chat_start(message.system);
      self.postMessage({ type: "chat-started", id: message.id });
    } else if (message.type === "chat-send") {
      const p = message.params;
      const result = await demo.chat_send(
        p.message, p.maxNewTokens, p.temperature, p.topK, p.topP, p.seed,
        (piece) => self.postMessage({ type: "text", id: message.id, piece }),
      );
      self.postMessage({ type: "done", id: message.id, result: JSON.parse(result) });
    } else if (message.type === "finetune") {
      const p = message.params;
      const result = await demo.finetune(
        p.text, p.steps, p.lr, p.context, p.batch,
        (step, loss, tokensPerS) => self.postMessage({ type: "step", id: message.id, step, loss, tokensPerS }),
      );
      self.postMessage({ type: "tuned", id: message.id, result: JSON.parse(result) });
    } else if (message.type === "export") {
      const files = demo.export().map(([name, bytes]) => [name, bytes.buffer]);
      self.postMessage({ type: "exported", id: message.id, files }, files.map(([, buffer]) => buffer));
    } else if (message.type === "lose-device") {
      demo.lose_device();
    } else if (message.type === "stop") {
      demo.stop();
    }
  } catch (error) {
    self.postMessage({ type: "error", id: message.id, message: String(error?.message ?? error) });
  }
};
