import pytest
from transformers import CLIPTokenizer

from factory.toyworld.tokenizer import learn_merges, write_clip_tokenizer
from factory.toyworld.world import vocabulary


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(tmp_path_factory.mktemp("tok"), vocabulary(), 16)
    )


def test_vocabulary_is_complete(tokenizer):
    # transformers 5 can silently build a 2-token CLIP tokenizer from v4-style arguments: check the size
    merges = learn_merges(vocabulary())
    assert len(tokenizer) == 512 + len(merges) + 2
    assert len(tokenizer) > 500


def test_every_grammar_word_is_one_token(tokenizer):
    for word in vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_concept_is_token_five_as_in_sd(tokenizer):
    ids = tokenizer("a photo of a star", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16
    assert tokenizer.convert_ids_to_tokens(ids[:7]) == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "star</w>",
        "<|endoftext|>",
    ]


def test_unknown_words_still_tokenize(tokenizer):
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("bird", add_special_tokens=False).input_ids)
    assert "".join(pieces).replace("</w>", "") == "bird"


# --- the toyworld DiT's T5 tokenizer ------------------------------------------------------------------------
def test_the_t5_tokenizer_spells_each_grammar_word_as_one_piece_and_refuses_others(tmp_path):
    from transformers import T5TokenizerFast

    from factory.toyworld.tokenizer import write_t5_tokenizer

    tok = T5TokenizerFast.from_pretrained(write_t5_tokenizer(tmp_path / "t5", vocabulary(), 16))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)  # T5's special ids
    assert len(tok) == 3 + len(vocabulary()) and tok.model_max_length == 16
    ids = tok("a photo of a star").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "\u2581a",
        "\u2581photo",
        "\u2581of",
        "\u2581a",
        "\u2581star",
        "</s>",
    ]
    for word in vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert tok("unicorn", add_special_tokens=False).input_ids == [tok.unk_token_id]
