#!/usr/bin/env python3
"""Continuous-batching probe for GQA decoder graphs with a shared past/present KV buffer.

Research script, not part of the build. For each model folder (genai layout) it checks whether
several sequences of different lengths can be decoded together in one ONNX Runtime run with
genai's `past_present_share_buffer` layout, one buffer per layer of shape
[batch, kv_heads, cap, head_size] bound as both `past_key_values.N.*` and `present.N.*`:

  A. each prompt generated alone at batch 1 (reference tokens, logits, top-1 margins);
  B. the same prompts together at batch 4: each prefilled at batch 1 into its own row
     (B1: separate [1,...] buffers copied into the row; B2: an OrtValue aliasing the row), then
     decoded together with input_ids [4,1] and a right-padded attention_mask [4, max_total];
  C. the same plus a 5th idle row (dummy token, mask at its own held length + 1), and a
     mid-stream join (4th prompt prefilled at step 8 into a row holding NaN leftovers);
  D. one decode step from one identical state replicated to batch M (M-dependence of kernels);
  E. where GQA writes each row's new key/value (per-row seqlens_k), whether it ever reads
     past a row's length (NaN-filled tails), and a sub-batch bound as a view of rows 0..k-1;
  F. timing: aggregate decode tokens/s at batch 1/2/4 (steps of the three sizes interleaved,
     so a loaded machine affects them alike) and one batch-1 prefill of the longest prompt.

Run:  .venv/bench/bin/python benches/batch_probe.py [--threads 2] [--repeats 7] [--only NAME]
          [--timing-only] [--model NAME=DIR] [--json out.json]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "smollm2-135m": ROOT / ".models/smollm2-135m-instruct",
    "phi3-tiny-gqa": ROOT / "tests/fixtures/models/phi3-tiny-gqa",
}

# --------------------------------------------------------------------------------------------
# Model and binding helpers


class Model:
    def __init__(self, folder: Path, threads: int):
        cfg = json.loads((folder / "genai_config.json").read_text())
        d = cfg["model"]["decoder"]
        self.folder = folder
        self.cfg = cfg
        self.layers = d["num_hidden_layers"]
        self.kv = d["num_key_value_heads"]
        self.hd = d["head_size"]
        self.vocab = cfg["model"]["vocab_size"]
        self.context = cfg["model"]["context_length"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(folder / d["filename"]), so, providers=["CPUExecutionProvider"])
        ins = {i.name for i in self.sess.get_inputs()}
        self.input_names = sorted(ins)
        self.ids_name = d["inputs"]["input_ids"]
        self.mask_name = d["inputs"]["attention_mask"]
        self.pos_name = "position_ids" if "position_ids" in ins else None
        self.past = [(d["inputs"]["past_key_names"] % l, d["inputs"]["past_value_names"] % l) for l in range(self.layers)]
        self.present = [(d["outputs"]["present_key_names"] % l, d["outputs"]["present_value_names"] % l) for l in range(self.layers)]
        self.logits_name = d["outputs"]["logits"]
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def alloc(self, batch: int, cap: int):
        """Per layer key then value, [batch, kv, cap, hd] float32 zeros."""
        return [np.zeros((batch, self.kv, cap, self.hd), np.float32) for _ in range(2 * self.layers)]

    def binding(self, arrays):
        """An IOBinding with each array bound as past AND present (share buffer). `arrays` may be
        views (e.g. big[b:b+1]) as long as they are C-contiguous; the OrtValue aliases them."""
        io = self.sess.io_binding()
        keep = []
        for l, ((pk, pv), (ok, ov)) in enumerate(zip(self.past, self.present)):
            for arr, i_name, o_name in ((arrays[2 * l], pk, ok), (arrays[2 * l + 1], pv, ov)):
                assert arr.flags["C_CONTIGUOUS"]
                val = ort.OrtValue.ortvalue_from_numpy(arr)
                assert val.data_ptr() == arr.ctypes.data, "OrtValue does not alias the numpy buffer"
                io.bind_ortvalue_input(i_name, val)
                io.bind_ortvalue_output(o_name, val)
                keep.append(val)
        return Binding(self, io, keep)


class Binding:
    def __init__(self, model: Model, io, keep):
        self.m = model
        self.io = io
        self.keep = keep
        self.logits_buf = None  # numpy-backed [B,S,V], rebound when the shape changes

    def run(self, ids: np.ndarray, mask: np.ndarray, positions=None) -> np.ndarray:
        """ids [B,S] int64, mask [B,T] int64. Returns logits [B,S,V]: a numpy buffer the binding
        owns, overwritten by the next run of the same shape (copy what you keep)."""
        m = self.m
        ids = np.ascontiguousarray(ids, np.int64)
        mask = np.ascontiguousarray(mask, np.int64)
        self._ids, self._mask = ids, mask  # keep alive during the run
        self.io.bind_cpu_input(m.ids_name, ids)
        self.io.bind_cpu_input(m.mask_name, mask)
        if m.pos_name:
            if positions is None:
                # per row: positions of the new tokens = (valid length - S) .. valid length - 1
                lens = mask.sum(1)
                positions = (lens[:, None] - ids.shape[1] + np.arange(ids.shape[1])[None, :]).astype(np.int64)
            self._pos = np.ascontiguousarray(positions, np.int64)
            self.io.bind_cpu_input(m.pos_name, self._pos)
        B, S = ids.shape
        if self.logits_buf is None or self.logits_buf.shape[:2] != (B, S):
            self.logits_buf = np.empty((B, S, m.vocab), np.float32)
            self._logits_val = ort.OrtValue.ortvalue_from_numpy(self.logits_buf)
            self.io.bind_ortvalue_output(m.logits_name, self._logits_val)
        m.sess.run_with_iobinding(self.io)
        return self.logits_buf


def margin(v: np.ndarray) -> float:
    top2 = np.partition(v, -2)[-2:]
    return float(top2[1] - top2[0])


# --------------------------------------------------------------------------------------------
# Prompts

SYS = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
LONG_TEXT = (
    "I am planning a small vegetable garden behind my house this spring. The soil is heavy clay, the "
    "spot gets about six hours of direct sun, and winters here are cold and wet. I would like to grow "
    "tomatoes, beans, lettuce and some herbs for cooking. Could you explain how I should prepare the "
    "soil, when I should plant each crop, how often to water, and which plants grow well next to each "
    "other so that I get a good harvest without using chemical fertilizers or pesticides at all?"
)


def chatml(user: str, system: bool) -> str:
    return (SYS if system else "") + "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n"


def fit_chat(tok: Tokenizer, target: int, system: bool):
    """ChatML prompt whose user message is the shortest prefix (in words) of LONG_TEXT reaching
    `target` tokens (or the closest possible)."""
    words = LONG_TEXT.split()
    best = None
    for k in range(1, len(words) + 1):
        ids = tok.encode(chatml(" ".join(words[:k]), system), add_special_tokens=False).ids
        best = ids
        if len(ids) >= target:
            break
    return best


def prompts_for(name: str, m: Model):
    if name.startswith("smollm2"):
        p = [
            m.tok.encode(chatml("Hi", False), add_special_tokens=False).ids,
            fit_chat(m.tok, 17, False),
            fit_chat(m.tok, 40, True),
            fit_chat(m.tok, 90, True),
        ]
        idle = m.tok.encode(chatml("Tell me a joke.", False), add_special_tokens=False).ids
    else:
        ids = [1] + m.tok.encode(LONG_TEXT * 2, add_special_tokens=False).ids
        p = [ids[:n] for n in (5, 17, 40, 90)]
        idle = ([1] + m.tok.encode("Once upon a time there was a small village", add_special_tokens=False).ids)[:11]
    return [list(map(int, x)) for x in p], list(map(int, idle))


# --------------------------------------------------------------------------------------------
# Generation


def generate_alone(m: Model, ids, n_new: int, cap: int):
    arrays = m.alloc(1, cap)
    b = m.binding(arrays)
    logits = b.run(np.array([ids]), np.ones((1, len(ids)), np.int64))
    last = logits[0, -1].copy()
    toks, margins, all_logits = [], [], []
    total = len(ids)
    for step in range(n_new):
        t = int(np.argmax(last))
        toks.append(t)
        margins.append(margin(last))
        all_logits.append(last)
        if step == n_new - 1:
            break
        total += 1
        last = b.run(np.array([[t]]), np.ones((1, total), np.int64))[0, -1].copy()
    return {"tokens": toks, "margins": margins, "logits": all_logits, "arrays": arrays, "len": total}


def prefill_rows(m: Model, big, rows, mode: str):
    """Prefill each row's prompt at batch 1 into row b of `big`. mode 'copy': own [1,...] buffers
    then numpy copy; 'alias': bind OrtValues that alias big[b:b+1] directly."""
    cap = big[0].shape[2]
    first_logits = []
    for b, ids in enumerate(rows):
        if mode == "copy":
            small = m.alloc(1, cap)
            bnd = m.binding(small)
        else:
            bnd = m.binding([a[b:b + 1] for a in big])
        lg = bnd.run(np.array([ids]), np.ones((1, len(ids)), np.int64))[0, -1].copy()
        if mode == "copy":
            for a, s in zip(big, small):
                a[b] = s[0]
        first_logits.append(lg)
    return first_logits


def generate_together(m: Model, prompts, n_new: int, cap: int, mode="copy", idle=None, nan_tails=False,
                      check_writes=False, watch_idle=True):
    rows = list(prompts) + ([idle] if idle is not None else [])
    B = len(rows)
    big = m.alloc(B, cap)
    first = prefill_rows(m, big, rows, mode)
    lens = [len(r) for r in rows]  # tokens held per row
    n_act = len(prompts)
    if nan_tails:
        for a in big:
            for b in range(B):
                a[b, :, lens[b]:, :] = np.nan
    idle_snapshot = None
    if idle is not None and watch_idle:
        idle_snapshot = [a[B - 1, :, :lens[B - 1], :].copy() for a in big]
    bnd = m.binding(big)
    toks = [[] for _ in range(n_act)]
    logits = [[] for _ in range(n_act)]
    last = first[:n_act]
    write_report = []
    dummy = 0
    for step in range(n_new):
        for b in range(n_act):
            toks[b].append(int(np.argmax(last[b])))
            logits[b].append(last[b])
        if step == n_new - 1:
            break
        feed = [toks[b][-1] for b in range(n_act)] + ([dummy] if idle is not None else [])
        new_lens = [lens[b] + 1 for b in range(n_act)] + ([lens[-1] + 1] if idle is not None else [])
        width = max(new_lens)
        mask = np.zeros((B, width), np.int64)
        for b in range(B):
            mask[b, :new_lens[b]] = 1
        before = [a.copy() for a in big] if (check_writes and step in (0, n_new // 2)) else None
        out = bnd.run(np.array(feed)[:, None], mask)
        last = [out[b, 0].copy() for b in range(n_act)]
        if before is not None:
            # which positions of each row changed, over all layers / heads / k and v
            per_row = []
            for b in range(B):
                changed = set()
                for a0, a1 in zip(before, big):
                    diff = np.any(a0[b] != a1[b], axis=(0, 2))  # over heads, head dim -> [cap]
                    changed |= set(np.nonzero(diff)[0].tolist())
                per_row.append({"past_len": lens[b] if b < n_act else lens[-1], "changed_positions": sorted(changed)})
            write_report.append({"step": step + 1, "mask_width": width, "rows": per_row})
        for b in range(n_act):
            lens[b] += 1
        # idle row: its length does not advance (the dummy lands at position `held`, overwritten each step)
    res = {"tokens": toks, "logits": logits, "arrays": big, "lens": lens, "writes": write_report}
    if idle_snapshot is not None:
        held = lens[-1]
        res["idle_held"] = held
        res["idle_intact"] = all(np.array_equal(s, a[B - 1, :, :held, :]) for s, a in zip(idle_snapshot, big))
    return res


def generate_join(m: Model, prompts, n_new: int, cap: int, join_at: int):
    """Continuous join: rows 0..n-2 are prefilled and decode; the last row starts empty with
    NaN garbage (a finished sequence's leftovers) and runs as an idle row (held 0, dummy token);
    at step `join_at` the last prompt is prefilled at batch 1 into that row (aliasing OrtValues)
    and then decodes with the others. Returns each row's first n_new tokens."""
    B = len(prompts)
    big = m.alloc(B, cap)
    for a in big:
        a[B - 1] = np.nan
    first = prefill_rows(m, big, prompts[:-1], "alias")
    lens = [len(p) for p in prompts[:-1]] + [0]
    active = [True] * (B - 1) + [False]
    last = first + [None]
    toks = [[] for _ in range(B)]
    bnd = m.binding(big)
    step = 0
    while any(len(t) < n_new for t in toks):
        if step == join_at:
            jb = m.binding([a[B - 1:B] for a in big])
            ids = prompts[-1]
            last[B - 1] = jb.run(np.array([ids]), np.ones((1, len(ids)), np.int64))[0, -1].copy()
            lens[B - 1] = len(ids)
            active[B - 1] = True
        for b in range(B):
            if active[b] and len(toks[b]) < n_new:
                toks[b].append(int(np.argmax(last[b])))
        feed, new_lens = [], []
        for b in range(B):
            if active[b] and len(toks[b]) < n_new:
                feed.append(toks[b][-1])
                new_lens.append(lens[b] + 1)
            else:  # idle or finished: dummy at its held length (the held tokens stay untouched)
                feed.append(0)
                new_lens.append(lens[b] + 1)
        if not any(active[b] and len(toks[b]) < n_new for b in range(B)) and all(active):
            break
        mask = np.zeros((B, max(new_lens)), np.int64)
        for b in range(B):
            mask[b, :new_lens[b]] = 1
        out = bnd.run(np.array(feed)[:, None], mask)
        for b in range(B):
            if active[b] and len(toks[b]) < n_new:
                last[b] = out[b, 0].copy()
                lens[b] += 1
        step += 1
    return toks


def compare(alone, together_tokens, together_logits):
    ta = alone["tokens"]
    first_div = next((i for i, (x, y) in enumerate(zip(ta, together_tokens)) if x != y), None)
    upto = first_div if first_div is not None else len(ta)
    diffs = [float(np.max(np.abs(alone["logits"][i] - together_logits[i]))) for i in range(min(len(ta), len(together_tokens)))]
    out = {
        "identical": first_div is None,
        "first_divergence": first_div,
        "alone_margin_at_divergence": alone["margins"][first_div] if first_div is not None else None,
        "max_abs_logit_diff_before_divergence": max(diffs[:upto]) if upto else 0.0,
        "logit_diff_prefill_step": diffs[0],
        "logit_diff_first_decode_step": diffs[1] if len(diffs) > 1 else None,
        "bitwise_equal_steps": sum(1 for d in diffs[:upto] if d == 0.0),
        "min_alone_margin": min(alone["margins"]),
        "per_step_max_abs_diff": [round(d, 6) for d in diffs],
    }
    return out


def kv_drift(m: Model, alone, big, row, n_valid):
    """max |together - alone| over the valid KV region of a row (all layers)."""
    return float(max(np.max(np.abs(a_al[0, :, :n_valid, :] - a_big[row, :, :n_valid, :])) for a_al, a_big in zip(alone["arrays"], big)))


# --------------------------------------------------------------------------------------------
# D. M-dependence of one decode step from identical state


def m_dependence(m: Model, ids, cap: int, batches=(1, 2, 3, 4, 5, 8)):
    base = m.alloc(1, cap)
    bnd = m.binding(base)
    lg = bnd.run(np.array([ids]), np.ones((1, len(ids)), np.int64))[0, -1]
    t = int(np.argmax(lg))
    ref = None
    out = {}
    for B in batches:
        big = [np.repeat(a, B, axis=0) for a in base]
        bb = m.binding(big)
        lo = bb.run(np.full((B, 1), t), np.ones((B, len(ids) + 1), np.int64))[:, 0].copy()
        if ref is None:
            ref = lo[0].copy()
        out[B] = {
            "row0_vs_batch1_max_abs": float(np.max(np.abs(lo[0] - ref))),
            "rows_bitwise_identical_to_each_other": bool(all(np.array_equal(lo[0], lo[i]) for i in range(B))),
            "argmax_same": bool(int(np.argmax(lo[0])) == int(np.argmax(ref))),
        }
    return out


# --------------------------------------------------------------------------------------------
# E. sub-batch view: bind big[0:k] (first k rows) and check rows >= k untouched


def subbatch_view(m: Model, prompts, cap: int):
    big = m.alloc(len(prompts), cap)
    prefill_rows(m, big, prompts, "alias")
    k = len(prompts) - 1
    snap = [a[k:].copy() for a in big]
    view = [a[:k] for a in big]
    bnd = m.binding(view)
    lens = [len(p) + 1 for p in prompts[:k]]
    mask = np.zeros((k, max(lens)), np.int64)
    for b in range(k):
        mask[b, :lens[b]] = 1
    bnd.run(np.zeros((k, 1), np.int64) + 5, mask)
    untouched = all(np.array_equal(s, a[k:]) for s, a in zip(snap, big))
    return {"bound_rows": k, "rows_after_view_untouched": untouched}


# --------------------------------------------------------------------------------------------
# F. timing


def decode_state(m: Model, ids, B: int, cap: int):
    """B rows all holding `ids` (prefilled once at batch 1, replicated), ready to decode."""
    base = m.alloc(1, cap)
    m.binding(base).run(np.array([ids]), np.ones((1, len(ids)), np.int64))
    big = [np.ascontiguousarray(np.repeat(a, B, axis=0)) for a in base]
    return {"big": big, "bnd": m.binding(big), "n": len(ids), "tok": np.full((B, 1), 5, np.int64), "B": B}


def step_once(st):
    """One decode step for all rows; returns its wall time in seconds."""
    st["n"] += 1
    mask = np.ones((st["B"], st["n"]), np.int64)
    t0 = time.perf_counter()
    lo = st["bnd"].run(st["tok"], mask)
    st["tok"] = np.argmax(lo[:, 0], axis=-1)[:, None].astype(np.int64)
    return time.perf_counter() - t0


def time_prefill(m: Model, ids, cap: int):
    arrays = m.alloc(1, cap)
    bnd = m.binding(arrays)
    t0 = time.perf_counter()
    bnd.run(np.array([ids]), np.ones((1, len(ids)), np.int64))
    return (time.perf_counter() - t0) * 1e3


# --------------------------------------------------------------------------------------------


def probe(name: str, folder: Path, args):
    m = Model(folder, args.threads)
    cap = args.cap
    prompts, idle = prompts_for(name, m)
    n_new = args.new_tokens
    rep = {
        "model": name,
        "graph_inputs_have_position_ids": m.pos_name is not None,
        "layers": m.layers, "kv_heads": m.kv, "head_size": m.hd, "vocab": m.vocab, "cap": cap,
        "prompt_lengths": [len(p) for p in prompts], "idle_prompt_length": len(idle),
    }
    print(f"\n=== {name}: layers={m.layers} kv={m.kv} hd={m.hd} vocab={m.vocab} cap={cap} "
          f"prompts={rep['prompt_lengths']} position_ids={'yes' if m.pos_name else 'no'}", flush=True)

    if not args.timing_only:
        # A. alone
        alone = [generate_alone(m, p, n_new, cap) for p in prompts]
        rep["alone_min_margin"] = [round(min(a["margins"]), 4) for a in alone]
        if name.startswith("smollm2"):
            rep["alone_text"] = [m.tok.decode(a["tokens"]) for a in alone]
        # determinism: alone twice
        again = generate_alone(m, prompts[1], n_new, cap)
        rep["alone_rerun_bitwise_identical"] = bool(all(np.array_equal(x, y) for x, y in zip(again["logits"], alone[1]["logits"])))

        # B. together (copy and alias prefill), with write-position check
        for mode in ("copy", "alias"):
            tg = generate_together(m, prompts, n_new, cap, mode=mode, check_writes=(mode == "copy"))
            rows = []
            for b in range(len(prompts)):
                c = compare(alone[b], tg["tokens"][b], tg["logits"][b])
                c["prompt_len"] = len(prompts[b])
                valid = len(prompts[b]) + n_new - 1
                c["kv_max_abs_diff_vs_alone"] = kv_drift(m, alone[b], tg["arrays"], b, valid)
                if not args.verbose:
                    c.pop("per_step_max_abs_diff")
                rows.append(c)
            rep[f"together_b4_{mode}"] = rows
            if mode == "copy":
                ok = all(r["changed_positions"] == [r["past_len"]] for w in tg["writes"] for r in w["rows"])
                rep["gqa_write_positions"] = {"all_rows_wrote_exactly_at_past_len": ok, "detail": tg["writes"]}
                tg_copy = tg
            else:
                rep["alias_vs_copy_bitwise_identical"] = bool(all(
                    np.array_equal(x, y) for b in range(len(prompts)) for x, y in zip(tg["logits"][b], tg_copy["logits"][b])))

        # B'. NaN in every row's tail (beyond its length) must not change anything
        tn = generate_together(m, prompts, n_new, cap, mode="copy", nan_tails=True)
        rep["nan_tails_outputs_bitwise_identical"] = bool(all(
            np.array_equal(x, y) for b in range(len(prompts)) for x, y in zip(tn["logits"][b], tg_copy["logits"][b])))
        rep["nan_tails_any_nan_logits"] = bool(any(np.isnan(x).any() for b in range(len(prompts)) for x in tn["logits"][b]))

        # C. idle 5th row
        ti = generate_together(m, prompts, n_new, cap, mode="alias", idle=idle)
        rep["idle_row"] = {
            "held": ti["idle_held"],
            "held_positions_intact": ti["idle_intact"],
            "active_rows_tokens_identical_to_alone": [ti["tokens"][b] == alone[b]["tokens"] for b in range(len(prompts))],
            "active_rows_logits_bitwise_equal_to_batch4": bool(all(
                np.array_equal(x, y) for b in range(len(prompts)) for x, y in zip(ti["logits"][b], tg_copy["logits"][b]))),
            "active_rows_max_abs_diff_vs_batch4": float(max(
                np.max(np.abs(x - y)) for b in range(len(prompts)) for x, y in zip(ti["logits"][b], tg_copy["logits"][b]))),
        }

        # C'. continuous join of the 4th prompt at step 8 into a row holding NaN garbage
        tj = generate_join(m, prompts, n_new, cap, join_at=8)
        rep["join_mid_stream"] = {"join_at_step": 8,
                                  "tokens_identical_to_alone": [tj[b] == alone[b]["tokens"] for b in range(len(prompts))]}

        # D. M-dependence
        rep["one_step_m_dependence"] = m_dependence(m, prompts[2], cap)

        # E. sub-batch view
        rep["subbatch_view"] = subbatch_view(m, prompts, cap)

    # F. timing. The machine may be loaded, so batch sizes are interleaved step by step (each
    # step of B=1, 2, 4 runs back to back, order rotated) and every size sees the same load;
    # medians over all steps, and the best per-repeat median, are reported.
    sizes = (1, 2, 4)
    tprompt = prompts[2]
    total_steps = min(args.time_steps * args.repeats, cap - len(tprompt) - 2)
    states = {B: decode_state(m, tprompt, B, cap) for B in sizes}
    for B in sizes:  # warm-up
        step_once(states[B])
    steps_all = {B: [] for B in sizes}
    prefill = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(total_steps):
        order = sizes[i % 3:] + sizes[:i % 3]
        for B in order:
            steps_all[B].append(step_once(states[B]))
        if i % args.time_steps == args.time_steps - 1:
            prefill.append(time_prefill(m, prompts[3], cap))
    rep_medians = {B: [statistics.median(v[j:j + args.time_steps]) for j in range(0, len(v), args.time_steps)] for B, v in steps_all.items()}
    cpu_share = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    med_ms = {B: statistics.median(v) * 1e3 for B, v in steps_all.items()}
    best_ms = {B: min(v) * 1e3 for B, v in rep_medians.items()}
    tps_med = {B: B / (med_ms[B] / 1e3) for B in sizes}
    tps_best = {B: B / (best_ms[B] / 1e3) for B in sizes}
    rep["timing"] = {
        "context_tokens_per_row": len(tprompt),
        "decode_steps_per_trial": args.time_steps,
        "repeats": args.repeats,
        "interleaved_steps_per_batch_size": total_steps,
        "process_cpu_seconds_per_wall_second": round(cpu_share, 2),
        "step_ms_median": {str(B): round(v, 2) for B, v in med_ms.items()},
        "step_ms_best_repeat_median": {str(B): round(v, 2) for B, v in best_ms.items()},
        "step_ms_per_repeat_median": {str(B): [round(x * 1e3, 2) for x in v] for B, v in rep_medians.items()},
        "aggregate_tok_s_median": {str(B): round(v, 1) for B, v in tps_med.items()},
        "aggregate_tok_s_best": {str(B): round(v, 1) for B, v in tps_best.items()},
        "ratio_b2_over_b1_median": round(tps_med[2] / tps_med[1], 2),
        "ratio_b4_over_b1_median": round(tps_med[4] / tps_med[1], 2),
        "ratio_b2_over_b1_best": round(tps_best[2] / tps_best[1], 2),
        "ratio_b4_over_b1_best": round(tps_best[4] / tps_best[1], 2),
        "prefill_ms": {"prompt_tokens": len(prompts[3]), "median": round(statistics.median(prefill), 1),
                       "best": round(min(prefill), 1), "all": [round(x, 1) for x in prefill]},
    }
    print_summary(rep)
    return rep


def print_summary(rep):
    if "together_b4_copy" in rep:
        print(f"prompt lengths {rep['prompt_lengths']}, idle {rep['idle_prompt_length']}; alone min margins {rep['alone_min_margin']}; "
              f"alone rerun bitwise identical: {rep['alone_rerun_bitwise_identical']}")
        for mode in ("copy", "alias"):
            for r in rep[f"together_b4_{mode}"]:
                print(f"  [{mode}] len {r['prompt_len']:3d}: identical={r['identical']} first_div={r['first_divergence']} "
                      f"margin@div={r['alone_margin_at_divergence']} maxdiff<div={r['max_abs_logit_diff_before_divergence']:.3g} "
                      f"prefill diff={r['logit_diff_prefill_step']:.3g} 1st-decode diff={r['logit_diff_first_decode_step']:.3g} "
                      f"bitwise steps={r['bitwise_equal_steps']} kv drift={r['kv_max_abs_diff_vs_alone']:.3g}")
        print(f"  alias prefill == copy prefill (bitwise): {rep['alias_vs_copy_bitwise_identical']}")
        g = rep["gqa_write_positions"]
        print(f"  GQA wrote each row exactly at its past_len: {g['all_rows_wrote_exactly_at_past_len']}  "
              + "; ".join(f"step {w['step']} width {w['mask_width']}: " + ",".join(f"{r['past_len']}->{r['changed_positions']}" for r in w['rows']) for w in g["detail"]))
        print(f"  NaN tails: outputs bitwise identical={rep['nan_tails_outputs_bitwise_identical']} any NaN={rep['nan_tails_any_nan_logits']}")
        print(f"  idle row: {rep['idle_row']}")
        print(f"  join mid-stream: {rep['join_mid_stream']}")
        print(f"  one-step M dependence: {rep['one_step_m_dependence']}")
        print(f"  sub-batch view: {rep['subbatch_view']}")
    t = rep["timing"]
    print(f"  timing (cpu s/wall s {t['process_cpu_seconds_per_wall_second']}): step ms median {t['step_ms_median']} "
          f"best {t['step_ms_best_repeat_median']}; agg tok/s median {t['aggregate_tok_s_median']} best {t['aggregate_tok_s_best']}; "
          f"b4/b1 median {t['ratio_b4_over_b1_median']} best {t['ratio_b4_over_b1_best']}; b2/b1 median {t['ratio_b2_over_b1_median']} "
          f"best {t['ratio_b2_over_b1_best']}; prefill {t['prefill_ms']}")
    print(f"  per-repeat step-ms medians: {t['step_ms_per_repeat_median']}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cap", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--time-steps", type=int, default=16)
    ap.add_argument("--only", help="run only this model name (after --model additions)")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                    help="add a genai model folder; names starting with 'smollm2' get ChatML prompts")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--timing-only", action="store_true", help="skip the correctness checks (A-E)")
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}, threads {args.threads}", flush=True)
    models = dict(MODELS)
    for spec in args.model:
        name, _, folder = spec.partition("=")
        models[name] = Path(folder)
    reports = []
    for name, folder in models.items():
        if args.only and name != args.only:
            continue
        if not (folder / "genai_config.json").is_file():
            print(f"skip {name}: {folder} missing")
            continue
        reports.append(probe(name, folder, args))
    if args.json:
        def clean(o):
            if isinstance(o, dict):
                return {str(k): clean(v) for k, v in o.items()}
            if isinstance(o, list):
                return [clean(v) for v in o]
            return o
        args.json.write_text(json.dumps(clean(reports), indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
