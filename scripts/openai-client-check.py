#!/usr/bin/env python3
"""`bitnet serve` driven by the official `openai` Python client (pip install openai).

Starts the server on a free loopback port with an API key, then through the client: lists the
models, asks for text completions (whole and streamed, with usage) and checks that they agree
with each other and with `bitnet generate --temperature 0`; asks for a chat completion (whole and
streamed) when the model has a chat template, else checks the client's BadRequestError; checks
the client's errors for a wrong key, an unknown model and an out-of-range value. Exits non-zero on
any disagreement.

    scripts/openai-client-check.py [--bitnet target/release/bitnet] [--model M]
"""

import argparse
import json
import subprocess
import sys

import openai

KEY = "check-key"


def start_server(args):
    command = [args.bitnet, "serve", "--port", "0", "--device", "cpu", "--api-key", KEY]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    line = server.stdout.readline().strip()
    if not line.startswith("listening on "):
        server.kill()
        sys.exit(f"the server did not start: {line!r}")
    return server, line.removeprefix("listening on ")


def generate(args, prompt, tokens):
    command = [args.bitnet, "generate", "--device", "cpu", "--json", "--prompt", prompt,
               "--temperature", "0", "--max-new-tokens", str(tokens)]
    if args.model:
        command += ["--model", args.model]
    return json.loads(subprocess.run(command, check=True, capture_output=True,
                                     text=True).stdout)


def check(what, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + str(detail) if detail and not ok else ''}")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bitnet", default="target/release/bitnet")
    parser.add_argument("--model")
    args = parser.parse_args()
    server, url = start_server(args)
    results = []
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
        models = client.models.list()
        name = models.data[0].id
        results.append(check("models.list", len(models.data) == 1, models))

        prompt = "It was a dark and stormy night"
        whole = client.completions.create(model=name, prompt=prompt, max_tokens=24,
                                          temperature=0)
        reference = generate(args, prompt, 24)
        results.append(check("completions.create equals bitnet generate",
                             whole.choices[0].text == reference["text"],
                             (whole.choices[0].text, reference["text"])))
        results.append(check("usage", whole.usage.completion_tokens
                             == len(reference["generated_ids"]), whole.usage))
        pieces, usage = [], None
        for chunk in client.completions.create(model=name, prompt=prompt, max_tokens=24,
                                               temperature=0, stream=True,
                                               stream_options={"include_usage": True}):
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
            if chunk.usage:
                usage = chunk.usage
        results.append(check("streamed completion equals the whole one",
                             "".join(pieces) == whole.choices[0].text, pieces))
        results.append(check("streamed usage", usage == whole.usage, usage))

        messages = [{"role": "user", "content": "Hello"}]
        try:
            answer = client.chat.completions.create(model=name, messages=messages,
                                                    max_tokens=16, temperature=0)
            streamed = "".join(chunk.choices[0].delta.content or ""
                               for chunk in client.chat.completions.create(
                                   model=name, messages=messages, max_tokens=16,
                                   temperature=0, stream=True)
                               if chunk.choices)
            results.append(check("chat.completions.create, whole and streamed",
                                 streamed == answer.choices[0].message.content,
                                 (streamed, answer.choices[0].message.content)))
        except openai.BadRequestError as e:
            results.append(check("chat without a template: BadRequestError",
                                 "no chat template" in str(e), e))

        wrong_key = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong")
        for what, call, error in [
            ("wrong key", lambda: wrong_key.models.list(), openai.AuthenticationError),
            ("unknown model", lambda: client.completions.create(model="gpt-4", prompt="a"),
             openai.BadRequestError),
            ("temperature 5", lambda: client.completions.create(model=name, prompt="a",
                                                                temperature=5),
             openai.BadRequestError),
        ]:
            try:
                call()
                results.append(check(what, False, "no error"))
            except error as e:
                results.append(check(f"{what}: {type(e).__name__}", True))
            except openai.APIError as e:
                results.append(check(what, False, repr(e)))
    finally:
        server.terminate()
        server.wait()
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
