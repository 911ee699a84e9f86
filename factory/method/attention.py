"""Cross-attention capture: the running mean of a concept's token attention over layers and steps.

`capture_concept_attention(unet, token_weights, size)` installs `ConceptAttnProcessor` on the UNet's
cross-attention modules (the ``attn2`` of every transformer block) and leaves self-attention on its fast
SDPA processor. On each call a capture processor computes the post-softmax probabilities explicitly
(``softmax(QK^T / sqrt(d))`` over the text tokens, as the paper's Eq. 2), keeps only the selected tokens
(``probs @ token_weights``, so several tokens are summed, e.g. "human", "arms", "legs"), averages over
heads, upsamples nearest to ``size`` x ``size`` and adds the result to a running sum held on the device.
Memory therefore does not grow with steps x layers, and each (layer, step) evaluation counts equally,
whatever its native resolution (the paper's unweighted mean). On exit the original processors are restored.

An SD3 transformer (MMDiT) has no cross-attention: each block runs one joint attention over the image and
text tokens together. There `JointConceptAttnProcessor` goes on every block's ``attn``: its output is the
default processor's (the same fused SDPA call), and on recorded steps it also computes the image-to-text
block of the attention, ``softmax(Q_image K_text^T / sqrt(d))`` renormalized over the text keys only, so that
each image token's weights over the prompt sum to one as in a cross-attention layer. That map is what the
rest of the method reads. This is our choice among two documented ones: ConceptAttention (Helbling et al.
2025) reads the attention *output* projected onto the concept tokens' outputs instead, and reports better
zero-shot maps on FLUX; no toyworld model of the SD3 family exists to measure the two against each other.

FLUX.1's transformer has double-stream blocks (image and text tokens with their own projections, one joint
attention) and single-stream blocks (one [text; image] sequence). `FluxConceptAttnProcessor` goes on every
block's ``attn`` and records the same image-to-text map there, the rotary embedding applied as the block
applies it; the output stays diffusers' `FluxAttnProcessor`'s.

FLUX.2's transformer has the same two kinds of block; a single-stream block's attention computes its
queries, keys, values and MLP input in one projection. `Flux2ConceptAttnProcessor` serves both kinds and
records the same image-to-text map; the output stays diffusers' FLUX.2 processors'.

Z-Image's transformer is single-stream: after refiner blocks that see the image alone and the caption alone,
its main `layers` run one attention over [image; caption] per sample (each part padded to a multiple of 32
tokens, the batch padded with a key mask). `ZImageConceptAttnProcessor` goes on those layers' attention and
records the image-to-caption map there, over the caption's part of the sequence (its tokens and the pad
tokens that fill it), as FLUX's map is taken over T5's whole padded sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


class AttentionAccumulator:
    """Running per-sample sum of the selected-token attention at one resolution."""

    def __init__(self, token_weights: torch.Tensor, size: int, record_rows: slice | None = None):
        self.reset(token_weights, size, record_rows)

    def reset(self, token_weights: torch.Tensor, size: int, record_rows: slice | None = None) -> None:
        """Start a new running mean (the same object is reused under torch.compile: no recompilation)."""
        if token_weights.ndim != 2:
            raise ValueError("token_weights must be (batch, tokens)")
        self.token_weights = token_weights
        self.size = size
        # With classifier-free guidance the UNet batch is [uncond, cond]; only `record_rows` are recorded.
        self.record_rows = record_rows if record_rows is not None else slice(None)
        n = token_weights[self.record_rows].shape[0]
        self.total = torch.zeros(n, size, size, device=token_weights.device, dtype=torch.float32)
        # The count is a device tensor, not a Python int: `add` runs inside a torch.compile'd model, where
        # dynamo guards on a Python attribute's value and recompiles at every new one (issue 30: a 50-step job
        # fell back to eager at the recompile limit). A tensor's in-place add is part of the graph.
        self.count = torch.zeros((), device=token_weights.device, dtype=torch.float32)
        self._values: dict = {}  # `add_attention`'s value tensors, per (heads, head_dim, dtype)
        self.enabled = True

    def add(self, probs: torch.Tensor, heads: int) -> None:
        """probs: (batch*heads, h*w, tokens) post-softmax cross-attention probabilities."""
        bh, hw, n_tok = probs.shape
        b = bh // heads
        w = self.token_weights[self.record_rows].to(probs.dtype)
        p = probs.view(b, heads, hw, n_tok)[self.record_rows]
        # reduced on the device in the model's dtype (only the (b, hw) result is upcast): no host sync, and
        # no float32 copy of the whole probability tensor
        sel = torch.einsum("bhqt,bt->bq", p, w).float() / heads  # mean over heads
        self.add_map(sel)

    def add_attention(
        self, query: torch.Tensor, key: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> None:
        """query: (recorded rows, image tokens, heads, d), key: (recorded rows, text tokens, heads, d), as a
        FLUX block forms them; `key_mask` (recorded rows, text tokens), True where a key is read. The token
        weights are read over the keys (zero-padded or cut to their number). Adds the same map as `add` does
        for ``softmax(Q K^T / sqrt(d))`` at the concept's tokens, computed by the fused attention kernel
        instead of forming the probabilities: attention with every value column the token weights gives each
        query's weighted probability mass, ``softmax(Q K^T / sqrt(d)) @ w``. Measured on the CPU (1024 x 512 x
        24 heads): 26 ms against 61 for the probabilities written out; the value's width is the head
        dimension, which keeps the fused kernel (a one-column value fell back to the unfused path, 71 ms)."""
        b, n_keys, heads, d = query.shape[0], key.shape[1], query.shape[2], query.shape[3]
        values = self._values.get((heads, d, n_keys, query.dtype))
        if values is None:
            w = self.token_weights[self.record_rows].to(query.dtype)
            w = F.pad(w, (0, max(0, n_keys - w.shape[1])))[:, :n_keys]  # the weights over these keys
            values = w[:, None, :, None].expand(b, heads, n_keys, d).contiguous()
            self._values[(heads, d, n_keys, query.dtype)] = values
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), values, attn_mask=mask
        )
        self.add_map(out[..., 0].float().mean(1))  # every column is the same; the mean over heads

    def add_map(self, maps: torch.Tensor) -> None:
        """maps: (recorded rows, h*w) one layer's concept map of each recorded sample, on a square grid."""
        side = int(round(maps.shape[1] ** 0.5))
        if side * side != maps.shape[1]:
            raise ValueError(f"a concept map over a non-square grid ({maps.shape[1]} tokens) is unsupported")
        sel = maps.float().view(-1, 1, side, side)
        if side != self.size:
            sel = F.interpolate(sel, size=(self.size, self.size), mode="nearest")
        self.total += sel[:, 0]
        self.count += 1

    def mean(self) -> torch.Tensor:
        if not self.count.item():  # one host sync per batch, after the loop
            raise RuntimeError("no cross-attention was recorded: is this a text-conditioned UNet?")
        return self.total / self.count


