"""The paper's tables pipeline at test size: every stage runs for real (label, fine-tune, generate, students,
evaluation) on a few toyworld images, and the rows come out scored and ordered."""

import json
import math

import pytest

from trainers.toyworld.tables import (
    NO_FINETUNE,
    ONE_STUDENT,
    PAPER_CUB,
    SNAPPED_PRELIM,
    SNAPPED_REFINED,
    TablesConfig,
    main,
    markdown,
    mean_over_seeds,
    run_tables,
    student_folder,
    write_docs,
)


@pytest.mark.slow
def test_small_tables_pipeline_end_to_end(tmp_path, local_ray):
    cfg = TablesConfig.small(str(tmp_path / "tables"))
    cfg.student_seeds = [0, 1]
    table = run_tables(cfg)
    # resumable: a second run skips every finished stage, and rescoring gives the same table
    again = run_tables(cfg)
    assert again["rows"]["GrabCut"] == table["rows"]["GrabCut"]
    assert again["rows"]["student on D_s"] == table["rows"]["student on D_s"]
    rows = table["rows"]
    assert set(PAPER_CUB) <= set(rows) and {NO_FINETUNE, SNAPPED_PRELIM, SNAPPED_REFINED} <= set(rows)
    for name, m in rows.items():
        assert all(0.0 <= m[k] <= 1.0 and math.isfinite(m[k]) for k in ("acc", "iou", "miou")), name
    # Low bars that still catch breakage. At this size (12 images, 100 student steps from scratch) students do
    # not beat GrabCut (the full run, `make tables`, is where they are compared); they must have learned a
    # non-empty foreground. The method's own masks must beat both M_pre and GrabCut.
    assert (
        rows["refined M"]["iou"] > rows["M_pre"]["iou"] and rows["refined M"]["iou"] > rows["GrabCut"]["iou"]
    )
    # both mask rules are scored on the same images (the comparison itself is the full run's)
    assert rows[SNAPPED_REFINED] != rows["refined M"] and rows[SNAPPED_PRELIM] != rows["M_pre"]
    assert table["attention_auc"] > 0.8
    for name in ("supervised student (GT masks)", "student on D_s", "student on D_s u D'_s", ONE_STUDENT):
        assert rows[name]["iou"] > 0.05, name
        # two student seeds: two trained sets of students, and the row is their mean
        assert len(rows[name]["seed_ious"]) == 2 and rows[name]["iou"] == pytest.approx(
            sum(rows[name]["seed_ious"]) / 2
        )
    # both seeds' students of a set came from one run (train.seeds), each seed in its own folder
    summary = json.loads((tmp_path / "tables" / "students-ds" / "students.json").read_text())
    assert sorted((s["student"], s["seed"]) for s in summary["students"]) == [
        (c, seed) for c in sorted(cfg.concepts) for seed in (0, 1)
    ]
    assert (tmp_path / "tables" / "students-ds" / "seed1" / "star" / "best.ts").exists()
    # one multi-class student per seed for every concept, both seeds in one run, twice a student's steps
    one = json.loads((tmp_path / "tables" / "students-ds-one" / "students.json").read_text())
    assert sorted((s["student"], s["seed"]) for s in one["students"]) == [
        ("multiclass", 0),
        ("multiclass", 1),
    ]
    assert {s["metrics"]["step"] for s in one["students"]} == {2 * cfg.student_steps}
    out = tmp_path / "tables"
    assert (out / "figure.png").exists() and "student on D_s u D'_s" in (out / "table.md").read_text()
    # D_s is stage 2's labels refined with m' (`factory refine`): m's concept maps, m' inpainting
    from factory.dataset.shards import ShardStore, decode_member

    [label] = ShardStore(str(out / "label-star")).read_first("shard-000000.tar", 1)
    [ds] = ShardStore(str(out / "ds-star")).read_first("shard-000000.tar", 1)
    meta = decode_member("json", ds["json"])
    assert ds["__key__"] == label["__key__"] and ds["attn.npy"] == label["attn.npy"]
    assert meta["refined_from"]["output"] == str(out / "label-star")
    assert meta["inpaint_model"] == "toyworld-ft"


def test_student_rows_over_seeds(tmp_path):
    a, b = {"acc": 0.9, "iou": 0.4, "miou": 0.6}, {"acc": 0.8, "iou": 0.5, "miou": 0.7}
    assert mean_over_seeds([a]) is a  # one seed: the row as it was, no spread claimed
    m = mean_over_seeds([a, b])
    assert (
        m["acc"] == pytest.approx(0.85) and m["iou"] == pytest.approx(0.45) and m["seed_ious"] == [0.4, 0.5]
    )
    assert m["iou_sd"] == pytest.approx(0.0707, abs=1e-4)  # sample standard deviation
    assert student_folder("ds-syn", 2) == "students-ds-syn/seed2"
    from dataclasses import asdict

    table = {
        "config": asdict(TablesConfig(student_seeds=[0, 1])),
        "rows": {"student on D_s": m, "GrabCut": a},
        "n_test": 2,
        "attention_auc": 0.9,
        "object_kept": {"m": 0.5, "mprime": 0.1, "m_changed": 0.4, "mprime_changed": 0.8},
    }
    md = markdown(table)
    assert "| student on D_s | 85.0 | 45.0 ± 7.1 | 65.0 |" in md and "| GrabCut | 90.0 | 40.0 | 60.0 |" in md
    assert "mean over student seeds 0, 1" in md
    # the docs page: the command that made it, the commit, the wall time, which stages were reused, the table
    page = tmp_path / "docs" / "tables.md"
    write_docs({**table, "total_s": 4530.0, "reused_stages": ["3 fine-tune m'"]}, md, page, "make tables")
    text = page.read_text()
    assert "```bash\nmake tables\n```" in text and "wall time 75.5 min" in text
    assert "stages reused from an earlier run: 3 fine-tune m'" in text and text.endswith(md)
    assert text.startswith("# ") and "\nCommit " in text  # a short hash, or "unknown" without git
    from factory.yaml_config import ConfigError

    with pytest.raises(ConfigError, match="integers"):  # a UserError: `trainers` prints one line, exit 2
        main(["--student-seeds", "0,x"])


def test_a_stage_runs_alone_and_is_reused_once_done(tmp_path):
    from trainers.toyworld.tables import ground_truth_shards, write_splits

    cfg = TablesConfig.small(str(tmp_path))
    cfg.concepts, cfg.n_train, cfg.n_test = ["star"], 3, 2
    assert write_splits(cfg, tmp_path) is True and write_splits(cfg, tmp_path) is False
    captions = (tmp_path / "train-star" / "captions.jsonl").read_text().splitlines()
    assert (
        len(captions) == 3 and len((tmp_path / "test-star" / "captions.jsonl").read_text().splitlines()) == 2
    )
    assert ground_truth_shards(cfg, tmp_path) is True and ground_truth_shards(cfg, tmp_path) is False
    assert (tmp_path / "gt-star" / "gt-000000.tar").exists()
