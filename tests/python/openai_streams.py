"""The official openai SDK through braid, in its default mode, against backends that
answer like vLLM: chat streams over a weighted sticky split (by `user`), without and
with `stream_options.include_usage` (braid asks for usage either way and must hand
back only what was asked for); whole chat and text completions, streamed and not; and
on a flaky route, an error as the first event and a slow first token (both retried
by braid before the client sees anything), then a stream that breaks after its first
tokens, which must raise the SDK's APIError with braid's message rather than end as
if complete. Prints one JSON line.

    openai_streams.py http://PROXY/v1
"""
import json
import sys

import openai

MESSAGES = [{"role": "user", "content": "hi"}]


def stream(client, model="m", **kw):
    text, usages = "", []
    for chunk in client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
        usages.append(chunk.usage.to_dict() if chunk.usage else None)
    return {"text": text, "usages": usages}


def main():
    client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
    out = {"plain": stream(client),
           "asked": stream(client, stream_options={"include_usage": True})}
    split = {}
    for user in [f"user-{i}" for i in range(8)]:
        seen = []
        for _ in range(2):
            raw = client.chat.completions.with_raw_response.create(
                model="m", messages=MESSAGES, stream=True, user=user)
            text = "".join(c.delta.content or "" for ch in raw.parse() for c in ch.choices)
            seen.append({"variant": raw.headers.get("x-braid-variant"), "text": text})
        split[user] = seen
    out["split"] = split
    whole = client.chat.completions.create(model="m", messages=MESSAGES)
    out["whole_chat"] = {"text": whole.choices[0].message.content,
                         "completion_tokens": whole.usage.completion_tokens}
    done = client.completions.create(model="m", prompt="hi")
    streamed = "".join(c.choices[0].text for c in
                       client.completions.create(model="m", prompt="hi", stream=True)
                       if c.choices)
    out["completions"] = {"text": done.choices[0].text, "streamed": streamed}
    out["flaky"] = [stream(client, model="flaky")["text"] for _ in range(2)]
    got = ""
    try:
        for chunk in client.chat.completions.create(model="flaky", messages=MESSAGES, stream=True):
            for c in chunk.choices:
                got += c.delta.content or ""
        out["broken"] = {"raised": None, "text": got}
    except openai.APIError as e:
        out["broken"] = {"raised": type(e).__name__, "message": e.message, "text": got}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
