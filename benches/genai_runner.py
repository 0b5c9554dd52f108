#!/usr/bin/env python3
"""Run one greedy generation with onnxruntime-genai (the reference runtime) and print JSON.

    genai_runner.py --model-dir DIR --prompt-ids IDS --max-new N [--threads T]

IDS is a JSON file holding a list of token ids, or the ids inline ("1,2,3" or "[1,2,3]").

Timing matches `edgeflow generate --json`:
  time_to_first_token_ms  from the start of append_tokens (prefill) until the first sampled
                          token is available (prefill + first sample);
  decode_tokens_per_s     (generated - 1) / (time from the first token to the last token).
Also reported: ttft_incl_generator_ms, which additionally counts og.Generator() creation (where
genai allocates its KV cache; edgeflow allocates its cache inside its TTFT window), and
load_ms (og.Config + og.Model).

Greedy (do_sample=false) with search max_length = min_length = len(prompt) + max_new, so genai
allocates a KV cache for exactly that many positions (not the model's full context) and
generates exactly max_new tokens: min_length masks the EOS logits until the end (edgeflow's
--ignore-eos instead lets EOS be picked and continues; see engine_bench.py).
Threads: session_options intra_op_num_threads = T, inter_op_num_threads = 1, CPU provider
only, set through og.Config.overlay (the model folder is not modified).
"""

import argparse
import json
import os
import sys
import time


def parse_ids(s):
    if os.path.isfile(s):
        with open(s) as f:
            ids = json.load(f)
    else:
        s = s.strip()
        ids = json.loads(s) if s.startswith("[") else [int(x) for x in s.split(",") if x.strip()]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise SystemExit("genai_runner: --prompt-ids must be a non-empty list of integers")
    return ids


def os_threads():
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompt-ids", required=True, help="JSON file with a list of ids, or ids inline")
    ap.add_argument("--max-new", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    prompt = parse_ids(args.prompt_ids)
    max_length = len(prompt) + args.max_new

    import numpy as np
    import onnxruntime_genai as og

    t_load = time.perf_counter()
    config = og.Config(args.model_dir)
    config.clear_providers()  # CPU
    overlay = {
        "model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}},
    }
    config.overlay(json.dumps(overlay))
    model = og.Model(config)
    load_ms = (time.perf_counter() - t_load) * 1e3

    params = og.GeneratorParams(model)
    search = {"do_sample": False, "max_length": max_length, "min_length": max_length, "batch_size": 1}
    params.set_search_options(**search)

    t_gen = time.perf_counter()
    generator = og.Generator(model, params)
    ids = np.asarray(prompt, dtype=np.int32)
    t0 = time.perf_counter()
    generator.append_tokens(ids)  # prefill
    generator.generate_next_token()  # first sample
    tokens = [int(generator.get_next_tokens()[0])]
    t_first = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()  # forward of the previous token + sample
        tokens.append(int(generator.get_next_tokens()[0]))
    t_last = time.perf_counter()
    threads_seen = os_threads()

    n = len(tokens)
    dt = t_last - t_first
    out = {
        "runtime": "onnxruntime-genai",
        "genai_version": og.__version__,
        "prompt_token_ids": prompt,
        "token_ids": tokens,
        "time_to_first_token_ms": (t_first - t0) * 1e3,
        "ttft_incl_generator_ms": (t_first - t_gen) * 1e3,
        "decode_tokens_per_s": (n - 1) / dt if n > 1 and dt > 0 else 0.0,
        "load_ms": load_ms,
        "threads": args.threads,
        "os_threads": threads_seen,
        "search_options": search,
        "session_options_overlay": overlay,
        "ort_lib": os.environ.get("ORT_LIB_PATH"),
    }
    if n != args.max_new:
        print(f"genai_runner: generated {n} tokens, expected {args.max_new}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
