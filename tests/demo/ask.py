"""Ask edgeflow one question over its Unix socket with the official openai SDK, streaming
the answer to the terminal (used by `make demo`).

    ask.py SOCKET QUESTION
"""
import sys

try:  # the openai SDK moved from httpx to its successor httpx2; accept either
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import openai


def main():
    sock, question = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(
        base_url="http://edgeflow/v1",
        api_key="unused",
        http_client=httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=60.0),
        max_retries=0,
    )
    print(f"Q: {question}")
    print("A: ", end="", flush=True)
    stream = client.chat.completions.create(
        model="phi-3",
        messages=[{"role": "user", "content": question}],
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    fingerprint, usage = None, None
    for chunk in stream:
        fingerprint = chunk.system_fingerprint or fingerprint
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            print(choice.delta.content or "", end="", flush=True)
    print()
    print(f"   (served by {fingerprint}; {usage.completion_tokens if usage else '?'} tokens; random weights, so the words are noise)")


if __name__ == "__main__":
    main()
