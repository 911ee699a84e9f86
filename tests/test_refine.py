"""`factory refine` (refine mode): a label output's samples drafted again from their stored concept maps,
with the job's inpainting model, without probing the model again: the paper's relabelling with m' of what
m labelled (issue 33, item 5). On real Ray, on toyworld."""

import numpy as np
import pytest
import torch

from factory.dataset.config import load_config
from factory.dataset.pipeline import run_job
from factory.dataset.shards import ShardStore, decode_member
from factory.dataset.sources import list_images
from factory.method.distiller import Distiller
from factory.method.settings import Concept, SampleSpec
from factory.toyworld.world import write_split
from factory.yaml_config import ConfigError

pytestmark = pytest.mark.integration


def _job(out, *extra):
    return load_config(
        "configs/toyworld-label.yaml",
        [f"output.uri={out}", "output.samples_per_shard=3", "output.report_samples=0", *extra],
    )


def _samples(uri) -> dict[str, dict]:
    store = ShardStore(str(uri))
    names = [s["name"] for s in store.read_json("manifest.json")["shards"]]
    return {r["__key__"]: r for n in names for r in store.read_shard(n)}


def test_refine_drafts_a_label_output_again_from_its_maps(tmp_path, local_ray, short_job):
    write_split(tmp_path / "split", range(2_000_000_000, 2_000_000_006), concept="star")
    keys = ("sampler.steps", "sampler.probe_t0", "inpaint.steps", "filters.reject_edgeless")
    steps = [s for s in short_job if s.split("=")[0] in keys]  # and no filter that could reject a sample
    source = tmp_path / "label"
    run_job(_job(source, *steps), "label", list_images(str(tmp_path / "split" / "images")), progress=False)
    refined = tmp_path / "refined"
    # m' here is the model itself (the mechanics; tests/test_finetune.py makes a real m')
    cfg = _job(refined, *steps, "inpaint.model=toyworld", f"input.refine_from={source}")
    summary = run_job(cfg, "refine", progress=False)
    assert summary["complete"]
    a, b = _samples(source), _samples(refined)
    assert a.keys() == b.keys() and len(a) == 6
    assert ShardStore(str(refined)).read_json("manifest.json")["expected_shards"] == 2  # the source's shards
    reference = Distiller("toyworld", config=cfg.distill_config(), inpaint_model="toyworld")
    threads = torch.get_num_threads()
    # as many threads as the job's actor had (GenerateShard): the same float reductions in its inpainting
    torch.set_num_threads(cfg.resources.actor_threads)
    try:
        for key, ra in a.items():
            rb = b[key]
            ma, mb = decode_member("json", ra["json"]), decode_member("json", rb["json"])
            # the same image, concept map and M_pre: nothing was probed again
            assert all(ra[m] == rb[m] for m in ("png", "prelim.png", "attn.npy"))
            assert (mb["seed"], mb["prompt"], mb["source"]) == (ma["seed"], ma["prompt"], ma["source"])
            assert mb["inpaint_model"] == "toyworld"
            assert mb["refined_from"] == {"output": str(source), "mode": "label"}
            assert "attention_s" not in mb["timings"] and "attention_s" in ma["timings"]
            # exactly what the Distiller drafts from the stored map (one sample a call, as on the CPU)
            spec = SampleSpec(Concept("star", ma["prompt"]), ma["seed"], key)
            image, attention = decode_member("png", ra["png"]), decode_member("attn.npy", ra["attn.npy"])
            [draft] = reference.draft(reference.with_maps([image], [attention], [spec]))
            assert np.array_equal(draft.finish().mask, decode_member("mask.png", rb["mask.png"]) > 127), key
    finally:
        torch.set_num_threads(threads)
    # run again: everything is committed, nothing is drafted
    again = run_job(cfg, "refine", progress=False)
    assert again["complete"] and _samples(refined).keys() == b.keys()

    # a source made by another model is refused before Ray starts, as is refine mode without a source
    with pytest.raises(ConfigError, match="made otherwise: model 'toyworld-dit'"):
        other = _job(tmp_path / "x", "model=toyworld-dit", f"input.refine_from={source}")
        run_job(other, "refine", progress=False)
    with pytest.raises(ConfigError, match="refine mode needs its source output"):
        run_job(_job(tmp_path / "y"), "refine", progress=False)