class ConceptAttnProcessor:
    """An attention processor for cross-attention that records concept-token probabilities.

    On recorded steps it follows diffusers' `AttnProcessor` (the explicit, non-fused path) so that the
    probabilities exist; the output is the same attention result that SDPA would give. On the other steps
    it is diffusers' `AttnProcessor2_0` (fused SDPA).
    """

    def __init__(self, accumulator: AttentionAccumulator):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.acc = accumulator
        self.fast = AttnProcessor2_0()  # steps that are not recorded run fused SDPA, as without capture

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
    ):
        if encoder_hidden_states is None:
            raise RuntimeError("ConceptAttnProcessor must only be installed on cross-attention (attn2)")
        if not self.acc.enabled:
            return self.fast(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch_size, seq_len, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, hidden_states.shape[0])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch*heads, hw, tokens)
        if self.acc.enabled:
            self.acc.add(probs, attn.heads)
        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def joint_attention(attn, hidden_states, encoder_hidden_states, seen):
    """diffusers' `JointAttnProcessor2_0.__call__` (0.42.1) for SD3's joint attention, step for step (the same
    output bits), calling ``seen(query, key)`` with the block's own [image; text] queries and keys after the
    RMS norms, (b, heads, tokens, d)."""
    residual = hidden_states
    batch_size = hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    inner_dim = key.shape[-1]
    head_dim = inner_dim // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    context_query = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
    context_key = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
    context_value = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
    context_query, context_key, context_value = (
        x.transpose(1, 2) for x in (context_query, context_key, context_value)
    )
    if attn.norm_added_q is not None:
        context_query = attn.norm_added_q(context_query)
    if attn.norm_added_k is not None:
        context_key = attn.norm_added_k(context_key)
    query = torch.cat([query, context_query], dim=2)
    key = torch.cat([key, context_key], dim=2)
    value = torch.cat([value, context_value], dim=2)
    seen(query, key)
    hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)
    hidden_states, encoder_hidden_states = (
        hidden_states[:, : residual.shape[1]],
        hidden_states[:, residual.shape[1] :],
    )
    if not attn.context_pre_only:
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    return hidden_states, encoder_hidden_states


