#!/usr/bin/env python3
"""Build genuine Phi-3-architecture ONNX GenAI models with random weights.

A random-init Hugging Face `Phi3ForCausalLM` (fixed seed) is saved as an HF
folder and exported with onnxruntime-genai's own model builder
(`onnxruntime_genai.models.builder`, int4, CPU), so the graph has the real ops
(GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNormalization, ...) and
the real I/O (`input_ids`, `attention_mask`, `past_key_values.N.key/value` ->
`logits`, `present.N.key/value`; no `position_ids`), in the layout of the
published `Phi-3-mini-4k-instruct-onnx` CPU folders:

    <decoder>.onnx  <decoder>.onnx.data  genai_config.json
    tokenizer.json  tokenizer_config.json  special_tokens_map.json

The tokenizer files are copied from tests/fixtures/tokenizer/ (made by
tests/gen/make_tokenizer.py); whatever tokenizer files the builder wrote are
removed.

Environment: the venv at .venv/gen (torch, transformers, onnx, onnx-ir,
onnxruntime, onnxruntime-genai==0.18.0, safetensors, numpy).

Regenerate the committed fixtures (tests/fixtures/models/phi3-tiny-*):

    .venv/gen/bin/python tests/gen/make_model.py --fixtures

which is the same as

    .venv/gen/bin/python tests/gen/make_model.py --preset tiny-gqa
    .venv/gen/bin/python tests/gen/make_model.py --preset tiny-gqa-acc1
    .venv/gen/bin/python tests/gen/make_model.py --preset tiny-mha

(The benchmarks build the full-size model without torch, in ~20 s: tests/gen/phi3_mini.py,
the same graph with random int4 weights drawn directly. The builder route below remains for
comparison.)

Build the full-size model (Phi-3-mini shape, 3.8B random parameters, int4
block 32, accuracy level 4) into .models/phi3-mini-int4/ (never committed;
measured on 2 cores / 24 GB: ~4 min, peak RSS 8.6 GB, ~23 GB of temporary
files in .models/ that are deleted afterwards, result 2.72 GB like the
published folder; onnxruntime-genai decodes it at ~5 tokens/s):

    .venv/gen/bin/python tests/gen/make_model.py --preset phi3-mini

For that size the builder's own int4 step would need far more than 24 GB, so
the `fp32-quantize` method is used: the HF model is created in bf16 and saved
as safetensors shards (8.2 GB RSS), the builder exports an fp32 model (8.0 GB
RSS, 15 GB .onnx.data), and then onnxruntime's MatMulNBitsQuantizer (block
32, symmetric, QOperator, as the builder does) quantizes it one decoder layer
at a time, reading each weight from the external-data file on demand (6 GB
RSS).  On the tiny models the two methods give identical graphs and
bit-identical weights (checked with --method fp32-quantize --compare-with DIR).

Other useful invocations:

    # custom shape
    make_model.py --hidden-size 128 --layers 2 --heads 8 --kv-heads 2 \
        --intermediate-size 384 --init-scale 0.2 --lm-head-scale 25 \
        --accuracy-level 1 --seed 3 --out /tmp/m
    # rename the decoder of an existing folder (rewrites the external-data
    # reference inside the .onnx and genai_config.json's decoder.filename)
    make_model.py --rename DIR NEW_NAME.onnx

Logit decisiveness: random weights with initializer_range 0.02 give flat
logits (top-1/top-2 gaps < 0.001), so the fixtures use initializer_range 0.2
and multiply lm_head by 50 after init (top logits ~300), which keeps greedy
outputs varied while making the smallest top-1/top-2 gap along the oracle's
greedy paths (tests/gen/oracle.py) > 0.2 on the accuracy-level-1 models; the
seeds were picked among 1..10 for that.  The <|end|> (32007) row of lm_head is
doubled (--end-token-scale 2) so that some greedy runs end on an eos id
(finish_reason "stop") within a few tokens while others run to the limit.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "tests" / "fixtures" / "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PUBLISHED_DECODER = "phi3-mini-4k-instruct-cpu-int4-rtn-block-32-acc-level-4.onnx"

# Phi-3-mini-4k-instruct's generation_config.json: generation ends at
# <|endoftext|> (32000), <|assistant|> (32001) or <|end|> (32007).
GENERATION_EOS = [32000, 32001, 32007]
END_TOKEN_ID = 32007  # <|end|>

PRESETS = {
    # grouped-query attention: 4 query heads of 16 share 2 kv heads
    "tiny-gqa": dict(
        hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=256,
        init_scale=0.2, lm_head_scale=50.0, end_token_scale=2.0, seed=9, accuracy_level=4,
        decoder_filename=PUBLISHED_DECODER,
        out=REPO / "tests" / "fixtures" / "models" / "phi3-tiny-gqa",
    ),
    # same weights as tiny-gqa, fp32 activations in MatMulNBits
    "tiny-gqa-acc1": dict(
        hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=256,
        init_scale=0.2, lm_head_scale=50.0, end_token_scale=2.0, seed=9, accuracy_level=1,
        decoder_filename="model.onnx",
        out=REPO / "tests" / "fixtures" / "models" / "phi3-tiny-gqa-acc1",
    ),
    # plain multi-head attention (kv heads == heads), 3 layers, 2 heads of 32
    # (hidden stays 64: the fp32 embedding table alone is 32064*hidden*4 bytes)
    "tiny-mha": dict(
        hidden_size=64, layers=3, heads=2, kv_heads=2, intermediate_size=192,
        init_scale=0.2, lm_head_scale=50.0, end_token_scale=2.0, seed=8, accuracy_level=1,
        decoder_filename="model.onnx",
        out=REPO / "tests" / "fixtures" / "models" / "phi3-tiny-mha",
    ),
    # full Phi-3-mini-4k shape; built on demand, never committed
    "phi3-mini": dict(
        hidden_size=3072, layers=32, heads=32, kv_heads=32, intermediate_size=8192,
        init_scale=0.02, lm_head_scale=1.0, seed=1, accuracy_level=4,
        decoder_filename=PUBLISHED_DECODER, method="fp32-quantize",
        out=REPO / ".models" / "phi3-mini-int4",
    ),
}
FIXTURE_PRESETS = ("tiny-gqa", "tiny-gqa-acc1", "tiny-mha")


def log(msg: str) -> None:
    print(f"[make_model {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------
# 1. Hugging Face model
# --------------------------------------------------------------------------
def phi3_config(a):
    from transformers import Phi3Config

    return Phi3Config(
        vocab_size=32064,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        hidden_act="silu",
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        # Phi-3-mini-4k: plain RoPE, theta 10000, no rope_scaling
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        initializer_range=a.init_scale,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
        architectures=["Phi3ForCausalLM"],
    )


def make_hf(a, hf_dir: Path, tokenizer_dir: Path) -> None:
    """Random-init Phi3ForCausalLM (seeded) saved as an HF folder."""
    import torch
    from transformers import GenerationConfig, Phi3ForCausalLM

    head_size = a.hidden_size // a.heads
    if a.hidden_size % a.heads or head_size % 16:
        sys.exit(f"hidden {a.hidden_size} / heads {a.heads}: head size must be an integer multiple of 16 "
                 "(the CPU GroupQueryAttention kernel needs it)")
    if a.heads % a.kv_heads:
        sys.exit("heads must be a multiple of kv heads")

    cfg = phi3_config(a)
    big = a.hidden_size * a.intermediate_size * a.layers > 50_000_000
    dtype = torch.bfloat16 if big else torch.float32
    log(f"creating Phi3ForCausalLM hidden={a.hidden_size} layers={a.layers} heads={a.heads} "
        f"kv_heads={a.kv_heads} intermediate={a.intermediate_size} init={a.init_scale} "
        f"lm_head_scale={a.lm_head_scale} seed={a.seed} dtype={dtype}")
    torch.manual_seed(a.seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Phi3ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():
        if a.lm_head_scale != 1.0:
            model.lm_head.weight.mul_(a.lm_head_scale)
        if a.embed_scale != 1.0:
            model.model.embed_tokens.weight.mul_(a.embed_scale)
        if a.end_token_scale != 1.0:
            # make <|end|> win now and then, so greedy runs can stop on an eos id
            model.lm_head.weight[END_TOKEN_ID].mul_(a.end_token_scale)
    hf_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(hf_dir, safe_serialization=True, max_shard_size="2GB")
    del model
    gc.collect()
    GenerationConfig(bos_token_id=1, eos_token_id=GENERATION_EOS, pad_token_id=32000).save_pretrained(hf_dir)
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, hf_dir / name)


# --------------------------------------------------------------------------
# 2. ONNX export
# --------------------------------------------------------------------------
def run_builder(hf_dir: Path, out: Path, precision: str, cache: Path, extra: dict) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder",
           "-i", str(hf_dir), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache),
           "--extra_options", *[f"{k}={v}" for k, v in extra.items()]]
    log("running " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def quantize_from_disk(src_onnx: Path, dst_onnx: Path, accuracy_level: int, block_size: int = 32) -> None:
    """fp32 builder output -> MatMulNBits int4, as the builder's own int4 step
    (MatMulNBitsQuantizer DEFAULT/RTN, symmetric, QOperator, MatMul only), one
    decoder layer at a time.

    Each layer's MatMuls and their weights (read from the .onnx.data file) go
    into a small throw-away ModelProto that MatMulNBitsQuantizer processes; its
    MatMulNBits nodes and int4 initializers are then copied into the main
    graph.  (Loading the weights into the main ModelProto instead keeps every
    fp32 weight alive: protobuf's arena does not give back memory of removed
    fields, which took the peak to ~18 GB at Phi-3-mini size.)"""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    base = str(src_onnx.parent)

    def loaded(t):
        t2 = onnx.TensorProto()
        t2.CopyFrom(t)
        if uses_external_data(t2):
            load_external_data_for_tensor(t2, base)
            del t2.external_data[:]
            t2.data_location = onnx.TensorProto.DEFAULT
        return t2

    model = onnx.load(str(src_onnx), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    groups: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            key = node.name.split("/")[2] if node.name.startswith("/model/layers.") else node.name
            groups.setdefault(key, []).append(node)
    log(f"quantizing {sum(len(v) for v in groups.values())} MatMuls in {len(groups)} groups "
        f"(block {block_size}, symmetric, accuracy level {accuracy_level})")
    replaced: dict[str, onnx.NodeProto] = {}  # original node name -> MatMulNBits node
    new_inits: list = []
    for i, (key, nodes) in enumerate(groups.items()):
        mini = onnx.helper.make_model(onnx.helper.make_graph(list(nodes), key, [], []),
                                      opset_imports=list(model.opset_import), ir_version=model.ir_version)
        mini.graph.initializer.extend([loaded(inits[n.input[1]]) for n in nodes])
        q = MatMulNBitsQuantizer(
            mini, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
            quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",), algo_config=None,
        )
        q.process()
        qg = q.model.model.graph
        assert len(qg.node) == len(nodes), f"{key}: expected one node per MatMul"
        # copy out (a Python reference to a sub-message would keep the whole
        # mini model, fp32 weights included, alive)
        for old, new in zip(nodes, qg.node):
            assert new.op_type == "MatMulNBits" and list(new.output) == list(old.output), (old.name, new.name)
            replaced[old.name] = onnx.NodeProto.FromString(new.SerializeToString())
        new_inits.extend(onnx.TensorProto.FromString(t.SerializeToString()) for t in qg.initializer)
        del q, mini, qg
        gc.collect()
        if i % 8 == 0 or i == len(groups) - 1:
            log(f"  quantized {key} ({i + 1}/{len(groups)})")

    graph = model.graph
    nodes = [replaced.get(n.name, n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {x for n in graph.node for x in n.input}
    kept = [loaded(t) for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del kept, new_inits, nodes, replaced
    gc.collect()
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    save_external(model, dst_onnx)


def save_external(model, dst_onnx: Path) -> None:
    import onnx

    data = dst_onnx.with_name(dst_onnx.name + ".data")
    for p in (dst_onnx, data):
        if p.exists():
            p.unlink()
    onnx.save_model(model, str(dst_onnx), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=0, convert_attribute=False)
    for p in (dst_onnx, data):
        p.chmod(0o644)  # onnx creates the data file 0600


def rename_decoder(folder: Path, new_name: str) -> None:
    """Rename <folder>'s decoder .onnx and its .onnx.data; the external-data
    location recorded inside the .onnx is rewritten (via onnx's external-data
    tools, a plain `mv` would break it) and genai_config.json is updated."""
    import onnx

    cfg_path = folder / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    old_name = cfg["model"]["decoder"]["filename"]
    if old_name == new_name:
        return
    old = folder / old_name
    model = onnx.load(str(old), load_external_data=True)
    save_external(model, folder / new_name)
    del model
    old.unlink()
    old_data = folder / (old_name + ".data")
    if old_data.exists():
        old_data.unlink()
    cfg["model"]["decoder"]["filename"] = new_name
    cfg_path.write_text(json.dumps(cfg, indent=4) + "\n")
    log(f"renamed decoder {old_name} -> {new_name}")


def finish_folder(out: Path, tokenizer_dir: Path) -> None:
    """Leave only the decoder, its data, genai_config.json and the Phi-3
    tokenizer files (the builder rewrites/adds tokenizer files)."""
    cfg = json.loads((out / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]["filename"]
    keep = {dec, dec + ".data", "genai_config.json", *TOKENIZER_FILES}
    for p in out.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, out / name)


def export(a, hf_dir: Path, out: Path, work: Path) -> None:
    extra = {"accuracy_level": a.accuracy_level, "filename": a.decoder_filename, "hf_token": "false"}
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.method == "builder":
        run_builder(hf_dir, out, "int4", work / "cache", extra)
    else:
        fp32 = work / "fp32"
        run_builder(hf_dir, fp32, "fp32", work / "cache", {"filename": "model.onnx", "hf_token": "false"})
        out.mkdir(parents=True)
        # the builder ran in its own process, so its memory is already released
        quantize_from_disk(fp32 / "model.onnx", out / a.decoder_filename, a.accuracy_level)
        cfg = json.loads((fp32 / "genai_config.json").read_text())
        cfg["model"]["decoder"]["filename"] = a.decoder_filename
        (out / "genai_config.json").write_text(json.dumps(cfg, indent=4) + "\n")
        if not a.keep_work:
            shutil.rmtree(fp32)


# --------------------------------------------------------------------------
# 3. checks
# --------------------------------------------------------------------------
def describe(out: Path) -> None:
    import onnx
    from collections import Counter

    cfg = json.loads((out / "genai_config.json").read_text())
    dec = out / cfg["model"]["decoder"]["filename"]
    m = onnx.load(str(dec), load_external_data=False)
    ops = Counter(n.op_type for n in m.graph.node)
    ext = sum(1 for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    locs = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    acc = {a.i for n in m.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    log(f"{out.name}: inputs={[i.name for i in m.graph.input]}")
    log(f"{out.name}: outputs={[o.name for o in m.graph.output]}")
    log(f"{out.name}: ops={dict(sorted(ops.items()))}")
    log(f"{out.name}: {ext}/{len(m.graph.initializer)} initializers external in {sorted(locs)}; "
        f"MatMulNBits accuracy_level={sorted(acc)}")
    total = 0
    for p in sorted(out.iterdir()):
        total += p.stat().st_size
        log(f"  {p.name:70s} {p.stat().st_size:>12,d}")
    log(f"  {'total':70s} {total:>12,d}")
    assert "position_ids" not in [i.name for i in m.graph.input]
    assert ext == len(m.graph.initializer) and locs == {dec.name + ".data"}


def smoke(out: Path, n: int = 8) -> None:
    """Load the folder with onnxruntime-genai and generate greedily."""
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = tok.encode("<|user|>\nHello, who are you?<|end|>\n<|assistant|>\n", add_special_tokens=True).ids
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + n)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    new = []
    while not gen.is_done():
        gen.generate_next_token()
        new.append(int(gen.get_next_tokens()[0]))
    log(f"{out.name}: genai greedy {len(ids)} prompt tokens -> {new} {tok.decode(new)!r}")
    assert new, "no tokens generated"


def compare_models(a_dir: Path, b_dir: Path) -> None:
    """Same graph (op sequence, attributes) and bit-identical initializers."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    def load(d):
        cfg = json.loads((d / "genai_config.json").read_text())
        return onnx.load(str(d / cfg["model"]["decoder"]["filename"]))

    ma, mb = load(a_dir), load(b_dir)
    sig = lambda m: [(n.op_type, list(n.input), list(n.output), sorted(onnx.helper.printable_attribute(x) for x in n.attribute)) for n in m.graph.node]
    same_graph = sig(ma) == sig(mb) and sorted((o.domain, o.version) for o in ma.opset_import) == sorted(
        (o.domain, o.version) for o in mb.opset_import) and ma.ir_version == mb.ir_version
    ia = {t.name: numpy_helper.to_array(t) for t in ma.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in mb.graph.initializer}
    same_init = ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)
    log(f"compare {a_dir} vs {b_dir}: same graph={same_graph}, identical initializers={same_init}")
    if not (same_graph and same_init):
        if not same_graph:
            for x, y in zip(sig(ma), sig(mb)):
                if x != y:
                    log(f"  first graph difference: {x} vs {y}")
                    break
        sys.exit(1)


