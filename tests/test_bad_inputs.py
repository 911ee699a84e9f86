"""The bad-input corpus (tests/corpus/cases.yaml): images, configs and command lines, each with its expected
outcome. Every user mistake is a one-line error before any work; every bad image is counted, not a crash.
The tests print how many cases they tried and how many were handled as expected."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from factory.dataset.config import load_config
from factory.dataset.images import ImageRejected, read_image
from factory.dataset.preflight import preflight
from factory.errors import UserError
from factory.yaml_config import ConfigError

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "corpus"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())
BIN = Path(sys.executable).parent
MAX_PIXELS, MIN_SIDE = 4096, 16  # the toyworld model: 4 latent cells of 4 px


def _report(what: str, tried: int, handled: list[str]) -> None:
    print(f"\n[corpus] {what}: {tried} tried, {len(handled)} handled as expected")


def test_image_corpus_each_file_read_or_rejected_as_expected():
    handled, wrong = [], {}
    for name, expected in CASES["images"].items():
        try:
            image = read_image(str(CORPUS / "images" / name), MAX_PIXELS, MIN_SIDE)
            got = {"ok": list(image.shape[:2])}
            assert image.dtype == np.uint8 and image.shape[2] == 3
        except ImageRejected as err:
            got = {"reject": err.reason}
            assert str(err).startswith(err.reason + ":")
        (handled.append(name) if got == expected else wrong.setdefault(name, (expected, got)))
    _report("images", len(CASES["images"]), handled)
    assert not wrong


def test_images_are_read_as_the_user_sees_them():
    upright = read_image(str(CORPUS / "images" / "exif-rotated.jpg"), MAX_PIXELS, MIN_SIDE)
    bright_rows = np.where(upright.mean(2).max(1) > 240)[0]
    assert upright.shape[:2] == (48, 64) and bright_rows.max() < 40  # the disc sits in the upper part
    grey16 = read_image(str(CORPUS / "images" / "grey-16bit.png"), MAX_PIXELS, MIN_SIDE)
    assert grey16.min() == 0 and grey16.max() == 255 and len(np.unique(grey16)) > 200  # scaled, not clipped
    rgba = read_image(str(CORPUS / "images" / "rgba.png"), MAX_PIXELS, MIN_SIDE)
    assert (rgba[:, :24] == 255).all()  # fully transparent pixels are white, as a viewer shows them
    cmyk = read_image(str(CORPUS / "images" / "cmyk.jpg"), MAX_PIXELS, MIN_SIDE)
    good = read_image(str(CORPUS / "images" / "good.jpg"), MAX_PIXELS, MIN_SIDE)
    assert np.abs(cmyk.astype(int) - good.astype(int)).mean() < 12
    flt = read_image(str(CORPUS / "images" / "float.tiff"), MAX_PIXELS, MIN_SIDE)
    assert flt.min() == 0 and flt.max() == 255


def _expect_user_error(fn, message: str) -> str | None:
    try:
        fn()
    except UserError as err:
        return None if message in str(err) else f"wrong message: {err}"
    return "no error"


def test_config_and_preflight_corpus_each_a_clear_error_before_any_work(tmp_path):
    handled, wrong = [], {}
    for name, case in CASES["configs"].items():
        sets = [f"output.uri={tmp_path / name}", *case["set"]]
        if case["stage"] == "config":
            problem = _expect_user_error(
                lambda s=sets: load_config("configs/toyworld.yaml", s), case["error"]
            )
            try:
                load_config("configs/toyworld.yaml", sets)
            except ConfigError:
                pass
            else:
                problem = problem or "not refused by the schema"
        else:
            cfg = load_config("configs/toyworld.yaml", sets)  # valid schema: the preflight must catch it
            problem = _expect_user_error(lambda c=cfg: preflight(c, "generate"), case["error"])
        (handled.append(name) if problem is None else wrong.setdefault(name, problem))
    _report("configs", len(CASES["configs"]), handled)
    assert not wrong
    assert not any(p.name.startswith(".factory-probe") for p in tmp_path.rglob("*"))  # probes removed


def test_an_opencv_without_contrib_is_a_clear_error_before_any_model_loads(tmp_path, monkeypatch):
    # The first H200 run's image had opencv-python-headless (no cv2.ximgproc): `masks.edges: guided` failed
    # at Step 4b, after the GPU had generated a batch. Now the Distiller and the preflight refuse it first.
    import cv2

    from factory.method import distiller as distiller_module
    from factory.method.distiller import Distiller
    from factory.method.edges import EdgesUnavailable, check_edges_available
    from factory.method.settings import DistillConfig

    monkeypatch.delattr(cv2, "ximgproc")

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the edge mode was checked")

    monkeypatch.setattr(distiller_module, "load_pipeline", no_model)
    with pytest.raises(EdgesUnavailable, match="opencv-contrib-python-headless.*masks.edges: none"):
        Distiller("toyworld")
    cfg = load_config("configs/toyworld.yaml", [f"output.uri={tmp_path / 'out'}"])
    with pytest.raises(EdgesUnavailable, match=r"cv2\.ximgproc"):
        preflight(cfg, "generate")
    assert not (tmp_path / "out").exists()  # refused before the output's write probe
    # the paper's rule needs no contrib: its preflight passes, its Distiller goes on to load the model
    check_edges_available("none")
    paper = load_config("configs/toyworld.yaml", [f"output.uri={tmp_path / 'out'}", "masks.edges=none"])
    preflight(paper, "generate")
    with pytest.raises(AssertionError, match="the model loaded"):
        Distiller("toyworld", config=DistillConfig(edges="none"))


def _cli(*args, env=None):
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


@pytest.mark.integration
def test_command_lines_print_one_line_errors_without_tracebacks(tmp_path):
    out = f"output.uri={tmp_path / 'out'}"
    missing_model = [
        "factory",
        "generate",
        "configs/toyworld.yaml",
        "--set",
        "model=/nonexistent/sd",
        "--set",
        out,
    ]
    calls = [
        (["factory", "generate", "configs/toyworld.yaml", "--set", "sampler.stepz=3"], "sampler.stepz"),
        (
            ["factory", "generate", "configs/nonexistent.yaml"],
            "config file configs/nonexistent.yaml not found",
        ),
        (missing_model, "does not exist"),
        (
            ["factory", "label", "configs/toyworld-label.yaml", "--input", str(tmp_path / "none")],
            "no images at",
        ),
        (["trainers", "finetune", "configs/finetune-toyworld.yaml", "--set", "train.lr=-1"], "train.lr"),
    ]
    handled = []
    for argv, message in calls:
        r = _cli(*argv)
        prog = " ".join(argv[:2]) if argv[0] == "trainers" else "factory"
        ok = (
            r.returncode == 2
            and r.stderr.strip().splitlines()[0].startswith(f"{prog}: error:")
            and message in r.stderr
            and "Traceback" not in r.stderr + r.stdout
        )
        assert ok, (argv, r.returncode, r.stderr[-2000:])
        handled.append(argv)
    debug = _cli(*missing_model, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ModelLoadError" in debug.stderr
    _report("command lines", len(calls) + 1, [*handled, "--debug"])


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    from factory.cli import main

    out = tmp_path / "never-written"
    rc = main(["generate", "configs/toyworld.yaml", "--dry-run", "--set", f"output.uri={out}"])
    text = capsys.readouterr().out
    assert (
        rc == 0
        and "6 shards (300 samples) planned" in text
        and "6 shards (300 samples) would be produced" in text
    )
    assert "star: 50 samples to produce" in text and not out.exists()


@pytest.mark.integration
def test_label_job_over_the_whole_image_corpus(tmp_path, local_ray):
    """Every corpus image through a real label job: counted by reason, masks the size of the written image."""

    from factory.dataset.pipeline import run_job
    from factory.dataset.shards import ShardStore
    from factory.dataset.sources import list_images

    cfg = load_config(
        "configs/toyworld-label.yaml",
        [
            f"output.uri={tmp_path / 'out'}",
            "input.max_pixels=4096",
            "sampler.steps=6",
            "sampler.probe_t0=4",
            "inpaint.steps=6",
            "output.samples_per_shard=8",
            "filters.min_area=0.0",
            "filters.max_area=1.0",
            "filters.min_bimodality=0.0",
            "resources.actors=1",
        ],
    )
    sources = list_images(str(CORPUS / "images"))
    summary = run_job(cfg, "label", sources, progress=False)
    expected_rejects = {}
    for case in CASES["images"].values():
        if "reject" in case:
            expected_rejects[case["reject"]] = expected_rejects.get(case["reject"], 0) + 1
    assert len(sources) == len(CASES["images"])
    assert summary["complete"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    rejected = manifest["totals"]["rejected"]
    assert {k: v for k, v in rejected.items() if k in expected_rejects} == expected_rejects
    assert manifest["totals"]["written"] + sum(rejected.values()) == len(sources)
    store = ShardStore(str(tmp_path / "out"))
    import io

    from PIL import Image

    keys = []
    for shard in manifest["shards"]:
        for s in store.read_shard(shard["name"]):
            keys.append(s["__key__"])
            image = np.asarray(Image.open(io.BytesIO(s[next(k for k in ("png", "jpg") if k in s)])))
            mask = np.asarray(Image.open(io.BytesIO(s["mask.png"])))
            assert image.shape[:2] == mask.shape[:2]
            if "exif" in s["__key__"]:
                assert image.shape[:2] == (48, 64)  # written upright
    assert all(k.replace("-", "").replace("_", "").isalnum() for k in keys), keys
    assert len(keys) == len(set(keys))
    # handled: written with a matching mask, or counted under the reason the corpus expects
    counted = [reason for reason, n in expected_rejects.items() for _ in range(n)]
    others = [reason for reason, n in rejected.items() if reason not in expected_rejects for _ in range(n)]
    _report("label job", len(sources), keys + counted + others)
