"""The `concept_output` readout: ConceptAttention's output-space concept maps on the double-stream blocks of
FLUX.1 and FLUX.2.

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

FLUX.2 (ConceptAttention's `concept_attention/flux2/`): the same streams through `Flux2TransformerBlock`s.
The text stream's modulation is one for all blocks (`double_stream_modulation_txt`; FLUX.2 has no pooled
vector, so it is the text's own), the norms plain LayerNorms, the MLP SwiGLU. Each word is encoded alone
in the encoder's chat template (`Flux2Family.word_states`) and its tokens keep their positions there: their
queries and keys turn as text tokens at those positions, (0, 0, 0, i). ConceptAttention keeps one state per
word, at index 510 of the padded template, instead of the word's own tokens. Default blocks: the last three
(5-7 of FLUX.2-dev's 8, its default).

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

from factory.method.attention import AttentionAccumulator, denoiser_layout, flux2_attention, flux_attention
from factory.method.readouts import CONCEPT_OUTPUT_LAST_BLOCKS, Readout


@dataclass
class ConceptStreams:
    """One batch's word streams: text-encoder embeddings of each word's tokens, and which word each token
    belongs to.

    tokens: (B, N, D) the text encoder's states of each word's tokens, the word encoded alone (padded to N).
    groups: (B, N, W) the mean over a word's tokens: 1/len(word) at its tokens, 0 at padding. Word 0 is the
        concept (all its words' tokens), words 1.. the background words.
    positions: (B, N) FLUX.2's text position of each token (its index in the word's own templated
        encoding), given the rotary turn a text token at that position gets; None for FLUX.1, whose text
        position ids are all zero.
    """

    tokens: torch.Tensor
    groups: torch.Tensor
    positions: torch.Tensor | None = None

    @property
    def key_mask(self) -> torch.Tensor:
        """(B, N) True at the tokens of a word, False at padding (padding is no key)."""
        return self.groups.sum(-1) > 0


def recorded_blocks(transformer, readout: Readout) -> list[int]:
    """The double-stream blocks `readout` records on: its layers, or the layout's last few."""
    n = len(transformer.transformer_blocks)
    layers = readout.layers
    if layers is None:
        last = CONCEPT_OUTPUT_LAST_BLOCKS[denoiser_layout(transformer)]
        layers = tuple(range(max(0, n - last), n))
    if max(layers) >= n:
        raise ValueError(
            f"readout layers {list(layers)} are beyond this transformer's {n} double-stream blocks "
            f"(indices 0-{n - 1}; the concept_output readout reads double-stream blocks only)"
        )
    return sorted(set(layers))


class _WordStreams:
    """The state shared by the blocks in one transformer call: the word streams and their conditioning."""

    def __init__(self, streams: ConceptStreams, acc: AttentionAccumulator, rows: slice):
        self.streams = streams
        self.acc = acc
        self.rows = rows
        self.hidden: torch.Tensor | None = None  # (b, N, inner) the words' residual stream
        self.temb: torch.Tensor | None = None  # FLUX.1: the time embedding each block modulates with
        self.mod: torch.Tensor | None = None  # FLUX.2: the text stream's modulation, shared by the blocks
        self.rotary: list | None = None  # FLUX.2: each row's (cos, sin) of its word tokens' positions

    def key_mask(self, b: int, n_img: int) -> torch.Tensor:
        """(b, 1, 1, N + n_img): the words' tokens and every image token are keys, padding is not."""
        image = torch.ones(b, n_img, dtype=torch.bool, device=self.streams.tokens.device)
        return torch.cat([self.streams.key_mask, image], 1)[:, None, None, :]

    def clear(self) -> None:
        self.hidden = self.temb = self.mod = self.rotary = None


