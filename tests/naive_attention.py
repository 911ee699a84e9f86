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


def naive_map(store, weights, size):
    maps = []
    for probs in store:  # (b, heads, queries, tokens)
        side = int(probs.shape[2] ** 0.5)
        sel = (probs.mean(1) * weights[:, None, :]).sum(-1).view(-1, 1, side, side)
        maps.append(F.interpolate(sel, size=size, mode="nearest")[:, 0])
    return torch.stack(maps).mean(0)
