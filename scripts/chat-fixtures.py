"""Writes tests/fixtures/chat/expected.json: what transformers' apply_chat_template makes of the
templates in tests/fixtures/chat (text and ids), with a tiny byte-level tokenizer that has the
templates' special tokens (tests/fixtures/chat/tokenizer.json). Run with transformers installed:
    python scripts/chat-fixtures.py
"""
import json
import pathlib

from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors
from transformers import PreTrainedTokenizerFast

DIR = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "chat"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"]

alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.add_special_tokens(SPECIALS)
bos = tok.token_to_id("<|begin_of_text|>")
tok.post_processor = processors.TemplateProcessing(
    single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
tok.save(str(DIR / "tokenizer.json"))

TEMPLATES = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "falcon3": ("<|begin_of_text|>", "<|endoftext|>"),
    "strict": ("<|begin_of_text|>", "<|end_of_text|>"),
}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hi there! "}],
    "system": [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "What is 2+2?"}],
    "multi_turn": [{"role": "user", "content": "Hello"},
                   {"role": "assistant", "content": " Hi! How can I help? "},
                   {"role": "user", "content": "# a comment"},
                   {"role": "assistant", "content": "Noted."},
                   {"role": "user", "content": "Name a colour, é."}],
}

cases = []
for name, (bos_token, eos_token) in TEMPLATES.items():
    template = (DIR / f"{name}.jinja").read_text()
    t = PreTrainedTokenizerFast(tokenizer_file=str(DIR / "tokenizer.json"), bos_token=bos_token,
                                eos_token=eos_token, chat_template=template)
    for conversation, messages in CONVERSATIONS.items():
        for add_generation_prompt in (False, True):
            case = {"template": name, "conversation": conversation,
                    "bos_token": bos_token, "eos_token": eos_token,
                    "add_generation_prompt": add_generation_prompt, "messages": messages}
            try:
                case["text"] = t.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt)
                ids = t.apply_chat_template(
                    messages, tokenize=True, add_generation_prompt=add_generation_prompt)
                case["ids"] = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            except Exception as e:  # the template's raise_exception
                case["error"] = str(e)
            cases.append(case)
# One case a line: small diffs when a case changes.
lines = ",\n".join(json.dumps(case, ensure_ascii=False) for case in cases)
(DIR / "expected.json").write_text(f"[\n{lines}\n]\n")
print(f"{len(cases)} cases")
