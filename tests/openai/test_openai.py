"""The official `openai` Python client against a running `bitnet serve` on the tiny model.

Run by scripts/test.sh (which builds the binary and installs `openai` in .venv).
Prints 'N passed, N failed' at the end and exits non-zero on any failure.
"""
import os
import re
import subprocess
import sys
import time

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("BITNET_BIN", os.path.join(ROOT, "target", "debug", "bitnet"))
MODEL = os.path.join(ROOT, "tests", "data", "tiny", "gguf", "tiny-i2_s.gguf")


def start_server():
    p = subprocess.Popen([BIN, "serve", "-m", MODEL, "--port", "0", "-np", "4", "-c", "256", "--api-key", "k"],
                         stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    m = re.search(r"http://([\d.]+:\d+)", line)
    if not m:
        p.kill()
        raise SystemExit(f"server did not start: {line}")
    return p, f"http://{m.group(1)}/v1"


def main():
    proc, base = start_server()
    client = openai.OpenAI(base_url=base, api_key="k", max_retries=0, timeout=60)
    deadline = time.time() + 30
    while True:
        try:
            client.models.list()
            break
        except openai.APIStatusError as e:  # 503 while loading
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    results = []

    def check(name, cond, detail=""):
        results.append(cond)
        print(("ok   " if cond else "FAIL ") + name + ("" if cond else f": {detail}"))

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, seed=3, temperature=0.9)
    text = r.choices[0].message.content
    check("chat completion", r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10, r)
    check("usage adds up", r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage)
    parts, usage = [], None
    for chunk in client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, seed=3, temperature=0.9,
                                                 stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    check("streamed chat text equals non-streamed", "".join(parts) == text, ("".join(parts), text))
    check("stream usage", usage is not None and usage.completion_tokens == 10, usage)

    c = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    full = c.choices[0].text
    check("completion", c.usage.completion_tokens == 8 and len(full) > 0, c)
    s = "".join(ch.choices[0].text for ch in client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True) if ch.choices)
    check("streamed completion equals non-streamed", s == full, (s, full))
    if len(full) > 4:
        stop = full[2:4]
        c2 = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, stop=[stop])
        check("stop sequence", c2.choices[0].finish_reason == "stop" and stop not in c2.choices[0].text and full.startswith(c2.choices[0].text), c2)
    try:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 400}])
        check("too-long prompt is a 400", False, "no error")
    except openai.BadRequestError:
        check("too-long prompt is a 400", True)
    try:
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        check("bad key is a 401", False, "no error")
    except openai.AuthenticationError:
        check("bad key is a 401", True)

    proc.terminate()  # SIGTERM: clean exit
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    check("SIGTERM exits cleanly", code == 0, code)
    passed, failed = sum(results), len(results) - sum(results)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
