#!/usr/bin/env python3
"""Instructions per proxied request, counted by valgrind's callgrind: the figure that
does not move with whatever else the machine is doing, so before/after comparisons of
a hot-path change are trustworthy on a shared 2-core VM.

braid runs under callgrind (one worker thread) in front of the same nginx upstreams
and 90/10 split as compare.py. Counters are zeroed after warm-up, `--requests`
requests are sent over keep-alive connections, then the counters are dumped:

    python3 benches/compare/profile.py [--proxy braid|braid-hyper|nginx|haproxy] [--requests 5000]

prints Ir per request and the top functions (inclusive), and leaves the full profile
in the output file for callgrind_annotate / kcachegrind. Extra callgrind flags
(--dump-instr=yes, say) go in CALLGRIND_FLAGS.
"""

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--braid", default=os.path.join(compare.ROOT, "target", "release", "braid"))
    ap.add_argument("--proxy", default="braid", choices=["braid", "braid-hyper", "nginx", "haproxy"])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--out", default=None, help="default: callgrind.PROXY.out")
    args = ap.parse_args()
    out = os.path.abspath(args.out or f"callgrind.{args.proxy}.out")
    with tempfile.TemporaryDirectory(prefix="braid-profile-") as work:
        a = compare.start_upstream(work, "upstream-a", None)
        b = compare.start_upstream(work, "upstream-b", None)
        try:
            start = {
                "braid": lambda w: compare.start_braid(work, os.path.abspath(args.braid), a, b,
                                                       None, w, ready_timeout=180),
                "braid-hyper": lambda w: compare.start_braid(work, os.path.abspath(args.braid),
                                                             a, b, None, w, ready_timeout=180,
                                                             http1="hyper"),
                "nginx": lambda w: compare.start_nginx(work, a, b, None, w),
                "haproxy": lambda w: compare.start_haproxy(work, a, b, None, w),
            }[args.proxy]
            ir, _ = compare.callgrind_ir(work, args.proxy, start, a, b, args.requests,
                                         args.connections, out)
        finally:
            b.stop()
            a.stop()
    print(f"{args.proxy}: {ir:,.0f} instructions per request "
          f"({args.requests} requests, {args.connections} connections)")
    annotate = subprocess.run(["callgrind_annotate", "--inclusive=yes", out],
                              capture_output=True, text=True)
    print("\n".join(annotate.stdout.splitlines()[:60]))
    print(f"full profile: {out}")


if __name__ == "__main__":
    main()
