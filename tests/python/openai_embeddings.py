"""The official openai SDK's embeddings.create, in its default mode (it asks for
base64 and decodes it), against braid's executor or through braid, beside the float
form. Prints one JSON line: the vectors, the usage, and the SDK's errors.

    openai_embeddings.py http://HOST/v1 MODEL
"""
import json
import sys

import openai


def main():
    client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
    model = sys.argv[2]
    texts = ["The weather is lovely today.", "He drove to the stadium."]
    default = client.embeddings.create(model=model, input=texts)
    floats = client.embeddings.create(model=model, input=texts[0], encoding_format="float")
    out = {
        "default": {"vectors": [d.embedding for d in default.data],
                    "index": [d.index for d in default.data],
                    "usage": default.usage.to_dict(), "model": default.model},
        "float": {"vectors": [d.embedding for d in floats.data],
                  "usage": floats.usage.to_dict()},
        "models": [m.id for m in client.models.list()],
    }
    errors = {}
    for name, call in {
        "unknown_model": lambda: client.embeddings.create(model="nope", input="x"),
        "dimensions": lambda: client.embeddings.create(model=model, input="x", dimensions=8),
    }.items():
        try:
            call()
            errors[name] = None
        except openai.APIStatusError as e:
            errors[name] = {"class": type(e).__name__, "status": e.status_code,
                            "param": getattr(e, "param", None)}
    out["errors"] = errors
    print(json.dumps(out))


if __name__ == "__main__":
    main()
