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
# braid-hyper: the same binary with `--http1 hyper` (hyper's HTTP/1.1 server instead of
# braid's own), so the before and after of issue 29 are paired in one run.
PROXIES = ["braid", "braid-hyper", "nginx", "haproxy", "envoy"]
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
        """(user, system, total) CPU seconds of the process and its children so far.
        User and system come from /proc/PID/stat in clock ticks (10 ms); the total,
        from every thread's /proc/PID/task/TID/schedstat in nanoseconds, is the
        precise figure: the ticks only split it."""
        user = system = total_ns = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                user += int(fields[11])
                system += int(fields[12])
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                        total_ns += int(f.read().split()[0])
            except OSError:
                pass
        return user / CLK_TCK, system / CLK_TCK, total_ns / 1e9

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
    """(connections accepted, requests served) by the upstream so far; the
    status query itself is one of each."""
    with urllib.request.urlopen(f"http://127.0.0.1:{up.port}/_count", timeout=5) as r:
        text = r.read().decode()
    # "Active connections: 1\nserver accepts handled requests\n 3 3 7 \n..."
    words = text.splitlines()[2].split()
    return int(words[0]), int(words[2])


class Upstreams:
    """Both upstreams' counters before a measurement, and what changed after it."""

    def __init__(self, ups):
        self.ups = ups
        self.before = [upstream_count(u) for u in ups]

    def delta(self):
        after = [upstream_count(u) for u in self.ups]
        # less the status query of `before` (one accept, one request each)
        accepts = sum(a[0] - b[0] - 1 for a, b in zip(after, self.before))
        requests = [a[1] - b[1] - 1 for a, b in zip(after, self.before)]
        return accepts, requests


def braid_config(a, b):
    return f"""routes:
  - model: demo
    variants:
      - {{ name: a, weight: 90, backend: "http://127.0.0.1:{a.port}" }}
      - {{ name: b, weight: 10, backend: "http://127.0.0.1:{b.port}" }}
"""


def start_braid(work, binary, a, b, cpu, wrapper=(), ready_timeout=30, http1="braid",
                extra=(), name=None):
    """braid with one worker thread; `wrapper` goes before it (valgrind, say); `http1`
    picks who serves plain HTTP/1.1 (`--http1`); `extra` are more flags (TLS files)."""
    port, admin = free_port(), free_port()
    name = name or ("braid" if http1 == "braid" else f"braid-{http1}")
    p = launch(work, name, f"{name}.yaml", braid_config(a, b),
               lambda c: [*wrapper, binary, "proxy", "--listen", f"127.0.0.1:{port}",
                          "--admin", f"127.0.0.1:{admin}", "--worker-threads", "1",
                          "--http1", http1, *extra, "--config", c],
               cpu, port)
    wait_ready(p, f"http://127.0.0.1:{admin}/readyz", timeout=ready_timeout)
    return p


def start_nginx(work, a, b, cpu, wrapper=()):
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
    # nginx's default (1000 requests, then a new connection) would make it reconnect
    # to its upstreams; every proxy here keeps its upstream connections.
    keepalive_requests 10000000;
    keepalive_timeout 300s;
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
                  lambda c: [*wrapper, "nginx", "-p", work, "-c", c], cpu, port)


def start_haproxy(work, a, b, cpu, wrapper=()):
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
    return launch(work, "haproxy", "haproxy.cfg", text,
                  lambda c: [*wrapper, "haproxy", "-db", "-f", c], cpu, port)


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


# Where each process runs. "separate": the proxy alone on CPU 0, the load generator and
# both upstreams on CPU 1 (the proxy's cost, isolated). "pod": the proxy and its
# upstreams share CPU 0, as a sidecar shares its pod with the model server, and the
# load generator has CPU 1.
LAYOUTS = {
    "separate": {"proxy": 0, "upstream": 1, "load": 1},
    "pod": {"proxy": 0, "upstream": 0, "load": 1},
}


