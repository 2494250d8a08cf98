"""A small CLIP BPE vocabulary for the tiny models, written as `vocab.json` + `merges.txt`.

The real repositories ship slow-tokenizer files (no `tokenizer.json`), so the tiny ones do
too: `CLIPTokenizer.from_pretrained` then takes the same path for both. The vocabulary
holds every byte (alone and word-final, `</w>`), a few merged words such as the "ghibli
style" trigger, and the two special tokens; about 530 entries instead of 49,408.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

_WORDS = ("ghibli", "style", "photo", "of", "a", "high", "quality", "detailed")
START, END = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte -> printable character table, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


@cache
def _vocabulary() -> tuple[dict[str, int], tuple[str, ...]]:
    symbols = _byte_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    merges = []
    for word in _WORDS:
        merged = word[0] + ("</w>" if len(word) == 1 else "")
        for position, char in enumerate(word[1:], start=1):
            right = char + ("</w>" if position == len(word) - 1 else "")
            merges.append(f"{merged} {right}")
            merged += right
            tokens.append(merged)
    tokens += [START, END]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return vocab, tuple(dict.fromkeys(merges))


def vocab_size() -> int:
    return len(_vocabulary()[0])


BOS = vocab_size() - 2
EOS = vocab_size() - 1


def write_clip_tokenizer(folder: Path, *, pad_token: str) -> None:
    """Write the four files of a CLIP slow tokenizer (model_max_length 77) into `folder`.

    `pad_token` follows the real model: "<|endoftext|>" for SD 1.x, "!" for SD 2 and SDXL.
    """
    vocab, merges = _vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": pad_token}
    config = {
        **special,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
