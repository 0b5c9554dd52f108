#!/usr/bin/env python3
"""Prefix reuse (issue 15, item 1): time to first token where edge apps spend their time, edgeflow
against onnxruntime-genai in the same run.

    prefix_bench.py --edgeflow BIN --model NAME=DIR [--model ...] [--threads 2] [--out FILE]

Two scenarios per model, each request a real OpenAI chat request over the Unix socket (streamed;
TTFT is from sending the request to the first chunk with content, so it includes HTTP,
rendering and tokenizing):

  system prompt  a ~512-token system prompt and a ~32-token user turn, a different user turn on
                 each request; the first request (nothing cached) is reported apart.
  chat           a 10-turn conversation: each turn sends every earlier turn with the model's
                 own answers (32 tokens each) and a new ~32-token user turn. The conversation
                 runs --chat-runs times (3), each on a fresh server; each turn's figure is the
                 median over the runs (one sample per turn is at the mercy of the machine's
                 noise, and the turn-10 / turn-1 ratio of two single samples more so).

Anchors, measured alternately with edgeflow's requests: onnxruntime-genai 0.18.0 (Python API,
benches/genai_runner.py, a fresh process each) prefilling a prompt of the same length as each
edgeflow request (the `usage.prompt_tokens` edgeflow reports; prefill cost depends on the length,
not on which tokens); and edgeflow itself with `engine.prefix_cache = "off"`, which recomputes
every prompt. Both servers run alone (one at a time) with the same threads, each warmed up by one
short unrelated request after start.
"""

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_bench  # noqa: E402  (machine_info, build_prompt, wait_idle)

HERE = Path(__file__).resolve().parent

USER_TURNS = [
    "What is the tallest mountain in Europe, and how high is it?",
    "Name three rivers that flow through Germany and say where each one starts.",
    "How does a heat pump move heat from a cold place to a warm one?",
    "Which planets in our solar system have rings, and what are they made of?",
    "Why is the sky blue during the day but red at sunset?",
    "What is the difference between weather and climate, in two sentences?",
    "How many bones does an adult human have, and which is the longest?",
    "Explain in simple words what a transistor does inside a computer chip.",
    "What did the Romans use to build roads that lasted for centuries?",
    "Why do cats purr, and do big cats like lions purr as well?",
    "What causes the tides in the oceans, and why are there two each day?",
    "How does a vaccine teach the immune system to recognise a virus?",
]


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path, timeout=600):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