class JointConceptAttnProcessor:
    """An attention processor for SD3's joint attention that records the image-to-text attention of the
    concept tokens (see the module docstring), while its output stays diffusers' `JointAttnProcessor2_0`'s.

    The text tokens are the last ``encoder_hidden_states.shape[1]`` of the joint sequence, as diffusers
    concatenates them. On recorded steps it runs `JointAttnProcessor2_0`'s own steps (`joint_attention`) and
    records from the queries and keys the block forms, through the fused kernel
    (`AttentionAccumulator.add_attention`), as FLUX's processor does: nothing is projected twice.
    """

    def __init__(self, accumulator: AttentionAccumulator):
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        self.acc = accumulator
        self.fast = JointAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise RuntimeError("JointConceptAttnProcessor must only be installed on joint attention")
        if not self.acc.enabled:
            return self.fast(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        n_img = hidden_states.shape[1]

        def record(query, key):  # (b, heads, tokens, d) -> add_attention's (b, tokens, heads, d)
            rows = self.acc.record_rows
            self.acc.add_attention(
                query[rows, :, :n_img].transpose(1, 2), key[rows, :, n_img:].transpose(1, 2)
            )

        return joint_attention(attn, hidden_states, encoder_hidden_states, record)


def flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb, projections):
    """The [text; image] queries, keys and values of a FLUX.1 or FLUX.2 attention, (b, tokens, heads, d),
    as both processors form them (`projections`: the model's `_get_qkv_projections`): per-head RMS norms,
    the text's own projections and norms in a double-stream block, then the rotary turn."""
    from diffusers.models.embeddings import apply_rotary_emb

    query, key, value, encoder_query, encoder_key, encoder_value = projections(
        attn, hidden_states, encoder_hidden_states
    )
    query = query.unflatten(-1, (-1, attn.head_dim))
    key = key.unflatten(-1, (-1, attn.head_dim))
    value = value.unflatten(-1, (-1, attn.head_dim))
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    if attn.added_kv_proj_dim is not None:
        encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
        encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
        encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
        encoder_query = attn.norm_added_q(encoder_query)
        encoder_key = attn.norm_added_k(encoder_key)
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


