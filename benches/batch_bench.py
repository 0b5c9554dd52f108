#!/usr/bin/env python3
"""Concurrent streams decoded together (issue 15, item 2): aggregate decode throughput and a
newcomer's time to first token, edgeflow against the same requests one after another and
against onnxruntime-genai, in the same run.

    batch_bench.py --edgeflow BIN --model NAME=DIR [--model ...] [--threads 2] [--runs 3] [--out FILE]

Every request is a real OpenAI chat request over the Unix socket (streamed, greedy, a different
user question each, `max_tokens` new tokens with `ignore_eos`, so every stream decodes the same
length). Two `edgeflow serve` processes are started per model, one at a time: `batched`
(`engine.max_sequences = 8`) and `one at a time` (`engine.max_sequences = 1`, the requests
queue); prefix reuse is off in both so that only batching differs. Per run, alternating:

  alone        one stream on the batched server: TTFT, decode tok/s.
  N together   N streams sent at once (N = 4, 8): aggregate decode tok/s = the tokens after
               each stream's first / (last stream's end - first stream's first token);
               also the wall time from sending to the last byte.
  one at a time  the same N requests sent at once to the max_sequences = 1 server.
  newcomer     3 streams decoding (each past its first token), then a 4th request: its TTFT,
               against the same request's TTFT alone.
  genai        onnxruntime-genai 0.18.0 (benches/genai_runner.py, a fresh process): one stream
               of the same prompt length and max_tokens, greedy (its decode tok/s).

Medians over the runs; ratios: N together / alone (aggregate over one stream), N together / one
at a time, N together / genai, newcomer TTFT / alone TTFT.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_bench  # noqa: E402  (machine_info, build_prompt, wait_idle)
import prefix_bench  # noqa: E402  (Server, chat, USER_TURNS)

HERE = Path(__file__).resolve().parent


def stream(sock, question, max_tokens):
    """One stream: absolute (sent, first token, end) times, completion tokens, prompt tokens."""
    sent = time.perf_counter()
    ttft, total, _, usage = prefix_bench.chat(sock, [{"role": "user", "content": question}], max_tokens, {"ignore_eos": True})
    if usage["completion_tokens"] != max_tokens:
        raise SystemExit(f"batch_bench: a stream gave {usage['completion_tokens']} tokens, not {max_tokens}")
    return {"sent": sent, "first": sent + ttft, "end": sent + total, "tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"]}


def together(sock, questions, max_tokens, newcomer=None):
    """Streams sent at once from threads, in question order. `newcomer`: a question sent once
    all of them are decoding (all admitted, then two more decode steps); its record is returned
    too."""
    out = [None] * len(questions)

    def run(i, q):
        out[i] = stream(sock, q, max_tokens)

    threads = [threading.Thread(target=run, args=(i, q)) for i, q in enumerate(questions)]
    for t in threads:
        t.start()
    late = None
    if newcomer is not None:
        deadline, admitted_at = time.time() + 600, None
        while time.time() < deadline:
            m = metrics(sock)
            steps = m.get("edgeflow_decode_steps_total", 0)
            if admitted_at is None and m.get("edgeflow_generations_in_progress", 0) >= len(questions) and m.get("edgeflow_queue_depth", 0) == 0:
                admitted_at = steps
            if admitted_at is not None and steps >= admitted_at + 2:
                break
            time.sleep(0.005)
        else:
            raise SystemExit("batch_bench: the first streams never decoded together")
        late = stream(sock, newcomer, max_tokens)
    for t in threads:
        t.join()
    if any(r is None for r in out):
        raise SystemExit("batch_bench: a stream failed")
    return out, late


def metrics(sock):
    conn = prefix_bench.UnixHTTP(sock, timeout=10)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for line in body.splitlines():
        if line.startswith("edgeflow_") and " " in line and "{" not in line:
            k, v = line.rsplit(" ", 1)
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def aggregate(streams):
    decoded = sum(s["tokens"] - 1 for s in streams)
    span = max(s["end"] for s in streams) - min(s["first"] for s in streams)
    wall = max(s["end"] for s in streams) - min(s["sent"] for s in streams)
    return {"decode_tok_s": decoded / span, "wall_s": wall, "tokens": sum(s["tokens"] for s in streams)}


def genai_decode(python, model_dir, n_prompt, filler_ids, max_new, threads):
    ids = (filler_ids * (n_prompt // len(filler_ids) + 1))[:n_prompt]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    out = subprocess.run([python, str(HERE / "genai_runner.py"), "--model-dir", model_dir, "--prompt-ids", f.name, "--max-new", str(max_new), "--threads", str(threads)], capture_output=True, text=True)
    os.unlink(f.name)
    if out.returncode != 0:
        raise SystemExit(f"batch_bench: genai_runner failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"decode_tok_s": r["decode_tokens_per_s"], "ttft_s": r["time_to_first_token_ms"] / 1000.0}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def bench_model(name, model_dir, args):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    filler = tok.encode(engine_bench.build_prompt(tok, 256), add_special_tokens=False).ids
    questions = prefix_bench.USER_TURNS[:8]
    rows = []
    servers = {}
    try:
        servers["batched"] = prefix_bench.Server(args.edgeflow, model_dir, args.threads, "off", "max_sequences = 8\n")
        servers["one_at_a_time"] = prefix_bench.Server(args.edgeflow, model_dir, args.threads, "off", "max_sequences = 1\n")
        for run in range(args.runs):
            engine_bench.wait_idle(args.wait_idle)
            row = {"run": run}
            b, s = servers["batched"].sock, servers["one_at_a_time"].sock
            alone = stream(b, questions[3], args.max_tokens)
            row["alone"] = {"ttft_s": alone["first"] - alone["sent"], "decode_tok_s": (alone["tokens"] - 1) / (alone["end"] - alone["first"]), "prompt_tokens": alone["prompt_tokens"]}
            for n in args.streams:
                order = [("together", b), ("one_at_a_time", s)] if run % 2 == 0 else [("one_at_a_time", s), ("together", b)]
                for label, sock in order:
                    streams, _ = together(sock, questions[:n], args.max_tokens)
                    row[f"{label}_{n}"] = aggregate(streams)
            streams, late = together(b, questions[:3], args.max_tokens, newcomer=questions[3])
            row["newcomer"] = {"ttft_s": late["first"] - late["sent"], "others_first_s": [x["first"] - x["sent"] for x in streams]}
            row["genai"] = genai_decode(args.genai_python, model_dir, alone["prompt_tokens"], filler, args.max_tokens, args.threads)
            rows.append(row)
            print(f"  run {run}: " + json.dumps({k: v for k, v in row.items() if k != "run"}, default=lambda x: round(x, 3)))
        m = metrics(servers["batched"].sock)
    finally:
        for srv in servers.values():
            srv.stop()
    return {"model": name, "dir": model_dir, "runs": rows, "max_tokens": args.max_tokens, "streams": args.streams, "metrics": m}


def report(res):
    runs = res["runs"]
    alone = median([r["alone"]["decode_tok_s"] for r in runs])
    alone_ttft = median([r["alone"]["ttft_s"] for r in runs])
    genai = median([r["genai"]["decode_tok_s"] for r in runs])
    print(f"\n### {res['model']}: {res['max_tokens']} new tokens per stream, {runs[0]['alone']['prompt_tokens']}-token prompts, medians of {len(runs)} runs\n")
    print("| | aggregate decode tok/s | / one stream alone | / one at a time | / genai (one stream) | wall, all streams |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| one stream alone | {alone:.1f} | 1.00 | | {alone/genai:.2f} | |")
    print(f"| genai, one stream | {genai:.1f} | {genai/alone:.2f} | | 1.00 | |")
    for n in res["streams"]:
        t = median([r[f"together_{n}"]["decode_tok_s"] for r in runs])
        s = median([r[f"one_at_a_time_{n}"]["decode_tok_s"] for r in runs])
        tw = median([r[f"together_{n}"]["wall_s"] for r in runs])
        sw = median([r[f"one_at_a_time_{n}"]["wall_s"] for r in runs])
        print(f"| {n} streams together | {t:.1f} | **{t/alone:.2f}** | **{t/s:.2f}** | {t/genai:.2f} | {tw:.2f} s |")
        print(f"| {n} streams one at a time | {s:.1f} | {s/alone:.2f} | 1.00 | {s/genai:.2f} | {sw:.2f} s |")
    nc = median([r["newcomer"]["ttft_s"] for r in runs])
    print(f"\nNewcomer while 3 others decode: TTFT {nc*1000:.1f} ms vs {alone_ttft*1000:.1f} ms alone: **{nc/alone_ttft:.2f}x**")
    m = res["metrics"]
    steps, seqs = m.get("edgeflow_decode_steps_total", 0), m.get("edgeflow_decode_step_sequences_total", 0)
    if steps:
        print(f"Batched server: {steps:.0f} decode steps, mean batch {seqs/steps:.2f}")


def main():
    ap = engine_bench.serve_bench_args(__doc__, ".bench/batch.json")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, nargs="+", default=[4, 8])
    args = ap.parse_args()
    engine_bench.run_models(args, bench_model, report)


if __name__ == "__main__":
    main()
