#!/usr/bin/env python3
"""Where a proxy's CPU time goes, sampled by perf (the cpu-clock software event, which
needs no hardware counters) under wrk's closed loop in the separate layout: what
callgrind's instruction counts do not weigh, such as clock reads through the vDSO
(valgrind sees them as system calls) and atomic reference counts.

The proxy is pinned to CPU 0 and sampled at 4,000 Hz; the load generator and the two
nginx upstreams (the 90/10 split of compare.py) run on CPU 1:

    python3 benches/compare/sampled.py [--proxy braid|braid-hyper|nginx] [--seconds 8]

prints microseconds per request in the kernel and in user space, the named groups
below, and the top user-space symbols.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

HZ = 4000
# Symbols counted together, by a part of their name.
GROUPS = {
    "clock reads": ("clock_gettime",),
    "Bytes reference counts": ("bytes::bytes_mut::shared_v_", "bytes::bytes::shared_"),
    "malloc and free": ("malloc", "_int_free", "cfree", "__libc_free"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--braid", default=os.path.join(compare.ROOT, "target", "release", "braid"))
    ap.add_argument("--proxy", default="braid", choices=["braid", "braid-hyper", "nginx"])
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if not shutil.which("perf"):
        raise SystemExit("perf is not installed (Debian: apt-get install linux-perf)")
    with tempfile.TemporaryDirectory(prefix="braid-sampled-") as work:
        data = os.path.join(work, "perf.data")
        wrapper = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(HZ), "-o", data]
        a = compare.start_upstream(work, "upstream-a", 1)
        b = compare.start_upstream(work, "upstream-b", 1)
        try:
            if args.proxy == "nginx":
                p = compare.start_nginx(work, a, b, 0, wrapper)
            else:
                http1 = "hyper" if args.proxy == "braid-hyper" else "braid"
                p = compare.start_braid(work, os.path.abspath(args.braid), a, b, 0, wrapper,
                                        ready_timeout=60, http1=http1)
            url = f"http://127.0.0.1:{p.port}{compare.PATH}"
            compare.wait_ready(p, url, "POST", compare.REQUEST.encode(), timeout=60)
            counts = compare.Upstreams([a, b])
            compare.wrk(url, work, args.seconds, 16, 1)
            _, split = counts.delta()
            p.stop()
        finally:
            b.stop()
            a.stop()
        report = subprocess.run(
            ["perf", "report", "-i", data, "--no-children", "--sort", "sym", "--stdio",
             "-g", "none", "--percentage", "absolute"],
            capture_output=True, text=True, check=True).stdout
        # cpu-clock counts nanoseconds.
        nanos = next(int(line.rsplit(None, 1)[1]) for line in report.splitlines()
                     if line.startswith("# Event count"))
    requests = max(sum(split), 1)
    us = nanos / 1e3 / requests
    rows = []
    for line in report.splitlines():
        words = line.split(None, 2)
        if len(words) == 3 and words[0].endswith("%") and words[1] in ("[.]", "[k]"):
            rows.append((float(words[0].rstrip("%")), words[1] == "[k]", words[2].strip()))
    kernel = sum(r[0] for r in rows if r[1])
    user = sum(r[0] for r in rows if not r[1])
    per = lambda pct: pct / 100 * us  # noqa: E731
    print(f"{args.proxy}: {requests:,} requests, {us:.2f} us of CPU per request sampled: "
          f"kernel {per(kernel):.2f}, user {per(user):.2f}")
    for name, parts in GROUPS.items():
        pct = sum(r[0] for r in rows if not r[1] and any(s in r[2] for s in parts))
        print(f"  {name}: {pct:.2f}% ({per(pct):.3f} us per request)")
    print("top user-space symbols (% of the proxy's samples):")
    for pct, _, sym in [r for r in rows if not r[1]][:args.top]:
        print(f"  {pct:5.2f}%  {sym[:100]}")


if __name__ == "__main__":
    main()