def measure(url, proc, ups, work, args, cpus, rate):
    """One measurement of a target: closed loop (rate None) or open loop at `rate`,
    with the proxy's user and system CPU per request and its upstream accepts."""
    cpu0 = proc.cpu_seconds() if proc else (0, 0, 0)
    counts = Upstreams(ups)
    if rate is None:
        r = wrk(url, work, args.seconds, args.connections, cpus["load"])
        r["failed"] = r.pop("errors")
    else:
        r = oha(url, rate, args.seconds, args.open_connections, cpus["load"])
    cpu1 = proc.cpu_seconds() if proc else (0, 0, 0)
    accepts, split = counts.delta()
    served = max(sum(split), 1)
    r["split"] = split
    r["accepts"] = accepts
    r["accepts_per_kreq"] = accepts / served * 1000
    if proc:
        r["cpu_us"] = (cpu1[2] - cpu0[2]) / served * 1e6
        user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        share = user / (user + system) if user + system else 0.5
        r["user_us"] = r["cpu_us"] * share
        r["sys_us"] = r["cpu_us"] - r["user_us"]
    return r


def run_proxies(args, work, layout):
    cpus = LAYOUTS[layout] if os.cpu_count() >= 2 else {"proxy": None, "upstream": None,
                                                          "load": None}
    procs = []
    try:
        a = start_upstream(work, "upstream-a", cpus["upstream"])
        b = start_upstream(work, "upstream-b", cpus["upstream"])
        procs += [a, b]
        starters = {
            "braid": lambda: start_braid(work, args.braid, a, b, cpus["proxy"]),
            "braid-hyper": lambda: start_braid(work, args.braid, a, b, cpus["proxy"],
                                               http1="hyper"),
            "nginx": lambda: start_nginx(work, a, b, cpus["proxy"]),
            "haproxy": lambda: start_haproxy(work, a, b, cpus["proxy"]),
            "envoy": lambda: start_envoy(work, a, b, cpus["proxy"]),
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
                s = {"closed": measure(url[t], proc, [a, b], work, args, cpus, None)}
                for rate in args.rates:
                    s[rate] = measure(url[t], proc, [a, b], work, args, cpus, rate)
                s["rss"] = proc.rss_mib() if proc else None
                samples[t].append(s)
                line = f"{layout} round {r + 1}/{args.rounds} {t}: {s['closed']['rps']:.0f} req/s"
                if proc:
                    line += "".join(f", {s[m]['cpu_us']:.1f} us/req @{m}"
                                    for m in ["closed"] + args.rates)
                    line += f", {s['rss']:.1f} MiB"
                print(line, flush=True)
        return samples
    finally:
        for p in reversed(procs):
            p.stop()


def proxy_results(args, samples):
    """Medians and ranges per target and measurement; ratios are taken within each
    round (paired), so drift between rounds cancels."""
    measures = ["closed"] + args.rates
    direct = samples["direct"]
    res = {}
    for t, ss in samples.items():
        row = {"rss": summarize([s["rss"] for s in ss]),
               "split": [sum(s[m]["split"][i] for s in ss for m in measures) for i in (0, 1)]}
        for m in measures:
            o = {q: summarize([s[m].get(q) for s in ss])
                 for q in ("rps", "cpu_us", "user_us", "sys_us", "accepts", "accepts_per_kreq",
                           "p50", "p99", "p99.9")}
            o["ratio"] = summarize([s[m]["rps"] / d[m]["rps"] for s, d in zip(ss, direct)])
            if m != "closed":
                o["added_p50"] = summarize([s[m]["p50"] - d[m]["p50"] for s, d in zip(ss, direct)])
                o["added_p99"] = summarize([s[m]["p99"] - d[m]["p99"] for s, d in zip(ss, direct)])
                o["errors"] = sorted({e for s in ss for e in s[m]["errors"]})
            o["failed"] = sum(s[m]["failed"] for s in ss)
            if "nginx" in samples and t not in ("direct", "nginx"):
                ng = samples["nginx"]
                o["cpu_vs_nginx"] = summarize(
                    [s[m]["cpu_us"] / n[m]["cpu_us"] for s, n in zip(ss, ng)])
                o["ratio_vs_nginx"] = summarize(
                    [(s[m]["rps"] / d[m]["rps"]) / (n[m]["rps"] / d[m]["rps"])
                     for s, n, d in zip(ss, ng, direct)])
                if m != "closed":
                    o["added_p50_vs_nginx"] = summarize(
                        [s[m]["p50"] - n[m]["p50"] for s, n in zip(ss, ng)])
                    o["added_p99_vs_nginx"] = summarize(
                        [s[m]["p99"] - n[m]["p99"] for s, n in zip(ss, ng)])
            row[m] = o
        res[t] = row
    return res


# ---------------------------------------------------------------------------
# Instructions per request (callgrind): a figure machine noise does not move.


def callgrind_load(port, requests, connections):
    """`requests` POSTs over `connections` keep-alive connections, each checked."""
    import http.client
    import threading

    failures = []

    def worker(n):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for _ in range(n):
            c.request("POST", PATH, body=REQUEST, headers={"content-type": "application/json"})
            r = c.getresponse()
            r.read()
            if r.status != 200:
                failures.append(r.status)
        c.close()

    share = [requests // connections + (i < requests % connections) for i in range(connections)]
    threads = [threading.Thread(target=worker, args=(n,)) for n in share]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit(f"callgrind load: {len(failures)} failed requests ({failures[:5]})")


def callgrind_ir(work, name, start, a, b, requests, connections=4, out=None, load=None):
    """User-space instructions per proxied request: counters zeroed after a warm-up,
    `requests` sent, counters dumped. Returns (Ir per request, dump file). `load(port,
    n)` sends the requests (default: `callgrind_load` over keep-alive HTTP/1.1, after
    waiting for the data port to answer)."""
    import glob
    prefix = os.path.join(work, f"cg-{name}")
    wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={prefix}.%p",
               *os.environ.get("CALLGRIND_FLAGS", "").split()]
    p = start(wrapper)
    try:
        if load is None:
            wait_ready(p, f"http://127.0.0.1:{p.port}{PATH}", "POST", REQUEST.encode(),
                       timeout=180)
            load = lambda port, n: callgrind_load(port, n, connections)  # noqa: E731
        load(p.port, 500)
        # Unpinned, so the process started is valgrind running the proxy; nginx and
        # HAProxy run as one process here.
        pid = str(p.popen.pid)
        subprocess.run(["callgrind_control", "--zero", pid], check=True, capture_output=True)
        counts = Upstreams([a, b])
        load(p.port, requests)
        _, split = counts.delta()
        for f in glob.glob(f"{prefix}.*"):
            os.remove(f)
        subprocess.run(["callgrind_control", "--dump", pid], check=True, capture_output=True)
        deadline = time.time() + 60
        while not glob.glob(f"{prefix}.*") and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        dump = sorted(glob.glob(f"{prefix}.*"))[-1]
    finally:
        p.stop()
    total = 0
    with open(dump) as f:
        for line in f:
            if line.startswith("summary:") or line.startswith("totals:"):
                total = int(line.split()[1])
    if out:
        shutil.copy(dump, out)
    return total / max(sum(split), 1), dump


def run_callgrind(args, work):
    if not shutil.which("valgrind"):
        print("valgrind is not installed: no instruction counts", flush=True)
        return {}
    a = start_upstream(work, "cg-upstream-a", None)
    b = start_upstream(work, "cg-upstream-b", None)
    out = {}
    try:
        starters = {
            "braid": lambda w: start_braid(work, args.braid, a, b, None, w, ready_timeout=180),
            "braid-hyper": lambda w: start_braid(work, args.braid, a, b, None, w,
                                                 ready_timeout=180, http1="hyper"),
            "nginx": lambda w: start_nginx(work, a, b, None, w),
            "haproxy": lambda w: start_haproxy(work, a, b, None, w),
        }
        for r in range(args.callgrind_rounds):
            for name in [p for p in args.proxies if p in starters]:
                ir, _ = callgrind_ir(work, name, starters[name], a, b, args.callgrind_requests)
                out.setdefault(name, []).append(ir)
                print(f"callgrind round {r + 1}: {name} {ir:,.0f} instructions/request",
                      flush=True)
    finally:
        b.stop()
        a.stop()
    return {k: summarize(v) for k, v in out.items()}


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


def write_report(args, res, batching, command, host=None, callgrind=None):
    """`res` is per layout: {layout: {target: row}}."""
    docs = args.out
    callgrind = callgrind or {}
    os.makedirs(os.path.join(docs, "img"), exist_ok=True)
    layouts = [lay for lay in args.layouts if lay in res]

    def svg(name, text):
        with open(os.path.join(docs, "img", name), "w") as f:
            f.write(text)
        return f"img/{name}"

    charts_md = []
    if layouts:
        first = res[layouts[0]]
        names = ["direct"] + [p for p in args.proxies if p in first]
        proxies = [p for p in names if p != "direct"]

        def bars(key, m):
            return [(p, first[p][m][key]["median"],
                     (first[p][m][key]["min"], first[p][m][key]["max"])) for p in proxies]
        cpu = svg("cpu-per-request.svg", charts.bar_chart(
            f"Proxy CPU per request, closed loop, {layouts[0]} layout (lower is better)",
            "microseconds of CPU per request", bars("cpu_us", "closed")))
        ratio = svg("throughput-ratio.svg", charts.bar_chart(
            f"Closed-loop throughput, proxied / direct, {layouts[0]} layout (higher is better)",
            "ratio", bars("ratio", "closed")))
        charts_md += [f"![CPU per request]({cpu})", f"![throughput ratio]({ratio})"]
        if args.rates:
            for q in ("p50", "p99"):
                path = svg(f"latency-{q}.svg", charts.line_chart(
                    f"{q} latency at fixed rates (open loop, {layouts[0]} layout)",
                    "requests/s", "ms",
                    [(t, [(r, first[t][r][q]["median"]) for r in args.rates]) for t in names],
                    log_x=True, xticks=args.rates))
                charts_md.append(f"![{q} vs rate]({path})")
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
             f"{args.seconds}s per measurement. Every proxy: one worker thread, a 90/10 "
             "weighted split over two single-worker nginx upstreams with keep-alive, "
             f"a {len(REQUEST)}-byte JSON POST to `{PATH}` answered with {len(REPLY)} bytes. "
             "Layouts: *separate* pins the proxy to CPU 0 and the load generator and "
             "upstreams to CPU 1; *pod* pins the proxy and its upstreams to CPU 0 (a sidecar "
             "beside its model server) and the load generator to CPU 1. Figures are the "
             "median, (min-max) across rounds; ratios are paired within a round.\n")
    if callgrind:
        L.append("## Instructions per request (callgrind)\n")
        L.append("User-space instructions the proxy executes per proxied request, counted by "
                 f"valgrind's callgrind over {args.callgrind_requests} requests on 4 keep-alive "
                 "connections after a warm-up (counters zeroed, then dumped). Unlike CPU time, "
                 "this does not move with machine noise; it leaves out the kernel's share "
                 "(system time, in the tables below).\n")
        L.append("| proxy | instructions / request | / nginx |")
        L.append("|---|---|---|")
        ng = callgrind.get("nginx")
        for p_, c in callgrind.items():
            rel = f"{c['median'] / ng['median']:.2f}" if ng else "-"
            L.append(f"| {p_} | {fmt(c, 0)} | {rel} |")
        L.append("")
    for lay in layouts:
        r_ = res[lay]
        names = ["direct"] + [p for p in args.proxies if p in r_]
        L.append(f"## Layout: {lay}\n")
        L.append(f"Closed loop: wrk, 1 thread, {args.connections} connections. Open loop: oha "
                 f"with latency correction, {args.open_connections} connections, at fixed "
                 "rates. CPU is the proxy's own (all its processes), user and system apart, "
                 "per request its upstreams served; *vs nginx* is braid's figure over "
                 "nginx's in the same round. Accepts: new upstream connections per 1,000 "
                 "requests (0 means every proxy reused its connections).\n")
        L.append("| target | load | req/s | proxied / direct | CPU us/req (user + sys) "
                 "| CPU vs nginx | p50 ms | p99 ms | added p50 | added p99 | upstream accepts/1k "
                 "| failed |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for m in ["closed"] + args.rates:
            for t in names:
                o = r_[t][m]
                load = "closed" if m == "closed" else f"{m} rps"
                cpu = (f"{fmt(o['cpu_us'])} ({fmt(o['user_us'])} + {fmt(o['sys_us'])})"
                       if o.get("cpu_us") else "-")
                vs = fmt(o.get("cpu_vs_nginx"), 2) if o.get("cpu_vs_nginx") else "-"
                lat = (fmt(o["p50"], 3), fmt(o["p99"], 3)) if o.get("p50") else ("-", "-")
                added = ((fmt(o["added_p50"], 3), fmt(o["added_p99"], 3))
                         if o.get("added_p50") and t != "direct" else ("-", "-"))
                ratio = fmt(o["ratio"], 3) if t != "direct" else "1"
                acc = fmt(o["accepts_per_kreq"], 2) if t != "direct" else "-"
                L.append(f"| {t} | {load} | {fmt(o['rps'], 0)} | {ratio} | {cpu} | {vs} "
                         f"| {lat[0]} | {lat[1]} | {added[0]} | {added[1]} | {acc} "
                         f"| {o['failed']} |")
        L.append("")
        rss = ", ".join(f"{t} {fmt(r_[t]['rss'])} MiB" for t in names if r_[t]["rss"])
        L.append(f"RSS after load: {rss}.\n")
    L += [c + "\n" for c in charts_md]
    if layouts and "braid" in res[layouts[0]] and "nginx" in res[layouts[0]]:
        L.append("## Targets (issue 13)\n")
        L.append("| target | layout | braid | bar | met |")
        L.append("|---|---|---|---|---|")
        for lay in layouts:
            br, ng = res[lay]["braid"], res[lay]["nginx"]
            for m in ["closed"] + args.rates:
                c = br[m]["cpu_vs_nginx"]["median"]
                L.append(f"| CPU per request <= nginx's ({'closed loop' if m == 'closed' else f'{m} rps'}) "
                         f"| {lay} | {c:.2f}x nginx | 1.00x | {'yes' if c <= 1 else '**no**'} |")
            rr = br["closed"]["ratio_vs_nginx"]["median"]
            L.append(f"| proxied/direct >= nginx's | {lay} | {br['closed']['ratio']['median']:.3f} "
                     f"({rr:.2f}x nginx's) | {ng['closed']['ratio']['median']:.3f} "
                     f"| {'yes' if rr >= 1 else '**no**'} |")
            if 2000 in args.rates:
                d50 = br[2000]["added_p50_vs_nginx"]["median"]
                d99 = br[2000]["added_p99_vs_nginx"]["median"]
                L.append(f"| added p50 at 2000 rps <= nginx's + 0.02 ms | {lay} | "
                         f"{d50:+.3f} ms vs nginx | +0.020 ms | {'yes' if d50 <= 0.02 else '**no**'} |")
                L.append(f"| added p99 at 2000 rps <= nginx's | {lay} | {d99:+.3f} ms vs nginx "
                         f"| +0.000 ms | {'yes' if d99 <= 0 else '**no**'} |")
            L.append(f"| RSS after load <= 15 MiB | {lay} | {br['rss']['median']:.1f} MiB | 15 MiB "
                     f"| {'yes' if br['rss']['median'] <= 15 else '**no**'} |")
        if "braid" in callgrind and "nginx" in callgrind:
            c = callgrind["braid"]["median"] / callgrind["nginx"]["median"]
            L.append(f"| instructions per request <= nginx's | - | {c:.2f}x nginx | 1.00x "
                     f"| {'yes' if c <= 1 else '**no**'} |")
        L.append("")
    if batch_charts:
        L.append("## Batching: on vs off vs direct\n")
        L.append(f"`cargo bench --bench batching`: closed loop, one row per request, "
                 f"{batching.get('seconds')}s per point; braid with batching "
                 "(max_batch_size 64) and without, and the load generator talking to the "
                 "executor directly. Proxy, executor and load generator share the machine.\n")
        if batching.get("recorded"):
            r = batching["recorded"]
            L.append(f"*This section was not measured again in this run:* it is the run of "
                     f"{r['date']} on {r['machine']} (`{r['command']}`), carried over with "
                     "`--batching-from`.\n")
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
             ("rounds", "seconds", "connections", "open_connections", "rates", "proxies",
              "layouts", "callgrind_requests")}
    with open(os.path.join(docs, "benchmarks.json"), "w") as f:
        json.dump({"command": command, "date": TODAY, "machine": host, "setup": setup,
                   "layouts": res, "callgrind": callgrind, "batching": batching},
                  f, indent=1, default=str)


