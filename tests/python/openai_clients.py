"""The official openai SDK, in its default mode, through braid: the models list, chat
and embeddings calls and the Responses API routed by their model (with the variant braid chose), and braid's
own errors raised as the SDK's matching exceptions. Prints one JSON line.

    openai_clients.py http://PROXY/v1
"""
import json
import sys

import openai


def main():
    client = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
    out = {"models": [m.id for m in client.models.list()]}
    calls = []
    for user in ("alice", "bob", "carol", "dave"):
        raw = client.chat.completions.with_raw_response.create(
            model="assistant", messages=[{"role": "user", "content": "hi"}], user=user)
        # The test backends echo what they received (braid's answer passes through).
        seen = raw.parse().to_dict()
        calls.append({"user": user, "variant": raw.headers.get("x-braid-variant"),
                      "backend": seen.get("backend"), "body": seen.get("body")})
    out["chat"] = calls
    # The echo is no embedding list: read the raw answer, as the SDK would refuse it.
    emb = client.embeddings.with_raw_response.create(model="embedder", input=["a", "b"])
    out["embeddings"] = {"variant": emb.headers.get("x-braid-variant"),
                         "body": emb.http_response.json().get("body")}
    # The Responses API, routed by its body's model like chat.
    resp = client.responses.with_raw_response.create(model="assistant", input="hi",
                                                     extra_headers={"x-braid-variant": "tuned"})
    seen = resp.http_response.json()
    out["responses"] = {"variant": resp.headers.get("x-braid-variant"),
                        "path": seen.get("path"), "body": seen.get("body")}
    errors = {}
    for name, call in {
        "unknown_model": lambda: client.chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "hi"}]),
        "unknown_variant": lambda: client.chat.completions.create(
            model="assistant", messages=[], extra_headers={"x-braid-variant": "nope"}),
    }.items():
        try:
            call()
            errors[name] = None
        except openai.APIStatusError as e:
            errors[name] = {"class": type(e).__name__, "status": e.status_code,
                            "message": e.message, "type": getattr(e, "type", None),
                            "param": getattr(e, "param", None)}
    out["errors"] = errors
    print(json.dumps(out))


if __name__ == "__main__":
    main()
