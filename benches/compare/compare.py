#!/usr/bin/env python3
"""braid beside nginx, HAProxy and Envoy on loopback, and batching on vs off.

Each proxy does the same job: one listener, a 90/10 weighted split between two
upstreams on loopback, keep-alive to the upstreams, one worker thread. The upstreams
are two single-process nginx instances answering a fixed Open Inference Protocol
reply; "direct" is the load generator talking to the first of them.

Measured per target, rounds interleaved round-robin (every target once per round):
  - closed loop (wrk, fixed connections): requests/s and proxied/direct ratio;
  - the proxy's CPU time per request, from /proc/PID/stat utime+stime over the
    closed-loop run, and its RSS after load;
  - the split each upstream saw (nginx stub_status), to show the 90/10 is real;
  - open loop at fixed rates (oha, latency correction): p50, p99, p99.9, and the
    latency added over direct.
Then the batching scenario (cargo bench --bench batching) and docs/benchmarks.md
with tables and SVG charts.

Run through benches/compare/run, which installs the peers first.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

# Everything here is on loopback: never through a proxy from the environment.
urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({})))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import charts  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REPLY = (
    '{"model_name":"demo","outputs":[{"name":"label","datatype":"BYTES",'
    '"shape":[1],"data":["positive"]}]}'
)
REQUEST = '{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["a fine day"]}]}'
PATH = "/v2/models/demo/infer"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXIES = ["braid", "nginx", "haproxy", "envoy"]
TODAY = datetime.date.today().isoformat()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(cpu):
    """taskset prefix; no pinning on a one-core machine."""
    if cpu is None or os.cpu_count() < 2 or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", str(cpu)]


class Proc:
    """A started server: its process group is killed on stop."""

    def __init__(self, name, argv, cwd, cpu):
        self.name = name
        self.log = open(os.path.join(cwd, f"{name}.log"), "wb")
        self.popen = subprocess.Popen(
            pin(cpu) + argv,
            cwd=cwd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def pids(self):
        """The process and its descendants (nginx workers, and so on)."""
        out, todo = [], [self.popen.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
        return out

    def cpu_seconds(self):
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except OSError:
                pass
        return total / CLK_TCK

    def rss_mib(self):
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def stop(self):
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self.log.close()

    def check_alive(self):
        if self.popen.poll() is not None:
            with open(self.log.name, errors="replace") as f:
                tail = f.read()[-2000:]
            raise SystemExit(f"{self.name} exited ({self.popen.returncode}):\n{tail}")


def launch(work, name, conf_name, conf_text, argv, cpu, port):
    """Writes a server's config file, starts it, and records the port it serves on.
    `argv` is a function of the config file's path."""
    conf = os.path.join(work, conf_name)
    with open(conf, "w") as f:
        f.write(conf_text)
    p = Proc(name, argv(conf), work, cpu)
    p.port = port
    return p


