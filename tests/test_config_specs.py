import pytest

from factory.dataset.config import load_config
from factory.dataset.specs import generation_shards, label_shards
from factory.yaml_config import ConfigError, with_values

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


def test_loading_a_job_yaml_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from factory.dataset.config import load_config, method_config; "
        "load_config('configs/toyworld.yaml', ['masks.rule=otsu']); method_config(['masks.edges=none']); "
        "from trainers.finetune.config import load_finetune_config; "
        "load_finetune_config('configs/finetune-toyworld.yaml'); "
        "from trainers.students.config import load_students_config; "
        "load_students_config('configs/students-toyworld.yaml'); "
        # the part writers and the shard assembly: every writer process of a job imports them (issue 31)
        "import factory.dataset.writers; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_axis_has_one_registry_that_the_config_and_the_code_share():
    from typing import get_args

    from factory.dataset.config import JobConfig
    from factory.method.edges import EDGES
    from factory.method.masks import RULES
    from factory.method.schedulers import SCHEDULERS
    from factory.method.settings import DistillConfig
    from factory.registry import UnknownChoiceError

    fields = JobConfig.model_fields
    choices = {
        "masks.rule": (fields["masks"].annotation.model_fields["rule"].annotation, RULES),
        "masks.edges": (fields["masks"].annotation.model_fields["edges"].annotation, EDGES),
        "sampler.scheduler": (fields["sampler"].annotation.model_fields["scheduler"].annotation, SCHEDULERS),
        "inpaint.scheduler": (fields["inpaint"].annotation.model_fields["scheduler"].annotation, SCHEDULERS),
    }
    for key, (literal, registry) in choices.items():
        assert get_args(literal) == registry.names(), key
    # one message for an unknown name, wherever it is checked: the Python API and the lookup alike
    for kwargs, registry in [({"mask_rule": "median"}, RULES), ({"edges": "crf"}, EDGES)]:
        with pytest.raises(UnknownChoiceError, match=f"unknown {registry.axis} .*choose one of") as a:
            DistillConfig(**kwargs)
        with pytest.raises(UnknownChoiceError) as b:
            registry[next(iter(kwargs.values()))]
        assert str(a.value) == str(b.value)
    with pytest.raises(ValueError, match="registered twice"):
        RULES.register("gmm", lambda v: v)


def test_method_settings_take_a_jobs_keys_on_every_command(tmp_path):
    from factory.dataset.config import method_config
    from trainers.cli import main

    cfg = method_config(["masks.edges=none", "sampler.steps=20", "sampler.probe_t0=16", "masks.rule=otsu"])
    assert (cfg.edges, cfg.num_inference_steps, cfg.probe_t0, cfg.mask_rule) == ("none", 20, 16, "otsu")
    with pytest.raises(ConfigError, match="masks.edgez"):
        method_config(["masks.edgez=none"])
    with pytest.raises(ConfigError, match="probe_t0"):
        method_config(["sampler.steps=10"])
    with pytest.raises(ConfigError, match="--inpaint-model"):
        method_config(["inpaint.model=/models/m-prime"])
    # the commands: a bad key is one line and exit 2, before any model loads or Ray starts
    split = str(tmp_path / "no-split-needed")
    for argv in (
        ["evaluate-masks", "--split", split, "--set", "masks.edges=crf"],
        ["scheduler-sweep", "--split", split, "--set", "edges=none"],
        ["scheduler-sweep", "--split", split, "--grid", "dpm:15"],
        ["toyworld-tables", "--out", str(tmp_path / "t"), "--set", "sampler.probe_t0=99"],
    ):
        assert main(argv) == 2, argv
    assert not (tmp_path / "t").exists()


def test_one_command_hands_another_typed_settings():
    from trainers.students.config import load_students_config

    base = load_students_config("configs/students-toyworld.yaml")
    cfg = with_values(base, {"train.seeds": [3, 4], "data.shards": ["a", "b"], "model.backbone": "resnet18"})
    assert cfg.train.seeds == [3, 4] and cfg.data.shards == ["a", "b"] and cfg.model.backbone == "resnet18"
    assert base.train.seeds != [3, 4]  # a copy
    with pytest.raises(ConfigError, match="train.steps"):
        with_values(base, {"train.steps": 0})