def chat(sock, messages, max_tokens, extra=None):
    """One streamed chat request: (ttft_s, total_s, text, usage). `extra`: more request fields."""
    body = json.dumps({"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})})
    conn = UnixHTTP(sock)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"prefix_bench: edgeflow answered {resp.status}: {resp.read()[:300]!r}")
    ttft, text, usage = None, [], None
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices", []):
            piece = (choice.get("delta") or {}).get("content") or ""
            if piece:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(piece)
    total = time.perf_counter() - t0
    conn.close()
    if usage is None:
        raise SystemExit("prefix_bench: no usage in the stream")
    return (ttft if ttft is not None else total), total, "".join(text), usage


class Server:
    """`edgeflow serve` on a private socket, with prefix reuse on or off (and more `[engine]` lines)."""

    def __init__(self, binary, model_dir, threads, prefix_cache, engine_extra=""):
        self.dir = tempfile.mkdtemp(prefix="edgeflow-prefix-bench-")
        self.sock = os.path.join(self.dir, "api.sock")
        config = os.path.join(self.dir, "config.toml")
        with open(config, "w") as f:
            f.write(f'[engine]\nprefix_cache = "{prefix_cache}"\nthreads = {threads}\n{engine_extra}[serve]\nrequest_timeout = "600s"\nqueue_depth = 64\n')
        self.proc = subprocess.Popen([binary, "serve", "--model-dir", model_dir, "--socket", self.sock, "--config", config], stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "log"), "w"))
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"prefix_bench: edgeflow serve exited: {open(os.path.join(self.dir, 'log')).read()[-2000:]}")
            try:
                c = UnixHTTP(self.sock, timeout=5)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    # One short unrelated request first: the first run of a fresh session pays
                    # one-off costs (allocations, kernel set-up) that are not prefill.
                    chat(self.sock, [{"role": "user", "content": "Hi"}], 2)
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("prefix_bench: edgeflow serve not ready within 120 s")

    def metrics(self):
        c = UnixHTTP(self.sock)
        c.request("GET", "/metrics")
        out = {}
        for line in c.getresponse().read().decode().splitlines():
            if line.startswith("edgeflow_prefix"):
                k, _, v = line.partition(" ")
                out[k] = float(v)
        return out

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def genai_ttft(python, model_dir, n_tokens, filler_ids, threads):
    ids = (filler_ids * (n_tokens // len(filler_ids) + 1))[:n_tokens]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    out = subprocess.run([python, str(HERE / "genai_runner.py"), "--model-dir", model_dir, "--prompt-ids", f.name, "--max-new", "2", "--threads", str(threads)], capture_output=True, text=True)
    os.unlink(f.name)
    if out.returncode != 0:
        raise SystemExit(f"prefix_bench: genai_runner failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["time_to_first_token_ms"] / 1000.0


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def bench_model(name, model_dir, args):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    system = engine_bench.build_prompt(tok, args.system_tokens)
    filler = tok.encode(engine_bench.build_prompt(tok, 256), add_special_tokens=False).ids
    res = {"model": name, "dir": model_dir}

    # --- system prompt: first request, then warm ones, each beside genai on the same length.
    rows = {"on": [], "off": [], "genai": []}
    first = {}
    for mode in ("on", "off"):
        engine_bench.wait_idle(args.wait_idle)
        server = Server(args.edgeflow, model_dir, args.threads, "256MiB" if mode == "on" else "off")
        try:
            for i in range(args.requests + 1):
                msgs = [{"role": "system", "content": system}, {"role": "user", "content": USER_TURNS[i % len(USER_TURNS)]}]
                ttft, _, _, usage = chat(server.sock, msgs, 8)
                row = {"ttft_s": ttft, "prompt_tokens": usage["prompt_tokens"], "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}
                if i == 0:
                    first[mode] = row
                else:
                    rows[mode].append(row)
                if mode == "on":
                    g = genai_ttft(args.genai_python, model_dir, usage["prompt_tokens"], filler, args.threads)
                    (rows["genai"] if i else first.setdefault("genai_list", [])).append({"ttft_s": g, "prompt_tokens": usage["prompt_tokens"]})
            if mode == "on":
                res["metrics"] = server.metrics()
        finally:
            server.stop()
    res["system_prompt"] = {"first": first, "warm": rows}

    # --- chat: 10 turns, prefix reuse on, genai on each turn's length; --chat-runs times,
    #     each on a fresh server (so turn 1 never finds the previous run's system prompt).
    runs = []
    for _ in range(args.chat_runs):
        engine_bench.wait_idle(args.wait_idle)
        server = Server(args.edgeflow, model_dir, args.threads, "256MiB")
        run = []
        try:
            msgs = [{"role": "system", "content": "You are a helpful assistant. Answer in a few sentences."}]
            for t in range(args.turns):
                msgs.append({"role": "user", "content": USER_TURNS[t % len(USER_TURNS)]})
                ttft, _, answer, usage = chat(server.sock, msgs, args.answer_tokens)
                g = genai_ttft(args.genai_python, model_dir, usage["prompt_tokens"], filler, args.threads)
                run.append({"turn": t + 1, "ttft_s": ttft, "genai_ttft_s": g, "prompt_tokens": usage["prompt_tokens"], "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]})
                msgs.append({"role": "assistant", "content": answer})
        finally:
            server.stop()
        runs.append(run)
    # Greedy answers make every run the same conversation; the per-turn medians are reported.
    turns = []
    for i in range(args.turns):
        samples = [r[i] for r in runs]
        turns.append({
            "turn": i + 1,
            "ttft_s": median([s["ttft_s"] for s in samples]),
            "genai_ttft_s": median([s["genai_ttft_s"] for s in samples]),
            "ttft_samples_s": [s["ttft_s"] for s in samples],
            "prompt_tokens": samples[0]["prompt_tokens"],
            "cached_tokens": samples[0]["cached_tokens"],
        })
    res["chat"] = turns
    return res


def report(res):
    sp = res["system_prompt"]
    on, off, ga = (median([r["ttft_s"] for r in sp["warm"][k]]) for k in ("on", "off", "genai"))
    n = sp["warm"]["on"][0]
    print(f"\n### {res['model']}: system prompt + user turn ({n['prompt_tokens']} prompt tokens, {n['cached_tokens']} reused)\n")
    print("| | edgeflow (prefix reuse) | edgeflow (prefix_cache = off) | genai | reuse / genai | off / genai |")
    print("|---|---:|---:|---:|---:|---:|")
    f = sp["first"]
    g0 = f.get("genai_list", [{}])[0].get("ttft_s", float("nan"))
    print(f"| first request (nothing cached) | {f['on']['ttft_s']*1000:.1f} ms | {f['off']['ttft_s']*1000:.1f} ms | {g0*1000:.1f} ms | {f['on']['ttft_s']/g0:.2f} | {f['off']['ttft_s']/g0:.2f} |")
    print(f"| later requests, TTFT median of {len(sp['warm']['on'])} | {on*1000:.1f} ms | {off*1000:.1f} ms | {ga*1000:.1f} ms | **{on/ga:.2f}** | {off/ga:.2f} |")
    c = res["chat"]
    print(f"\n### {res['model']}: 10-turn chat (medians of {len(c[0].get('ttft_samples_s', [0]))} runs)\n")
    print("| turn | prompt tokens | reused | edgeflow TTFT | edgeflow range | genai TTFT | edgeflow / genai |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for t in c:
        samples = t.get("ttft_samples_s", [t["ttft_s"]])
        print(f"| {t['turn']} | {t['prompt_tokens']} | {t['cached_tokens']} | {t['ttft_s']*1000:.1f} ms | {min(samples)*1000:.1f}–{max(samples)*1000:.1f} ms | {t['genai_ttft_s']*1000:.1f} ms | {t['ttft_s']/t['genai_ttft_s']:.2f} |")
    print(f"\nTurn {c[-1]['turn']} / turn 1 TTFT: edgeflow **{c[-1]['ttft_s']/c[0]['ttft_s']:.2f}**, genai {c[-1]['genai_ttft_s']/c[0]['genai_ttft_s']:.2f}")
    print(f"Metrics after the system-prompt run: {res.get('metrics')}")


def main():
    ap = engine_bench.serve_bench_args(__doc__, ".bench/prefix.json")
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--requests", type=int, default=5, help="warm requests after the first")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--chat-runs", type=int, default=3, help="times the 10-turn chat runs, each on a fresh server")
    args = ap.parse_args()
    engine_bench.run_models(args, bench_model, report)


if __name__ == "__main__":
    main()
