"""Naive references for the attention capture: processors that compute every probability explicitly and
keep it all, and the map the capture should equal (for `tests/test_attention_capture.py` and
`tests/test_families.py`)."""

import torch
import torch.nn.functional as F


class StoreCrossAttention:
    """Naive reference for a UNet's attn2: the full probability tensor, every token, kept."""

    def __init__(self, store):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = (q @ k.transpose(1, 2) * attn.scale).softmax(-1)
        b = hidden_states.shape[0]
        self.store.append(probs.view(b, attn.heads, *probs.shape[1:]))
        out = attn.batch_to_head_dim(probs @ v)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


class StoreJointAttention:
    """Naive reference for SD3's joint attention: the whole (image + text) x (image + text) probability
    tensor, computed explicitly; its image-to-text block renormalized over the text keys is kept."""

    def __init__(self, store):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *a, **kw):
        b, n_img = hidden_states.shape[:2]
        h = attn.heads

        def heads(x):
            return x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2)

        q, k, v = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )

        def norm(f, x):
            return x if f is None else f(x)

        q, k = norm(attn.norm_q, q), norm(attn.norm_k, k)
        cq = norm(attn.norm_added_q, heads(attn.add_q_proj(encoder_hidden_states)))
        ck = norm(attn.norm_added_k, heads(attn.add_k_proj(encoder_hidden_states)))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
        image_to_text = probs[:, :, :n_img, n_img:]
        self.store.append(image_to_text / image_to_text.sum(-1, keepdim=True))
        out = (probs @ v).transpose(1, 2).reshape(b, -1, h * v.shape[-1])
        img, txt = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, txt


class StoreFluxAttention:
    """Naive reference for FLUX's attention (double- and single-stream blocks): the whole [text; image] x
    [text; image] probability tensor computed explicitly, with the rotary embedding; its image-to-text block
    renormalized over the text keys is kept."""

    def __init__(self, store, n_text: int):
        self.store = store
        self.n_text = n_text

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        q, k, v = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:  # double-stream: [text; image]
            cq, ck, cv = (
                heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            q = torch.cat([attn.norm_added_q(cq), q], 1)
            k = torch.cat([attn.norm_added_k(ck), k], 1)
            v = torch.cat([cv, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (b, heads, tokens, d)
        probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        n = self.n_text
        image_to_text = probs[:, :, n:, :n]
        self.store.append(image_to_text / image_to_text.sum(-1, keepdim=True))
        out = (probs @ v).transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out
        txt, img = out[:, :n], out[:, n:]
        return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(txt)


class StoreFlux2Attention:
    """Naive reference for FLUX.2's attention: a double-stream block's as FLUX.1's (`StoreFluxAttention`),
    a single-stream block's from its one fused projection (queries, keys, values and the MLP's input) and
    its one output projection over [attention; MLP]; the whole probability tensor written out."""

    def __init__(self, store, n_text: int):
        self.store = store
        self.double = StoreFluxAttention(store, n_text)
        self.n_text = n_text

    def __call__(self, attn, hidden_states, *args):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux2 import Flux2ParallelSelfAttention

        if not isinstance(attn, Flux2ParallelSelfAttention):
            encoder_hidden_states, attention_mask, image_rotary_emb = args
            return self.double(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        _, image_rotary_emb = args
        qkv_dim = 3 * attn.inner_dim
        fused = attn.to_qkv_mlp_proj(hidden_states)
        q, k, v = (x.unflatten(-1, (attn.heads, -1)) for x in fused[..., :qkv_dim].chunk(3, -1))
        q = apply_rotary_emb(attn.norm_q(q), image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(attn.norm_k(k), image_rotary_emb, sequence_dim=1)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        n = self.n_text
        image_to_text = probs[:, :, n:, :n]
        self.store.append(image_to_text / image_to_text.sum(-1, keepdim=True))
        out = (probs @ v).transpose(1, 2).flatten(2)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(fused[..., qkv_dim:])], -1))


class StoreZImageAttention:
    """Naive reference for Z-Image's main layers: the whole [image; caption] x [image; caption] probability
    tensor computed explicitly (the batch padding masked), with the rotary turn; its image-to-caption block
    renormalized over the caption's keys is kept, zero-padded to `width` keys (the token weights' width).
    The image is the first `n_img` tokens; the caption starts at `start` (the image padded to 32)."""

    def __init__(self, store, n_img: int, start: int, width: int):
        self.store, self.n_img, self.start, self.width = store, n_img, start, width

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        q, k, v = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)

        def rotate(x):  # complex rotation by freqs_cis, written out
            xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(xc * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)

        q, k = rotate(q), rotate(k)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (b, heads, tokens, d)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
        probs = scores.softmax(-1)
        image_to_caption = probs[:, :, : self.n_img, self.start :]
        kept = image_to_caption / image_to_caption.sum(-1, keepdim=True)
        self.store.append(F.pad(kept, (0, self.width - kept.shape[-1]))[..., : self.width])
        out = (probs @ v).transpose(1, 2).flatten(2)
        return attn.to_out[0](out)


def naive_map(store, weights, size):
    maps = []
    for probs in store:  # (b, heads, queries, tokens)
        side = int(probs.shape[2] ** 0.5)
        sel = (probs.mean(1) * weights[:, None, :]).sum(-1).view(-1, 1, side, side)
        maps.append(F.interpolate(sel, size=size, mode="nearest")[:, 0])
    return torch.stack(maps).mean(0)


def _project(attn, linear, x, norm=None):
    """(b, tokens, heads, d) from a projection, RMS-normed if asked."""
    y = linear(x).unflatten(-1, (attn.heads, -1))
    return norm(y) if norm is not None else y


def _attend(q, k, v, mask=None):
    """Explicit softmax attention: (b, tokens, heads, d) in, heads flattened out; `mask` (b, keys) False
    at keys no query sees."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def _attend_words(wq, wk, wv, k_img, v_img, keep):
    """The words' attention output: each sample's word queries over its own words' tokens (padding is no
    key) and the image's keys, written out row by row."""
    rows = [
        _attend(
            wq[r : r + 1],
            torch.cat([wk[r : r + 1, keep[r]], k_img[r : r + 1]], 1),
            torch.cat([wv[r : r + 1, keep[r]], v_img[r : r + 1]], 1),
        )
        for r in range(wq.shape[0])
    ]
    return torch.cat(rows)