class ConceptOutputProcessor:
    """On a double-stream block of FLUX.1 (`FluxAttention`) or FLUX.2 (`Flux2Attention`): diffusers'
    processor's steps for the image and text (`attention.flux_attention` / `flux2_attention`, the same
    output bits), then (on recorded steps) one step of the word streams through this block from the image
    keys, values and attention output the block has just formed, recording the map if `record`."""

    def __init__(self, block, state: _WordStreams, record: bool, flux2: bool):
        self.block = block
        self.state = state
        self.record = record
        self.flux2 = flux2
        if flux2:
            from diffusers.models.transformers.transformer_flux2 import (
                Flux2AttnProcessor,
                Flux2ParallelSelfAttnProcessor,
            )

            self.fast = (Flux2AttnProcessor(), Flux2ParallelSelfAttnProcessor())
        else:
            from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

            self.fast = FluxAttnProcessor()

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        s = self.state
        plain = self.fast[0] if self.flux2 else self.fast
        if not s.acc.enabled:
            return plain(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        n_text = encoder_hidden_states.shape[1]
        image = {}

        def keep(query, key, value, out):  # the image's part, rows recorded
            image.update(key=key[s.rows, n_text:], value=value[s.rows, n_text:], out=out[s.rows, n_text:])

        run = flux2_attention if self.flux2 else flux_attention
        result = run(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, self.fast, keep
        )
        self._advance_words(attn, **image)
        return result

    def _modulated(self):
        """The words normed and modulated as the block's text stream, and the gates and MLP modulation,
        each (b, 1, dim)."""
        s, block = self.state, self.block
        if self.flux2:  # FLUX.2: one modulation of the text stream for every block, plain LayerNorms
            from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

            (shift, scale, gate), (shift_mlp, scale_mlp, gate_mlp) = Flux2Modulation.split(s.mod, 2)
            return block.norm1_context(s.hidden) * (1 + scale) + shift, gate, shift_mlp, scale_mlp, gate_mlp
        normed, gate, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(s.hidden, emb=s.temb)
        return normed, gate[:, None], shift_mlp[:, None], scale_mlp[:, None], gate_mlp[:, None]

    def _turned(self, x: torch.Tensor) -> torch.Tensor:
        """FLUX.2: the words' queries or keys turned by their rows' text positions; FLUX.1: as they are."""
        if not self.flux2:
            return x
        from diffusers.models.embeddings import apply_rotary_emb

        rows = [
            apply_rotary_emb(x[r : r + 1], rot, sequence_dim=1) for r, rot in enumerate(self.state.rotary)
        ]
        return torch.cat(rows)

    def _advance_words(self, attn, key, value, out) -> None:
        s, block = self.state, self.block

        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))  # (b, tokens, heads, head_dim)

        # 1. The words through the text stream's modulation, projections and RMS norms, and (FLUX.2) the
        # rotary turn of their text positions.
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._modulated()
        wq = self._turned(attn.norm_added_q(heads(attn.add_q_proj(normed))))
        wk = self._turned(attn.norm_added_k(heads(attn.add_k_proj(normed))))
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
        hidden = s.hidden + gate_msa * attn.to_add_out(words_out.to(s.hidden.dtype))
        normed = block.norm2_context(hidden) * (1 + scale_mlp) + shift_mlp
        s.hidden = hidden + gate_mlp * block.ff_context(normed)


@contextlib.contextmanager
def capture_concept_output(
    transformer, readout: Readout, size: int, record_rows: slice | None = None
) -> Iterator[AttentionAccumulator]:
    """Record the `concept_output` map of `readout.streams` on `readout`'s double-stream blocks of a FLUX.1
    or FLUX.2 transformer while it runs; `acc.enabled` chooses the recorded steps, as for the other
    capture."""
    streams: ConceptStreams = readout.streams
    if streams is None:
        raise ValueError("the concept_output readout needs the batch's word streams (Readout.streams)")
    flux2 = denoiser_layout(transformer) == "flux2"
    if flux2 and streams.positions is None:
        raise ValueError("FLUX.2's word streams need their text positions (ConceptStreams.positions)")
    blocks = recorded_blocks(transformer, readout)
    rows = record_rows if record_rows is not None else slice(None)
    acc = AttentionAccumulator(streams.groups[:, :, 0], size)  # one map per recorded row
    state = _WordStreams(streams, acc, rows)
    original = dict(transformer.attn_processors)
    processors = {
        f"transformer_blocks.{i}.attn.processor": ConceptOutputProcessor(
            transformer.transformer_blocks[i], state, record=i in blocks, flux2=flux2
        )
        for i in range(blocks[-1] + 1)
    }

    def start_words(module, args, kwargs):
        """Before each transformer call: the words' stream from their text embeddings, and their time
        conditioning: FLUX.1's time embedding with the pooled CLIP vector zero, as ConceptAttention's;
        FLUX.2's text-stream modulation (it has no pooled vector) and the words' rotary turns."""
        if not acc.enabled:
            return
        dtype = kwargs["hidden_states"].dtype
        timestep = kwargs["timestep"][rows].to(dtype) * 1000
        guidance = kwargs.get("guidance")
        guidance = guidance[rows].to(dtype) * 1000 if guidance is not None else None
        if flux2:
            state.mod = module.double_stream_modulation_txt(module.time_guidance_embed(timestep, guidance))
            ids = F.pad(streams.positions[:, :, None], (3, 0))  # (0, 0, 0, position), as the text's ids
            state.rotary = [module.pos_embed(row) for row in ids]
        else:
            pooled = torch.zeros_like(kwargs["pooled_projections"][rows])
            if guidance is None:
                state.temb = module.time_text_embed(timestep, pooled)
            else:
                state.temb = module.time_text_embed(timestep, guidance, pooled)
        state.hidden = module.context_embedder(streams.tokens.to(dtype))

    hook = transformer.register_forward_pre_hook(start_words, with_kwargs=True)
    transformer.set_attn_processor({n: processors.get(n, p) for n, p in original.items()})
    try:
        yield acc
    finally:
        hook.remove()
        transformer.set_attn_processor(original)
        state.clear()
