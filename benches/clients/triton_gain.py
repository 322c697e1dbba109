#!/usr/bin/env python3
"""The batching gain for the official Triton clients in their default modes (HTTP with
binary tensors, and gRPC with raw contents) against plain JSON, through braid in front
of its own executor (MiniLM).

Starts `braid executor` and `braid proxy` (two routes to the same model: `off` without
batching, `on` with it), then, for each client form, runs CLIENTS closed-loop client
threads for SECONDS against each route and reports sentences/s and on/off.

Run (after `cargo build --release`), with the test clients' interpreter:
  target/py-clients/bin/python benches/clients/triton_gain.py [--clients 32] [--seconds 10]
"""
import argparse
import json
import os
import sys
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stack import LOCAL, braid_stack  # noqa: E402

TEXTS = ["Great!", "Not worth the money.", "The delivery was late but the product works.",
         "I loved this film, it was wonderful from start to finish.", "ok",
         "Terrible service, I want a refund.", "Would buy again.", "Meh."]


def run(addr, model, form, clients, seconds):
    done = [0] * clients
    end = time.monotonic() + seconds
    barrier = threading.Barrier(clients)

    def worker(i):
        if form == "triton-grpc":
            grpc_worker(i)
            return
        c = httpclient.InferenceServerClient(url=addr, connection_timeout=120, network_timeout=120)
        barrier.wait()
        n = i
        while time.monotonic() < end:
            n += 1
            inp = httpclient.InferInput("text", [1], "BYTES")
            inp.set_data_from_numpy(np.array([TEXTS[n % len(TEXTS)].encode()], dtype=np.object_),
                                    binary_data=(form == "triton-default"))
            outputs = None if form == "triton-default" else [
                httpclient.InferRequestedOutput("embedding", binary_data=False)]
            c.infer(model, [inp], outputs=outputs)
            done[i] += 1
        c.close()

    def grpc_worker(i):
        c = grpcclient.InferenceServerClient(url=addr)
        barrier.wait()
        n = i
        while time.monotonic() < end:
            n += 1
            inp = grpcclient.InferInput("text", [1], "BYTES")
            inp.set_data_from_numpy(np.array([TEXTS[n % len(TEXTS)].encode()], dtype=np.object_))
            c.infer(model, [inp])
            done[i] += 1
        c.close()

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(done) / seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=10)
    a = ap.parse_args()
    routes = (f"  - model: off\n    {LOCAL}\n  - model: on\n    {LOCAL}\n"
              "    batching: { max_batch_size: 64, max_queue: 1024 }\n")
    with braid_stack(routes) as addr:
        rows = []
        for form in ["json", "triton-default", "triton-grpc"]:
            r = {m: run(addr, m, form, a.clients, a.seconds) for m in ["off", "on"]}
            rows.append((form, r["off"], r["on"], r["on"] / r["off"]))
    print(f"| client form ({a.clients} clients, {a.seconds}s each) | off: sentences/s | on: sentences/s | on/off |")
    print("|---|---|---|---|")
    for form, off, on, gain in rows:
        print(f"| {form} | {off:.0f} | {on:.0f} | {gain:.2f}x |")
    print(json.dumps({"gains": {f: g for f, _, _, g in rows},
                      "triton_vs_json": rows[1][3] / rows[0][3],
                      "grpc_vs_json": rows[2][3] / rows[0][3]}))


if __name__ == "__main__":
    sys.exit(main())
