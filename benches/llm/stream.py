"""LLM streams through braid, against the backend direct, side by side in one run:
what braid adds per event and to time to first token, and how fast a client that
leaves reaches the backend.

A backend streams like vLLM (SSE over chunked HTTP/1.1, keep-alive), each event
stamped with the moment it was written (this process's monotonic clock, which the
client shares). The client keeps one connection per target, as the openai SDK's
pool does, and the targets alternate call by call (direct, braid, direct, ...):

- per event: arrival minus the backend's stamp, p50 per target; braid's added
  latency is the difference of the two p50s;
- time to first token: request written to first content event, paired by round
  (braid minus the direct call just before it), median of the pairs;
- disconnect: the client reads three events and closes; the backend notes when its
  connection ends (EOF); the time from the client's close, per target;
- with --nginx, nginx (proxy_buffering off, pooled upstream) as a third target, for
  scale: what any proxy hop costs on this machine.

    benches/llm/stream.py [--braid target/release/braid] [--rounds 200] [--events 50] [--nginx]

Prints a JSON report and a markdown table (docs/benchmarks.md, "LLM streams").
"""
import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

EVENT = re.compile(rb"data: (\{[^\n]*\})\n\n")


def now():
    return time.monotonic_ns()


class Backend:
    """vLLM-shaped streams; `closed` holds when each connection saw its EOF."""

    def __init__(self, events, gap_ms, first_ms):
        self.events, self.gap, self.first = events, gap_ms / 1e3, first_ms / 1e3
        self.closed = {}
        self.seen = {}
        self.connections = 0

    async def serve(self, reader, writer):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = json.loads(await reader.readexactly(length))
                tag = body.get("user", "")
                self.seen[tag] = now()
                events = body.get("max_tokens", self.events)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                eof = asyncio.ensure_future(reader.read(1))
                gone = False
                try:
                    # The first token's wait, watching for the caller leaving.
                    await asyncio.wait_for(asyncio.shield(eof), self.first)
                    self.closed[tag] = now()
                    writer.close()
                    return
                except asyncio.TimeoutError:
                    pass
                for i in range(events):
                    chunk = json.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m",
                                        "choices": [{"index": 0, "delta": {"content": f"t{i}"},
                                                     "finish_reason": None}],
                                        "stamp": now()}).encode()
                    e = b"data: " + chunk + b"\n\n"
                    writer.write(b"%x\r\n%s\r\n" % (len(e), e))
                    await writer.drain()
                    try:
                        await asyncio.wait_for(asyncio.shield(eof), self.gap)
                        gone = True
                    except asyncio.TimeoutError:
                        pass
                    if gone or eof.done():
                        self.closed[tag] = now()
                        writer.close()
                        return
                e = b"data: [DONE]\n\n"
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(e), e))
                await writer.drain()
                # The next request on this connection (or its end).
                first = await eof
                if not first:
                    return
                reader = Prefixed(first, reader)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return


class Prefixed:
    """A reader that gives one byte back first."""

    def __init__(self, head, reader):
        # Never nested: the previous one's byte was read with its request's head.
        self.head = head
        self.reader = reader.reader if isinstance(reader, Prefixed) else reader

    async def readuntil(self, sep):
        rest = await self.reader.readuntil(sep)
        head, self.head = self.head, b""
        return head + rest

    async def readexactly(self, n):
        return await self.reader.readexactly(n)

    async def read(self, n):
        return await self.reader.read(n)


CONNECTIONS = {}
SENT = {}