def _word_map(words_out, image_out, groups):
    """(b, image) word 0's share of the softmax over the words of (word output . image output), each word's
    tokens averaged."""
    dots = words_out @ image_out.transpose(1, 2)  # (b, tokens, image)
    return (groups.transpose(1, 2) @ dots).softmax(1)[:, 0]


def _single_qkv(attn, x):
    """A single-stream block's q (RMS-normed), k (RMS-normed), v of x, (b, tokens, heads, d): FLUX.1's
    separate projections, FLUX.2's fused one (its first 3 x inner columns, then the MLP's) written out."""
    if hasattr(attn, "to_qkv_mlp_proj"):
        q, k, v = attn.to_qkv_mlp_proj(x)[..., : 3 * attn.inner_dim].chunk(3, -1)
        q, k, v = (y.unflatten(-1, (attn.heads, -1)) for y in (q, k, v))
        return attn.norm_q(q), attn.norm_k(k), v
    return (
        _project(attn, attn.to_q, x, attn.norm_q),
        _project(attn, attn.to_k, x, attn.norm_k),
        _project(attn, attn.to_v, x),
    )


def _single_block_image(attn, x, rotary, n_text):
    """A single-stream block's attention over x = [text; image] (normed, modulated), written out: the image
    tokens' attention output (b, image, inner) and their keys (turned) and values."""
    from diffusers.models.embeddings import apply_rotary_emb

    q, k, v = _single_qkv(attn, x)
    q, k = (apply_rotary_emb(y, rotary, sequence_dim=1) for y in (q, k))
    return _attend(q, k, v)[:, n_text:], k[:, n_text:], v[:, n_text:]


def _double_block_image(attn, img, txt, rotary):
    """A FLUX.1 / FLUX.2 double-stream block's joint attention over [text; image] (the normed, modulated
    streams), written out: the image tokens' attention output (b, image, inner), and their keys (turned)
    and values, (b, image, heads, d)."""
    from diffusers.models.embeddings import apply_rotary_emb

    n_text = txt.shape[1]
    q = torch.cat(
        [
            _project(attn, attn.add_q_proj, txt, attn.norm_added_q),
            _project(attn, attn.to_q, img, attn.norm_q),
        ],
        1,
    )
    k = torch.cat(
        [
            _project(attn, attn.add_k_proj, txt, attn.norm_added_k),
            _project(attn, attn.to_k, img, attn.norm_k),
        ],
        1,
    )
    v_img = _project(attn, attn.to_v, img)
    v = torch.cat([_project(attn, attn.add_v_proj, txt), v_img], 1)
    q, k = (apply_rotary_emb(x, rotary, sequence_dim=1) for x in (q, k))
    return _attend(q, k, v)[:, n_text:], k[:, n_text:], v_img


