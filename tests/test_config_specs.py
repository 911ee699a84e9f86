import pytest

from factory.dataset.config import ConfigError, load_config
from factory.dataset.specs import generation_shards, label_shards

TOY = "configs/toyworld.yaml"


def test_all_shipped_configs_validate():
    import glob

    files = sorted(glob.glob("configs/*.yaml"))
    assert len(files) >= 6
    for f in files:
        if "deepspeed" in f or "finetune" in f or "students" in f:
            continue
        cfg = load_config(f)
        assert cfg.concepts and cfg.output.uri
    human = load_config("configs/sd15-human.yaml").concepts[0]
    assert human.words == ["human", "arms", "legs"] and "arms and legs" in human.to_concept().prompt


def test_set_overrides_by_dotted_path():
    cfg = load_config(
        TOY, ["output.uri=/tmp/x", "concepts.1.samples=7", "sampler.guidance_scale=1.5", "masks.rule=otsu"]
    )
    assert cfg.output.uri == "/tmp/x" and cfg.concepts[1].samples == 7
    assert cfg.sampler.guidance_scale == 1.5 and cfg.distill_config().mask_rule == "otsu"


def test_invalid_configs_list_every_problem():
    with pytest.raises(ConfigError) as err:
        load_config(TOY, ["resources.actors=0", "bogus=1", "masks.rule=median"])
    msg = str(err.value)
    assert "resources.actors" in msg and "bogus" in msg and "masks.rule" in msg
    with pytest.raises(ConfigError, match="probe_t0"):
        load_config(TOY, ["sampler.probe_t0=99"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(TOY, ["output.uri"])
    with pytest.raises(ConfigError, match="index"):
        load_config(TOY, ["concepts.9.samples=1"])


def test_specs_are_deterministic_and_sharded():
    cfg = load_config(TOY, ["output.samples_per_shard=4"])
    a, b = generation_shards(cfg), generation_shards(cfg)
    assert a == b
    total = sum(c.samples for c in cfg.concepts)
    assert sum(len(t) for t in a) == total and len(a) == -(-total // 4)
    assert [t.name for t in a[:2]] == ["shard-000000", "shard-000001"]
    keys = [s["key"] for t in a for s in t.samples(cfg)]
    assert len(set(keys)) == total and keys[0] == "circle-00000000"
    seeds = [s["seed"] for t in a for s in t.samples(cfg)]
    assert len(set(seeds)) == total  # distinct seeds
    other_cfg = load_config(TOY, ["output.samples_per_shard=4", "seed=1"])
    other = generation_shards(other_cfg)
    assert [s["seed"] for s in other[0].samples(other_cfg)] != [s["seed"] for s in a[0].samples(cfg)]


def test_label_specs_key_by_file_name():
    cfg = load_config(TOY, ["output.samples_per_shard=2", "concepts=[{name: star}]"])
    shards = label_shards(cfg, ["/d/b.png", "/d/a.jpg", "/e/a.png"])
    keys = [s["key"] for t in shards for s in t.samples(cfg)]
    assert keys[0] == "star-a" and len(set(keys)) == 3 and shards[0].samples(cfg)[0]["source"] == "/d/a.jpg"