def fused_attention(query, key, value, attention_mask, processor) -> torch.Tensor:
    """The FLUX.1 / FLUX.2 processors' attention call: diffusers' dispatch on `processor`'s backend, the
    heads flattened, (b, tokens, heads * d) in the queries' dtype."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    hidden_states = dispatch_attention_fn(
        query,
        key,
        value,
        attn_mask=attention_mask,
        backend=processor._attention_backend,
        parallel_config=processor._parallel_config,
    )
    return hidden_states.flatten(2, 3).to(query.dtype)


def flux_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, fast, seen):
    """diffusers' `FluxAttnProcessor.__call__` (0.42.1) step for step, the same operations in the same order
    (so the same output bits), calling ``seen(query, key, value, out)`` with the block's own tensors: the
    [text; image] queries, keys and values after the RMS norms and the rotary turn, (b, tokens, heads, d),
    and the attention output before the output projections, (b, tokens, heads * d). A readout reads what the
    block computes anyway instead of projecting anything a second time. `fast` is the `FluxAttnProcessor`
    whose attention backend is used."""
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    query, key, value = flux_qkv(
        attn, hidden_states, encoder_hidden_states, image_rotary_emb, _get_qkv_projections
    )
    hidden_states = fused_attention(query, key, value, attention_mask, fast)
    seen(query, key, value, hidden_states)
    if encoder_hidden_states is not None:
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states
    return hidden_states


class FluxConceptAttnProcessor:
    """An attention processor for FLUX's blocks that records the image-to-text attention of the concept
    tokens, while its output stays diffusers' `FluxAttnProcessor`'s.

    A double-stream block's attention gets the image tokens as `hidden_states` and the text tokens as
    `encoder_hidden_states` (their own projections); a single-stream block's gets one sequence, [text;
    image], whose first `token_weights.shape[1]` tokens are the text. On recorded steps it runs
    `FluxAttnProcessor`'s own steps (`flux_attention`) and records ``softmax(Q_image K_text^T / sqrt(d))``
    over the text keys from the queries and keys the block has formed (projections, RMS norms, the rotary
    turn of the joint positions), as for SD3 (`JointConceptAttnProcessor`), for the recorded rows only and
    through the fused attention kernel (`AttentionAccumulator.add_attention`). Nothing is projected twice: per
    FLUX.1 block at 1024 px the record adds the image-by-text product, ~13 GFLOP against the block's ~1,170
    (counted by hand; recomputing the image queries and text keys, as the first version did, added ~100
    more). Unrecorded steps call `FluxAttnProcessor` itself."""

    def __init__(self, accumulator: AttentionAccumulator):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.acc = accumulator
        self.fast = FluxAttnProcessor()

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        if not self.acc.enabled:
            return self.fast(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        # the text comes first in both blocks' layout
        n_text = (
            encoder_hidden_states.shape[1]
            if encoder_hidden_states is not None
            else self.acc.token_weights.shape[1]
        )

        def record(query, key, value, out):
            rows = self.acc.record_rows
            self.acc.add_attention(query[rows, n_text:], key[rows, :n_text])

        return flux_attention(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, self.fast, record
        )


def flux2_parallel_projections(attn, hidden_states):
    """A FLUX.2 single-stream block's fused input projection (`Flux2ParallelSelfAttnProcessor`'s steps):
    the queries and keys (RMS-normed, not yet turned) and values, (b, tokens, heads, d), and the MLP's
    input, (b, tokens, mlp)."""
    hidden_states = attn.to_qkv_mlp_proj(hidden_states)
    qkv_dim = 3 * attn.inner_dim
    mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
    local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
    qkv, mlp_hidden_states = torch.split(
        hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1
    )
    query, key, value = qkv.chunk(3, dim=-1)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    return query, key, value, mlp_hidden_states


def flux2_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, fast, seen):
    """diffusers' FLUX.2 processors (0.42.1) step for step, the same operations in the same order, calling
    ``seen(query, key, value, out)`` as `flux_attention` does: the [text; image] queries, keys and values
    after the RMS norms and the rotary turn, (b, tokens, heads, d), and the attention output before the
    output projection, (b, tokens, heads * d). `Flux2AttnProcessor` for a double-stream block's
    `Flux2Attention`, `Flux2ParallelSelfAttnProcessor` for a single-stream block's
    `Flux2ParallelSelfAttention` (one fused projection gives the queries, keys, values and the MLP's input;
    one output projection takes the attention and the MLP together). `fast` holds the two processors whose
    attention backends are used."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2ParallelSelfAttention,
        _get_qkv_projections,
    )

    single = isinstance(attn, Flux2ParallelSelfAttention)
    processor = fast[1] if single else fast[0]
    if single:
        query, key, value, mlp_hidden_states = flux2_parallel_projections(attn, hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    else:
        query, key, value = flux_qkv(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb, _get_qkv_projections
        )
    hidden_states = fused_attention(query, key, value, attention_mask, processor)
    seen(query, key, value, hidden_states)
    if single:
        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        return attn.to_out(torch.cat([hidden_states, mlp_hidden_states], dim=-1))
    if encoder_hidden_states is not None:
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if encoder_hidden_states is not None:
        return hidden_states, encoder_hidden_states
    return hidden_states


class Flux2ConceptAttnProcessor:
    """An attention processor for FLUX.2's blocks (double-stream `Flux2Attention`, single-stream
    `Flux2ParallelSelfAttention`: one object serves both, as their modules call it) that records the
    image-to-text attention of the concept tokens, while its output stays diffusers' processors'. The text
    comes first in both layouts, `token_weights.shape[1]` tokens of it in a single-stream block. On recorded
    steps it runs the processors' own steps (`flux2_attention`) and records ``softmax(Q_image K_text^T /
    sqrt(d))`` from the block's queries and keys, as `FluxConceptAttnProcessor` does for FLUX.1."""

    def __init__(self, accumulator: AttentionAccumulator):
        from diffusers.models.transformers.transformer_flux2 import (
            Flux2AttnProcessor,
            Flux2ParallelSelfAttnProcessor,
        )

        self.acc = accumulator
        self.fast = (Flux2AttnProcessor(), Flux2ParallelSelfAttnProcessor())

    def __call__(self, attn, hidden_states, *args):
        from diffusers.models.transformers.transformer_flux2 import Flux2ParallelSelfAttention

        single = isinstance(attn, Flux2ParallelSelfAttention)
        # the two modules call their processor with different positional arguments
        encoder_hidden_states, attention_mask, image_rotary_emb = (None, *args) if single else args
        if not self.acc.enabled:
            if single:
                return self.fast[1](attn, hidden_states, attention_mask, image_rotary_emb)
            return self.fast[0](attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        n_text = self.acc.token_weights.shape[1] if single else encoder_hidden_states.shape[1]

        def record(query, key, value, out):
            rows = self.acc.record_rows
            self.acc.add_attention(query[rows, n_text:], key[rows, :n_text])

        return flux2_attention(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, self.fast, record
        )


Z_IMAGE_SEQ_MULTIPLE = 32  # Z-Image pads the image's and the caption's tokens each to a multiple of this


def z_image_rotary(x_in: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """`ZSingleStreamAttnProcessor`'s rotary turn (its closure, as it is): (b, tokens, heads, d) by the
    complex (b, tokens, d / 2) `freqs`."""
    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        return torch.view_as_real(x * freqs.unsqueeze(2)).flatten(3).type_as(x_in)


def z_image_attention(attn, hidden_states, attention_mask, freqs_cis, fast, seen):
    """diffusers' `ZSingleStreamAttnProcessor.__call__` (0.42.1) step for step, the same operations in the
    same order, calling ``seen(query, key, value, mask, out)`` with the queries and keys after the RMS norms
    and the rotary turn and the values, (b, tokens, heads, d), the (b, tokens) key mask (None: every key),
    and the attention output before the output projection, (b, tokens, heads * d)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
    key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
    value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    if freqs_cis is not None:
        query = z_image_rotary(query, freqs_cis)
        key = z_image_rotary(key, freqs_cis)
    dtype = query.dtype
    query, key = query.to(dtype), key.to(dtype)
    mask = attention_mask
    if attention_mask is not None and attention_mask.ndim == 2:
        attention_mask = attention_mask[:, None, None, :]
    hidden_states = dispatch_attention_fn(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=0.0,
        is_causal=False,
        backend=fast._attention_backend,
        parallel_config=fast._parallel_config,
    )
    hidden_states = hidden_states.flatten(2, 3).to(dtype)
    seen(query, key, value, mask, hidden_states)
    output = attn.to_out[0](hidden_states)
    if len(attn.to_out) > 1:
        output = attn.to_out[1](output)
    return output


class ZImageConceptAttnProcessor:
    """An attention processor for Z-Image's main (single-stream) layers that records the image-to-caption
    attention of the concept tokens, while its output stays diffusers' `ZSingleStreamAttnProcessor`'s.

    A main layer's sequence is, per sample, [image tokens, padded to a multiple of 32; caption tokens,
    padded likewise], the batch padded after them (the key mask). The image has ``(size / 2)^2`` tokens
    (2 x 2 patches of the `size` x `size` latents); the caption's part starts after the padded image. The
    map is ``softmax(Q_image K_caption^T / sqrt(d))`` over the caption's part, at the concept's tokens
    (`AttentionAccumulator.add_attention`, the fused kernel, with the batch padding masked)."""

    def __init__(self, accumulator: AttentionAccumulator):
        from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

        self.acc = accumulator
        self.fast = ZSingleStreamAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        if not self.acc.enabled:
            return self.fast(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        n_img = (self.acc.size // 2) ** 2
        start = -(-n_img // Z_IMAGE_SEQ_MULTIPLE) * Z_IMAGE_SEQ_MULTIPLE

        def record(query, key, value, mask, out):
            rows = self.acc.record_rows
            key_mask = mask[rows, start:].bool() if mask is not None else None
            self.acc.add_attention(query[rows, :n_img], key[rows, start:], key_mask)

        return z_image_attention(attn, hidden_states, attention_mask, freqs_cis, self.fast, record)


def attention_processors(model) -> dict:
    """{name: processor} of every attention of `model`: diffusers' `attn_processors`, or (a model without
    it, as Z-Image's transformer) each `Attention` module's processor under ``<module>.processor``."""
    if hasattr(model, "attn_processors"):
        return dict(model.attn_processors)
    from diffusers.models.attention_processor import Attention

    return {f"{n}.processor": m.processor for n, m in model.named_modules() if isinstance(m, Attention)}


def set_attention_processors(model, processors: dict) -> None:
    """Install `processors` ({name: processor}, every attention's) on `model`; see `attention_processors`."""
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(dict(processors))  # set_attn_processor empties the dict it is given
        return
    for name, processor in processors.items():
        model.get_submodule(name.removesuffix(".processor")).set_processor(processor)


def cross_attention_names(model) -> list[str]:
    """Processor names of the layers where a concept map is read: a UNet's cross-attention layers
    (``...attn2.processor``), an SD3 transformer's joint attention (``transformer_blocks.N.attn...``), or
    every attention of a FLUX transformer's double- and single-stream blocks, or Z-Image's main layers."""
    processors = attention_processors(model)
    if denoiser_layout(model) in ("flux", "flux2"):  # every double- and single-stream block's attention
        names = [n for n in processors if n.endswith(".attn.processor")]
    elif denoiser_layout(model) == "z_image":  # the main layers over [image; caption], not the refiners
        names = [n for n in processors if n.startswith("layers.")]
    elif denoiser_layout(model) == "joint":  # SD3.5's blocks also have an image-only `attn2`, not read
        names = [
            n for n in processors if n.startswith("transformer_blocks.") and n.endswith(".attn.processor")
        ]
    else:
        names = [n for n in processors if n.endswith("attn2.processor")]
    if not names:
        raise ValueError(
            "this model has no cross-attention (attn2) or joint attention layers; concept attention needs a "
            "text-conditioned UNet such as Stable Diffusion's, or an SD3 transformer"
        )
    return names


def recorded_layer_names(model, layers: tuple[int, ...] | None) -> set[str]:
    """The processor names of the layers a capture records: `layers` (indices into
    `cross_attention_names`), or every one."""
    names = cross_attention_names(model)
    if layers is None:
        return set(names)
    if max(layers) >= len(names):
        raise ValueError(
            f"readout layers {list(layers)} are beyond this model's {len(names)} attention layers "
            f"(indices 0-{len(names) - 1})"
        )
    return {names[i] for i in layers}


def denoiser_layout(model) -> str:
    """ "flux" (FLUX.1's double- and single-stream blocks), "flux2" (FLUX.2's), "z_image" (single-stream),
    "joint" (SD3's MMDiT) or "unet", from the model's config (also when torch.compile'd)."""
    if hasattr(model.config, "num_single_layers"):
        return "flux2" if hasattr(model.config, "timestep_guidance_channels") else "flux"
    if hasattr(model.config, "n_refiner_layers"):
        return "z_image"
    return "joint" if hasattr(model.config, "joint_attention_dim") else "unet"


def _capture_processor(model, acc: AttentionAccumulator):
    processor = {
        "flux": FluxConceptAttnProcessor,
        "flux2": Flux2ConceptAttnProcessor,
        "z_image": ZImageConceptAttnProcessor,
        "joint": JointConceptAttnProcessor,
    }
    return processor.get(denoiser_layout(model), ConceptAttnProcessor)(acc)


CAPTURE_PROCESSORS = (
    ConceptAttnProcessor,
    JointConceptAttnProcessor,
    FluxConceptAttnProcessor,
    Flux2ConceptAttnProcessor,
    ZImageConceptAttnProcessor,
)


@contextlib.contextmanager
def capture_concept_attention(
    unet,
    token_weights: torch.Tensor,
    size: int,
    record_rows: slice | None = None,
    layers: tuple[int, ...] | None = None,
) -> Iterator[AttentionAccumulator]:
    """Record the selected tokens' cross-attention of every attn2 layer (of a UNet; the joint attention's
    image-to-text block of an SD3 transformer) while the block runs.

    token_weights: (unet_batch, n_text_tokens) weights, 1 at the concept's token positions.
    size: output resolution (the latent side); every layer is upsampled nearest to it.
    layers: indices into `cross_attention_names(unet)` to record; None: every one.
    """
    original = attention_processors(unet)
    cross = recorded_layer_names(unet, layers)
    installed = {n: p for n, p in original.items() if isinstance(p, CAPTURE_PROCESSORS)}
    if set(installed) == cross and len(set(installed.values())) == 1:
        # `install_capture` put one on these layers for good (compile): reuse its accumulator. (Installed on
        # other layers, it is a disabled pass-through, and the processors are swapped below as without it.)
        acc = next(iter(installed.values())).acc
        acc.reset(token_weights, size, record_rows)
        try:
            yield acc
        finally:
            acc.enabled = False
        return
    acc = AttentionAccumulator(token_weights, size, record_rows)
    capture = _capture_processor(unet, acc)
    set_attention_processors(unet, {n: (capture if n in cross else p) for n, p in original.items()})
    try:
        yield acc
    finally:
        set_attention_processors(unet, original)


def install_capture(unet, layers: tuple[int, ...] | None = None) -> None:
    """Install one capture processor for good on every cross- or joint-attention layer (or on `layers`,
    indices as `capture_concept_attention` takes them), disabled until `capture_concept_attention` enables
    it. For a model that is then `torch.compile`d: swapping processors per batch would recompile it each
    time, while one processor object whose accumulator is reset keeps the compiled graphs."""
    weights = torch.zeros(1, 1, device=unet.device)
    capture = _capture_processor(unet, AttentionAccumulator(weights, 1))
    capture.acc.enabled = False
    cross = recorded_layer_names(unet, layers)
    current = attention_processors(unet)
    for earlier in {id(p): p for p in current.values() if isinstance(p, CAPTURE_PROCESSORS)}.values():
        current.update(getattr(earlier, "replaced", {}))  # an earlier install's layers get theirs back
    capture.replaced = {n: current[n] for n in cross}
    set_attention_processors(unet, {n: (capture if n in cross else p) for n, p in current.items()})