def naive_concept_output(transformer, block_inputs, tokens, groups, timestep, guidance, layers):
    """Naive reference for the `concept_output` readout (ConceptAttention) of one FLUX transformer call.

    block_inputs: each double-stream block's keyword inputs in a plain run (hidden_states, temb,
    image_rotary_emb, ...). The image's attention output is recomputed here with the whole [text; image]
    probability tensor written out; the word streams are run block by block with explicit attention over
    [words; image] keys and the text stream's weights, written out from ConceptAttention's
    `ModifiedDoubleStreamBlock` (not from our processor). Returns the (b, image tokens) map of word 0,
    averaged over `layers`."""

    pooled = torch.zeros(tokens.shape[0], transformer.config.pooled_projection_dim)
    temb = transformer.time_text_embed(timestep * 1000, guidance * 1000, pooled)
    words = transformer.context_embedder(tokens)
    keep = groups.sum(-1) > 0
    maps = []
    n_double = len(transformer.transformer_blocks)
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    for i in range(max(layers) + 1):
        block, inputs = blocks[i], block_inputs[i]
        if i >= n_double:  # a single-stream block: its one set of weights for the words too
            txt, img = inputs["encoder_hidden_states"], inputs["hidden_states"]
            normed, gate = block.norm(torch.cat([txt, img], 1), emb=inputs["temb"])
            image_out, k_img, v_img = _single_block_image(
                block.attn, normed, inputs["image_rotary_emb"], txt.shape[1]
            )
            normed, gate = block.norm(words, emb=temb)
            wq, wk, wv = _single_qkv(block.attn, normed)
            words_out = _attend_words(wq, wk, wv, k_img, v_img, keep)
            if i in layers:
                maps.append(_word_map(words_out, image_out, groups))
            mlp = block.act_mlp(block.proj_mlp(normed))
            words = words + gate[:, None] * block.proj_out(torch.cat([words_out, mlp], -1))
            continue
        attn, rotary = block.attn, inputs["image_rotary_emb"]
        img, _, _, _, _ = block.norm1(inputs["hidden_states"], emb=inputs["temb"])
        txt, _, _, _, _ = block.norm1_context(inputs["encoder_hidden_states"], emb=inputs["temb"])
        image_out, k_img, v_img = _double_block_image(attn, img, txt, rotary)

        def project(linear, x, norm=None, attn=attn):
            return _project(attn, linear, x, norm)

        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(words, emb=temb)
        wq = project(attn.add_q_proj, normed, attn.norm_added_q)
        wk = project(attn.add_k_proj, normed, attn.norm_added_k)
        wv = project(attn.add_v_proj, normed)
        words_out = _attend_words(wq, wk, wv, k_img, v_img, keep)
        if i in layers:
            maps.append(_word_map(words_out, image_out, groups))
        words = words + gate_msa[:, None] * attn.to_add_out(words_out)
        words = words + gate_mlp[:, None] * block.ff_context(
            block.norm2_context(words) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        )
    return torch.stack(maps).mean(0)


