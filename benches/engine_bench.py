#!/usr/bin/env python3
"""Side-by-side benchmark: edgeflow's engine vs onnxruntime-genai (the reference runtime).

For each model folder: a prompt of exactly --prompt-tokens tokens (text whose encoding with the
model's tokenizer.json by HF `tokenizers` has that many ids; edgeflow gets the text through
--prompt and must report the same prompt_token_ids, genai gets the ids), --new-tokens new
tokens, greedy, EOS ignored, the same intra-op thread count for both. The two runtimes run
alternately (ABBA order), each run in a fresh process; peak RSS is the child's ru_maxrss
from os.wait4. Reports medians and edgeflow/genai ratios, greedy token agreement, and for
large models the memory-bandwidth ceiling of decode speed.

Writes .bench/engine.json. Run through benches/run.sh (`make bench`).
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "benches" / "genai_runner.py"
DEFAULT_MODELS = [
    ("phi3-tiny-gqa", ROOT / "tests/fixtures/models/phi3-tiny-gqa", 5),
    ("smollm2", ROOT / ".models/smollm2-135m-instruct", 5),
    ("phi3-mini-int4", ROOT / ".models/phi3-mini-int4", 3),
]

# --------------------------------------------------------------------------------------------
# Machine


def machine_info():
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "cpus_available": len(os.sched_getaffinity(0))}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            k, v = k.strip(), v.strip()
            if k in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "L2 cache", "L3 cache", "Hypervisor vendor", "Flags"):
                if k == "Flags":
                    flags = set(v.split())
                    info["simd"] = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")) or f in ("sse4_2", "f16c"))
                else:
                    info[k] = v
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def _bw_child(arr, i, k, reps, barrier, q):
    part = arr[i * len(arr) // k:(i + 1) * len(arr) // k]
    times = []
    for _ in range(reps):
        barrier.wait()
        t = time.perf_counter()
        part.sum()
        times.append((t, time.perf_counter()))
    q.put(times)


def memory_bandwidth(gib=1.0, reps=6, procs=(1, 2)):
    """Read bandwidth in GB/s (1e9 B/s): best of `reps` numpy sums over a `gib` GiB float64
    array, split across k forked processes (numpy sums hold the GIL for part of the time, so
    threads do not scale) started together on a barrier."""
    import numpy as np

    arr = np.ones(int(gib * 2**30) // 8)
    arr += 0  # touch every page
    out = {}
    ctx = mp.get_context("fork")
    for k in procs:
        barrier, q = ctx.Barrier(k), ctx.Queue()
        ps = [ctx.Process(target=_bw_child, args=(arr, i, k, reps, barrier, q)) for i in range(k)]
        for p in ps:
            p.start()
        results = [q.get() for _ in ps]
        for p in ps:
            p.join()
        best = min(max(r[j][1] for r in results) - min(r[j][0] for r in results) for j in range(reps))
        out[k] = arr.nbytes / best / 1e9
    del arr
    return out


# --------------------------------------------------------------------------------------------
# ONNX weights: a minimal protobuf reader (the bench must not need the `onnx` package)

ELEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 21: 0.5, 22: 0.5}
# Ops that read only a few rows of a weight per token: the embedding table (Gather) and the
# rotary cos/sin caches (indexed by position inside GroupQueryAttention / RotaryEmbedding).
GATHER_OPS = {"Gather", "GatherBlockQuantized", "GroupQueryAttention", "RotaryEmbedding"}


def _varint(buf, i):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _fields(buf):
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            ln, i = _varint(buf, i)
            v, i = buf[i:i + ln], i + ln
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield field, wt, v


def onnx_weights(model_path):
    """Initializers of the main graph with their byte sizes and the op types consuming them."""
    buf = memoryview(Path(model_path).read_bytes())
    graph = next((v for f, wt, v in _fields(buf) if f == 7 and wt == 2), None)
    if graph is None:
        raise ValueError(f"{model_path}: no graph")
    inits, consumers = {}, {}
    for f, wt, v in _fields(graph):
        if f == 1 and wt == 2:  # NodeProto
            op, ins = "", []
            for nf, nwt, nv in _fields(v):
                if nf == 1 and nwt == 2:
                    ins.append(bytes(nv).decode())
                elif nf == 4 and nwt == 2:
                    op = bytes(nv).decode()
            for name in ins:
                if name:
                    consumers.setdefault(name, []).append(op)
        elif f == 5 and wt == 2:  # TensorProto
            dims, dtype, name, ext_len = [], 0, "", None
            for tf, twt, tv in _fields(v):
                if tf == 1:
                    if twt == 0:
                        dims.append(tv)
                    else:
                        j = 0
                        while j < len(tv):
                            d, j = _varint(tv, j)
                            dims.append(d)
                elif tf == 2:
                    dtype = tv
                elif tf == 8:
                    name = bytes(tv).decode()
                elif tf == 13:  # external_data entry
                    kv = {ef: bytes(ev).decode() for ef, _, ev in _fields(tv)}
                    if kv.get(1) == "length":
                        ext_len = int(kv.get(2, "0"))
            count = 1
            for d in dims:
                count *= d
            nbytes = ext_len if ext_len is not None else int(count * ELEM_BYTES.get(dtype, 4) + 0.5)
            inits[name] = {"shape": dims, "dtype": dtype, "bytes": nbytes}
    for name, info in inits.items():
        info["consumers"] = sorted(set(consumers.get(name, [])))
    return inits


def weight_traffic(model_dir, config):
    """Bytes of weights read per decoded token: every initializer (int4 blocks, scales, norms,
    lm_head) except those consumed only by row-indexing ops (GATHER_OPS: the embedding table,
    of which one row is gathered per token, and the rotary cos/sin caches)."""
    onnx_path = Path(model_dir) / config["model"]["decoder"]["filename"]
    inits = onnx_weights(onnx_path)
    streamed, gathered = 0, []
    for name, info in inits.items():
        if info["consumers"] and set(info["consumers"]) <= GATHER_OPS:
            gathered.append({"name": name, "bytes": info["bytes"], "shape": info["shape"], "consumers": info["consumers"]})
        else:
            streamed += info["bytes"]
    data_files = sorted(Path(model_dir).glob("*.onnx.data"))
    return {
        "onnx": str(onnx_path),
        "onnx_data_bytes": sum(p.stat().st_size for p in data_files),
        "initializer_bytes": sum(i["bytes"] for i in inits.values()),
        "excluded_gathered": gathered,
        "streamed_bytes_per_token": streamed,
    }


def kv_bytes_per_position(config):
    d = config["model"]["decoder"]
    return 2 * d["num_hidden_layers"] * d["num_key_value_heads"] * d["head_size"] * 4  # fp32 K and V


# --------------------------------------------------------------------------------------------
# Prompt


PROSE = (
    "The field unit wakes before dawn, reads the overnight sensor logs, and writes a short summary "
    "for the maintenance crew. Pressure in the north pipeline rose slowly after midnight, then fell "
    "back when the relief valve opened. Two pumps reported vibration above their usual range, and "
    "the cooling fan on cabinet seven stopped twice for a few seconds. Nobody was on site, so the "
    "agent compared each reading with last week's baseline, marked the unusual ones, and suggested "
    "which parts to inspect first. It also noted that the weather station lost its network link "
    "for an hour, which explains the gap in the wind and humidity charts. "
)


def build_prompt(tokenizer, n_tokens):
    """Text whose encoding (add_special_tokens=True, as edgeflow encodes) has exactly n ids."""
    words = (PROSE * (4 * n_tokens // 100 + 4)).split()
    count = lambda s: len(tokenizer.encode(s, add_special_tokens=True).ids)
    best = ""
    for n in range(1, len(words) + 1):
        text = " ".join(words[:n])
        c = count(text)
        if c == n_tokens:
            return text
        if c > n_tokens:
            break
        best = text
    # Pad from below with a one-token word until the count is exact.
    text = best
    for _ in range(n_tokens):
        c = count(text)
        if c == n_tokens:
            return text
        if c > n_tokens:
            break
        text += " and"
    raise SystemExit(f"engine_bench: could not build a prompt of exactly {n_tokens} tokens")


# --------------------------------------------------------------------------------------------
# Runs


# Linux starts a child's ru_maxrss at its parent's peak RSS (the forked mm keeps the parent's
# high-water mark, and exec folds it into the child's maxrss), so a child of this process would
# inherit the bench's own peak (numpy, tokenizers, the bandwidth array). Runs therefore go through
# a minimal launcher (python -I -S, a few MiB), which forks and execs the real command and writes
# the grandchild's os.wait4 rusage to a file. The launcher's own peak is the floor of the
# measurement (LAUNCHER_FLOOR, reported).
LAUNCHER = r"""
import os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write("%d %d %.6f" % (os.waitstatus_to_exitcode(status), ru.ru_maxrss, ru.ru_utime + ru.ru_stime))
"""


def run_child(cmd, env=None):
    """Runs cmd; returns (exit code, stdout, stderr, wall seconds, peak RSS in MiB, CPU seconds)."""
    fd, ru_file = tempfile.mkstemp(prefix="bench-rusage-")
    os.close(fd)
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, ru_file, *cmd], stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL)
            wall = time.perf_counter() - t
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        parts = Path(ru_file).read_text().split()
        code, maxrss_kib, cpu = (int(parts[0]), int(parts[1]), float(parts[2])) if len(parts) == 3 else (p.returncode or 1, 0, 0.0)
        return code, stdout, stderr, wall, maxrss_kib / 1024.0, cpu
    finally:
        os.unlink(ru_file)


def loadavg():
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def busy_processes(min_cpu_s=2.0, sample_s=1.0):
    """Other processes that used CPU during a short sample (to flag a shared, noisy machine)."""
    def snap():
        out = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(d.name)] = int(f[11]) + int(f[12])
            except (OSError, IndexError, ValueError):
                pass
        return out
    hz = os.sysconf("SC_CLK_TCK")
    a = snap()
    time.sleep(sample_s)
    b = snap()
    busy = []
    for pid, ticks in b.items():
        used = (ticks - a.get(pid, ticks)) / hz / sample_s
        if used > 0.1 and pid != os.getpid():
            try:
                cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = "?"
            busy.append({"pid": pid, "cpu": round(used, 2), "cmd": cmd[:160]})
    return sorted(busy, key=lambda x: -x["cpu"])


def wait_idle(max_wait_s, threshold=0.15):
    """Waits (up to max_wait_s) until no other process uses more than `threshold` of a CPU;
    returns the busy processes seen in the last 1 s sample (empty when the machine is quiet)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = [b for b in busy_processes() if b["cpu"] > threshold]
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(2)


