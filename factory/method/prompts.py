"""Concept prompts and the token positions whose attention the method reads.

`concept_token_indices(tokenizer, "a photo of a human with arms and legs", ["human", "arms", "legs"])`
returns the positions of every token of every concept word in the tokenized prompt (a word that the
tokenizer splits into several pieces contributes all its pieces). Their attention maps are summed, as the
paper does for "human", "arms", "legs".
"""

from __future__ import annotations

import re

import torch

from factory.errors import UserError


class ConceptTokenError(UserError, ValueError):
    """A concept word cannot be located in the prompt's tokens."""


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special, truncation=False)["input_ids"]


def concept_token_indices(
    tokenizer, prompt: str, words: list[str] | str, width: int | None = None, special: bool = True
) -> list[int]:
    """Positions (in the padded, special-token-prefixed sequence; `special=False`: a sequence tokenized
    without the tokenizer's special tokens, as a processor tokenizes a chat-templated prompt that writes its
    own) of the tokens of each concept word; a position at or beyond `width` (default: the tokenizer's
    `model_max_length`) is an error."""
    words = [words] if isinstance(words, str) else list(words)
    if not words:
        raise ConceptTokenError("no concept words given")
    ids = _encode(tokenizer, prompt, special=special)
    max_len = tokenizer.model_max_length if width is None else width

    def starts_of(piece: list[int]) -> list[int]:
        return [i for i in range(len(ids) - len(piece) + 1) if ids[i : i + len(piece)] == piece]

    found: list[int] = []
    for word in words:
        if not re.search(rf"(?<![\w]){re.escape(word.lower())}(?![\w])", prompt.lower()):
            raise ConceptTokenError(f"concept word {word!r} does not occur in the prompt {prompt!r}")
        piece = _encode(tokenizer, word, special=False)
        if not piece:
            raise ConceptTokenError(f"concept word {word!r} produces no tokens with this tokenizer")
        starts = starts_of(piece)
        if not starts:  # a byte-level BPE (Qwen's, Mistral's) spells a word after a space otherwise
            spaced = _encode(tokenizer, " " + word, special=False)
            starts = starts_of(spaced)
            piece = spaced if starts else piece
        if not starts:
            raise ConceptTokenError(
                f"concept word {word!r} occurs in {prompt!r} but not as its own tokens {piece} in "
                f"{ids}; choose the word as the tokenizer splits it (e.g. without punctuation attached)"
            )
        pos = list(range(starts[0], starts[0] + len(piece)))
        if pos[-1] >= max_len:
            window = f"the tokenizer's {max_len}" if width is None else f"the model's {max_len} text"
            raise ConceptTokenError(
                f"concept word {word!r} is at token {pos[-1]}, beyond {window} positions; shorten the prompt"
            )
        found.extend(pos)
    return sorted(set(found))


def token_weight_matrix(
    tokenizer, prompts: list[str], words: list[list[str]], width: int | None = None, special: bool = True
) -> torch.Tensor:
    """(batch, width) float weights, 1 at each prompt's concept tokens, else 0; `width` defaults to the
    tokenizer's `model_max_length` (a concept beyond it is an error, `concept_token_indices`)."""
    w = torch.zeros(len(prompts), tokenizer.model_max_length if width is None else width)
    for row, (prompt, ws) in enumerate(zip(prompts, words, strict=True)):
        w[row, concept_token_indices(tokenizer, prompt, ws, width, special)] = 1.0
    return w


def chat_templated(tokenizer, prompt: str, enable_thinking: bool) -> str:
    """`prompt` as one user turn in a chat model's template with the generation prompt (what the Qwen3-encoded
    pipelines, Z-Image and FLUX.2 klein, hand their encoder), thinking on or off as the pipeline sets it."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )


def padded_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    """(B, model_max_length) token ids, padded and truncated to the tokenizer's length, as the pipelines
    tokenize prompts."""
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Text embeddings exactly as StableDiffusionPipeline computes them (last hidden state, padded)."""
    ids = padded_ids(tokenizer, prompts)
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0]
