"""The capture processor: equal to a naive full computation, attn2 only, processors restored."""

import torch
from diffusers.models.attention_processor import AttnProcessor
from naive_attention import StoreCrossAttention, naive_map

from factory.method.attention import capture_concept_attention, cross_attention_names
from factory.method.prompts import encode_prompts, token_weight_matrix


def _inputs(pipe, prompts, words):
    emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    w = token_weight_matrix(pipe.tokenizer, prompts, words)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(len(prompts), 4, 16, 16, generator=g)
    return emb, w, z


def test_capture_equals_naive_full_computation(toyworld_pipe):
    pipe = toyworld_pipe
    prompts = ["a photo of a star", "a photo of a red ring on a striped background"]
    emb, w, z = _inputs(pipe, prompts, [["star"], ["red", "ring"]])
    ts = [torch.tensor([781, 781]), torch.tensor([21, 21])]
    with torch.no_grad(), capture_concept_attention(pipe.unet, w, 16) as acc:
        outs_capture = [pipe.unet(z, t, encoder_hidden_states=emb).sample for t in ts]
    got = acc.mean()

    store = []
    original = dict(pipe.unet.attn_processors)
    naive = StoreCrossAttention(store)
    pipe.unet.set_attn_processor(
        {n: (naive if n.endswith("attn2.processor") else p) for n, p in original.items()}
    )
    try:
        with torch.no_grad():
            outs_naive = [pipe.unet(z, t, encoder_hidden_states=emb).sample for t in ts]
    finally:
        pipe.unet.set_attn_processor(original)
    expected = naive_map(store, w, 16)  # every token kept, selected afterwards
    assert len(store) == acc.count == 2 * len(cross_attention_names(pipe.unet))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    for a, b in zip(outs_capture, outs_naive, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_only_cross_attention_is_replaced_and_everything_is_restored(toyworld_pipe):
    unet = toyworld_pipe.unet
    before = dict(unet.attn_processors)
    w = torch.zeros(1, toyworld_pipe.tokenizer.model_max_length)
    with capture_concept_attention(unet, w, 16):
        during = unet.attn_processors
        for name, proc in during.items():
            if name.endswith("attn2.processor"):
                assert type(proc).__name__ == "ConceptAttnProcessor"
            else:
                assert proc is before[name], "self-attention must keep its fast (SDPA) processor"
    after = unet.attn_processors
    assert all(after[n] is before[n] for n in before)


def test_processors_restored_after_an_exception(toyworld_pipe):
    unet = toyworld_pipe.unet
    before = dict(unet.attn_processors)
    try:
        with capture_concept_attention(unet, torch.zeros(1, 16), 16):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(unet.attn_processors[n] is before[n] for n in before)


def test_capture_memory_does_not_grow_with_steps(toyworld_pipe):
    pipe = toyworld_pipe
    emb, w, z = _inputs(pipe, ["a photo of a star"], [["star"]])
    with torch.no_grad(), capture_concept_attention(pipe.unet, w, 16) as acc:
        for t in (1, 21, 41, 61):
            pipe.unet(z, torch.tensor([t]), encoder_hidden_states=emb)
        assert acc.total.shape == (1, 16, 16)
    assert acc.count == 4 * len(cross_attention_names(pipe.unet))


def test_capture_processor_matches_default_processor_output(toyworld_pipe):
    """Installing the capture processor does not change what the UNet computes."""
    pipe = toyworld_pipe
    emb, w, z = _inputs(pipe, ["a photo of a heart"], [["heart"]])
    with torch.no_grad():
        ref = pipe.unet(z, torch.tensor([500]), encoder_hidden_states=emb).sample
        with capture_concept_attention(pipe.unet, w, 16):
            got = pipe.unet(z, torch.tensor([500]), encoder_hidden_states=emb).sample
        original = dict(pipe.unet.attn_processors)
        pipe.unet.set_attn_processor(AttnProcessor())
        plain = pipe.unet(z, torch.tensor([500]), encoder_hidden_states=emb).sample
        pipe.unet.set_attn_processor(original)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)