def same_weights(a_dir: Path, b_dir: Path) -> None:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    def inits(d):
        cfg = json.loads((d / "genai_config.json").read_text())
        m = onnx.load(str(d / cfg["model"]["decoder"]["filename"]))
        return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}

    ia, ib = inits(a_dir), inits(b_dir)
    ok = ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)
    log(f"{a_dir.name} and {b_dir.name} have identical weights: {ok}")
    if not ok:
        sys.exit(1)


# --------------------------------------------------------------------------
def build(a) -> None:
    tokenizer_dir = Path(a.tokenizer_dir)
    for name in TOKENIZER_FILES:
        if not (tokenizer_dir / name).exists():
            sys.exit(f"missing {tokenizer_dir / name} (run tests/gen/make_tokenizer.py first)")
    out = Path(a.out)
    t0 = time.time()
    work_parent = out.parent if a.method == "fp32-quantize" else None  # big temp files: stay on the same disk
    if work_parent:
        work_parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-work-", dir=work_parent))
    try:
        hf_dir = Path(a.hf_dir) if a.hf_dir else work / "hf"
        if not (hf_dir / "config.json").exists():
            make_hf(a, hf_dir, tokenizer_dir)
        export(a, hf_dir, out, work)
        finish_folder(out, tokenizer_dir)
    finally:
        if not a.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept work dir {work}")
    log(f"built {out} in {time.time() - t0:.0f} s")
    describe(out)
    if not a.no_smoke:
        smoke(out)
    if a.compare_with:
        compare_models(out, Path(a.compare_with))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="named shape/options (flags given explicitly override it)")
    p.add_argument("--fixtures", action="store_true", help="build the committed fixtures: " + ", ".join(FIXTURE_PRESETS))
    p.add_argument("--rename", nargs=2, metavar=("DIR", "NEW_NAME"), help="rename the decoder of an existing folder and exit")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--init-scale", type=float, help="Phi3Config.initializer_range (std of normal init)")
    p.add_argument("--lm-head-scale", type=float, help="multiply lm_head.weight after init")
    p.add_argument("--embed-scale", type=float, default=1.0, help="multiply embed_tokens.weight after init")
    p.add_argument("--end-token-scale", type=float, help="multiply lm_head's <|end|> (32007) row after init")
    p.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits accuracy_level: 4 = int8 activations (published default), 1 = fp32")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output folder")
    p.add_argument("--decoder-filename", help="name of the decoder .onnx (its data file is NAME.data)")
    p.add_argument("--method", choices=["builder", "fp32-quantize"],
                   help="builder: the builder's own int4 export (small models); fp32-quantize: fp32 export + "
                        "on-disk MatMulNBitsQuantizer (big models)")
    p.add_argument("--tokenizer-dir", default=str(TOKENIZER_DIR))
    p.add_argument("--hf-dir", help="reuse/keep the HF folder here instead of a temporary one")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    p.add_argument("--compare-with", help="after building, check the result is identical to this folder")
    p.add_argument("--no-smoke", action="store_true", help="skip the onnxruntime-genai load/generate check")
    a = p.parse_args()

    if a.rename:
        rename_decoder(Path(a.rename[0]), a.rename[1])
        describe(Path(a.rename[0]))
        smoke(Path(a.rename[0]))
        return
    if a.fixtures:
        with tempfile.TemporaryDirectory(prefix="phi3-fixtures-") as tmp:
            for name in FIXTURE_PRESETS:
                sub = [sys.executable, __file__, "--preset", name, "--tokenizer-dir", a.tokenizer_dir]
                if name.startswith("tiny-gqa"):
                    # one HF model for both gqa folders: same weights, two accuracy levels
                    sub += ["--hf-dir", str(Path(tmp) / "hf-tiny-gqa")]
                subprocess.run(sub, check=True)
        same_weights(PRESETS["tiny-gqa"]["out"], PRESETS["tiny-gqa-acc1"]["out"])
        return

    defaults = dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=256, init_scale=0.2,
                    lm_head_scale=50.0, end_token_scale=1.0, seed=1, accuracy_level=4, decoder_filename="model.onnx",
                    method="builder", out=None)
    if a.preset:
        defaults.update(PRESETS[a.preset])
    for k, v in defaults.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.out is None:
        p.error("--out or --preset is required")
    build(a)


if __name__ == "__main__":
    main()
