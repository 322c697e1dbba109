#!/usr/bin/env python3
"""Latency of a high-priority request under a saturating low-priority load, through
braid in front of its executor (MiniLM), with and without priority classes.

LOW closed-loop threads send bulk requests (no class: the route's default); one thread
sends an `x-braid-priority: interactive` request every 100 ms. Route `plain` has no
classes (the header is ignored there); route `classes` has interactive > bulk.

Run (after `cargo build --release`):
  target/py-clients/bin/python benches/clients/priority_p99.py [--low 48] [--seconds 15]
"""
import argparse
import http.client
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stack import LOCAL, braid_stack  # noqa: E402

BODY = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                               "data": ["The delivery was late but the product works fine."]}]})


def post(conn, model, headers):
    conn.request("POST", f"/v2/models/{model}/infer", BODY,
                 {"content-type": "application/json", **headers})
    r = conn.getresponse()
    r.read()
    return r.status


def measure(addr, model, low, seconds):
    host, port = addr.rsplit(":", 1)
    end = time.monotonic() + seconds
    statuses = {}

    def bulk():
        c = http.client.HTTPConnection(host, int(port), timeout=120)
        while time.monotonic() < end:
            s = post(c, model, {})
            statuses[s] = statuses.get(s, 0) + 1

    ts = [threading.Thread(target=bulk) for _ in range(low)]
    for t in ts:
        t.start()
    time.sleep(2)  # let the queue fill
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    lat = []
    while time.monotonic() < end - 0.5:
        t0 = time.monotonic()
        assert post(c, model, {"x-braid-priority": "interactive"}) == 200
        lat.append((time.monotonic() - t0) * 1e3)
        time.sleep(0.1)
    for t in ts:
        t.join()
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(len(lat) * p))]
    return pct(0.5), pct(0.99), len(lat), statuses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--low", type=int, default=48)
    ap.add_argument("--seconds", type=int, default=15)
    a = ap.parse_args()
    routes = (f"  - model: plain\n    {LOCAL}\n"
              "    batching: { max_batch_size: 32, max_queue: 1024 }\n"
              f"  - model: classes\n    {LOCAL}\n"
              "    batching:\n      max_batch_size: 32\n      max_queue: 1024\n"
              "      priorities: [{ name: interactive }, { name: bulk, sheddable: true }]\n"
              "      default_priority: bulk\n")
    with braid_stack(routes) as addr:
        print(f"| route ({a.low} bulk clients, {a.seconds}s) | interactive p50 ms | interactive p99 ms | samples | bulk statuses |")
        print("|---|---|---|---|---|")
        for model in ["plain", "classes"]:
            p50, p99, n, st = measure(addr, model, a.low, a.seconds)
            print(f"| {model} | {p50:.0f} | {p99:.0f} | {n} | {st} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
