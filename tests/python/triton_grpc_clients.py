"""Many concurrent official Triton gRPC clients (tritonclient.grpc, its defaults: raw
input contents) through braid, each compared with a direct call to the server for the
same text, each with its own sticky key. The variant braid chose is read from the
answer's initial metadata through the stub tritonclient ships (service_pb2_grpc).
Prints one JSON line: what a test checks.

Usage: triton_grpc_clients.py PROXY_ADDR PROXY_MODEL DIRECT_ADDR DIRECT_MODEL OUTPUT CLIENTS
"""
import json
import struct
import sys
import threading

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

WORDS = ["good", "bad", "great", "terrible", "film", "movie", "food", "service", "love",
         "hate", "weather", "lovely", "sunny", "stadium", "review", "poison", "very", "not"]


def infer(client, model, output, text, user):
    inp = grpcclient.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    result = client.infer(model, [inp], request_id=f"req-{user}",
                          headers={"x-user-id": user})
    assert result.get_response().id == f"req-{user}", result.get_response()
    return result.as_numpy(output)


def variant_of(stub, model, text, user):
    """One ModelInfer through the official generated stub: the x-braid-variant of the
    answer's initial metadata."""
    req = service_pb2.ModelInferRequest(model_name=model, id=user)
    t = req.inputs.add()
    t.name, t.datatype = "text", "BYTES"
    t.shape.append(1)
    raw = text.encode()
    req.raw_input_contents.append(struct.pack("<I", len(raw)) + raw)
    _, call = stub.ModelInfer.with_call(req, metadata=[("x-user-id", user)])
    return dict(call.initial_metadata()).get("x-braid-variant")


def main():
    proxy, proxy_model, direct, direct_model, output, n = sys.argv[1:7]
    n = int(n)
    texts = [f"{WORDS[i % 18]} {WORDS[(i // 18 + 3) % 18]} {WORDS[(i * 7 + 1) % 18]}"
             for i in range(n)]
    assert len(set(texts)) == n
    barrier = threading.Barrier(n)
    got, variants, errors = [None] * n, [None] * n, []

    def run(i):
        client = grpcclient.InferenceServerClient(url=proxy)
        channel = grpc.insecure_channel(proxy)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        user = f"user-{i}"
        try:
            barrier.wait()
            got[i] = infer(client, proxy_model, output, texts[i], user)
            seen = {variant_of(stub, proxy_model, texts[i], user) for _ in range(2)}
            variants[i] = seen.pop() if len(seen) == 1 else f"not sticky: {seen}"
        except Exception as e:  # reported, never swallowed
            errors.append(f"client {i}: {e!r}")
        finally:
            client.close()
            channel.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    direct_client = grpcclient.InferenceServerClient(url=direct)
    want = [infer(direct_client, direct_model, output, t, "direct") for t in texts]
    answered = [g for g in got if g is not None]
    wrong, max_diff = 0, 0.0
    for g, w in zip(got, want):
        if g is None:
            continue
        if g.shape != w.shape:
            wrong += 1
            continue
        d = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))))
        max_diff = max(max_diff, d)
        wrong += d > 1e-4

    client = grpcclient.InferenceServerClient(url=proxy)
    try:
        client.infer("no-such-model", [grpcclient.InferInput("text", [1], "BYTES")])
        not_found = "answered"
    except InferenceServerException as e:
        not_found = f"{e.status()}: {e.message()}"
    print(json.dumps({
        "answered": len(answered),
        "wrong_rows": wrong,
        "max_diff": max_diff,
        "errors": errors,
        "variants": variants,
        "server_live": client.is_server_live(),
        "model_ready": client.is_model_ready(proxy_model),
        "not_found": not_found,
    }))


if __name__ == "__main__":
    main()
