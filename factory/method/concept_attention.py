"""The `concept_output` readout: ConceptAttention's output-space concept maps on the blocks of FLUX.1 and
FLUX.2.

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
mflux#213). The maps are averaged over the recorded blocks (`Readout.layers`; default the last four
double-stream blocks, 15-18 of FLUX.1's 19, the paper's) and the sampler's recorded steps.

Single-stream blocks (an extension; ConceptAttention's FLUX code reads double-stream blocks only): the layer
indices go on past the double-stream blocks into the single-stream ones (FLUX.1-dev: 19-56), as the
`image_to_text` readout numbers them. A single-stream block has one set of weights for text and image, and
the words take it, as ConceptAttention's port to a single-stream model (CogVideoX,
`concept_attention/cogvideox/dit_block.py`) does: the block's modulation (on the words' time embedding),
norm, q/k/v (FLUX.2: the fused projection) and MLP input, RMS norms, and the output projection of
[attention; MLP]; word queries again attend to [words; image] keys only. The words run through every block
up to the last recorded one, double-stream blocks included.

FLUX.2 (ConceptAttention's `concept_attention/flux2/`): the same streams through `Flux2TransformerBlock`s.
The text stream's modulation is one for all blocks (`double_stream_modulation_txt`; FLUX.2 has no pooled
vector, so it is the text's own; the single-stream blocks' is `single_stream_modulation`), the norms plain
LayerNorms, the MLP SwiGLU. Each word is encoded alone in the encoder's chat template
(`Flux2Family.word_states`) and its tokens keep their positions there: their queries and keys turn as text
tokens at those positions, (0, 0, 0, i). ConceptAttention keeps one state per word, at index 510 of the
padded template, instead of the word's own tokens. Default blocks: the last three double-stream blocks (5-7
of FLUX.2-dev's 8, its default).

Blocks after the last recorded one and unrecorded steps run diffusers' processors untouched.
Departure from the paper: the map is upsampled nearest from FLUX's 2 x 2 patch tokens to the latent grid and
thresholded by the method's rule (GMM), where ConceptAttention thresholds at the map's mean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from factory.method.attention import (
    AttentionAccumulator,
    attention_processors,
    denoiser_layout,
    flux2_attention,
    flux_attention,
    set_attention_processors,
    z_image_attention,
    z_image_rotary,
)
from factory.method.readouts import CONCEPT_OUTPUT_LAST_BLOCKS, Readout


@dataclass
class ConceptStreams:
    """One batch's word streams: text-encoder embeddings of each word's tokens, and which word each token
    belongs to.

    tokens: (B, N, D) the text encoder's states of each word's tokens, the word encoded alone (padded to N).
    groups: (B, N, W) the mean over a word's tokens: 1/len(word) at its tokens, 0 at padding. Word 0 is the
        concept (all its words' tokens), words 1.. the background words.
    positions: (B, N) FLUX.2's and Z-Image's text position of each token (its index in the word's own
        templated encoding), given the rotary turn a text token at that position gets; None for FLUX.1,
        whose text position ids are all zero.
    """

    tokens: torch.Tensor
    groups: torch.Tensor
    positions: torch.Tensor | None = None

    @property
    def key_mask(self) -> torch.Tensor:
        """(B, N) True at the tokens of a word, False at padding (padding is no key)."""
        return self.groups.sum(-1) > 0


def block_modules(transformer) -> list[tuple[str, object]]:
    """Every block in the order the readouts number layers (`attention.cross_attention_names`): the
    double-stream blocks, then the single-stream ones, each as (its attention processor's name, block)."""
    double = [
        (f"transformer_blocks.{i}.attn.processor", b) for i, b in enumerate(transformer.transformer_blocks)
    ]
    single = [
        (f"single_transformer_blocks.{i}.attn.processor", b)
        for i, b in enumerate(getattr(transformer, "single_transformer_blocks", []))
    ]
    return double + single


def recorded_blocks(transformer, readout: Readout) -> list[int]:
    """The blocks `readout` records on: its layers (double-stream blocks first, then single-stream ones, as
    the `image_to_text` readout numbers them; Z-Image's main layers), or the default: the layout's last few
    double-stream blocks, every main layer of Z-Image."""
    layers = readout.layers
    if denoiser_layout(transformer) == "z_image":  # its main layers, every one by default
        n = len(transformer.layers)
        if layers is not None and max(layers) >= n:
            raise ValueError(f"readout layers {list(layers)} are beyond this transformer's {n} main layers")
        return sorted(set(layers)) if layers is not None else list(range(n))
    n_double = len(transformer.transformer_blocks)
    n = n_double + len(getattr(transformer, "single_transformer_blocks", []))
    if layers is None:
        last = CONCEPT_OUTPUT_LAST_BLOCKS[denoiser_layout(transformer)]
        layers = tuple(range(max(0, n_double - last), n_double))
    if max(layers) >= n:
        raise ValueError(
            f"readout layers {list(layers)} are beyond this transformer's {n_double} double-stream and "
            f"{n - n_double} single-stream blocks (indices 0-{n - 1}: the double-stream blocks, then the "
            "single-stream ones)"
        )
    return sorted(set(layers))


class _WordStreams:
    """The state shared by the blocks in one transformer call: the word streams and their conditioning."""

    def __init__(self, streams: ConceptStreams, acc: AttentionAccumulator, rows: slice):
        self.streams = streams
        self.acc = acc
        self.rows = rows
        self.hidden: torch.Tensor | None = None  # (b, N, inner) the words' residual stream
        # the words' stream before the first block: the same at every step, so formed once per capture
        self.embedded: torch.Tensor | None = None
        self.n_text: int | None = None  # the text tokens before the image in a single-stream block
        self.temb: torch.Tensor | None = None  # FLUX.1: the time embedding each block modulates with
        self.mod: torch.Tensor | None = None  # FLUX.2: the text stream's modulation, shared by the blocks
        self.mod_single: torch.Tensor | None = None  # FLUX.2: the single-stream blocks' shared modulation
        self.rotary: list | None = None  # FLUX.2: each row's (cos, sin) of its word tokens' positions
        self.adaln: torch.Tensor | None = None  # Z-Image: the time embedding its layers modulate with
        self.freqs: torch.Tensor | None = None  # Z-Image: (b, N, d / 2) the words' rotary turns

    def key_mask(self, b: int, n_img: int) -> torch.Tensor:
        """(b, 1, 1, N + n_img): the words' tokens and every image token are keys, padding is not."""
        image = torch.ones(b, n_img, dtype=torch.bool, device=self.streams.tokens.device)
        return torch.cat([self.streams.key_mask, image], 1)[:, None, None, :]

    def clear(self) -> None:
        self.hidden = self.n_text = self.temb = self.mod = self.mod_single = self.rotary = None
        self.adaln = self.freqs = self.embedded = None


class ConceptOutputProcessor:
    """On a block of FLUX.1 (`FluxAttention`) or FLUX.2 (`Flux2Attention`, `Flux2ParallelSelfAttention`):
    diffusers' processor's steps for the image and text (`attention.flux_attention` / `flux2_attention`,
    the same output bits), then (on recorded steps) one step of the word streams through this block from the
    image keys, values and attention output the block has just formed, recording the map if `record`.

    A double-stream block moves the words with its text stream's weights (ConceptAttention's); a
    single-stream block has one set of weights for every token, which the words take: its modulation (on the
    words' time embedding), norm, fused or separate q/k/v and MLP input, RMS norms and output projection,
    as ConceptAttention's port to a single-stream model (its CogVideoX blocks) takes the shared ones."""

    def __init__(self, block, state: _WordStreams, record: bool, flux2: bool, single: bool = False):
        self.block = block
        self.state = state
        self.record = record
        self.flux2 = flux2
        self.single = single
        if flux2:
            from diffusers.models.transformers.transformer_flux2 import (
                Flux2AttnProcessor,
                Flux2ParallelSelfAttnProcessor,
            )

            self.fast = (Flux2AttnProcessor(), Flux2ParallelSelfAttnProcessor())
        else:
            from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

            self.fast = FluxAttnProcessor()

    def __call__(self, attn, hidden_states, *args):
        s = self.state
        # FLUX.2's single-stream attention calls its processor with (mask, rotary), the others with
        # (encoder states, mask, rotary)
        parallel = self.flux2 and self.single
        encoder_hidden_states, attention_mask, image_rotary_emb = (None, *args) if parallel else args
        if not s.acc.enabled:
            if parallel:
                return self.fast[1](attn, hidden_states, attention_mask, image_rotary_emb)
            plain = self.fast[0] if self.flux2 else self.fast
            return plain(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        n_text = s.n_text if self.single else encoder_hidden_states.shape[1]
        image = {}

        def keep(query, key, value, out):  # the image's part, rows recorded
            image.update(key=key[s.rows, n_text:], value=value[s.rows, n_text:], out=out[s.rows, n_text:])

        run = flux2_attention if self.flux2 else flux_attention
        result = run(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, self.fast, keep
        )
        self._advance_words(attn, **image)
        return result

    def _turned(self, x: torch.Tensor) -> torch.Tensor:
        """FLUX.2: the words' queries or keys turned by their rows' text positions; FLUX.1: as they are."""
        if not self.flux2:
            return x
        from diffusers.models.embeddings import apply_rotary_emb

        rows = [
            apply_rotary_emb(x[r : r + 1], rot, sequence_dim=1) for r, rot in enumerate(self.state.rotary)
        ]
        return torch.cat(rows)

    def _words_in(self, attn):
        """The words' queries, keys (RMS-normed; turned for FLUX.2) and values, (b, N, heads, d), by this
        block's weights for them, and the step that adds the block's update to their residual stream from
        their attention output."""
        s, block = self.state, self.block

        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        if self.single and self.flux2:  # one modulation for every single-stream block; fused projections
            from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

            from factory.method.attention import flux2_parallel_projections

            ((shift, scale, gate),) = Flux2Modulation.split(s.mod_single, 1)
            q, k, v, mlp = flux2_parallel_projections(attn, block.norm(s.hidden) * (1 + scale) + shift)

            def update(words_out):
                both = torch.cat([words_out.to(s.hidden.dtype), attn.mlp_act_fn(mlp)], -1)
                return s.hidden + gate * attn.to_out(both)

        elif self.single:  # FLUX.1: the block's own modulation, on the words' time embedding
            normed, gate = block.norm(s.hidden, emb=s.temb)
            q, k = attn.norm_q(heads(attn.to_q(normed))), attn.norm_k(heads(attn.to_k(normed)))
            v = heads(attn.to_v(normed))

            def update(words_out):
                both = torch.cat([words_out.to(s.hidden.dtype), block.act_mlp(block.proj_mlp(normed))], -1)
                return s.hidden + gate[:, None] * block.proj_out(both)

        else:  # a double-stream block: the text stream's weights
            if self.flux2:  # FLUX.2: one modulation of the text stream for every block, plain LayerNorms
                from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

                (shift, scale, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = Flux2Modulation.split(s.mod, 2)
                normed = block.norm1_context(s.hidden) * (1 + scale) + shift
            else:
                normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(s.hidden, emb=s.temb)
                gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                    x[:, None] for x in (gate_msa, shift_mlp, scale_mlp, gate_mlp)
                )
            q = attn.norm_added_q(heads(attn.add_q_proj(normed)))
            k = attn.norm_added_k(heads(attn.add_k_proj(normed)))
            v = heads(attn.add_v_proj(normed))

            def update(words_out):
                hidden = s.hidden + gate_msa * attn.to_add_out(words_out.to(s.hidden.dtype))
                normed = block.norm2_context(hidden) * (1 + scale_mlp) + shift_mlp
                return hidden + gate_mlp * block.ff_context(normed)

        return self._turned(q), self._turned(k), v, update

    def _advance_words(self, attn, key, value, out) -> None:
        s = self.state
        # 1. The words through this block's weights for them (modulation, projections, RMS norms, FLUX.2's
        # rotary turn of their text positions).
        wq, wk, wv, update = self._words_in(attn)
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
        # 4. The words' residual update by the block.
        s.hidden = update(words_out)


class ZImageConceptOutputProcessor(ConceptOutputProcessor):
    """On a Z-Image main layer (`ZImageTransformerBlock`, single-stream over [image; caption]):
    `ZSingleStreamAttnProcessor`'s steps for the sequence (`attention.z_image_attention`, the same output
    bits), then the words' step through the layer by its one set of weights, as on FLUX's single-stream
    blocks: its time modulation (one for every token), RMS norms, q/k/v, q/k norms, the rotary turn of
    their caption positions, the output projection, the gated FFN."""

    def __init__(self, block, state: _WordStreams, record: bool):
        from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

        self.block, self.state, self.record = block, state, record
        self.fast = ZSingleStreamAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        s = self.state
        if not s.acc.enabled:
            return self.fast(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        n_img = (s.acc.size // 2) ** 2  # the image's 2 x 2 patch tokens come first, then its padding
        image = {}

        def keep(query, key, value, mask, out):
            image.update(key=key[s.rows, :n_img], value=value[s.rows, :n_img], out=out[s.rows, :n_img])

        result = z_image_attention(attn, hidden_states, attention_mask, freqs_cis, self.fast, keep)
        self._advance_words(attn, **image)
        return result

    def _words_in(self, attn):
        s, layer = self.state, self.block
        scale_msa, gate_msa, scale_mlp, gate_mlp = (
            layer.adaLN_modulation(s.adaln).unsqueeze(1).chunk(4, dim=2)
        )
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        normed = layer.attention_norm1(s.hidden) * (1.0 + scale_msa)
        q, k, v = (f(normed).unflatten(-1, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        q, k = z_image_rotary(q, s.freqs), z_image_rotary(k, s.freqs)

        def update(words_out):
            hidden = s.hidden + gate_msa * layer.attention_norm2(attn.to_out[0](words_out.to(s.hidden.dtype)))
            return hidden + gate_mlp * layer.ffn_norm2(
                layer.feed_forward(layer.ffn_norm1(hidden) * (1.0 + scale_mlp))
            )

        return q, k, v, update


def _start_flux_words(module, kwargs, state: _WordStreams) -> None:
    """Before a FLUX transformer call: the words' stream from their text embeddings, and their time
    conditioning: FLUX.1's time embedding with the pooled CLIP vector zero, as ConceptAttention's; FLUX.2's
    text-stream and single-stream modulations (it has no pooled vector) and the words' rotary turns."""
    rows, streams = state.rows, state.streams
    dtype = kwargs["hidden_states"].dtype
    timestep = kwargs["timestep"][rows].to(dtype) * 1000
    guidance = kwargs.get("guidance")
    guidance = guidance[rows].to(dtype) * 1000 if guidance is not None else None
    state.n_text = kwargs["encoder_hidden_states"].shape[1]
    flux2 = denoiser_layout(module) == "flux2"
    if state.embedded is None:  # step-independent: the words' embedding and (FLUX.2) rotary turns
        state.embedded = module.context_embedder(streams.tokens.to(dtype))
        if flux2:
            ids = F.pad(streams.positions[:, :, None], (3, 0))  # (0, 0, 0, position), as the text's ids
            state.rotary = [module.pos_embed(row) for row in ids]
    if flux2:
        temb = module.time_guidance_embed(timestep, guidance)
        state.mod = module.double_stream_modulation_txt(temb)
        state.mod_single = module.single_stream_modulation(temb)
    else:
        pooled = torch.zeros_like(kwargs["pooled_projections"][rows])
        if guidance is None:
            state.temb = module.time_text_embed(timestep, pooled)
        else:
            state.temb = module.time_text_embed(timestep, guidance, pooled)
    state.hidden = state.embedded


def _start_z_image_words(module, args, state: _WordStreams) -> None:
    """Before a Z-Image transformer call, `(latents, t, captions)`: the words' stream as a caption's,
    through the caption embedder and the caption refiner (the words attend to the words there, padding
    masked), at their caption positions' rotary ids (1 + position, 0, 0); the layers' time embedding."""
    latents, t = args[0], args[1]
    streams = state.streams
    dtype = latents[0].dtype
    state.adaln = module.t_embedder(t[state.rows] * module.t_scale).type_as(latents[0])
    if state.embedded is None:  # the refiner has no time modulation: the same words at every step
        ids = F.pad(streams.positions[:, :, None] + 1, (0, 2))
        state.freqs = module.rope_embedder(ids.flatten(0, 1)).unflatten(0, ids.shape[:2])
        hidden = module.cap_embedder(streams.tokens.to(dtype))
        for layer in module.context_refiner:
            hidden = layer(hidden, streams.key_mask, state.freqs)
        state.embedded = hidden
    state.hidden = state.embedded


@contextlib.contextmanager
def capture_concept_output(
    transformer, readout: Readout, size: int, record_rows: slice | None = None
) -> Iterator[AttentionAccumulator]:
    """Record the `concept_output` map of `readout.streams` on `readout`'s blocks of a FLUX.1, FLUX.2 or
    Z-Image transformer while it runs; `acc.enabled` chooses the recorded steps, as for the other
    capture."""
    streams: ConceptStreams = readout.streams
    if streams is None:
        raise ValueError("the concept_output readout needs the batch's word streams (Readout.streams)")
    layout = denoiser_layout(transformer)
    if layout in ("flux2", "z_image") and streams.positions is None:
        raise ValueError(f"{layout}'s word streams need their text positions (ConceptStreams.positions)")
    blocks = recorded_blocks(transformer, readout)
    rows = record_rows if record_rows is not None else slice(None)
    acc = AttentionAccumulator(streams.groups[:, :, 0], size)  # one map per recorded row
    state = _WordStreams(streams, acc, rows)
    if layout == "z_image":
        processors = {
            f"layers.{i}.attention.processor": ZImageConceptOutputProcessor(layer, state, record=i in blocks)
            for i, layer in enumerate(transformer.layers[: blocks[-1] + 1])
        }
    else:
        n_double = len(transformer.transformer_blocks)
        processors = {
            name: ConceptOutputProcessor(
                block, state, record=i in blocks, flux2=layout == "flux2", single=i >= n_double
            )
            for i, (name, block) in enumerate(block_modules(transformer)[: blocks[-1] + 1])
        }

    def start_words(module, args, kwargs):
        if not acc.enabled:
            return
        if layout == "z_image":
            _start_z_image_words(module, args, state)
        else:
            _start_flux_words(module, kwargs, state)

    original = attention_processors(transformer)
    hook = transformer.register_forward_pre_hook(start_words, with_kwargs=True)
    set_attention_processors(transformer, {n: processors.get(n, p) for n, p in original.items()})
    try:
        yield acc
    finally:
        hook.remove()
        set_attention_processors(transformer, original)
        state.clear()
