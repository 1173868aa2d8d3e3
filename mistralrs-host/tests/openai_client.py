"""A real OpenAI client (the `openai` package from PyPI) against `mistralrs serve`.

Used by tests/serve_e2e.rs. Reads a JSON list of requests on stdin, sends each one in
turn, greedy (temperature 0), and prints one JSON list of results on stdout.

A request: {"endpoint": "chat" | "completion", "stream": bool, "prompt": str,
            "max_tokens": int, "logprobs": bool}
A result:  {"text": str, "finish_reason": str, "tokens": [str] | null,
            "logprobs": [float] | null, "top": [[[str, float]]] | null, "chunks": int}
`tokens`/`logprobs`/`top` (the 5 best per step) come from the chat endpoint's per-token
logprobs when asked for;
`chunks` counts the streamed chunks that carried text (0 when not streaming).
"""

import json
import sys

import openai


def chat(client, model, req):
    kwargs = dict(
        model=model,
        messages=[{"role": "user", "content": req["prompt"]}],
        max_tokens=req["max_tokens"],
        temperature=0,
    )
    if req.get("logprobs"):
        kwargs.update(logprobs=True, top_logprobs=5)
    tokens, logprobs, top = [], [], []

    def record(content):
        for t in content:
            tokens.append(t.token)
            logprobs.append(t.logprob)
            top.append([[c.token, c.logprob] for c in t.top_logprobs or []])

    if not req["stream"]:
        r = client.chat.completions.create(**kwargs)
        choice = r.choices[0]
        if choice.logprobs is not None and choice.logprobs.content is not None:
            record(choice.logprobs.content)
        return choice.message.content or "", choice.finish_reason, (tokens, logprobs, top), 0
    text, finish, chunks = "", None, 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta is not None and choice.delta.content:
            text += choice.delta.content
            chunks += 1
        if choice.logprobs is not None and choice.logprobs.content is not None:
            record(choice.logprobs.content)
        if choice.finish_reason is not None:
            finish = choice.finish_reason
    return text, finish, (tokens, logprobs, top), chunks


def completion(client, model, req):
    kwargs = dict(
        model=model,
        prompt=req["prompt"],
        max_tokens=req["max_tokens"],
        temperature=0,
    )
    if not req["stream"]:
        r = client.completions.create(**kwargs)
        return r.choices[0].text, r.choices[0].finish_reason, ([], [], []), 0
    text, finish, chunks = "", None, 0
    for chunk in client.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.text:
            text += choice.text
            chunks += 1
        if choice.finish_reason is not None:
            finish = choice.finish_reason
    return text, finish, ([], [], []), chunks


def main():
    base_url = sys.argv[1]
    client = openai.OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    out = []
    for req in json.load(sys.stdin):
        send = chat if req["endpoint"] == "chat" else completion
        text, finish, (tokens, logprobs, top), chunks = send(client, model, req)
        out.append(
            {
                "text": text,
                "finish_reason": finish,
                "tokens": tokens or None,
                "logprobs": logprobs or None,
                "top": top or None,
                "chunks": chunks,
            }
        )
    json.dump({"openai_version": openai.__version__, "model": model, "results": out}, sys.stdout)


if __name__ == "__main__":
    main()
