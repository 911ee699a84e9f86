"""Prompt variety (generate mode): each sample's prompt drawn from its concept's templates and attribute
values, or its listed prompts, by the sample's seed alone; the config checks; the preflight's token check of
every expansion; a generate job whose samples carry their drawn prompts."""

import collections
import json

import pytest

from factory.dataset.config import ConceptConfig, load_config
from factory.dataset.preflight import PromptError, check_prompts
from factory.dataset.prompt_variety import concept_for_sample, every_prompt
from factory.yaml_config import ConfigError

DIVERSE = {
    "name": "star",
    "templates": ["a photo of a {color} {concept} on a {background} background", "a {color} {concept}"],
    "attributes": {"color": ["red", "green", "blue"], "background": ["striped", "dotted"]},
}


def test_a_samples_prompt_depends_on_its_seed_alone_and_covers_every_value():
    c = ConceptConfig(**DIVERSE)
    drawn = [concept_for_sample(c, seed) for seed in range(600)]
    assert [concept_for_sample(c, seed) for seed in range(600)] == drawn  # the same draws again
    prompts = [concept.prompt for concept, _ in drawn]
    assert set(prompts) == {x.prompt for x in every_prompt(c)} - {
        "a photo of a star"
    }  # all 9, not `template`
    counts = collections.Counter(values["color"] for _, values in drawn)
    assert set(counts) == {"red", "green", "blue"} and min(counts.values()) > 150  # about 200 each
    short = [p for p in prompts if p.startswith("a ") and "photo" not in p]
    assert 240 < len(short) < 360  # each template about half the time
    concept, values = drawn[0]
    assert concept.token_words == ["star"] and concept.prompt == concept.template.format(concept="star")
    assert concept.prompt.split()[-1] in ("star", "background") and values["color"] in concept.prompt
    # without variety, the concept's one template; label mode always uses it
    plain = ConceptConfig(name="star")
    assert concept_for_sample(plain, 5) == (plain.to_concept(), {})
    listed = ConceptConfig(name="fire truck", prompts=["a red fire truck", "a fire truck at night"])
    assert {concept_for_sample(listed, s)[0].prompt for s in range(50)} == {
        "a red fire truck",
        "a fire truck at night",
    }
    assert len(list(every_prompt(ConceptConfig(**DIVERSE)))) == 3 * 2 + 3 + 1


@pytest.mark.parametrize(
    "change, error",
    [
        ({"templates": ["a {colour} {concept}"]}, "fields \\['colour'\\] that are not in attributes"),
        (
            {"attributes": {**DIVERSE["attributes"], "size": ["big"]}},
            "attributes \\['size'\\] appear in no template",
        ),
        ({"attributes": {"color": [], "background": ["dotted"]}}, "attribute 'color' needs one or more"),
        ({"prompts": ["a star"]}, "either prompts or templates"),
        ({"templates": [], "prompts": []}, "attributes fill the fields of `templates`"),
        ({"templates": ["a {color {concept}"]}, "template 'a \\{color \\{concept\\}'"),
    ],
)
def test_bad_prompt_variety_is_a_config_error(change, error):
    with pytest.raises(ValueError, match=error):
        ConceptConfig(**{**DIVERSE, **change})


def test_the_preflight_checks_every_expanded_prompt(tmp_path):
    base = ["configs/toyworld.yaml", f"output.uri={tmp_path}"]
    good = {**DIVERSE, "samples": 2}
    check_prompts(load_config(base[0], [base[1], f"concepts=[{json.dumps(good)}]"]))
    # one template of two drops the concept: the error names that expansion
    bad = {**good, "templates": [DIVERSE["templates"][0], "a {color} shape"]}
    with pytest.raises(
        PromptError, match="concept 'star': concept word 'star' does not occur in the prompt 'a red shape'"
    ):
        check_prompts(load_config(base[0], [base[1], f"concepts=[{json.dumps(bad)}]"]))
    with pytest.raises(ConfigError, match="a plain prompt has no fields"):
        load_config(base[0], [base[1], 'concepts=[{name: star, prompts: ["a {color} star"]}]'])


@pytest.mark.integration
def test_a_generate_job_draws_each_samples_prompt_and_records_it(tmp_path, local_ray, short_job):
    from factory.dataset.pipeline import run_job
    from factory.dataset.shards import ShardStore

    concept = {**DIVERSE, "samples": 4}
    cfg = load_config(
        "configs/toyworld.yaml",
        [
            f"output.uri={tmp_path / 'out'}",
            f"concepts=[{json.dumps(concept)}]",
            "output.samples_per_shard=4",
            *short_job,
        ],
    )
    assert run_job(cfg, "generate", progress=False)["complete"]
    samples = ShardStore(str(tmp_path / "out")).read_shard("shard-000000.tar")
    metas = [json.loads(s["json"]) for s in samples]
    assert len(metas) == 4
    c = cfg.concepts[0]
    for meta in metas:
        concept, values = concept_for_sample(c, meta["seed"])
        assert meta["prompt"] == concept.prompt and meta["prompt_attributes"] == values
    assert len({m["prompt"] for m in metas}) > 1  # four seeds, nine prompts
