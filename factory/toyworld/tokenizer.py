"""Tokenizers for the toyworld caption grammar: a CLIP-format BPE vocabulary (the SD model's and the DiT's
CLIP) and a T5-format one (the DiT's T5).

The files written here (vocab.json + merges.txt) have exactly the layout of OpenAI CLIP's tokenizer:
256 byte symbols, the same 256 with the end-of-word marker ``</w>``, then one entry per merge, then
``<|startoftext|>`` and ``<|endoftext|>``. `transformers.CLIPTokenizer.from_pretrained(dir)` loads them as
it loads Stable Diffusion's tokenizer. The merges are learned by plain BPE on the grammar's words until
every word is a single token, so "a photo of a star" tokenizes like CLIP does ("star" at index 5). Any
other English word still tokenizes, as a sequence of character-level pieces.

The T5 tokenizer (`write_t5_tokenizer`) is what T5's SentencePiece tokenizer is: a Unigram model over
"\u2581word" pieces with T5's special tokens (<pad> 0, </s> 1, <unk> 2) and "</s>" appended, saved as a
`tokenizer.json` that `transformers.T5TokenizerFast.from_pretrained(dir)` loads. Each grammar word is one
piece; a word outside the grammar is <unk>, so a concept T5 cannot spell is refused as in a real FLUX.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Standard BPE on a word list, merging until every word is one symbol. Applying the merges by rank
    (as CLIP's tokenizer does) reproduces the training segmentation, so every word stays whole."""
    seqs = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for seq in seqs.values():
            for a, b in zip(seq, seq[1:], strict=False):
                pairs[(a, b)] += 1
        if not pairs:
            return merges
        best = max(pairs, key=lambda p: (pairs[p], p))  # deterministic tie-break
        merges.append(best)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out


def write_clip_tokenizer(out_dir: str | Path, words: list[str], model_max_length: int) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for a CLIPTokenizer over `words`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(sorted(set(words)))
    byte_syms = list(bytes_to_unicode().values())
    vocab_list = byte_syms + [s + "</w>" for s in byte_syms] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if len(vocab) != len(vocab_list):
        raise RuntimeError("duplicate tokens in the toyworld vocabulary")
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2)
    )
    return out


def write_t5_tokenizer(out_dir: str | Path, words: list[str], model_max_length: int) -> Path:
    """Write a T5 tokenizer (tokenizer.json + its config) over `words`; see the module docstring."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        ("\u2581" + w, -1.0) for w in sorted(set(words))
    ]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    out = Path(out_dir)
    T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=model_max_length,
    ).save_pretrained(out)
    return out