def naive_concept_output_flux2(transformer, block_inputs, tokens, groups, positions, layers):
    """The same naive reference for a FLUX.2 transformer, written out from ConceptAttention's FLUX.2
    `ModifiedDoubleStreamBlock` (`concept_attention/flux2/dit_block.py`): the words take the text stream's
    modulation (each block's own `temb_mod_txt` input here), LayerNorm, projections, RMS norms, output
    projection and SwiGLU MLP; their queries and keys turn by their text positions (0, 0, 0, position).
    Returns the (b, image tokens) map of word 0, averaged over `layers`."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    words = transformer.context_embedder(tokens)
    keep = groups.sum(-1) > 0
    ids = torch.zeros(*positions.shape, 4, dtype=torch.long)
    ids[..., 3] = positions
    word_rotary = [transformer.pos_embed(row) for row in ids]

    def turned(x):  # each row's word queries or keys turned by its own text positions
        return torch.cat(
            [apply_rotary_emb(x[r : r + 1], word_rotary[r], sequence_dim=1) for r in range(len(x))]
        )

    maps = []
    n_double = len(transformer.transformer_blocks)
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    for i in range(max(layers) + 1):
        block, inputs = blocks[i], block_inputs[i]
        if i >= n_double:  # a single-stream block: [text; image] in one stream, one modulation for all
            ((shift, scale, gate),) = Flux2Modulation.split(inputs["temb_mod"], 1)
            x = block.norm(inputs["hidden_states"]) * (1 + scale) + shift
            n_text = inputs["hidden_states"].shape[1] - block_inputs[0]["hidden_states"].shape[1]
            image_out, k_img, v_img = _single_block_image(block.attn, x, inputs["image_rotary_emb"], n_text)
            normed = block.norm(words) * (1 + scale) + shift
            wq, wk, wv = _single_qkv(block.attn, normed)
            words_out = _attend_words(turned(wq), turned(wk), wv, k_img, v_img, keep)
            if i in layers:
                maps.append(_word_map(words_out, image_out, groups))
            mlp = block.attn.to_qkv_mlp_proj(normed)[..., 3 * block.attn.inner_dim :]
            both = torch.cat([words_out, block.attn.mlp_act_fn(mlp)], -1)
            words = words + gate * block.attn.to_out(both)
            continue
        attn, rotary = block.attn, inputs["image_rotary_emb"]
        (shift, scale, _), _ = Flux2Modulation.split(inputs["temb_mod_img"], 2)
        (c_shift, c_scale, c_gate), (m_shift, m_scale, m_gate) = Flux2Modulation.split(
            inputs["temb_mod_txt"], 2
        )

        def project(linear, x, norm=None, attn=attn):
            return _project(attn, linear, x, norm)

        img = block.norm1(inputs["hidden_states"]) * (1 + scale) + shift
        txt = block.norm1_context(inputs["encoder_hidden_states"]) * (1 + c_scale) + c_shift
        image_out, k_img, v_img = _double_block_image(attn, img, txt, rotary)

        normed = block.norm1_context(words) * (1 + c_scale) + c_shift
        wq = turned(project(attn.add_q_proj, normed, attn.norm_added_q))
        wk = turned(project(attn.add_k_proj, normed, attn.norm_added_k))
        wv = project(attn.add_v_proj, normed)
        words_out = _attend_words(wq, wk, wv, k_img, v_img, keep)
        if i in layers:
            maps.append(_word_map(words_out, image_out, groups))
        words = words + c_gate * attn.to_add_out(words_out)
        words = words + m_gate * block.ff_context(block.norm2_context(words) * (1 + m_scale) + m_shift)
    return torch.stack(maps).mean(0)


def _z_qkv(attn, x, freqs):
    """A Z-Image layer's queries and keys (RMS-normed, turned by the complex `freqs`, written out) and
    values of x, (b, tokens, heads, d)."""

    def rotate(y):
        yc = torch.view_as_complex(y.float().reshape(*y.shape[:-1], -1, 2))
        return torch.view_as_real(yc * freqs.unsqueeze(2)).flatten(3).type_as(y)

    q, k, v = (_project(attn, f, x) for f in (attn.to_q, attn.to_k, attn.to_v))
    return rotate(attn.norm_q(q)), rotate(attn.norm_k(k)), v


def naive_concept_output_z_image(transformer, layer_inputs, tokens, groups, positions, n_img, layers):
    """The naive reference for a Z-Image transformer (single-stream layers, ConceptAttention's one-way word
    streams as its CogVideoX port takes a single-stream block's shared weights), written out from
    `ZImageTransformerBlock`: the words embedded as a caption at their caption positions (1 + position, 0,
    0), through the caption refiner (attending to the words), then each main layer's modulation (its input
    time embedding), RMS norms, q/k/v, rotary turn, output projection and gated FFN, attending to [words;
    image]. layer_inputs: each main layer's positional inputs (sequence, mask, freqs, time embedding) in a
    plain run; the image is the first `n_img` tokens of the sequence. Returns word 0's (b, n_img) map,
    averaged over `layers`."""
    keep = groups.sum(-1) > 0
    ids = torch.zeros(*positions.shape, 3, dtype=torch.long)
    ids[..., 0] = positions + 1
    word_freqs = torch.stack([transformer.rope_embedder(row) for row in ids])
    words = transformer.cap_embedder(tokens)
    for layer in transformer.context_refiner:  # no modulation: the words attend to the words
        q, k, v = _z_qkv(layer.attention, layer.attention_norm1(words), word_freqs)
        out = _attend(q, k, v, keep)
        words = words + layer.attention_norm2(layer.attention.to_out[0](out))
        words = words + layer.ffn_norm2(layer.feed_forward(layer.ffn_norm1(words)))
    maps = []
    for i in range(max(layers) + 1):
        layer = transformer.layers[i]
        x, mask, freqs, adaln = layer_inputs[i][:4]
        attn = layer.attention
        scale_msa, gate_msa, scale_mlp, gate_mlp = layer.adaLN_modulation(adaln)[:, None].chunk(4, -1)
        q, k, v = _z_qkv(attn, layer.attention_norm1(x) * (1 + scale_msa), freqs)
        image_out = _attend(q, k, v, mask)[:, :n_img]
        wq, wk, wv = _z_qkv(attn, layer.attention_norm1(words) * (1 + scale_msa), word_freqs)
        words_out = _attend_words(wq, wk, wv, k[:, :n_img], v[:, :n_img], keep)
        if i in layers:
            maps.append(_word_map(words_out, image_out, groups))
        words = words + gate_msa.tanh() * layer.attention_norm2(attn.to_out[0](words_out))
        ffn = layer.feed_forward(layer.ffn_norm1(words) * (1 + scale_mlp))
        words = words + gate_mlp.tanh() * layer.ffn_norm2(ffn)
    return torch.stack(maps).mean(0)
