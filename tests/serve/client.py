"""Real clients for tests/serve.rs: the official openai SDK and prometheus_client's parser,
talking to `edgeflow serve` over its Unix socket. Prints one JSON object on stdout; the
Rust test makes the assertions.

    client.py SOCKET sdk REQUEST_JSON   chat, completions and models through the SDK
    client.py SOCKET metrics            /metrics parsed by prometheus_client
"""

import json
import sys

try:  # the openai SDK moved from httpx to its successor httpx2; accept either
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx


def http_client(sock):
    return httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=60.0)


def sdk(sock, spec):
    import openai

    client = openai.OpenAI(base_url="http://edgeflow/v1", api_key=spec.get("api_key", "unused"), http_client=http_client(sock), max_retries=0)
    messages = spec["messages"]
    prompt = spec["prompt"]
    n = spec["max_tokens"]
    out = {}

    models = client.models.list()
    out["models"] = [m.model_dump() for m in models.data]

    chat = client.chat.completions.create(model="anything", messages=messages, max_tokens=n, temperature=0)
    out["chat"] = {
        "text": chat.choices[0].message.content,
        "role": chat.choices[0].message.role,
        "finish_reason": chat.choices[0].finish_reason,
        "usage": chat.usage.model_dump(exclude_none=True),
        "model": chat.model,
        "system_fingerprint": chat.system_fingerprint,
        "object": chat.object,
    }

    pieces, finish, usage, roles, chunks = [], None, None, [], 0
    stream = client.chat.completions.create(model="anything", messages=messages, max_tokens=n, temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage.model_dump(exclude_none=True)
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    out["chat_stream"] = {"text": "".join(pieces), "finish_reason": finish, "usage": usage, "roles": roles, "chunks": chunks}

    completion = client.completions.create(model="anything", prompt=prompt, max_tokens=n, temperature=0)
    out["completion"] = {"text": completion.choices[0].text, "finish_reason": completion.choices[0].finish_reason, "usage": completion.usage.model_dump(exclude_none=True), "object": completion.object}

    pieces, finish = [], None
    for chunk in client.completions.create(model="anything", prompt=prompt, max_tokens=n, temperature=0, stream=True):
        for choice in chunk.choices:
            pieces.append(choice.text)
            if choice.finish_reason:
                finish = choice.finish_reason
    out["completion_stream"] = {"text": "".join(pieces), "finish_reason": finish}

    # Errors come back as the SDK's own exception classes, with OpenAI's fields.
    errors = {}
    try:
        client.chat.completions.create(model="anything", messages=messages, max_tokens=n, n=2)
    except openai.BadRequestError as e:
        errors["n2"] = {"status": e.status_code, "param": e.param, "code": e.code, "message": e.message}
    bad_key = openai.OpenAI(base_url="http://edgeflow/v1", api_key="wrong-key", http_client=http_client(sock), max_retries=0)
    try:
        bad_key.models.list()
        errors["bad_key"] = {"status": 200}
    except openai.AuthenticationError as e:
        errors["bad_key"] = {"status": e.status_code, "code": e.code}
    out["errors"] = errors
    return out


def metrics(sock):
    from prometheus_client.parser import text_string_to_metric_families

    with http_client(sock) as c:
        r = c.get("http://edgeflow/metrics")
    families = {}
    for fam in text_string_to_metric_families(r.text):
        families[fam.name] = {
            "type": fam.type,
            "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in fam.samples],
        }
    return {"status": r.status_code, "content_type": r.headers.get("content-type"), "families": families}


def main():
    sock, scenario = sys.argv[1], sys.argv[2]
    if scenario == "sdk":
        result = sdk(sock, json.loads(sys.argv[3]))
    elif scenario == "metrics":
        result = metrics(sock)
    else:
        sys.exit(f"unknown scenario {scenario}")
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
