"""Offline tokenizers for the tiny FLUX text encoders.

Both are built from `vocab.WORDS` with no download, deterministically, and saved in the
formats `transformers.CLIPTokenizer` and `T5TokenizerFast` load from a folder, exactly as
FLUX.1-dev's `tokenizer/` and `tokenizer_2/` folders are loaded.

- CLIP (`tokenizer/`): byte-level BPE in OpenAI CLIP's layout (`vocab.json`, `merges.txt`):
  the 256 byte symbols, the same with `</w>`, merges, then `<|startoftext|>` and
  `<|endoftext|>` last, because the CLIP text encoder pools at `argmax(input_ids)`, which
  must be the end-of-text token.
- T5 (`tokenizer_2/`): a Unigram model (`tokenizer.json`) with `<pad>`=0, `</s>`=1,
  `<unk>`=2 like T5's, every printable ASCII character as a piece, and each word as a
  whole-word piece that outscores its spelling.
"""

from __future__ import annotations

import json
import os
import re
import string

from .vocab import WORDS, training_corpus

CLIP_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def learn_bpe_merges(words: dict[str, int], byte_encoder: dict[int, str], num_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE merges in CLIP's style (`</w>` on each word's last symbol).

    Written out instead of using `tokenizers`' trainer because that trainer breaks ties
    between equally frequent pairs in hash order, which differs between processes: the
    same corpus then gives different token ids. Here ties go to the lexicographically
    smallest pair, so the vocabulary is the same on every run.
    """
    seqs = {}
    for word, freq in words.items():
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        seqs[tuple(symbols)] = seqs.get(tuple(symbols), 0) + freq
    merges = []
    for _ in range(num_merges):
        counts: dict[tuple[str, str], int] = {}
        for seq, freq in seqs.items():
            for pair in zip(seq, seq[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + freq
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        merged = best[0] + best[1]
        new_seqs = {}
        for seq, freq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            new_seqs[tuple(out)] = new_seqs.get(tuple(out), 0) + freq
        seqs = new_seqs
    return merges


def build_clip_tokenizer(folder: str, vocab_size: int = 1536) -> int:
    """Write `vocab.json`, `merges.txt` and configs for `CLIPTokenizer`; return the vocab size."""
    byte_encoder = _bytes_to_unicode()
    byte_symbols = list(byte_encoder.values())
    words: dict[str, int] = {}
    for line in training_corpus():
        for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", line.lower()):
            words[word] = words.get(word, 0) + 1
    merges = learn_bpe_merges(words, byte_encoder, vocab_size - 2 * len(byte_symbols) - 2)

    vocab: dict[str, int] = {}
    for sym in byte_symbols + [s + "</w>" for s in byte_symbols]:
        vocab.setdefault(sym, len(vocab))
    kept = []
    for a, b in merges:
        merged = a + b
        if a in vocab and b in vocab and merged not in vocab:
            vocab[merged] = len(vocab)
            kept.append((a, b))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in kept:
            f.write(f"{a} {b}\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "errors": "replace",
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f, indent=2)
    return len(vocab)


def build_t5_tokenizer(folder: str) -> int:
    """Write a Unigram `tokenizer.json` plus configs for `T5TokenizerFast`; return the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in pieces}
    # Whole words (with and without the word-start marker) beat their spelling (-8 a char).
    # transformers' T5 tokenizer rebuilds its own normalizer (no lower-casing), so the
    # capitalised form of each word is a piece too.
    for w in WORDS:
        for piece in ("\u2581" + w, w, "\u2581" + w.capitalize()):
            if piece not in seen:
                pieces.append((piece, -2.0 - 0.01 * len(pieces) / len(WORDS)))
                seen.add(piece)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "\u2581"
    for ch in alphabet:
        for piece in (ch, "\u2581" + ch):
            if piece not in seen:
                pieces.append((piece, -8.0))
                seen.add(piece)

    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": 512,
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": 0,
        "additional_special_tokens": [],
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({k: config[k] for k in ("eos_token", "unk_token", "pad_token")}, f, indent=2)
    return tok.get_vocab_size()
