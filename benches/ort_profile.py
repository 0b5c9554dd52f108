#!/usr/bin/env python3
"""Where a genai decoder graph spends its time: ONNX Runtime's own profiler over one prompt
(prefill) and single-token decode steps into genai's shared KV buffer, kernel time summed per
node group (LM head, MLP, projections, attention, the rest).

Research script behind BENCHMARKS.md "Single stream: where prefill time goes"; not a timed
benchmark. The graph is loaded as shipped (all positions' logits), as both runtimes did before
edgeflow's last-position rewrite (src/engine/graph.rs).

Run:  .venv/bench/bin/python benches/ort_profile.py MODEL_DIR [--prompt 128] [--threads 2]
"""

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

GROUPS = ("lm_head", "qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "GroupQuery", "embed")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    cfg = json.loads((a.model_dir / "genai_config.json").read_text())["model"]["decoder"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.enable_profiling = True
    so.profile_file_prefix = "/tmp/ort_profile"
    s = ort.InferenceSession(str(a.model_dir / cfg["filename"]), so, providers=["CPUExecutionProvider"])
    layers, kv, hs = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_size"]
    cap = a.prompt + 16
    names = [i.name for i in s.get_inputs()]

    def feeds(n, past):
        f = {"input_ids": np.random.randint(100, 1000, (1, n)).astype(np.int64), "attention_mask": np.ones((1, past + n), np.int64)}
        for layer in range(layers):
            for k in ("key", "value"):
                f[f"past_key_values.{layer}.{k}"] = np.zeros((1, kv, cap, hs), np.float32)
        if "position_ids" in names:
            f["position_ids"] = np.arange(past, past + n)[None].astype(np.int64)
        return f

    for kind, n, past in (("prefill", a.prompt, 0), ("decode", 1, a.prompt)):
        for _ in range(a.runs):
            t = time.time()
            s.run(None, feeds(n, past))
            print(f"{kind} {n} token(s): {1e3 * (time.time() - t):.1f} ms")
    events = json.loads(Path(s.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]

    def group(name):
        return next((g for g in GROUPS if g in name), "other")

    for label, run in (("prefill", runs[a.runs - 1]), ("decode", runs[-1])):
        lo, hi = run["ts"], run["ts"] + run["dur"]
        per = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and lo <= e["ts"] <= hi:
                per[(group(e["name"]), e["args"]["op_name"])] += e["dur"]
        total = sum(per.values())
        print(f"\n{label}: kernels {total / 1e3:.1f} ms of a {run['dur'] / 1e3:.1f} ms run")
        for (g, op), d in per.most_common(16):
            print(f"  {g:12s} {op:34s} {d / 1e3:8.1f} ms {100 * d / total:5.1f}%")


if __name__ == "__main__":
    main()
