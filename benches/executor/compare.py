#!/usr/bin/env python3
"""Old encoder bench binary against new, interleaved: batch-1 pass time and batch-32
(by length) rows/s, median of N rounds and the paired ratio per round.

Usage: benches/executor/compare.py OLD_BIN NEW_BIN [--rounds 5] [--sentences 128] [-- extra args for NEW]
Each binary is a `cargo bench --bench encoder` executable (target/release/deps/encoder-*).
"""
import argparse, re, statistics, subprocess

def run(binary, sentences, extra):
    out = subprocess.run([binary, "--bench", "--no-http", "--sentences", str(sentences), *extra],
                         capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\| (\d+) \| (one|by length) \| (\d+) \| [\d.]+x \| ([\d.]+) \|", line)
        if m:
            rows[(int(m[1]), m[2])] = (float(m[3]), float(m[4]))
    return rows[(1, "one")][1], rows[(32, "by length")][0]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old"); ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sentences", type=int, default=128)
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    res = {"old": [], "new": []}
    for r in range(a.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for k in order:
            res[k].append(run(getattr(a, k), a.sentences, a.extra if k == "new" else []))
        print(f"round {r + 1}: old {res['old'][-1]}, new {res['new'][-1]}", flush=True)
    med = lambda xs: statistics.median(xs)
    p1 = [n[0] / o[0] for o, n in zip(res["old"], res["new"])]
    p32 = [n[1] / o[1] for o, n in zip(res["old"], res["new"])]
    print()
    print("| figure | old (median) | new (median) | new / old, paired (median, min-max) |")
    print("|---|---|---|---|")
    print(f"| batch-1 pass, ms | {med([x[0] for x in res['old']]):.1f} | {med([x[0] for x in res['new']]):.1f} "
          f"| {med(p1):.2f} ({min(p1):.2f}-{max(p1):.2f}) |")
    print(f"| batch-32 by length, sentences/s | {med([x[1] for x in res['old']]):.0f} | {med([x[1] for x in res['new']]):.0f} "
          f"| {med(p32):.2f} ({min(p32):.2f}-{max(p32):.2f}) |")

main()