async def call(addr, tag, events, leave_after=None, leave_at_ms=None):
    """One streamed call: (ttft ns, [per-event delay ns], closed-at ns or None). Calls
    share one keep-alive connection per target, as the openai SDK's pool does; a call
    that leaves has one of its own."""
    if leave_after is None and addr in CONNECTIONS:
        reader, writer = CONNECTIONS.pop(addr)
    else:
        reader, writer = await asyncio.open_connection(*addr)
    body = json.dumps({"model": "m", "stream": True, "user": tag, "max_tokens": events,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    SENT[tag] = sent = now()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    if leave_at_ms is not None:
        # Gone before the first token: braid is still waiting for it (its commit point).
        await asyncio.sleep(leave_at_ms / 1e3)
        closed = now()
        writer.transport.abort()
        return None, [], closed
    buf, delays, ttft, seen, done = b"", [], None, 0, False
    while True:
        data = await reader.read(65536)
        t = now()
        if not data:
            break
        done = done or b"[DONE]" in buf + data
        buf += data
        for m in EVENT.finditer(buf):
            ev = json.loads(m.group(1))
            if ttft is None:
                ttft = t - sent
            delays.append(t - ev["stamp"])
            seen += 1
        if leave_after is not None and seen >= leave_after:
            closed = now()
            writer.transport.abort()
            return ttft, delays, closed
        if done and buf.endswith(b"\r\n0\r\n\r\n"):
            # The whole answer, its last chunk included: the connection is reusable.
            CONNECTIONS[addr] = (reader, writer)
            return ttft, delays, None
        cut = buf.rfind(b"\n\n")
        if cut >= 0:
            buf = buf[cut + 2:]
    writer.close()
    return ttft, delays, None


def spawn_braid(braid, backend_port, workers):
    work = tempfile.mkdtemp()
    cfg = os.path.join(work, "braid.yaml")
    with open(cfg, "w") as f:
        f.write(f"""routes:
  - model: m
    variants: [{{ name: only, backend: "http://127.0.0.1:{backend_port}" }}]
""")
    p = subprocess.Popen([braid, "proxy", "--config", cfg, "--listen", "127.0.0.1:0",
                          "--admin", "127.0.0.1:0", "--worker-threads", str(workers)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "BRAID_LOG": "info"})
    deadline = time.time() + 60
    while time.time() < deadline:
        line = p.stdout.readline()
        m = re.search(r"data=(\S+)", re.sub(r"\x1b\[[0-9;]*m", "", line))
        if m:
            host, port = m.group(1).rsplit(":", 1)
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
            return p, (host, int(port))
    raise RuntimeError("braid did not start")


def spawn_nginx(backend_port):
    """nginx as a streaming reverse proxy (no buffering, pooled upstream), for scale."""
    work = tempfile.mkdtemp()
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  upstream b {{ server 127.0.0.1:{backend_port}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off; proxy_request_buffering on;
    }}
  }}
}}
""")
    p = subprocess.Popen(["nginx", "-c", conf, "-p", work], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p, ("127.0.0.1", port)
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nginx did not start")


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(args):
    backend = Backend(args.events, args.gap_ms, args.first_ms)
    server = await asyncio.start_server(backend.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    braid, proxy = spawn_braid(args.braid, port, args.worker_threads)
    direct = ("127.0.0.1", port)
    peers = []
    try:
        targets = {"direct": direct, "braid": proxy}
        if args.nginx:
            nginx, addr = spawn_nginx(port)
            peers.append(nginx)
            targets["nginx"] = addr
        for name, addr in targets.items():  # warm up: connections, the pool
            for _ in range(5):
                await call(addr, f"warm-{name}", 5)
        out = {k: {"ttft": [], "delays": []} for k in targets}
        pairs, nginx_pairs = [], []
        for r in range(args.rounds):
            got = {}
            for name, addr in targets.items():
                ttft, delays, _ = await call(addr, f"{name}-{r}", args.events)
                got[name] = ttft
                out[name]["ttft"].append(ttft)
                out[name]["delays"].extend(delays)
            pairs.append(got["braid"] - got["direct"])
            if "nginx" in got:
                nginx_pairs.append(got["nginx"] - got["direct"])
        leave = {k: [] for k in targets}
        early = {k: [] for k in targets}
        for r in range(args.disconnects):
            for name, addr in targets.items():
                for kind, got, kw in (("mid", leave, {"leave_after": 3}),
                                      ("early", early, {"leave_at_ms": args.first_ms / 2})):
                    tag = f"leave-{kind}-{name}-{r}"
                    _, _, closed = await call(addr, tag, 1000, **kw)
                    deadline = time.time() + 5
                    while tag not in backend.closed and time.time() < deadline:
                        await asyncio.sleep(0.001)
                    got[name].append(backend.closed[tag] - closed if tag in backend.closed else None)
    finally:
        for p in [braid, *peers]:
            p.terminate()
            p.wait(timeout=10)
        server.close()
    ms = lambda ns: round(ns / 1e6, 3)
    report = {
        "rounds": args.rounds, "events_per_stream": args.events, "gap_ms": args.gap_ms,
        "backend_connections": backend.connections,
        "event_delay_p50_ms": {k: ms(statistics.median(v["delays"])) for k, v in out.items()},
        "event_delay_p99_ms": {k: ms(pct(v["delays"], 0.99)) for k, v in out.items()},
        "ttft_p50_ms": {k: ms(statistics.median(v["ttft"])) for k, v in out.items()},
        "ttft_added_median_of_pairs_ms": ms(statistics.median(pairs)),
        "nginx_ttft_added_median_of_pairs_ms": ms(statistics.median(nginx_pairs)) if nginx_pairs else None,
        "request_to_backend_p50_ms": {
            k: ms(statistics.median(backend.seen[f"{k}-{r}"] - SENT[f"{k}-{r}"] for r in range(args.rounds)))
            for k in targets},
        "disconnect_to_backend_ms": {
            k: {"p50": ms(statistics.median([x for x in v if x is not None])),
                "max": ms(max(x for x in v if x is not None)),
                "missed": sum(x is None for x in v)} for k, v in leave.items()},
        "disconnect_before_first_token_to_backend_ms": {
            k: {"p50": ms(statistics.median([x for x in v if x is not None])),
                "max": ms(max(x for x in v if x is not None)),
                "missed": sum(x is None for x in v)} for k, v in early.items()},
    }
    report["event_added_p50_ms"] = round(report["event_delay_p50_ms"]["braid"]
                                         - report["event_delay_p50_ms"]["direct"], 3)
    print(json.dumps(report, indent=2))
    d = report
    if d.get("nginx_ttft_added_median_of_pairs_ms") is not None:
        print(f"\nnginx, for scale: per event p50 {d['event_delay_p50_ms']['nginx']} ms, "
              f"time to first token adds {d['nginx_ttft_added_median_of_pairs_ms']} ms (median of pairs), "
              f"request to backend p50 {d['request_to_backend_p50_ms']['nginx']} ms")
    print("\n| measure | direct | through braid | braid adds | target |")
    print("|---|---|---|---|---|")
    print(f"| per event, p50 (arrival − backend's write) | {d['event_delay_p50_ms']['direct']} ms "
          f"| {d['event_delay_p50_ms']['braid']} ms | {d['event_added_p50_ms']} ms | ≤ 0.1 ms |")
    print(f"| per event, p99 | {d['event_delay_p99_ms']['direct']} ms | {d['event_delay_p99_ms']['braid']} ms | | |")
    print(f"| time to first token, p50 | {d['ttft_p50_ms']['direct']} ms | {d['ttft_p50_ms']['braid']} ms "
          f"| {d['ttft_added_median_of_pairs_ms']} ms (median of pairs) | ≤ 0.2 ms |")
    rq = d["request_to_backend_p50_ms"]
    print(f"| request written → backend has it, p50 | {rq['direct']} ms | {rq['braid']} ms | "
          f"{round(rq['braid'] - rq['direct'], 3)} ms | |")
    dd = d["disconnect_to_backend_ms"]
    print(f"| client leaves mid-stream → backend's connection ends, p50 / max | {dd['direct']['p50']} / {dd['direct']['max']} ms "
          f"| {dd['braid']['p50']} / {dd['braid']['max']} ms | | ≤ 100 ms |")
    de = d["disconnect_before_first_token_to_backend_ms"]
    print(f"| client leaves before the first token → backend's connection ends, p50 / max | {de['direct']['p50']} / {de['direct']['max']} ms "
          f"| {de['braid']['p50']} / {de['braid']['max']} ms | | ≤ 100 ms |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--braid", default="target/release/braid")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--events", type=int, default=50)
    ap.add_argument("--gap-ms", type=float, default=2.0)
    ap.add_argument("--first-ms", type=float, default=20.0)
    ap.add_argument("--disconnects", type=int, default=50)
    ap.add_argument("--nginx", action="store_true", help="nginx beside braid, for scale")
    ap.add_argument("--worker-threads", type=int, default=1)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
