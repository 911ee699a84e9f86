import pytest
from transformers import CLIPTokenizer

from factory.method.prompts import ConceptTokenError, concept_token_indices, token_weight_matrix
from factory.toyworld.tokenizer import write_clip_tokenizer
from factory.toyworld.world import vocabulary


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("t"), vocabulary(), 16))


def test_single_word_is_token_five(tok):
    assert concept_token_indices(tok, "a photo of a star", "star") == [5]


def test_several_words_are_all_selected(tok):
    idx = concept_token_indices(tok, "a photo of a red star on a striped background", ["red", "star"])
    assert idx == [5, 6]


def test_word_split_into_several_tokens(tok):
    # "human" is not in the toyworld grammar, so it becomes several character-level pieces
    pieces = tok("human", add_special_tokens=False).input_ids
    assert len(pieces) > 1
    idx = concept_token_indices(tok, "a photo of a human", ["human"])
    assert idx == list(range(5, 5 + len(pieces)))
    w = token_weight_matrix(tok, ["a photo of a human", "a photo of a ring"], [["human"], ["ring"]])
    assert w.shape == (2, 16) and w[0].sum() == len(pieces) and w[1].tolist().index(1.0) == 5


def test_absent_word_is_an_error_before_any_work(tok):
    with pytest.raises(ConceptTokenError, match="does not occur in the prompt"):
        concept_token_indices(tok, "a photo of a star", "ring")
    with pytest.raises(ConceptTokenError, match="does not occur"):
        concept_token_indices(tok, "a photo of a starfish", "star")  # whole words only


def test_word_beyond_the_token_window_is_an_error(tok):
    prompt = "a photo of a " + "very " * 20 + "star"
    with pytest.raises(ConceptTokenError, match="beyond the tokenizer's 16 positions"):
        concept_token_indices(tok, prompt, "star")


def test_a_weight_width_bounds_the_concept_positions(tok):
    """`width`: the text positions a model reads (Z-Image's caption), below the tokenizer's own length."""
    w = token_weight_matrix(tok, ["a photo of a star"], [["star"]], width=8)
    assert w.shape == (1, 8) and w[0].nonzero().flatten().tolist() == [5]
    with pytest.raises(ConceptTokenError, match="beyond the model's 5 text positions"):
        token_weight_matrix(tok, ["a photo of a star"], [["star"]], width=5)
