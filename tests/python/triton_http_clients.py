"""Many concurrent official Triton HTTP clients (tritonclient.http) in their default
mode and two mixed modes, through braid, each compared with a direct call to the
executor for the same text. Prints one JSON line: what a test checks.

Usage: triton_http_clients.py PROXY_ADDR PROXY_MODEL DIRECT_ADDR DIRECT_MODEL CLIENTS
"""
import json
import sys
import threading

import numpy as np
import tritonclient.http as httpclient

WORDS = ["good", "bad", "great", "terrible", "film", "movie", "food", "service", "love",
         "hate", "weather", "lovely", "sunny", "stadium", "review", "poison", "very", "not"]
# 0: the defaults (binary input, every output binary); 1: JSON input, binary output
# asked for by name; 2: binary input, JSON output asked for by name.
MODES = ["default", "json-in-binary-out", "binary-in-json-out"]


def infer(client, model, text, mode):
    inp = httpclient.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([text.encode()], dtype=np.object_),
                            binary_data=(mode != 1))
    outputs = None
    if mode == 1:
        outputs = [httpclient.InferRequestedOutput("embedding", binary_data=True)]
    elif mode == 2:
        outputs = [httpclient.InferRequestedOutput("embedding", binary_data=False)]
    result = client.infer(model, [inp], outputs=outputs, request_id=f"req-{text}")
    assert result.get_response()["id"] == f"req-{text}", result.get_response()
    return result.as_numpy("embedding")


def main():
    proxy, proxy_model, direct, direct_model, n = sys.argv[1:6]
    n = int(n)
    texts = [f"{WORDS[i % 18]} {WORDS[(i // 18 + 3) % 18]} {WORDS[(i * 7 + 1) % 18]}"
             for i in range(n)]
    assert len(set(texts)) == n
    barrier = threading.Barrier(n)
    got, errors = [None] * n, []

    def run(i):
        client = httpclient.InferenceServerClient(url=proxy)
        try:
            barrier.wait()
            got[i] = infer(client, proxy_model, texts[i], i % 3)
        except Exception as e:  # reported, never swallowed
            errors.append(f"client {i} ({MODES[i % 3]}): {e!r}")
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    direct_client = httpclient.InferenceServerClient(url=direct)
    want = [infer(direct_client, direct_model, t, 0) for t in texts]
    max_diff, wrong = 0.0, 0
    for i in range(n):
        if got[i] is None:
            continue
        assert got[i].shape == want[i].shape, (got[i].shape, want[i].shape)
        diffs = [float(np.abs(got[i] - w).max()) for w in want]
        max_diff = max(max_diff, diffs[i])
        if diffs[i] > min(diffs):  # another text's row is closer than its own
            wrong += 1
    print(json.dumps({"clients": n, "answered": sum(g is not None for g in got),
                      "errors": errors, "max_diff": max_diff, "wrong_rows": wrong}))


main()
