"""The official openai SDK, in its default mode, against a language model served by
braid's executor (directly, or through braid's proxy): completions and chat, whole and
streamed, with usage, logprobs and seeds; and the SDK's exceptions for braid's refusals.
Prints one JSON line.

    openai_llm.py http://HOST/v1 MODEL
"""
import json
import sys

import openai


def main():
    base, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    out = {"models": [m.id for m in client.models.list()]}
    c = client.completions.create(model=model, prompt="the cat sat", max_tokens=8, temperature=0)
    out["completion"] = {"text": c.choices[0].text, "finish": c.choices[0].finish_reason,
                         "usage": c.usage.to_dict()}
    chunks = list(client.completions.create(model=model, prompt="the cat sat", max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    out["completion_stream"] = {
        "text": "".join(ch.choices[0].text for ch in chunks if ch.choices),
        "usage": next(ch.usage.to_dict() for ch in chunks if ch.usage is not None),
    }
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=2)
    out["chat"] = {"content": chat.choices[0].message.content,
                   "role": chat.choices[0].message.role,
                   "logprobs": [[t.token, len(t.top_logprobs)] for t in chat.choices[0].logprobs.content],
                   "usage": chat.usage.to_dict()}
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0,
        stream=True)
    out["chat_stream"] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    seeded = [client.completions.create(model=model, prompt="the", max_tokens=12, temperature=1.0,
                                        seed=s).choices[0].text for s in (5, 5, 6)]
    out["seeded"] = seeded
    errors = {}
    for name, call in {
        "n": lambda: client.completions.create(model=model, prompt="a", n=2),
        "context": lambda: client.completions.create(model=model, prompt="the " * 600),
        "unknown_model": lambda: client.completions.create(model="gpt-9", prompt="a"),
    }.items():
        try:
            call()
            errors[name] = None
        except openai.APIStatusError as e:
            errors[name] = {"class": type(e).__name__, "status": e.status_code,
                            "param": getattr(e, "param", None), "code": getattr(e, "code", None)}
    out["errors"] = errors
    print(json.dumps(out))


if __name__ == "__main__":
    main()
