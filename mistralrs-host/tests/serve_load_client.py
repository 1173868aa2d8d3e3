"""Load against `mistralrs serve`: many concurrent clients, cancelled and dropped streams.

Used by tests/serve_load.rs (and `cargo xtask bench-e2e --serve`). asyncio with httpx2, the
HTTP client the `openai` package installs beside itself (same PYTHONPATH), so no other
package is needed; raw sockets for the abrupt disconnects.

Reads one JSON object on stdin:
  {"pid": server pid (for VmRSS), "requests": [{"endpoint": "chat" | "completion",
   "prompt": str, "max_tokens": int}], "total": int, "clients": int, "rss_after": int,
   "seed": int, "cancel_every": int, "disconnect_every": int (0: none), "timeout": seconds,
   "whole_only": bool (optional: no streaming, so every answer reports its tokens),
   "references": the "references" of an earlier run on the same server and requests
   (optional: step 1 is skipped)}
and prints one JSON object on stdout (see `main`).

1. References: every distinct request once, alone, one after another, not streamed. Their
   `usage.prompt_tokens` are the prompts' token lengths.
2. Every client draws from all the requests, so the engine batches and interleaves them
   as it likes (right since the patch's fix of mistral.rs 0.8.1's CPU decode attention,
   docs/mistralrs.md; before it, each prompt length was dealt to one client). Requests
   that are cancelled or dropped are only ever dropped after their first streamed chunk,
   i.e. after their prompt was prefilled.
3. The load: `total` requests over `clients` concurrent clients, in two rounds: the first
   `rss_after` requests, then (all answered) the server's VmRSS is read, then the rest, and
   VmRSS again. Every `cancel_every`-th request is streamed and closed after its first
   chunks (httpx closes the stream: the server sees the connection go); every
   `disconnect_every`-th one is streamed over a raw socket that is reset (SO_LINGER 0)
   after the first chunk. The others are streamed or not, alternately. Each answer that
   completes is compared with its reference: the same text and finish reason. A
   non-200 status, an error body or an error event in a stream is a server error.
"""

import asyncio
import json
import random
import socket
import struct
import sys
import time
import urllib.parse

import httpx2 as httpx


def body(req, model, stream):
    common = {"model": model, "max_tokens": req["max_tokens"], "temperature": 0, "stream": stream}
    if req["endpoint"] == "chat":
        return "/chat/completions", {"messages": [{"role": "user", "content": req["prompt"]}], **common}
    return "/completions", {"prompt": req["prompt"], **common}


