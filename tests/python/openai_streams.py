"""The official openai SDK streaming through braid, in its default mode: a chat stream
without and with `stream_options.include_usage` (braid asks for usage either way and
must hand back only what was asked for), and a stream that breaks after its first
tokens, which must raise the SDK's APIError with braid's message rather than end as
if complete. Prints one JSON line.

    openai_streams.py http://PROXY/v1
"""
import json
import sys

import openai


def stream(client, **kw):
    text, usages = "", []
    for chunk in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
        usages.append(chunk.usage.to_dict() if chunk.usage else None)
    return {"text": text, "usages": usages}


def main():
    client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
    out = {"plain": stream(client),
           "asked": stream(client, stream_options={"include_usage": True})}
    got = ""
    try:
        for chunk in client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True):
            for c in chunk.choices:
                got += c.delta.content or ""
        out["broken"] = {"raised": None, "text": got}
    except openai.APIError as e:
        out["broken"] = {"raised": type(e).__name__, "message": e.message, "text": got}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