def prewarm(paths):
    """Reads files once so the first run does not pay for a cold page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def first_divergence(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def serve_bench_args(doc, out):
    """The options every serve-level bench takes; add its own, then parse."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edgeflow", required=True)
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR")
    ap.add_argument("--genai-python", default=sys.executable)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wait-idle", type=float, default=30)
    ap.add_argument("--out", default=out)
    return ap


def run_models(args, bench_model, report):
    """The shared main of the serve-level benches: machine line, each `--model NAME=DIR` benched
    and reported, everything written as JSON to `--out`."""
    out = {"machine": machine_info(), "load_at_start": os.getloadavg()[0], "command": " ".join(sys.argv), "models": []}
    print(f"machine: {out['machine'].get('Model name')}, {out['machine'].get('cpus_available')} cores, SIMD {' '.join(out['machine'].get('simd', []))}")
    for spec in args.model:
        name, _, d = spec.partition("=")
        res = bench_model(name, d, args)
        out["models"].append(res)
        report(res)
    out["load_at_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nload average: {out['load_at_start']:.2f} at start, {out['load_at_end']:.2f} at end; results in {args.out}")


def median(xs):
    return statistics.median(xs) if xs else None


def fmt(x, nd=1):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def bench_model(name, model_dir, runs, warmup, args, env_ef):
    from tokenizers import Tokenizer

    config = json.loads((model_dir / "genai_config.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = build_prompt(tok, args.prompt_tokens)
    ids = tok.encode(text, add_special_tokens=True).ids
    assert len(ids) == args.prompt_tokens
    ids_file = Path(tempfile.mkstemp(prefix="bench-prompt-", suffix=".json")[1])
    ids_file.write_text(json.dumps(ids))

    eos = config["model"].get("eos_token_id", [])
    eos = set(eos if isinstance(eos, list) else [eos])
    ef_cmd = [str(args.edgeflow), "generate", "--model-dir", str(model_dir), "--prompt", text, "--max-tokens", str(args.new_tokens),
              "--greedy", "--threads", str(args.threads), "--ignore-eos", "--json"]
    ge_cmd = [args.genai_python, str(RUNNER), "--model-dir", str(model_dir), "--prompt-ids", str(ids_file),
              "--max-new", str(args.new_tokens), "--threads", str(args.threads)]
    cmds = {"edgeflow": (ef_cmd, env_ef), "genai": (ge_cmd, None)}

    prewarm([p for p in model_dir.iterdir() if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data")])
    print(f"\n## {name}  ({model_dir})", flush=True)
    print(f"prompt: {len(ids)} tokens, {len(text)} chars; new tokens: {args.new_tokens}; threads: {args.threads}; runs: {runs} each (+{warmup} warm-up)", flush=True)
    print("  edgeflow: " + " ".join(shlex.quote(c) for c in ef_cmd), flush=True)
    print("  genai:    " + " ".join(shlex.quote(c) for c in ge_cmd) + f"   ({ids_file.name}: the {len(ids)} prompt ids)", flush=True)

    load_before, busy_before = loadavg(), busy_processes()
    if busy_before:
        print(f"  WARNING: other processes are using CPU (timings will be noisy): " + "; ".join(f"{b['cpu'] * 100:.0f}% {b['cmd'][:80]}" for b in busy_before), flush=True)
    results = {"edgeflow": [], "genai": []}
    errors = []
    # ABBA order so neither runtime always runs first (page cache, CPU boost, thermal drift).
    order = []
    for i in range(warmup + runs):
        order += [("edgeflow", i), ("genai", i)] if i % 2 == 0 else [("genai", i), ("edgeflow", i)]
    for rt, i in order:
        cmd, env = cmds[rt]
        busy = wait_idle(args.wait_idle) if args.wait_idle > 0 else []
        code, out, err, wall, rss, cpu = run_child(cmd, env)
        if code != 0:
            errors.append({"runtime": rt, "run": i, "exit": code, "stderr": err[-2000:]})
            print(f"  {rt} run {i}: FAILED (exit {code}): {err.strip()[-500:]}", flush=True)
            continue
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            errors.append({"runtime": rt, "run": i, "exit": code, "stdout": out[-2000:], "stderr": err[-2000:]})
            print(f"  {rt} run {i}: unparsable output", flush=True)
            continue
        rec = {
            "run": i,
            "warmup": i < warmup,
            "ttft_ms": r["time_to_first_token_ms"],
            "decode_tok_s": r["decode_tokens_per_s"],
            "peak_rss_mib": rss,
            "wall_s": wall,
            "cpu_s": cpu,
            "busy_at_start": busy,
            "n_tokens": len(r["token_ids"]),
            "token_ids": r["token_ids"],
            "threads_reported": r.get("threads"),
        }
        if rt == "edgeflow":
            rec["finish_reason"] = r.get("finish_reason")
            if r["prompt_token_ids"] != ids:
                d = first_divergence(r["prompt_token_ids"], ids)
                msg = f"edgeflow's prompt_token_ids differ from HF tokenizers' at index {d} ({len(r['prompt_token_ids'])} vs {len(ids)} ids)"
                errors.append({"runtime": rt, "run": i, "error": msg})
                print("  ERROR: " + msg, flush=True)
        else:
            rec["ttft_incl_generator_ms"] = r.get("ttft_incl_generator_ms")
            rec["load_ms"] = r.get("load_ms")
            rec["os_threads"] = r.get("os_threads")
            rec["search_options"] = r.get("search_options")
        if rec["n_tokens"] != args.new_tokens:
            errors.append({"runtime": rt, "run": i, "error": f"generated {rec['n_tokens']} tokens, expected {args.new_tokens}"})
        results[rt].append(rec)
        tag = (" (warm-up)" if rec["warmup"] else "") + (f" [busy: {', '.join(str(b['cpu']) + ' ' + b['cmd'].split()[0].rsplit('/', 1)[-1] for b in busy[:3])}]" if busy else "")
        print(f"  {rt:8s} run {i}{tag}: ttft {rec['ttft_ms']:8.2f} ms  decode {rec['decode_tok_s']:9.2f} tok/s  rss {rss:7.1f} MiB  wall {wall:6.2f} s  cpu {cpu:6.2f} s", flush=True)
    ids_file.unlink(missing_ok=True)

    measured = {rt: [r for r in rs if not r["warmup"]] for rt, rs in results.items()}
    med = {
        rt: {
            "ttft_ms": median([r["ttft_ms"] for r in rs]),
            "decode_tok_s": median([r["decode_tok_s"] for r in rs]),
            "peak_rss_mib": median([r["peak_rss_mib"] for r in rs]),
            "wall_s": median([r["wall_s"] for r in rs]),
            "cpu_s": median([r["cpu_s"] for r in rs]),
            "ttft_ms_range": [min((r["ttft_ms"] for r in rs), default=None), max((r["ttft_ms"] for r in rs), default=None)],
            "decode_tok_s_range": [min((r["decode_tok_s"] for r in rs), default=None), max((r["decode_tok_s"] for r in rs), default=None)],
            "n": len(rs),
        }
        for rt, rs in measured.items()
    }
    if measured["genai"]:
        med["genai"]["ttft_incl_generator_ms"] = median([r["ttft_incl_generator_ms"] for r in measured["genai"]])
        med["genai"]["load_ms"] = median([r["load_ms"] for r in measured["genai"]])
    ratio = lambda k: (med["edgeflow"][k] / med["genai"][k]) if med["edgeflow"][k] and med["genai"][k] else None
    ratios = {k: ratio(k) for k in ("ttft_ms", "decode_tok_s", "peak_rss_mib", "wall_s", "cpu_s")}

    # Greedy agreement: across runtimes, and each runtime with itself across runs.
    agreement = {}
    if results["edgeflow"] and results["genai"]:
        a, b = results["edgeflow"][0]["token_ids"], results["genai"][0]["token_ids"]
        d = first_divergence(a, b)
        agreement = {
            "identical": d is None,
            "first_divergence": d,
            "matching_prefix": len(a) if d is None else d,
            "compared": min(len(a), len(b)),
        }
        if d is not None and d < len(a) and d < len(b):
            agreement["at_divergence"] = {"edgeflow": a[d], "genai": b[d], "edgeflow_token_is_eos": a[d] in eos}
            if a[d] in eos:
                agreement["note"] = ("edgeflow picked an EOS id here; with --ignore-eos it keeps it, while genai's "
                                     "min_length masks EOS logits, so divergence at an EOS step is expected")
    for rt, rs in results.items():
        agreement[f"{rt}_deterministic_across_runs"] = all(r["token_ids"] == rs[0]["token_ids"] for r in rs) if rs else None

    return {
        "dir": str(model_dir),
        "prompt_text": text,
        "prompt_token_ids": ids,
        "commands": {
            "edgeflow": " ".join(shlex.quote(c) for c in ef_cmd[:4]) + " --prompt <prompt_text> " + " ".join(ef_cmd[6:]),
            "genai": " ".join(shlex.quote(c) for c in ge_cmd[:5]) + " <prompt_token_ids.json> " + " ".join(ge_cmd[6:]),
        },
        "config": config,
        "eos_token_ids": sorted(eos),
        "runs": results,
        "median": med,
        "ratio_edgeflow_over_genai": ratios,
        "agreement": agreement,
        "errors": errors,
        "machine_load": {"loadavg_before": load_before, "loadavg_after": loadavg(), "busy_processes_before": busy_before, "busy_processes_after": busy_processes()},
    }


def ceiling(res, bw, threads):
    cfg = res["config"]
    w = weight_traffic(res["dir"], cfg)
    bw_t = bw.get(threads) or max(bw.values())
    per_tok = w["streamed_bytes_per_token"]
    # Mean KV-cache bytes read per decode step (cache holds prompt+1 .. prompt+new-1 positions).
    kv = kv_bytes_per_position(cfg)
    p, n = len(res["prompt_token_ids"]), len(res["runs"]["edgeflow"][0]["token_ids"]) if res["runs"]["edgeflow"] else 0
    mean_ctx = p + n / 2
    out = {
        "bandwidth_gb_s": bw_t,
        "bandwidth_processes": threads if threads in bw else max(bw, key=bw.get),
        **w,
        "ceiling_tok_s_weights": bw_t * 1e9 / per_tok if per_tok else None,
        "kv_bytes_per_position": kv,
        "mean_kv_bytes_per_step": kv * mean_ctx,
        "ceiling_tok_s_weights_plus_kv": bw_t * 1e9 / (per_tok + kv * mean_ctx) if per_tok else None,
    }
    for rt in ("edgeflow", "genai"):
        tps = res["median"][rt]["decode_tok_s"]
        out[f"{rt}_pct_of_ceiling"] = 100 * tps / out["ceiling_tok_s_weights"] if tps and out["ceiling_tok_s_weights"] else None
    return out


def table(name, res):
    m, r = res["median"], res["ratio_edgeflow_over_genai"]
    e, g = m["edgeflow"], m["genai"]
    lines = [
        f"### {name}",
        "",
        f"| median of {e['n']}/{g['n']} runs | edgeflow | onnxruntime-genai 0.18.0 | edgeflow / genai |",
        "|---|---:|---:|---:|",
        f"| TTFT, ms (prefill {len(res['prompt_token_ids'])} tok + 1st sample) | {fmt(e['ttft_ms'], 2)} | {fmt(g['ttft_ms'], 2)} | {fmt(r['ttft_ms'], 2)} |",
        f"| decode, tok/s | {fmt(e['decode_tok_s'], 2)} | {fmt(g['decode_tok_s'], 2)} | {fmt(r['decode_tok_s'], 2)} |",
        f"| peak RSS, MiB | {fmt(e['peak_rss_mib'])} | {fmt(g['peak_rss_mib'])} | {fmt(r['peak_rss_mib'], 2)} |",
        f"| process wall time, s (load + run) | {fmt(e['wall_s'], 2)} | {fmt(g['wall_s'], 2)} | {fmt(r['wall_s'], 2)} |",
        f"| process CPU time, s (user + sys) | {fmt(e['cpu_s'], 2)} | {fmt(g['cpu_s'], 2)} | {fmt(r['cpu_s'], 2)} |",
    ]
    if e["ttft_ms_range"][0] is not None and g["ttft_ms_range"][0] is not None:
        lines.append(f"| TTFT range, ms | {fmt(e['ttft_ms_range'][0], 2)}–{fmt(e['ttft_ms_range'][1], 2)} | {fmt(g['ttft_ms_range'][0], 2)}–{fmt(g['ttft_ms_range'][1], 2)} | |")
        lines.append(f"| decode range, tok/s | {fmt(e['decode_tok_s_range'][0], 2)}–{fmt(e['decode_tok_s_range'][1], 2)} | {fmt(g['decode_tok_s_range'][0], 2)}–{fmt(g['decode_tok_s_range'][1], 2)} | |")
    c = res.get("ceiling")
    if c:
        lines.append(f"| decode, % of bandwidth ceiling ({c['ceiling_tok_s_weights']:.2f} tok/s) | {fmt(c['edgeflow_pct_of_ceiling'])}% | {fmt(c['genai_pct_of_ceiling'])}% | |")
    a = res["agreement"]
    lines.append("")
    if a.get("identical"):
        lines.append(f"Greedy tokens: identical ({a['compared']} of {a['compared']}).")
    elif a:
        lines.append(f"Greedy tokens: DIVERGE at index {a['first_divergence']} (matching prefix {a['matching_prefix']} of {a['compared']}); {a.get('at_divergence')}. {a.get('note', '')}")
    lines.append(f"Deterministic across runs: edgeflow {a.get('edgeflow_deterministic_across_runs')}, genai {a.get('genai_deterministic_across_runs')}.")
    if g.get("ttft_incl_generator_ms") is not None:
        lines.append(f"genai TTFT counting og.Generator() creation (its KV-cache allocation; edgeflow's TTFT includes its own): {g['ttft_incl_generator_ms']:.2f} ms; genai load (Config+Model): {g['load_ms']:.0f} ms.")
    if c:
        lines.append(
            f"Ceiling: {c['bandwidth_gb_s']:.1f} GB/s ({c['bandwidth_processes']} proc) / {c['streamed_bytes_per_token'] / 1e6:.1f} MB of weights per token "
            f"(all initializers, {c['initializer_bytes'] / 1e6:.1f} MB, minus Gather-only ones: "
            + ", ".join(f"{x['name']} {x['bytes'] / 1e6:.1f} MB" for x in c["excluded_gathered"])
            + f"; .onnx.data is {c['onnx_data_bytes'] / 1e6:.1f} MB) = {c['ceiling_tok_s_weights']:.2f} tok/s; "
            f"counting the fp32 KV cache too (mean {c['mean_kv_bytes_per_step'] / 1e6:.1f} MB/step) = {c['ceiling_tok_s_weights_plus_kv']:.2f} tok/s."
        )
    n_busy = sum(1 for rs in res["runs"].values() for x in rs if x.get("busy_at_start"))
    n_all = sum(len(rs) for rs in res["runs"].values())
    if n_busy:
        lines.append(f"WARNING: {n_busy} of {n_all} runs started while other processes were using CPU (see runs[].busy_at_start).")
    ml = res.get("machine_load", {})
    if ml.get("busy_processes_before") or ml.get("busy_processes_after"):
        lines.append(f"WARNING: other processes were using CPU during this model's runs (loadavg before {ml.get('loadavg_before')}, after {ml.get('loadavg_after')}); timings are not clean.")
    if res["errors"]:
        lines.append(f"ERRORS: {len(res['errors'])}: " + "; ".join(str({k: v for k, v in e.items() if k != 'stderr'}) for e in res["errors"][:5]))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for both runtimes (default 2)")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR", help="model folder to bench (repeatable; default: the tiny GQA fixture, SmolLM2 (make smollm2) and .models/phi3-mini-int4, those present)")
    ap.add_argument("--only", choices=["tiny", "smollm2", "phi3-mini"], help="bench only one of the default models")
    ap.add_argument("--runs", type=int, help="measured runs per runtime (default 5 for small models, 3 for phi3-mini)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded runs per runtime before measuring (default 1)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--edgeflow", type=Path, default=ROOT / "target/release/edgeflow")
    ap.add_argument("--genai-python", default=sys.executable, help="python with onnxruntime-genai (default: this one)")
    ap.add_argument("--ort-lib", default=os.environ.get("ORT_DYLIB_PATH") or str(ROOT / ".ort" / platform.machine() / "libonnxruntime.so"))
    ap.add_argument("--no-bandwidth", action="store_true", help="skip the memory-bandwidth measurement")
    ap.add_argument("--wait-idle", type=float, default=60, metavar="S",
                    help="before each run, wait up to S seconds for other processes to stop using CPU (0: don't; default 60)")
    ap.add_argument("--out", type=Path, default=ROOT / ".bench/engine.json")
    args = ap.parse_args()

    models = []
    if args.model:
        for m in args.model:
            name, sep, d = m.partition("=")
            if not sep:
                name, d = Path(m).name, m
            models.append((name, Path(d).resolve(), args.runs or 5))
    else:
        for name, d, runs in DEFAULT_MODELS:
            if args.only and not name.startswith({"tiny": "phi3-tiny"}.get(args.only, args.only)):
                continue
            if d.is_dir():
                models.append((name, d, args.runs or runs))
            else:
                print(f"engine_bench: {d.relative_to(ROOT)} not found, skipping {name}", file=sys.stderr)
    if not models:
        raise SystemExit("engine_bench: no model folder to bench")
    if not args.edgeflow.is_file():
        raise SystemExit(f"engine_bench: {args.edgeflow} not found (cargo build --release)")

    env_ef = dict(os.environ, ORT_DYLIB_PATH=args.ort_lib)
    import onnxruntime_genai as og  # noqa: F401  (fail early when the venv is wrong)

    machine = machine_info()
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print("# edgeflow vs onnxruntime-genai", flush=True)
    print(f"machine: {machine.get('Model name', '?')}, {machine['cpus_available']} CPUs available ({machine.get('CPU(s)', '?')} total), "
          f"{machine.get('mem_total_gib', '?')} GiB RAM; SIMD: {' '.join(machine.get('simd', []))}", flush=True)
    print(f"command: {command}", flush=True)
    print(f"edgeflow: {args.edgeflow} (ORT_DYLIB_PATH={args.ort_lib}); genai: onnxruntime-genai {og.__version__} via {args.genai_python}", flush=True)

    bw, bw_busy = {}, []
    if not args.no_bandwidth:
        procs = sorted({1, args.threads})
        bw_busy = wait_idle(args.wait_idle) if args.wait_idle > 0 else busy_processes()
        bw = memory_bandwidth(procs=procs)
        print("memory read bandwidth (numpy sum over 1 GiB, best of 6): " + ", ".join(f"{k} proc {v:.1f} GB/s" for k, v in bw.items())
              + (f"  [WARNING: machine busy: {', '.join(b['cmd'][:60] for b in bw_busy[:3])}]" if bw_busy else ""), flush=True)

    # Interpreter + import baseline of the genai child (Python and numpy are not the runtime).
    floor_rss = run_child(["true"])[4]
    base_rss = run_child([args.genai_python, "-c", "import numpy, onnxruntime_genai"])[4]
    print(f"peak RSS floor of the launcher: {floor_rss:.1f} MiB; genai child baseline (python + import numpy, onnxruntime_genai, no model): {base_rss:.1f} MiB", flush=True)

    report = {
        "machine": machine,
        "command": command,
        "settings": {
            "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "warmup": args.warmup,
            "greedy": True, "edgeflow_flags": "--greedy --ignore-eos --threads N",
            "genai_search_options": {"do_sample": False, "max_length": "prompt_tokens + new_tokens", "min_length": "= max_length (masks EOS, forces exactly new_tokens)"},
            "genai_session_options": {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1, "providers": "cleared (CPU)"},
            "order": "ABBA alternation, each run a fresh process",
        },
        "onnxruntime_genai_version": og.__version__,
        "ort_lib_edgeflow": args.ort_lib,
        "memory_bandwidth_gb_s": {str(k): v for k, v in bw.items()},
        "memory_bandwidth_busy_processes": bw_busy if bw else None,
        "genai_child_baseline_rss_mib": base_rss,
        "rss_floor_mib": floor_rss,
        "rss_method": "ru_maxrss of the benchmarked process from os.wait4, via a minimal launcher (python -I -S) so the bench's own peak RSS is not inherited",
        "models": {},
    }
    tables = []
    for name, d, runs in models:
        res = bench_model(name, d, runs, args.warmup, args, env_ef)
        if bw and res["runs"]["edgeflow"]:
            try:
                c = ceiling(res, bw, args.threads)
                if c["streamed_bytes_per_token"] >= 256 * 2**20:  # smaller models live in cache: no DRAM ceiling
                    res["ceiling"] = c
                else:
                    res["ceiling_not_applicable"] = {"streamed_bytes_per_token": c["streamed_bytes_per_token"], "reason": "weights fit in CPU caches"}
            except (OSError, ValueError, KeyError) as e:
                res["ceiling_error"] = str(e)
        report["models"][name] = res
        tables.append(table(name, res))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))

    print("\n" + "\n\n".join(tables))
    print(f"\nresults: {args.out}")
    if any(r["errors"] for r in report["models"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
