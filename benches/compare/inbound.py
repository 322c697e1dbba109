#!/usr/bin/env python3
"""Instructions per proxied request for each way a client reaches braid's data port,
with braid's own HTTP/1.1 server and with hyper's (`--http1 hyper`), paired in one run:
plain HTTP/1.1, h2c (prior knowledge), HTTP/1.1 over TLS and HTTP/2 over TLS (ALPN).
Only plain HTTP/1.1 is served by braid's own code; the others must not move.

braid runs under callgrind (one worker thread) in front of the same two nginx
upstreams and 90/10 split as compare.py; oha sends the load (its `--http2`, and
`--insecure` against a certificate made for the run with openssl):

    python3 benches/compare/inbound.py [--requests 5000] [--rounds 1]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

WAYS = [("http/1.1", False, False), ("h2c", False, True),
        ("http/1.1 + TLS", True, False), ("h2 + TLS", True, True)]


def oha(url, n, h2, tls):
    cmd = ["oha", "-n", str(n), "-c", "4", "-m", "POST", "-d", compare.REQUEST,
           "-H", "content-type: application/json", "--no-tui"]
    if h2:
        cmd.append("--http2")
    if tls:
        cmd.append("--insecure")
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    if "[200]" not in out or any(f"[{c}]" in out for c in ("400", "500", "502", "503")):
        raise SystemExit(f"load against {url} failed:\n{out}")


def measure(work, binary, a, b, http1, tls, h2, requests):
    name = f"{http1}-{'tls' if tls else 'plain'}-{'h2' if h2 else 'h1'}"
    extra = []
    if tls:
        extra = ["--tls-cert", os.path.join(work, "cert.pem"),
                 "--tls-key", os.path.join(work, "key.pem")]

    def start(wrapper):
        return compare.start_braid(work, binary, a, b, None, wrapper, ready_timeout=180,
                                   http1=http1, extra=extra, name=f"braid-{name}")

    def load(port, n):
        oha(f"{'https' if tls else 'http'}://127.0.0.1:{port}{compare.PATH}", n, h2, tls)

    ir, _ = compare.callgrind_ir(work, name, start, a, b, requests, load=load)
    return ir


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--braid", default=os.path.join(compare.ROOT, "target", "release", "braid"))
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({})))
    res = {}
    with tempfile.TemporaryDirectory(prefix="braid-inbound-") as work:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", os.path.join(work, "key.pem"),
                        "-out", os.path.join(work, "cert.pem")],
                       check=True, capture_output=True)
        a = compare.start_upstream(work, "upstream-a", None)
        b = compare.start_upstream(work, "upstream-b", None)
        try:
            for r in range(args.rounds):
                for way, tls, h2 in WAYS:
                    for http1 in ("braid", "hyper"):
                        ir = measure(work, os.path.abspath(args.braid), a, b, http1, tls, h2,
                                     args.requests)
                        res.setdefault((way, http1), []).append(ir)
                        print(f"round {r + 1}: {way:15} --http1 {http1:5} {ir:9,.0f} "
                              "instructions/request", flush=True)
        finally:
            b.stop()
            a.stop()
    print("\n| client speaks | --http1 braid | --http1 hyper | braid / hyper |")
    print("|---|---|---|---|")
    for way, _, _ in WAYS:
        ours = sorted(res[(way, "braid")])[len(res[(way, "braid")]) // 2]
        theirs = sorted(res[(way, "hyper")])[len(res[(way, "hyper")]) // 2]
        print(f"| {way} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
