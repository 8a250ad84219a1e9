"""CLIP tokenization: loading a checkpoint's tokenizer, adding placeholder tokens, and building small CLIP-format
BPE vocabularies (for tiny test models and the toy world).

The tokenizer itself is transformers' `CLIPTokenizer`, the same class diffusers uses, so token ids agree exactly with
the PyTorch pipelines; it runs without torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

START = "<|startoftext|>"
END = "<|endoftext|>"


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """The 256 printable stand-ins byte-level BPE (GPT-2/CLIP) uses for bytes, in byte order."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


def write_clip_tokenizer(folder: str | Path, words: Iterable[str], *, pad_token: str = END) -> int:
    """Write a CLIP-format tokenizer (vocab.json, merges.txt, configs) whose BPE merges spell each of `words` as one
    token. Returns the vocabulary size. The special tokens get the two highest ids, as in real CLIP, so rules that
    find EOS as the largest id behave as they do on real checkpoints.
    """
    alphabet = byte_alphabet()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen = set(merges)
    for word in sorted(set(w.lower() for w in words)):
        encoded = "".join(alphabet[b] for b in word.encode("utf-8"))
        pieces = list(encoded[:-1]) + [encoded[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            pair = (left, right)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
                vocab.setdefault(left + right, len(vocab))
            left = left + right
    vocab[START] = len(vocab)
    vocab[END] = len(vocab)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def load_tokenizer(folder: str | Path):
    """The checkpoint's CLIP tokenizer (transformers' CLIPTokenizer; imports no torch)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))
