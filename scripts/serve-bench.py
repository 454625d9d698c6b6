#!/usr/bin/env python3
"""Aggregate decoding throughput of `bitnet serve` under concurrent streamed requests.

Starts the server on a free loopback port, then for each number of streams sends that many
streamed /v1/completions requests at once (different prompts, greedy, the same max_tokens) and
reports, per level: aggregate new tokens per second (all requests' completion tokens over the
wall time from the first request to the last answer's end), the mean and worst time to the first
token, and each stream's own rate. Standard library only.

    scripts/serve-bench.py [--bitnet target/release/bitnet] [--model M] [--device cpu]
                           [--streams 1 4 16 64] [--max-tokens 64] [--max-batch 64]
"""

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time

PROMPTS = [
    "It was a dark and stormy night",
    "Call me Ishmael. Some years ago",
    "The whale rose from the sea",
    "In the beginning",
    "Once upon a time there lived",
    "The ship sailed at dawn",
    "A long way from home",
    "He looked at the sky and said",
]


def start_server(args):
    command = [args.bitnet, "serve", "--port", "0", "--device", args.device,
               "--max-batch", str(args.max_batch), "--max-queue", "256"]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    line = server.stdout.readline().strip()
    if not line.startswith("listening on http://"):
        server.kill()
        sys.exit(f"the server did not start: {line!r}")
    host, port = line.removeprefix("listening on http://").rsplit(":", 1)
    return server, host, int(port)


def model_name(host, port):
    connection = http.client.HTTPConnection(host, port, timeout=600)
    connection.request("GET", "/v1/models")
    return json.loads(connection.getresponse().read())["data"][0]["id"]


def one_stream(host, port, body, results, index, start):
    connection = http.client.HTTPConnection(host, port, timeout=3600)
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        results[index] = {"error": f"{response.status} {response.read()!r}"}
        return
    first = None
    usage = None
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            break
        event = json.loads(data)
        if event.get("usage"):
            usage = event["usage"]
        if first is None and event["choices"] and event["choices"][0]["text"]:
            first = time.perf_counter()
    end = time.perf_counter()
    results[index] = {
        "first": (first or end) - start,
        "end": end - start,
        "tokens": usage["completion_tokens"],
    }


def level(host, port, name, streams, max_tokens):
    results = [None] * streams
    start = time.perf_counter()
    threads = []
    for i in range(streams):
        body = {"model": name, "prompt": f"{PROMPTS[i % len(PROMPTS)]} ({i})",
                "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        thread = threading.Thread(target=one_stream,
                                  args=(host, port, body, results, i, start))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        sys.exit(f"{len(errors)} requests failed: {errors[0]}")
    wall = max(r["end"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    firsts = [r["first"] for r in results]
    per_stream = [r["tokens"] / (r["end"] - r["first"]) if r["end"] > r["first"] else 0.0
                  for r in results]
    return {
        "streams": streams,
        "tokens": tokens,
        "aggregate": tokens / wall,
        "first_mean": statistics.mean(firsts),
        "first_worst": max(firsts),
        "per_stream": statistics.median(per_stream),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bitnet", default="target/release/bitnet")
    parser.add_argument("--model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=64)
    args = parser.parse_args()
    server, host, port = start_server(args)
    try:
        name = model_name(host, port)
        # One request first: page faults and the first allocations are not the server's rate.
        level(host, port, name, 1, 8)
        rows = [level(host, port, name, n, args.max_tokens) for n in args.streams]
    finally:
        server.terminate()
        server.wait()
    base = rows[0]["aggregate"]
    print(f"model {name}, device {args.device}, --max-batch {args.max_batch}, "
          f"max_tokens {args.max_tokens}, greedy")
    print("| streams | new tokens | aggregate tokens/s | vs 1 stream | median per-stream "
          "tokens/s | first token, mean / worst (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['streams']} | {r['tokens']} | {r['aggregate']:.1f} | "
              f"{r['aggregate'] / base:.2f}x | {r['per_stream']:.1f} | "
              f"{r['first_mean']:.2f} / {r['first_worst']:.2f} |")


if __name__ == "__main__":
    main()
