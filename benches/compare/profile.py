#!/usr/bin/env python3
"""Instructions per proxied request, counted by valgrind's callgrind: the figure that
does not move with whatever else the machine is doing, so before/after comparisons of
a hot-path change are trustworthy on a shared 2-core VM.

braid runs under callgrind (one worker thread) in front of the same nginx upstreams
and 90/10 split as compare.py. Counters are zeroed after warm-up, `--requests`
requests are sent over keep-alive connections, then the counters are dumped:

    python3 benches/compare/profile.py [--braid target/release/braid] [--requests 5000]

prints Ir per request and the top functions (inclusive), and leaves the full profile
in the output file for callgrind_annotate / kcachegrind. Extra callgrind flags
(--dump-instr=yes, say) go in CALLGRIND_FLAGS.
"""

import argparse
import glob
import http.client
import threading
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402


def load(port, requests, connections):
    """`requests` POSTs over `connections` keep-alive connections, each checked."""

    def worker(n):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(n):
            c.request("POST", compare.PATH, body=compare.REQUEST,
                      headers={"content-type": "application/json"})
            r = c.getresponse()
            r.read()
            if r.status != 200:
                raise SystemExit(f"status {r.status}")
        c.close()

    share = [requests // connections + (i < requests % connections) for i in range(connections)]
    threads = [threading.Thread(target=worker, args=(n,)) for n in share]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--braid", default=os.path.join(compare.ROOT, "target", "release", "braid"))
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--out", default="callgrind.braid.out")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    with tempfile.TemporaryDirectory(prefix="braid-profile-") as work:
        a = compare.start_upstream(work, "upstream-a", None)
        b = compare.start_upstream(work, "upstream-b", None)
        procs = [a, b]
        try:
            valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/cg.%p",
                        *os.environ.get("CALLGRIND_FLAGS", "").split()]
            p = compare.start_braid(work, args.braid, a, b, None, valgrind, ready_timeout=120)
            procs.append(p)
            port = p.port
            # warm-up: connections, pools, lazily created metrics
            load(port, 500, args.connections)
            subprocess.run(["callgrind_control", "--zero", str(p.popen.pid)], check=True,
                           capture_output=True)
            load(port, args.requests, args.connections)
            for f in glob.glob(f"{work}/cg.*"):
                os.remove(f)
            subprocess.run(["callgrind_control", "--dump", str(p.popen.pid)], check=True,
                           capture_output=True)
            deadline = time.time() + 60
            while not glob.glob(f"{work}/cg.*") and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(1)
            dump = sorted(glob.glob(f"{work}/cg.*"))[-1]
            os.replace(dump, out)
        finally:
            for proc in reversed(procs):
                proc.stop()
    total = 0
    with open(out) as f:
        for line in f:
            if line.startswith("summary:") or line.startswith("totals:"):
                total = int(line.split()[1])
    print(f"{total / args.requests:,.0f} instructions per request "
          f"({total:,} over {args.requests} requests, {args.connections} connections)")
    annotate = subprocess.run(["callgrind_annotate", "--inclusive=yes", out],
                              capture_output=True, text=True)
    print("\n".join(annotate.stdout.splitlines()[:60]))
    print(f"full profile: {out}")


if __name__ == "__main__":
    main()