def piece(endpoint, choice, streamed):
    if endpoint == "chat":
        if streamed:
            return (choice.get("delta") or {}).get("content") or ""
        return (choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


class ServerError(Exception):
    pass


def check_body(obj, where):
    if not isinstance(obj, dict) or "error" in obj or "choices" not in obj:
        raise ServerError(f"{where}: error body {json.dumps(obj)[:500]}")


async def send(client, base, model, req, stream, stop_after=None):
    """One request; returns (text, finish_reason, usage, chunks, cancelled)."""
    path, payload = body(req, model, stream)
    if not stream:
        r = await client.post(base + path, json=payload)
        if r.status_code != 200:
            raise ServerError(f"HTTP {r.status_code}: {r.text[:500]}")
        obj = r.json()
        check_body(obj, "answer")
        choice = obj["choices"][0]
        return piece(req["endpoint"], choice, False), choice.get("finish_reason"), obj.get("usage"), 0, False
    text, finish, usage, chunks = "", None, None, 0
    async with client.stream("POST", base + path, json=payload) as r:
        if r.status_code != 200:
            raise ServerError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            check_body(obj, "stream chunk")
            if obj.get("usage"):
                usage = obj["usage"]
            for choice in obj["choices"]:
                p = piece(req["endpoint"], choice, True)
                if p:
                    text += p
                    chunks += 1
                if choice.get("finish_reason") is not None:
                    finish = choice["finish_reason"]
            if stop_after is not None and chunks >= stop_after:
                # Leaving the block closes the response and its connection mid-stream.
                return text, None, None, chunks, True
    return text, finish, usage, chunks, False


async def send_and_reset(base, model, req):
    """Streams `req` over a raw socket and resets the connection (RST, SO_LINGER 0) as soon
    as the first event arrives. Returns the bytes read before the reset."""
    url = urllib.parse.urlsplit(base)
    path, payload = body(req, model, True)
    data = json.dumps(payload).encode()
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    head = (
        f"POST {url.path}{path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    writer.write(head + data)
    await writer.drain()
    got = b""
    while b"data:" not in got:
        chunk = await reader.read(4096)
        if not chunk:
            break
        got += chunk
    if not got.startswith(b"HTTP/1.1 200"):
        writer.close()
        raise ServerError(f"raw stream: {got[:500]!r}")
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    return len(got)


def rss_kib(pid):
    """VmRSS, RssAnon and RssFile of the process, KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1])
    return out


async def run(base, cfg):
    limits = httpx.Limits(max_connections=cfg["clients"] * 2, max_keepalive_connections=cfg["clients"])
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        r = await client.get(base + "/models")
        model = r.json()["data"][0]["id"]
        reqs = cfg["requests"]
        started = time.monotonic()
        refs = cfg.get("references")
        if refs is None:
            refs = []
            for req in reqs:
                text, finish, usage, _, _ = await send(client, base, model, req, False)
                refs.append({"text": text, "finish_reason": finish, "prompt_tokens": usage["prompt_tokens"],
                             "completion_tokens": usage["completion_tokens"]})
        ref_seconds = time.monotonic() - started

        lengths = sorted({r["prompt_tokens"] for r in refs})
        pools = [list(range(len(refs)))] * cfg["clients"]

        counter = {"next": 0}
        results = []
        errors = []
        mismatches = []

        async def client_loop(c, pool, limit):
            rng = random.Random(cfg["seed"] * 1000 + c)
            while counter["next"] < limit:
                n = counter["next"]
                counter["next"] += 1
                i = rng.choice(pool)
                req = reqs[i]
                de, ce = cfg["disconnect_every"], cfg["cancel_every"]
                if de and n % de == de - 1:
                    kind = "disconnected"
                elif ce and n % ce == ce - 1:
                    kind = "cancelled"
                else:
                    kind = "streamed" if n % 2 and not cfg.get("whole_only") else "whole"
                t0 = time.monotonic()
                try:
                    if kind == "disconnected":
                        await asyncio.wait_for(send_and_reset(base, model, req), cfg["timeout"])
                        out = None
                    else:
                        stop = rng.randint(1, 3) if kind == "cancelled" else None
                        one = send(client, base, model, req, kind != "whole", stop)
                        out = await asyncio.wait_for(one, cfg["timeout"])
                except (ServerError, httpx.HTTPError, OSError, ValueError, asyncio.TimeoutError) as e:
                    errors.append({"n": n, "request": i, "kind": kind, "error": f"{type(e).__name__}: {e}"})
                    continue
                row = {"n": n, "request": i, "kind": kind, "client": c,
                       "prompt_tokens": refs[i]["prompt_tokens"], "seconds": time.monotonic() - t0}
                if out is not None:
                    text, finish, usage, chunks, cancelled = out
                    ref = refs[i]
                    row["completion_tokens"] = (usage or {}).get("completion_tokens")
                    # A stream to close after k chunks may end before: then it is whole.
                    row["kind"] = "cancelled" if cancelled else ("streamed" if kind != "whole" else kind)
                    if cancelled:
                        if not ref["text"].startswith(text):
                            mismatches.append({**row, "got": text, "want_prefix_of": ref["text"]})
                    elif text != ref["text"] or finish != ref["finish_reason"]:
                        mismatches.append({**row, "got": text, "finish_reason": finish,
                                           "want": ref["text"], "want_finish_reason": ref["finish_reason"]})
                results.append(row)

        async def round_to(limit):
            await asyncio.gather(*(client_loop(c, p, limit) for c, p in enumerate(pools)))

        t1 = time.monotonic()
        await round_to(cfg["rss_after"])
        rss_first = rss_kib(cfg["pid"])
        await round_to(cfg["total"])
        load_seconds = time.monotonic() - t1
        rss_last = rss_kib(cfg["pid"])

    kinds = {}
    for r in results:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return {
        "model": model,
        "distinct_requests": len(reqs),
        "distinct_prompt_lengths": len(lengths),
        "clients": len(pools),
        "requests": counter["next"],
        "answered": len(results),
        "kinds": kinds,
        "errors": errors,
        "mismatches": mismatches,
        "rss_kib_after_first": rss_first["VmRSS"],
        "rss_kib_after_all": rss_last["VmRSS"],
        "rss_anon_kib_after_first": rss_first["RssAnon"],
        "rss_anon_kib_after_all": rss_last["RssAnon"],
        "rss_file_kib_after_first": rss_first["RssFile"],
        "rss_file_kib_after_all": rss_last["RssFile"],
        "rss_after_first_requests": cfg["rss_after"],
        "references": refs,
        "reference_seconds": ref_seconds,
        "load_seconds": load_seconds,
        "completion_tokens": sum(r.get("completion_tokens") or 0 for r in results),
    }


def main():
    out = asyncio.run(run(sys.argv[1], json.load(sys.stdin)))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
