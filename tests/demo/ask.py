"""Ask edgeflow one question over its Unix socket with the official openai SDK, streaming
the answer to the terminal (used by `make demo`).

    ask.py SOCKET QUESTION [--model NAME] [--max-tokens N] [--expect WORD]

With --expect, exits 1 when the answer does not contain WORD (case-insensitive): the demo
checks that a trained model gave a correct answer, not only that bytes came back.
"""
import argparse
import sys

try:  # the openai SDK moved from httpx to its successor httpx2; accept either
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import openai


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("socket")
    p.add_argument("question")
    p.add_argument("--model", default="smollm2", help="the model name sent (edgeflow serves its active model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--expect", metavar="WORD", help="fail unless the answer contains WORD")
    args = p.parse_args()

    client = openai.OpenAI(
        base_url="http://edgeflow/v1",
        api_key="unused",
        http_client=httpx.Client(transport=httpx.HTTPTransport(uds=args.socket), timeout=60.0),
        max_retries=0,
    )
    print(f"Q: {args.question}")
    print("A: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": args.question}],
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    fingerprint, usage, finish, answer = None, None, None, []
    for chunk in stream:
        fingerprint = chunk.system_fingerprint or fingerprint
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            answer.append(choice.delta.content or "")
            print(choice.delta.content or "", end="", flush=True)
            finish = choice.finish_reason or finish
    print()
    tokens = usage.completion_tokens if usage else "?"
    print(f"   (served by {fingerprint}; {tokens} tokens; finish_reason {finish})")
    text = "".join(answer)
    if args.expect and args.expect.lower() not in text.lower():
        print(f"ask.py: the answer does not contain {args.expect!r}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