def wait_ready(proc, url, method="GET", body=None, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            req = urllib.request.Request(url, data=body, method=method)
            req.add_header("content-type", "application/json")
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    proc.stop()
    raise SystemExit(f"{proc.name} not ready at {url} after {timeout}s")


# ---------------------------------------------------------------------------
# The upstreams and the four proxies, configured alike.


def start_upstream(work, name, cpu):
    port = free_port()
    text = f"""
daemon off; master_process off; worker_processes 1; pid {work}/{name}.pid;
error_log {work}/{name}.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  client_body_temp_path {work}/{name}-body;
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location = /_count {{ stub_status; }}
    location / {{ default_type application/json; return 200 '{REPLY}'; }}
  }}
}}
"""
    p = launch(work, name, f"{name}.conf", text, lambda c: ["nginx", "-p", work, "-c", c],
               cpu, port)
    wait_ready(p, f"http://127.0.0.1:{port}{PATH}", "POST", REQUEST.encode())
    return p


def upstream_count(up):
    """Requests the upstream has served, less this query itself."""
    with urllib.request.urlopen(f"http://127.0.0.1:{up.port}/_count", timeout=5) as r:
        text = r.read().decode()
    # "Active connections: 1\nserver accepts handled requests\n 3 3 7 \n..."
    return int(text.splitlines()[2].split()[2])


def braid_config(a, b):
    return f"""routes:
  - model: demo
    variants:
      - {{ name: a, weight: 90, backend: "http://127.0.0.1:{a.port}" }}
      - {{ name: b, weight: 10, backend: "http://127.0.0.1:{b.port}" }}
"""


def start_braid(work, binary, a, b, cpu, wrapper=(), ready_timeout=30):
    """braid with one worker thread; `wrapper` goes before it (valgrind, say)."""
    port, admin = free_port(), free_port()
    p = launch(work, "braid", "braid.yaml", braid_config(a, b),
               lambda c: [*wrapper, binary, "proxy", "--listen", f"127.0.0.1:{port}",
                          "--admin", f"127.0.0.1:{admin}", "--worker-threads", "1",
                          "--config", c],
               cpu, port)
    wait_ready(p, f"http://127.0.0.1:{admin}/readyz", timeout=ready_timeout)
    return p


def start_nginx(work, a, b, cpu):
    port = free_port()
    text = f"""
daemon off; master_process off; worker_processes 1; pid {work}/nginx-proxy.pid;
error_log {work}/nginx-proxy.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  client_body_temp_path {work}/nginx-proxy-body;
  proxy_temp_path {work}/nginx-proxy-tmp;
  upstream backends {{
    server 127.0.0.1:{a.port} weight=9;
    server 127.0.0.1:{b.port} weight=1;
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""
    return launch(work, "nginx", "nginx-proxy.conf", text,
                  lambda c: ["nginx", "-p", work, "-c", c], cpu, port)


def start_haproxy(work, a, b, cpu):
    port = free_port()
    text = f"""
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 300s
  timeout server 300s
  option http-keep-alive
  http-reuse always
frontend in
  bind 127.0.0.1:{port}
  default_backend models
backend models
  balance roundrobin
  server a 127.0.0.1:{a.port} weight 90
  server b 127.0.0.1:{b.port} weight 10
"""
    return launch(work, "haproxy", "haproxy.cfg", text, lambda c: ["haproxy", "-db", "-f", c],
                  cpu, port)


def start_envoy(work, a, b, cpu):
    port = free_port()

    def cluster(name, up):
        return f"""
  - name: {name}
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {up.port} }} }} }}"""

    text = f"""static_resources:
  listeners:
  - name: in
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  weighted_clusters:
                    clusters:
                    - {{ name: a, weight: 90 }}
                    - {{ name: b, weight: 10 }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:{cluster("a", a)}{cluster("b", b)}
"""
    return launch(work, "envoy", "envoy.yaml", text,
                  lambda c: ["envoy", "-c", c, "--concurrency", "1", "--log-level", "error",
                             "--disable-hot-restart", "--base-id", str(os.getpid() % 60000)],
                  cpu, port)


# ---------------------------------------------------------------------------
# Load.


def wrk(url, work, seconds, connections, cpu):
    script = os.path.join(work, "post.lua")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(
                'wrk.method = "POST"\n'
                f"wrk.body = {json.dumps(REQUEST)}\n"
                'wrk.headers["Content-Type"] = "application/json"\n'
            )
    out = subprocess.run(
        pin(cpu) + ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", script, url],
        capture_output=True, text=True, check=True,
    ).stdout
    requests = rps = None
    errors = 0
    for line in out.splitlines():
        words = line.split()
        if "requests in" in line:
            requests = int(words[0])
        elif line.startswith("Requests/sec:"):
            rps = float(words[1])
        elif "Non-2xx" in line or line.strip().startswith("Socket errors"):
            errors += sum(int(w.rstrip(",")) for w in words if w.rstrip(",").isdigit())
    if requests is None or rps is None:
        raise SystemExit(f"could not read wrk's output:\n{out}")
    return {"requests": requests, "rps": rps, "errors": errors}


def oha(url, rate, seconds, connections, cpu):
    out = subprocess.run(
        pin(cpu) + ["oha", "--no-tui", "--output-format", "json", "-z", f"{seconds}s",
                    "-q", str(rate), "--latency-correction", "-c", str(connections),
                    "-m", "POST", "-H", "content-type: application/json", "-d", REQUEST, url],
        capture_output=True, text=True, check=True,
    ).stdout
    doc = json.loads(out)
    pct = doc["latencyPercentiles"]
    codes = doc.get("statusCodeDistribution", {})
    ok = codes.get("200", 0)
    # Requests still in flight when the run's time is up are cut off by oha and
    # reported as "aborted due to deadline": not failures of the target.
    errors = {k: v for k, v in doc.get("errorDistribution", {}).items() if "deadline" not in k}
    return {
        "rps": doc["summary"]["requestsPerSec"],
        "p50": pct["p50"] * 1e3,
        "p99": pct["p99"] * 1e3,
        "p99.9": pct["p99.9"] * 1e3,
        "ok": ok,
        "failed": sum(codes.values()) - ok + sum(errors.values()),
        "errors": errors,
    }


# ---------------------------------------------------------------------------


def summarize(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_proxies(args, work):
    cpu_proxy, cpu_load = (0, 1) if os.cpu_count() >= 2 else (None, None)
    procs = []
    try:
        a = start_upstream(work, "upstream-a", cpu_load)
        b = start_upstream(work, "upstream-b", cpu_load)
        procs += [a, b]
        starters = {
            "braid": lambda: start_braid(work, args.braid, a, b, cpu_proxy),
            "nginx": lambda: start_nginx(work, a, b, cpu_proxy),
            "haproxy": lambda: start_haproxy(work, a, b, cpu_proxy),
            "envoy": lambda: start_envoy(work, a, b, cpu_proxy),
        }
        running = {}
        for name in args.proxies:
            p = starters[name]()
            procs.append(p)
            wait_ready(p, f"http://127.0.0.1:{p.port}{PATH}", "POST", REQUEST.encode())
            running[name] = p
        targets = ["direct"] + list(running)
        url = {t: f"http://127.0.0.1:{a.port if t == 'direct' else running[t].port}{PATH}"
               for t in targets}
        samples = {t: [] for t in targets}
        for r in range(args.rounds):
            for t in targets:
                proc = running.get(t)
                before = (proc.cpu_seconds() if proc else 0, upstream_count(a), upstream_count(b))
                closed = wrk(url[t], work, args.seconds, args.connections, cpu_load)
                after = (proc.cpu_seconds() if proc else 0, upstream_count(a), upstream_count(b))
                s = {
                    "rps": closed["rps"],
                    "errors": closed["errors"],
                    "split": (after[1] - before[1] - 1, after[2] - before[2] - 1),
                    "cpu_us": (after[0] - before[0]) / closed["requests"] * 1e6 if proc else None,
                }
                for rate in args.rates:
                    s[rate] = oha(url[t], rate, args.seconds, args.open_connections, cpu_load)
                s["rss"] = proc.rss_mib() if proc else None
                samples[t].append(s)
                print(f"round {r + 1}/{args.rounds} {t}: {closed['rps']:.0f} req/s closed"
                      + (f", {s['cpu_us']:.1f} us CPU/req, {s['rss']:.1f} MiB" if proc else "")
                      + "".join(f", p50 {s[q]['p50']:.3f} ms @{q}" for q in args.rates),
                      flush=True)
        return samples
    finally:
        for p in reversed(procs):
            p.stop()


def proxy_results(args, samples):
    res = {}
    direct_rps = summarize([s["rps"] for s in samples["direct"]])
    for t, ss in samples.items():
        row = {
            "rps": summarize([s["rps"] for s in ss]),
            # the ratio within each round, so drift between rounds cancels
            "ratio": summarize([s["rps"] / d["rps"] for s, d in zip(ss, samples["direct"])]),
            "cpu_us": summarize([s["cpu_us"] for s in ss]),
            "rss": summarize([s["rss"] for s in ss]),
            "errors": sum(s["errors"] for s in ss),
            "split": [sum(s["split"][0] for s in ss), sum(s["split"][1] for s in ss)],
            "open": {},
        }
        for rate in args.rates:
            o = {}
            for q in ("p50", "p99", "p99.9", "rps"):
                o[q] = summarize([s[rate][q] for s in ss])
            o["added_p50"] = summarize(
                [s[rate]["p50"] - d[rate]["p50"] for s, d in zip(ss, samples["direct"])])
            o["added_p99"] = summarize(
                [s[rate]["p99"] - d[rate]["p99"] for s, d in zip(ss, samples["direct"])])
            o["failed"] = sum(s[rate]["failed"] for s in ss)
            o["errors"] = sorted({e for s in ss for e in s[rate]["errors"]})
            row["open"][rate] = o
        res[t] = row
    res["direct"]["rps"] = direct_rps
    return res


def run_batching(args, work):
    out = os.path.join(work, "batching.json")
    cmd = ["cargo", "bench", "--locked", "--bench", "batching"]
    if args.quick:
        cmd += ["--profile", "dev"]
    cmd += ["--", "--seconds", str(args.batching_seconds), "--json", out]
    if args.skip_minilm:
        cmd.append("--skip-minilm")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(out) as f:
        return json.load(f)


# ---------------------------------------------------------------------------
# The report.


def fmt(s, digits=1, unit=""):
    if s is None:
        return "-"
    m, lo, hi = s["median"], s["min"], s["max"]
    if lo == hi:
        return f"{m:.{digits}f}{unit}"
    return f"{m:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})"


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 1024 / 1024
    return f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB, Linux {platform.release()}"


def versions():
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            text = (r.stdout + r.stderr).strip().splitlines()
            return text[0] if text else "?"
        except OSError:
            return "not installed"
    return {
        "braid": first_line([ARGS.braid, "--version"]),
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "envoy": first_line(["envoy", "--version"]).split("version:")[-1].strip(),
        "wrk": first_line(["wrk", "-v"]),
        "oha": first_line(["oha", "--version"]),
    }


def write_report(args, res, batching, command, host=None):
    docs = args.out
    os.makedirs(os.path.join(docs, "img"), exist_ok=True)
    names = ["direct"] + [p for p in args.proxies if p in res]
    proxies = [p for p in names if p != "direct"]

    def svg(name, text):
        with open(os.path.join(docs, "img", name), "w") as f:
            f.write(text)
        return f"img/{name}"

    charts_md = []
    if res:
        cpu = svg("cpu-per-request.svg", charts.bar_chart(
            "Proxy CPU per request (lower is better)", "microseconds of CPU per request",
            [(p, res[p]["cpu_us"]["median"], (res[p]["cpu_us"]["min"], res[p]["cpu_us"]["max"]))
             for p in proxies]))
        ratio = svg("throughput-ratio.svg", charts.bar_chart(
            "Closed-loop throughput, proxied / direct (higher is better)", "ratio",
            [(p, res[p]["ratio"]["median"], (res[p]["ratio"]["min"], res[p]["ratio"]["max"]))
             for p in proxies]))
        open_loop = []
        if args.rates:
            p50 = svg("latency-p50.svg", charts.line_chart(
                "p50 latency at fixed rates (open loop)", "requests/s", "ms",
                [(t, [(r, res[t]["open"][r]["p50"]["median"]) for r in args.rates]) for t in names],
                log_x=True, xticks=args.rates))
            p99 = svg("latency-p99.svg", charts.line_chart(
                "p99 latency at fixed rates (open loop)", "requests/s", "ms",
                [(t, [(r, res[t]["open"][r]["p99"]["median"]) for r in args.rates]) for t in names],
                log_x=True, xticks=args.rates))
            open_loop = [f"![p50 vs rate]({p50})", f"![p99 vs rate]({p99})"]
        charts_md += [f"![CPU per request]({cpu})", f"![throughput ratio]({ratio})"] + open_loop
    batch_charts = []
    for sc in batching.get("scenarios", []):
        slug = sc["slug"]
        series = [(mode, [(pt["concurrency"], pt["rps"]) for pt in sc["points"][mode]])
                  for mode in ("direct", "off", "on")]
        path = svg(f"batching-{slug}.svg", charts.line_chart(
            f"{sc['name']}: throughput", "concurrency (closed loop)", "requests/s",
            [({"direct": "direct to executor", "off": "braid, batching off",
               "on": "braid, batching on"}[m], pts) for m, pts in series],
            log_x=True, xticks=[pt["concurrency"] for pt in sc["points"]["on"]]))
        batch_charts.append((sc, path))

    L = []
    L.append("# Benchmarks: braid beside nginx, HAProxy and Envoy\n")
    L.append("Generated by `benches/compare/run`; do not edit by hand. "
             "What each figure means and how it was taken is at the end.\n")
    L.append(f"- **Date:** {TODAY}")
    host = host or machine()
    L.append(f"- **Machine:** {host}")
    L.append(f"- **Command:** `{command}`")
    v = versions()
    L.append("- **Versions:** " + ", ".join(f"{k}: {val}" for k, val in v.items()))
    L.append(f"- **Setup:** {args.rounds} round(s), targets interleaved round-robin; "
             f"{args.seconds}s per measurement; proxy pinned to CPU 0, load generator and "
             "upstreams to CPU 1. Every proxy: one worker thread, a 90/10 weighted split "
             "over two nginx upstreams with keep-alive, "
             f"a {len(REQUEST)}-byte JSON POST to `{PATH}` answered with {len(REPLY)} bytes. Figures are the median, (min-max) across rounds.\n")
    if res:
        L.append("## Proxies, closed loop\n")
        L.append(f"wrk, 1 thread, {args.connections} connections.\n")
        L.append("| target | requests/s | proxied / direct | CPU us / request | RSS after load (MiB) "
                 "| upstream a : b | errors |")
        L.append("|---|---|---|---|---|---|---|")
        for t in names:
            r = res[t]
            a, b = r["split"]
            share = f"{a} : {b} ({100 * b / (a + b):.1f}% b)" if a + b else "-"
            L.append(f"| {t} | {fmt(r['rps'], 0)} | {fmt(r['ratio'], 3) if t != 'direct' else '1'} "
                     f"| {fmt(r['cpu_us'])} | {fmt(r['rss'])} | {share} | {r['errors']} |")
        L.append("")
        if args.rates:
            L.append("## Proxies, open loop\n")
            L.append(f"oha with latency correction, {args.open_connections} connections, "
                     "fixed request rates. Latency in milliseconds; *added* is the proxy's p50 "
                     "(p99) minus direct's in the same round.\n")
            L.append("| target | rate | achieved req/s | p50 | p99 | p99.9 | added p50 | added p99 | failed |")
            L.append("|---|---|---|---|---|---|---|---|---|")
            for rate in args.rates:
                for t in names:
                    o = res[t]["open"][rate]
                    added = (fmt(o["added_p50"], 3), fmt(o["added_p99"], 3)) if t != "direct" else ("-", "-")
                    L.append(f"| {t} | {rate} | {fmt(o['rps'], 0)} | {fmt(o['p50'], 3)} | "
                             f"{fmt(o['p99'], 3)} | {fmt(o['p99.9'], 3)} | {added[0]} | {added[1]} "
                             f"| {o['failed']} |")
            L.append("")
        L += [c + "\n" for c in charts_md]
        if "braid" in res and "nginx" in res:
            L.append("## Targets\n")
            br, ng = res["braid"], res["nginx"]
            rows = [
                ("CPU per request <= nginx's", f"{br['cpu_us']['median']:.1f} us",
                 f"{ng['cpu_us']['median']:.1f} us", br["cpu_us"]["median"] <= ng["cpu_us"]["median"]),
                ("proxied/direct >= nginx's", f"{br['ratio']['median']:.3f}",
                 f"{ng['ratio']['median']:.3f}", br["ratio"]["median"] >= ng["ratio"]["median"]),
                ("RSS after load <= 20 MiB", f"{br['rss']['median']:.1f} MiB", "20 MiB",
                 br["rss"]["median"] <= 20),
            ]
            if args.rates:
                low = min(args.rates)
                rows.insert(2, (f"added p50 at {low} rps <= 0.1 ms",
                                f"{br['open'][low]['added_p50']['median']:.3f} ms",
                                "0.100 ms", br["open"][low]["added_p50"]["median"] <= 0.1))
            L.append("| target | braid | bar | met |")
            L.append("|---|---|---|---|")
            for name, got, bar, ok in rows:
                L.append(f"| {name} | {got} | {bar} | {'yes' if ok else '**no**'} |")
            L.append("")
    if batch_charts:
        L.append("## Batching: on vs off vs direct\n")
        L.append(f"`cargo bench --bench batching`: closed loop, one row per request, "
                 f"{batching.get('seconds')}s per point; braid with batching "
                 "(max_batch_size 64) and without, and the load generator talking to the "
                 "executor directly. Proxy, executor and load generator share the machine.\n")
        for sc, path in batch_charts:
            L.append(f"### {sc['name']}\n")
            L.append("| concurrency | direct req/s | off req/s | on req/s | on/off | direct p50/p99 ms "
                     "| off p50/p99 ms | on p50/p99 ms |")
            L.append("|---|---|---|---|---|---|---|---|")
            for d, off, on in zip(*(sc["points"][m] for m in ("direct", "off", "on"))):
                L.append(f"| {on['concurrency']} | {d['rps']:.0f} | {off['rps']:.0f} | {on['rps']:.0f} "
                         f"| {on['rps'] / off['rps']:.2f}x | {d['p50']:.2f} / {d['p99']:.2f} "
                         f"| {off['p50']:.2f} / {off['p99']:.2f} | {on['p50']:.2f} / {on['p99']:.2f} |")
            L.append("")
            L.append(f"![{sc['name']}]({path})\n")
    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "NOTES.md")
    if os.path.exists(notes):
        with open(notes) as f:
            L.append(f.read())
    with open(os.path.join(docs, "benchmarks.md"), "w") as f:
        f.write("\n".join(L).rstrip() + "\n")
    setup = {k: getattr(args, k) for k in
             ("rounds", "seconds", "connections", "open_connections", "rates", "proxies")}
    with open(os.path.join(docs, "benchmarks.json"), "w") as f:
        json.dump({"command": command, "date": TODAY, "machine": host, "setup": setup, "proxies": res,
                   "batching": batching}, f, indent=1, default=str)


def render(args):
    """The report again from a recorded run (after editing NOTES.md, say)."""
    global ARGS, TODAY
    with open(args.render) as f:
        doc = json.load(f)
    setup = doc.get("setup", {"rounds": 3, "seconds": 10, "connections": 16,
                              "open_connections": 32, "rates": [2000, 10000],
                              "proxies": PROXIES})
    for k, v in setup.items():
        setattr(args, k, v)
    TODAY = doc.get("date", TODAY)
    res = doc["proxies"]
    for row in res.values():
        row["open"] = {int(k): v for k, v in row["open"].items()}
    args.out = args.out or os.path.dirname(os.path.abspath(args.render))
    ARGS = args
    # The machine the run was recorded on, not the one rendering it.
    write_report(args, res, doc["batching"], doc.get("command", "benches/compare/run"),
                 doc.get("machine"))
    print(f"wrote {os.path.join(args.out, 'benchmarks.md')}")


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="one short round of everything (CI); the report goes to a temp dir")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--open-connections", type=int, default=32)
    ap.add_argument("--rates", default="2000,10000")
    ap.add_argument("--proxies", default=",".join(PROXIES))
    ap.add_argument("--batching-seconds", type=int, default=3)
    ap.add_argument("--skip-batching", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--braid", default=os.path.join(ROOT, "target", "release", "braid"))
    ap.add_argument("--out", default=None, help="where benchmarks.md and img/ go (default: docs/)")
    ap.add_argument("--render", metavar="JSON",
                    help="measure nothing: write the report again from a run's benchmarks.json")
    args = ap.parse_args()
    if args.render:
        return render(args)
    command = " ".join(["benches/compare/run"] + sys.argv[1:])
    if args.quick:
        # Closed loop and batching only: the open loop needs oha, which takes ~7 minutes
        # to build on a fresh machine; full runs exercise that path.
        args.rounds, args.seconds, args.batching_seconds = 1, 2, 1
        args.rates = ""
        args.out = args.out or tempfile.mkdtemp(prefix="braid-compare-")
    args.out = args.out or os.path.join(ROOT, "docs")
    args.braid = os.path.abspath(args.braid)
    args.rates = [int(r) for r in args.rates.split(",") if r]
    args.proxies = [p for p in args.proxies.split(",") if p]
    ARGS = args
    for tool in ["wrk", "nginx"] + (["oha"] if args.rates else []) + [p for p in args.proxies if p != "braid"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed: run benches/compare/run, which installs it")
    if "braid" in args.proxies and not os.access(args.braid, os.X_OK):
        raise SystemExit(f"no braid binary at {args.braid}")
    with tempfile.TemporaryDirectory(prefix="braid-compare-") as work:
        samples = run_proxies(args, work) if args.proxies else {}
        res = proxy_results(args, samples) if samples else {}
        batching = {} if args.skip_batching else run_batching(args, work)
    write_report(args, res, batching, command)
    print(f"wrote {os.path.join(args.out, 'benchmarks.md')}")
    if res:
        for t in res:
            r = res[t]
            print(f"{t:8} {fmt(r['rps'], 0):>24} req/s  ratio {fmt(r['ratio'], 3):>22}  "
                  f"CPU {fmt(r['cpu_us']):>20} us/req  RSS {fmt(r['rss'])} MiB  split {r['split']}")
        # A proxy that did not split 90/10 is a broken comparison. Failed requests are
        # reported (an overloaded peer may drop some at the highest rate), not fatal.
        for t in args.proxies:
            a, b = res[t]["split"]
            share = b / (a + b) if a + b else 0
            if not 0.07 <= share <= 0.13:
                raise SystemExit(f"{t} sent {share:.1%} to upstream b, not about 10%")
            failed = res[t]["errors"] + sum(o["failed"] for o in res[t]["open"].values())
            if failed:
                why = {e for o in res[t]["open"].values() for e in o["errors"]}
                print(f"warning: {t}: {failed} requests failed: {sorted(why)}")


if __name__ == "__main__":
    main()
