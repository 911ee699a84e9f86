"""The `concept_output` readout: ConceptAttention's output-space concept maps on FLUX's double-stream blocks.

ConceptAttention (Helbling et al., ICML 2025; helblazer811/ConceptAttention, `concept_attention/flux/`)
adds one token stream per concept word: the concept ("bird", every token of every one of its words) and a
few background words ("background", ...). The words are embedded by T5 each on its own, passed through the
transformer's `context_embedder`, and then go through the double-stream blocks with the *text* stream's
weights: its modulation (on a time embedding whose pooled CLIP vector is zero), norms, q/k/v projections and
q/k RMS norms, output projection and MLP. In each block the word queries attend one way to [words; image]
keys (position ids zero, so no rotary turn for the words; the image keys turned as the block turns them);
the image and text tokens never attend to the words, so the image the model makes is unchanged: the block's
own attention runs `FluxAttnProcessor`'s steps (`attention.flux_attention`), whose image keys, values and
attention output (before the output projection) the words then use: nothing is projected twice.

On a recorded block and step the map is ``softmax_words(o_word . o_image)`` at the concept, where ``o`` are
the attention outputs before the output projection with the heads flattened; a word of several tokens
scores with the mean of its tokens' dot products (ports that took only the first token miss the rest,
mflux#213). The maps are averaged over the recorded blocks (`Readout.layers`, indices of the double-stream
blocks; default the last four, 15-18 of FLUX.1's 19, the paper's) and the sampler's recorded steps.

The word streams run through every double-stream block up to the last recorded one and only on recorded
steps; blocks after it, the single-stream blocks and unrecorded steps run diffusers' processors untouched.
Departure from the paper: the map is upsampled nearest from FLUX's 2 x 2 patch tokens to the latent grid and
thresholded by the method's rule (GMM), where ConceptAttention thresholds at the map's mean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from factory.method.attention import AttentionAccumulator, flux_attention
from factory.method.readouts import CONCEPT_OUTPUT_LAST_BLOCKS, Readout


@dataclass
class ConceptStreams:
    """One batch's word streams: T5 embeddings of each word's tokens, and which word each token belongs to.

    tokens: (B, N, D) the T5 hidden states of each word's tokens, the word encoded alone (padded to N).
    groups: (B, N, W) the mean over a word's tokens: 1/len(word) at its tokens, 0 at padding. Word 0 is the
        concept (all its words' tokens), words 1.. the background words.
    """

    tokens: torch.Tensor
    groups: torch.Tensor

    @property
    def key_mask(self) -> torch.Tensor:
        """(B, N) True at the tokens of a word, False at padding (padding is no key)."""
        return self.groups.sum(-1) > 0


def recorded_blocks(transformer, readout: Readout) -> list[int]:
    """The double-stream blocks `readout` records on: its layers, or the last four."""
    n = len(transformer.transformer_blocks)
    layers = readout.layers
    if layers is None:
        layers = tuple(range(max(0, n - CONCEPT_OUTPUT_LAST_BLOCKS), n))
    if max(layers) >= n:
        raise ValueError(
            f"readout layers {list(layers)} are beyond this transformer's {n} double-stream blocks "
            f"(indices 0-{n - 1}; the concept_output readout reads double-stream blocks only)"
        )
    return sorted(set(layers))


class _WordStreams:
    """The state shared by the blocks in one transformer call: the word streams and their time embedding."""

    def __init__(self, streams: ConceptStreams, acc: AttentionAccumulator, rows: slice):
        self.streams = streams
        self.acc = acc
        self.rows = rows
        self.hidden: torch.Tensor | None = None  # (b, N, inner) the words' residual stream
        self.temb: torch.Tensor | None = None

    def key_mask(self, b: int, n_img: int) -> torch.Tensor:
        """(b, 1, 1, N + n_img): the words' tokens and every image token are keys, padding is not."""
        image = torch.ones(b, n_img, dtype=torch.bool, device=self.streams.tokens.device)
        return torch.cat([self.streams.key_mask, image], 1)[:, None, None, :]


class ConceptOutputProcessor:
    """On a double-stream block: diffusers' `FluxAttnProcessor`'s steps for the image and text
    (`attention.flux_attention`, the same output bits), then (on recorded steps) one step of the word
    streams through this block from the image keys, values and attention output the block has just formed,
    recording the map if `record`."""

    def __init__(self, block, state: _WordStreams, record: bool):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.block = block
        self.state = state
        self.record = record
        self.fast = FluxAttnProcessor()

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        s = self.state
        if not s.acc.enabled:
            return self.fast(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        n_text = encoder_hidden_states.shape[1]
        image = {}

        def keep(query, key, value, out):  # the image's part, rows recorded
            image.update(key=key[s.rows, n_text:], value=value[s.rows, n_text:], out=out[s.rows, n_text:])

        result = flux_attention(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, self.fast, keep
        )
        self._advance_words(attn, **image)
        return result

    def _advance_words(self, attn, key, value, out) -> None:
        s, block = self.state, self.block

        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))  # (b, tokens, heads, head_dim)

        # 1. The words through the text stream's modulation, projections and RMS norms (position ids zero:
        # no rotary turn).
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(s.hidden, emb=s.temb)
        wq = attn.norm_added_q(heads(attn.add_q_proj(normed)))
        wk = attn.norm_added_k(heads(attn.add_k_proj(normed)))
        wv = heads(attn.add_v_proj(normed))
        # 2. Word queries over [words; image] keys (the block's own image keys, turned, and values), padding
        # words masked out.
        keys = torch.cat([wk, key], 1).transpose(1, 2)
        values = torch.cat([wv, value], 1).transpose(1, 2)
        b, n_img = out.shape[:2]
        words_out = F.scaled_dot_product_attention(
            wq.transpose(1, 2), keys, values, attn_mask=s.key_mask(b, n_img)
        )
        words_out = words_out.transpose(1, 2).flatten(2, 3)  # (b, N, inner): before the output projection
        # 3. The map: word outputs . image outputs, a word's tokens averaged, softmax over the words.
        if self.record:
            scores = torch.einsum("bnd,bpd->bnp", words_out.float(), out.float())
            per_word = torch.einsum("bnp,bnw->bwp", scores, s.streams.groups.float())
            s.acc.add_map(per_word.softmax(1)[:, 0])
        # 4. The words' residual update, as the text stream's.
        hidden = s.hidden + gate_msa.unsqueeze(1) * attn.to_add_out(words_out.to(s.hidden.dtype))
        normed = block.norm2_context(hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        s.hidden = hidden + gate_mlp.unsqueeze(1) * block.ff_context(normed)


@contextlib.contextmanager
def capture_concept_output(
    transformer, readout: Readout, size: int, record_rows: slice | None = None
) -> Iterator[AttentionAccumulator]:
    """Record the `concept_output` map of `readout.streams` on `readout`'s double-stream blocks of a FLUX
    transformer while it runs; `acc.enabled` chooses the recorded steps, as for the other capture."""
    streams: ConceptStreams = readout.streams
    if streams is None:
        raise ValueError("the concept_output readout needs the batch's word streams (Readout.streams)")
    blocks = recorded_blocks(transformer, readout)
    rows = record_rows if record_rows is not None else slice(None)
    acc = AttentionAccumulator(streams.groups[:, :, 0], size)  # one map per recorded row
    state = _WordStreams(streams, acc, rows)
    original = dict(transformer.attn_processors)
    processors = {
        f"transformer_blocks.{i}.attn.processor": ConceptOutputProcessor(
            transformer.transformer_blocks[i], state, record=i in blocks
        )
        for i in range(blocks[-1] + 1)
    }

    def start_words(module, args, kwargs):
        """Before each transformer call: the words' stream from their T5 embeddings, and their time
        embedding (the pooled CLIP vector zero, as ConceptAttention's)."""
        if not acc.enabled:
            return
        dtype = kwargs["hidden_states"].dtype
        timestep = kwargs["timestep"][rows].to(dtype) * 1000
        pooled = torch.zeros_like(kwargs["pooled_projections"][rows])
        guidance = kwargs.get("guidance")
        if guidance is None:
            state.temb = module.time_text_embed(timestep, pooled)
        else:
            state.temb = module.time_text_embed(timestep, guidance[rows].to(dtype) * 1000, pooled)
        state.hidden = module.context_embedder(streams.tokens.to(dtype))

    hook = transformer.register_forward_pre_hook(start_words, with_kwargs=True)
    transformer.set_attn_processor({n: processors.get(n, p) for n, p in original.items()})
    try:
        yield acc
    finally:
        hook.remove()
        transformer.set_attn_processor(original)
        state.hidden = state.temb = None
