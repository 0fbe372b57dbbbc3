#!/usr/bin/env python3
"""Aggregate throughput of a running `bitnet serve` with 1, 4, 8, ... concurrent streams.

    bitnet serve -m MODEL -np 8 -c 512 --port 8080 &
    python3 scripts/serve_bench.py --url http://127.0.0.1:8080 --streams 1,4,8 -n 64

For each concurrency N, N clients start together, each streaming one /v1/completions request
(a different prompt of about --prompt-words words, `max_tokens` = -n, end-of-text tokens
forbidden with logit_bias so every stream generates exactly -n tokens). It reports, per N: the
aggregate generation rate (all completion tokens / wall time from the first request to the
last token), each stream's own decode rate (tokens after the first / time after the first),
and the mean time to first token. Runs --repeat times per N and prints the mean. Standard
library only, so it runs anywhere Python 3 does.
"""

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request

WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls count "
         "silver stars above the quiet river near an old stone bridge").split()


def stream_one(url, prompt, n, bias, out, idx, barrier):
    body = json.dumps({
        "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "logit_bias": bias,
    }).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    barrier.wait()
    t0 = time.perf_counter()
    first = None
    tokens = None
    with urllib.request.urlopen(req, timeout=3600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            ev = json.loads(data)
            ch = ev.get("choices") or [{}]
            if first is None and (ch[0].get("text") or ch[0].get("delta", {}).get("content")):
                first = time.perf_counter()
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    end = time.perf_counter()
    out[idx] = (t0, first or end, end, tokens or 0)


def run_level(url, n_streams, n, words, bias):
    prompts = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))
               for i in range(n_streams)]
    out = [None] * n_streams
    barrier = threading.Barrier(n_streams)
    threads = [threading.Thread(target=stream_one,
                                args=(url, prompts[i], n, bias, out, i, barrier))
               for i in range(n_streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(o is None for o in out):
        sys.exit("a stream failed (see the error above)")
    start = min(o[0] for o in out)
    end = max(o[2] for o in out)
    total = sum(o[3] for o in out)
    per_stream = [(o[3] - 1) / (o[2] - o[1]) for o in out if o[3] > 1 and o[2] > o[1]]
    ttft = [o[1] - o[0] for o in out]
    return total / (end - start), statistics.mean(per_stream), statistics.mean(ttft), total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("-n", type=int, default=64, help="tokens generated per stream")
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--forbid", default="",
                    help="comma-separated token ids to forbid (default: the server's EOS/EOT "
                         "are not known here, so pass them, e.g. 128001,128009)")
    a = ap.parse_args()
    bias = {t: -100 for t in a.forbid.split(",") if t}
    with urllib.request.urlopen(a.url + "/v1/models") as r:
        model = json.load(r)["data"][0]["id"]
    print(f"model {model}, {a.n} tokens per stream, prompts of ~{a.prompt_words} words, "
          f"mean of {a.repeat} runs\n")
    print("| streams | aggregate tok/s | per-stream decode tok/s | time to first token | vs 1 stream |")
    print("|---|---|---|---|---|")
    base = None
    for level in [int(s) for s in a.streams.split(",")]:
        runs = [run_level(a.url, level, a.n, a.prompt_words, bias) for _ in range(a.repeat)]
        agg = statistics.mean(r[0] for r in runs)
        per = statistics.mean(r[1] for r in runs)
        ttft = statistics.mean(r[2] for r in runs)
        base = base or agg
        print(f"| {level} | {agg:.2f} | {per:.2f} | {ttft:.2f} s | {agg / base:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