def render(args):
    """The report again from a recorded run (after editing NOTES.md, say)."""
    global ARGS, TODAY
    with open(args.render) as f:
        doc = json.load(f)
    if "layouts" not in doc:
        raise SystemExit(f"{args.render} was written by the harness before layouts; run again")
    for k, v in doc["setup"].items():
        setattr(args, k, v)
    TODAY = doc.get("date", TODAY)
    res = doc["layouts"]
    # JSON keys are strings; the rates are numbers.
    for rows in res.values():
        for row in rows.values():
            for r in args.rates:
                row[r] = row.pop(str(r))
    args.out = args.out or os.path.dirname(os.path.abspath(args.render))
    ARGS = args
    # The machine the run was recorded on, not the one rendering it.
    write_report(args, res, doc["batching"], doc.get("command", "benches/compare/run"),
                 doc.get("machine"), doc.get("callgrind"))
    print(f"wrote {os.path.join(args.out, 'benchmarks.md')}")


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="one short round of everything (CI); the report goes to a temp dir")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--open-connections", type=int, default=32)
    ap.add_argument("--rates", default="2000,5000,10000")
    ap.add_argument("--layouts", default="separate,pod")
    ap.add_argument("--proxies", default=",".join(PROXIES))
    ap.add_argument("--callgrind-requests", type=int, default=5000,
                    help="requests counted under callgrind per proxy (0: skip callgrind)")
    ap.add_argument("--callgrind-rounds", type=int, default=1)
    ap.add_argument("--batching-seconds", type=int, default=3)
    ap.add_argument("--skip-batching", action="store_true")
    ap.add_argument("--batching-from", metavar="JSON",
                    help="take the batching section from a recorded benchmarks.json "
                         "instead of measuring it again")
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
        args.rates, args.layouts, args.callgrind_requests = "", "separate", 0
        args.out = args.out or tempfile.mkdtemp(prefix="braid-compare-")
    args.out = args.out or os.path.join(ROOT, "docs")
    args.braid = os.path.abspath(args.braid)
    args.rates = [int(r) for r in args.rates.split(",") if r]
    args.proxies = [p for p in args.proxies.split(",") if p]
    args.layouts = [lay for lay in args.layouts.split(",") if lay]
    for lay in args.layouts:
        if lay not in LAYOUTS:
            raise SystemExit(f"unknown layout {lay!r}: one of {', '.join(LAYOUTS)}")
    ARGS = args
    for tool in ["wrk", "nginx"] + (["oha"] if args.rates else []) + [p for p in args.proxies if not p.startswith("braid")]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed: run benches/compare/run, which installs it")
    if any(p.startswith("braid") for p in args.proxies) and not os.access(args.braid, os.X_OK):
        raise SystemExit(f"no braid binary at {args.braid}")
    res = {}
    with tempfile.TemporaryDirectory(prefix="braid-compare-") as work:
        callgrind = run_callgrind(args, work) if args.callgrind_requests else {}
        if args.proxies:
            for lay in args.layouts:
                res[lay] = proxy_results(args, run_proxies(args, work, lay))
        if args.batching_from:
            with open(args.batching_from) as f:
                doc = json.load(f)
            batching = doc["batching"]
            batching.setdefault("recorded", {k: doc.get(k, "?")
                                             for k in ("date", "machine", "command")})
        else:
            batching = {} if args.skip_batching else run_batching(args, work)
    write_report(args, res, batching, command, callgrind=callgrind)
    print(f"wrote {os.path.join(args.out, 'benchmarks.md')}")
    for lay, rows in res.items():
        for t, r in rows.items():
            c = r["closed"]
            print(f"{lay:8} {t:8} {fmt(c['rps'], 0):>24} req/s  ratio {fmt(c['ratio'], 3):>22}  "
                  f"CPU {fmt(c['cpu_us']):>20} us/req  RSS {fmt(r['rss'])} MiB  split {r['split']}")
        # A proxy that did not split 90/10 is a broken comparison; one that opened new
        # upstream connections under load is not doing what the others do. Failed
        # requests are reported (an overloaded peer may drop some at the highest rate).
        for t in args.proxies:
            a, b = rows[t]["split"]
            share = b / (a + b) if a + b else 0
            if not 0.07 <= share <= 0.13:
                raise SystemExit(f"{t} sent {share:.1%} to upstream b, not about 10%")
            measures = ["closed"] + args.rates
            # Opening a pool's worth of connections in a measurement is expected (after
            # an idle timeout, or at the first); more than twice that is churn.
            pool = 2 * max(args.connections, args.open_connections)
            accepts = max(rows[t][m]["accepts"]["max"] for m in measures)
            if accepts > pool:
                print(f"warning: {lay}: {t} opened {accepts:.0f} upstream connections in one "
                      f"measurement (more than {pool}): not reusing them")
            failed = sum(rows[t][m]["failed"] for m in measures)
            if failed:
                why = {e for m in args.rates for e in rows[t][m]["errors"]}
                print(f"warning: {lay}: {t}: {failed} requests failed: {sorted(why)}")


if __name__ == "__main__":
    main()
