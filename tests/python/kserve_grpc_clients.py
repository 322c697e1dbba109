"""Many concurrent KServe InferenceGRPCClient calls (KServe's Python SDK, its defaults)
through braid, each compared with a direct call to the server for the same text.
Prints one JSON line: what a test checks.

Usage: kserve_grpc_clients.py PROXY_ADDR PROXY_MODEL DIRECT_ADDR DIRECT_MODEL OUTPUT CLIENTS
"""
import asyncio
import json
import sys

from kserve import InferenceGRPCClient, InferInput, InferRequest

from rows import compare

WORDS = ["good", "bad", "great", "terrible", "film", "movie", "food", "service", "love",
         "hate", "weather", "lovely", "sunny", "stadium", "review", "poison", "very", "not"]


async def infer(client, model, text, request_id):
    inp = InferInput(name="text", shape=[1], datatype="BYTES", data=[text])
    req = InferRequest(model_name=model, infer_inputs=[inp], request_id=request_id)
    res = await client.infer(req)
    assert res.id == request_id, (res.id, request_id)
    return res


async def main():
    proxy, proxy_model, direct, direct_model, output, n = sys.argv[1:7]
    n = int(n)
    texts = [f"{WORDS[i % 18]} {WORDS[(i // 18 + 5) % 18]} {WORDS[(i * 5 + 2) % 18]}"
             for i in range(n)]
    assert len(set(texts)) == n
    through = InferenceGRPCClient(url=proxy)
    results = await asyncio.gather(
        *(infer(through, proxy_model, t, f"req-{i}") for i, t in enumerate(texts)),
        return_exceptions=True)
    errors = [f"client {i}: {r!r}" for i, r in enumerate(results) if isinstance(r, Exception)]
    straight = InferenceGRPCClient(url=direct)
    want = [await infer(straight, direct_model, t, f"direct-{i}") for i, t in enumerate(texts)]

    max_diff, wrong = compare(results, want, output)
    await through.close()
    await straight.close()
    print(json.dumps({"clients": n, "answered": n - len(errors), "errors": errors,
                      "max_diff": max_diff, "wrong_rows": wrong}))


asyncio.run(main())
