"""`factory bench`: what a triplet costs next to one plain diffusers generation, side by side in one run.

    factory bench                                          # toyworld, on whatever device this machine has
    factory bench --model sd15-arch --steps 2 --repeats 2  # SD 1.5's architecture, random weights, 512 px
    factory bench --model sd15-arch --device cuda --dtype bf16 --steps 50 --batch 8 --compile --out b.json

Every figure comes from the same process, and the measurements are interleaved: each repeat runs the
plain pipeline, the triplet and both capture loops in turn, so a machine that slows down mid-run slows all
of them. Per-sample times are medians over the repeats; the first call of each (warm-up, and compilation
with --compile) is timed apart and not counted.

The JSON's keys (also printed as a table; docs/benchmarks.md has them with measured values):

- `machine`: device name, CPU count, torch threads, library versions.
- `settings`: model, family, the denoiser's (UNet's or MMDiT's) parameters as `unet_params`, resolution,
  steps, probe_t0, inpainting steps, guidance, batch,
  repeats, sampler, dtype, compile, channels_last, concept.
- `plain_s_per_image`: diffusers' own `StableDiffusionPipeline.__call__` on the same modules and sampler at
  the same steps, resolution, batch and guidance, decoded to pixels.
- `plain_cfg_s_per_image`: the same at guidance 7.5 (two UNet passes a step), what users usually run.
- `triplet_s_per_sample`: `Distiller.synthesize`: synthesis with in-loop capture, M_pre, background
  inpainting, both decodes, the refined mask.
- `triplet_over_plain`: the two above at equal steps and guidance; the FLOP floor is about 2.0.
- `stages_s_per_sample`: the triplet's own stage timings (`Triplet.meta["timings"]`, synced on a GPU).
- `actor_cpu_s_per_sample`: what a job's GPU actor spends per sample on the CPU besides the model calls
  (M_pre and the drafts: `prelim_s` + `draft_s`); `writer_refine_s_per_sample`: Steps 5-6 (`refine_s`),
  which a job runs in its CPU writer tasks.
- `capture`: the synthesis loop alone (the prompt encoded beforehand) with the attention capture on and
  off; `overhead` = on / off - 1 for the default readout (`image_to_text`), `by_readout` for each readout
  the family serves (FLUX: `concept_output` too, on its default layers).
- `encode_write_s_per_sample`, `encode_write_share`: image encoding and tar writing of the triplets (a
  writer task's work) per sample, and its share of triplet + write.
- `edges`: the guided-filter edge snapping of the refined mask (`masks.edges`, part of the refine stage)
  timed apart on the triplets' own masks: seconds per sample and its share of a triplet.
- `memory`: the process's peak host RSS; the bytes an actor call hands on, per sample and per call of
  `batch`; the peak GPU memory.
- `flops`: per triplet and per plain image, counted by `torch.utils.flop_counter.FlopCounterMode` over one
  real call of each (fused attention included, on the CPU too), or read from `--flops-cache` (`source`).
- `throughput`: plain images/s, triplets/s, triplets per device-hour; MFU on a GPU whose dense bf16 peak
  is in `PEAK_FLOPS`. These count the whole triplet in one process, as a CPU actor makes it; a job's GPU
  actor hands the refined mask to CPU writer tasks, so a GPU's own rate is `actor_triplets_per_hour(r)`
  (derived from the fields above, also for older JSON files; printed and tabled beside them).
- `compile_s`: with --compile, each measurement's first call minus its steady call.
- `raw_s`: every timed call, per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Dense bf16/fp16 tensor peaks (perf-anchors.md): MFU is reported only for these devices.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


def _peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(start: float, message: str) -> None:
    """A line on stderr as the bench goes (a row cut short by a GPU slot's limit still shows where its time
    went: the first H200 run's sdxl-arch row left an empty log)."""
    print(f"[bench {time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)


def _timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def _attention_flop_formulas() -> dict:
    """FLOP formulas for the fused attention ops that torch's counter leaves at 0: the CPU's SDPA kernel
    (`_scaled_dot_product_flash_attention_for_cpu`) and the fused-overrideable one, counted as torch counts
    its CUDA flash / efficient / cuDNN kernels (2 matmuls of Q, K, V's shapes). Without them a CPU count
    missed every self-attention."""
    from torch.utils.flop_counter import sdpa_flop_count

    def sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    return {getattr(aten, n): sdpa for n in names if hasattr(aten, n)}


def count_flops(fn) -> int:
    """The FLOPs of one call of `fn`, attention included on the CPU and on a GPU."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_attention_flop_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


def _read_flops(path: str | None, key: dict) -> dict | None:
    if not path or not Path(path).exists():
        return None
    for entry in json.loads(Path(path).read_text()):
        if entry["key"] == key:
            return entry["flops"]
    return None


def _write_flops(path: str | None, key: dict, counts: dict) -> None:
    if not path:
        return
    entries = json.loads(Path(path).read_text()) if Path(path).exists() else []
    flops = {k: v for k, v in counts.items() if k != "source"}
    entries = [e for e in entries if e["key"] != key] + [{"key": key, "flops": flops}]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(entries, indent=1) + "\n")


def bench(
    model: str = "toyworld",
    steps: int = 20,
    inpaint_steps: int | None = None,
    guidance: float = 1.0,
    batch: int = 1,
    repeats: int = 3,
    resolution: int | None = None,
    scheduler: str = "ddim",
    compile: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    channels_last: bool = False,
    concept: str = "star",
    flops: bool = True,
    flops_cache: str | None = None,
    arch_overrides: dict[str, dict] | None = None,
    capture_only: bool = False,
) -> dict:
    """Run the benchmark and return its figures (the module docstring lists the keys).

    flops_cache: a JSON file of FLOP counts per sample: read if it holds this model and setting's (the
    counts do not depend on batch, dtype or compile), else counted here (not under compile, whose graphs
    the counter cannot see into) and written, so that every row of a bench run reports MFU.
    arch_overrides: config changes of a shipped architecture (`--arch-set`: a depth-reduced FLUX).
    capture_only: only the synthesis loops with each readout's capture and without (a model too large for
    the rest on this machine); the result has `machine`, `settings` and `capture`."""

    from factory.dataset.pipeline import peak_rss_bytes
    from factory.dataset.shards import encode_triplet
    from factory.method.distiller import Distiller
    from factory.method.loading import load_pipeline, quiet_model_libraries
    from factory.method.readouts import Readout
    from factory.method.schedulers import make_scheduler
    from factory.method.settings import Concept, DistillConfig, SampleSpec
    from factory.method.synthesis import synthesize_latents

    quiet_model_libraries(False)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    inpaint_steps = inpaint_steps or steps
    start = time.perf_counter()
    t_load, pipe = _timed(
        lambda: load_pipeline(model, device, None if dtype == "auto" else dtype, arch_overrides),
        torch.device("cpu"),
    )
    _progress(start, f"{model} loaded on {pipe.device} in {t_load:.1f} s")
    dev = pipe.device
    probe_t0 = max(1, round(0.8 * steps))  # the paper's 40 of 50
    config = DistillConfig(
        num_inference_steps=steps,
        probe_t0=probe_t0,
        inpaint_steps=inpaint_steps,
        guidance_scale=guidance,
        scheduler=scheduler,
        inpaint_scheduler=scheduler,
        resolution=resolution,
        micro_batch=batch,
        compile=compile,
        channels_last=channels_last,
    )
    d = Distiller(model, pipeline=pipe, config=config)  # with compile, the pipeline's denoiser is compiled
    res = d.resolution
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler)
    c = Concept(concept)
    specs = [SampleSpec(c, seed=i, key=f"bench-{i}") for i in range(batch)]
    prompt = [c.prompt] * batch
    weights = d.token_weights(specs)

    def plain(g: float):
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        return pipe(
            prompt=prompt,
            num_inference_steps=steps,
            guidance_scale=g,
            height=res,
            width=res,
            generator=gens,
            output_type="np",
        ).images

    # each readout the family serves, with its default layers (factory.method.readouts)
    readouts = {name: d.config.readout_spec() for name in d.family.readouts}
    if "concept_output" in readouts:
        streams = d.family.concept_streams([c.token_words] * batch, d.config.background_words)
        readouts["concept_output"] = Readout("concept_output", streams=streams)

    with torch.inference_mode():  # the loops time the denoiser steps: the prompt is encoded once, here
        cond = d.embed(prompt)
        neg = d.embed_negative([""] * batch) if guidance != 1.0 else None

    def loop(capture: bool, readout: str = "image_to_text"):
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        shape = (d.denoiser.in_channels, d.latent_size, d.latent_size)
        return synthesize_latents(
            d.denoiser,
            d.sampler,
            shape,
            cond,
            weights,
            gens,
            steps,
            guidance,
            neg,
            probe_t0,
            capture,
            readout=readouts[readout],
        )

    def encode_write(triplets):
        import webdataset as wds

        with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "bench.tar", "wb") as f:
            with wds.TarWriter(f, encoder=False, mtime=0) as w:
                for t in triplets:
                    w.write(encode_triplet(vars(t), "jpg", 95))  # as a writer task does

    runs = {
        "plain": lambda: plain(guidance),
        "plain_cfg": lambda: plain(7.5),
        "triplet": lambda: d.synthesize(specs),
    }
    loops = {"loop_on": lambda: loop(True), "loop_off": lambda: loop(False)}
    for name in readouts:
        if name != "image_to_text":
            loops[f"loop_{name}"] = lambda name=name: loop(True, name)
    if capture_only:
        runs = {}
    times: dict[str, list[float]] = {k: [] for k in [*runs, *loops]}
    first: dict[str, float] = {}
    with torch.inference_mode():
        for k, fn in [*runs.items(), *loops.items()]:  # warm-up (and compilation): timed apart
            first[k], out = _timed(fn, dev)
            _progress(start, f"warm-up {k}: {first[k]:.2f} s")
            if k == "triplet":
                triplets = out
        for i in range(repeats):
            # ABBA: every other repeat runs the measurements in reverse order, so that neither a drift of
            # the machine nor the cost of following a memory-heavy call (page faults after the triplet's
            # decodes, on the CPU) lands on one measurement only
            order = list(runs.items()) if i % 2 == 0 else list(runs.items())[::-1]
            for k, fn in order:
                t, out = _timed(fn, dev)
                times[k].append(t)
                if k == "triplet":
                    triplets = out
            if runs:
                _progress(
                    start,
                    f"repeat {i + 1} of {repeats}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in runs),
                )
        # the capture overhead is a few percent at most: its two loops alternate on their own, twice per
        # repeat (on, off, off, on, ...), so that the difference is not lost in the machine's drift
        for i in range(2 * repeats):
            for k in list(loops) if i % 2 == 0 else list(loops)[::-1]:
                times[k].append(_timed(loops[k], dev)[0])
        _progress(
            start, "capture loops: " + ", ".join(f"{k} {statistics.median(times[k]):.2f} s" for k in loops)
        )
        if capture_only:
            med = {k: statistics.median(v) for k, v in times.items()}
            return {
                "machine": _machine(dev),
                "settings": _settings(
                    d, model, concept, steps, probe_t0, steps, guidance, batch, repeats, scheduler
                )
                | {"arch_overrides": arch_overrides or {}, "capture_only": True},
                "capture": _capture(med, batch, readouts),
                "raw_s": times,
            }
        enc = []
        for _ in range(repeats):
            enc.append(_timed(lambda: encode_write(triplets), torch.device("cpu"))[0])
        flop_counts = {}
        # what a FLOP count depends on; not the batch, device, dtype or compile (the counts are per sample)
        key = {
            "model": model,
            "resolution": res,
            "steps": steps,
            "probe_t0": probe_t0,
            "inpaint_steps": inpaint_steps,
            "guidance": guidance,
            "scheduler": scheduler,
            "concept": concept,
        }
        cached = _read_flops(flops_cache, key)
        if cached:
            flop_counts = {**cached, "source": flops_cache}
        elif flops and not compile:
            flop_counts = {
                "triplet_per_sample": count_flops(runs["triplet"]) / batch,
                "plain_per_image": count_flops(runs["plain"]) / batch,
                "source": "counted",
            }
            _write_flops(flops_cache, key, flop_counts)
            _progress(start, "FLOPs counted")
    # the edge snapping (masks.edges: guided, in the triplet's refine stage) timed apart on these triplets'
    # own masks and images, so that its share is known whether or not the config has it on
    from factory.method.edges import snap_to_edges

    def snap_all():
        for t in triplets:
            snap_to_edges(t.mask, t.image, d.edge_radius_px, d.config.edge_eps)

    edges = [_timed(snap_all, torch.device("cpu"))[0] for _ in range(max(1, repeats))]
    med = {k: statistics.median(v) for k, v in times.items()}
    triplet_s = med["triplet"] / batch
    edges_s = statistics.median(edges) / len(triplets)
    enc_s = statistics.median(enc) / batch
    stages = {}
    for t in triplets:
        for k, v in t.meta["timings"].items():
            stages[k] = stages.get(k, 0.0) + v / len(triplets)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    throughput = {
        "images_per_s": batch / med["plain"],
        "triplets_per_s": 1 / triplet_s,
        "triplets_per_device_hour": 3600 / triplet_s,
        "mfu": None,
        "peak_flops": _peak_flops(name) if dev.type == "cuda" else None,
    }
    if flop_counts and throughput["peak_flops"]:
        throughput["mfu"] = flop_counts["triplet_per_sample"] / triplet_s / throughput["peak_flops"]
    per_sample_bytes = sum(t.nbytes for t in triplets) / batch
    return {
        "machine": _machine(dev),
        "settings": _settings(
            d, model, concept, steps, probe_t0, inpaint_steps, guidance, batch, repeats, scheduler
        )
        | {"arch_overrides": arch_overrides or {}},
        "load_s": t_load,
        "plain_s_per_image": med["plain"] / batch,
        "plain_cfg_s_per_image": med["plain_cfg"] / batch,
        "triplet_s_per_sample": triplet_s,
        "triplet_over_plain": med["triplet"] / med["plain"],
        "stages_s_per_sample": stages,
        "actor_cpu_s_per_sample": stages.get("prelim_s", 0.0) + stages.get("draft_s", 0.0),
        "writer_refine_s_per_sample": stages.get("refine_s", 0.0),
        "capture": _capture(med, batch, readouts),
        "encode_write_s_per_sample": enc_s,
        "encode_write_share": enc_s / (triplet_s + enc_s),
        "edges": {"on": d.config.edges, "s_per_sample": edges_s, "share": edges_s / triplet_s},
        "memory": {
            "peak_rss_bytes": peak_rss_bytes(),
            "call_bytes_per_sample": per_sample_bytes,
            "call_bytes_at_batch": per_sample_bytes * batch,
            "gpu_peak_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        },
        "flops": flop_counts,
        "throughput": throughput,
        "compile_s": {k: first[k] - med[k] for k in times} if compile else None,
        "raw_s": times,
    }


def _machine(dev: torch.device) -> dict:
    import diffusers
    import transformers

    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }


def _settings(d, model, concept, steps, probe_t0, inpaint_steps, guidance, batch, repeats, scheduler) -> dict:
    c = d.config
    return {
        "model": model,
        "family": d.family.name,
        "unet_params": sum(p.numel() for p in d.family.denoiser_module.parameters()),
        "resolution": d.resolution,
        "steps": steps,
        "probe_t0": probe_t0,
        "inpaint_steps": inpaint_steps,
        "guidance": guidance,
        "batch": batch,
        "repeats": repeats,
        "scheduler": scheduler,
        "dtype": str(d.dtype).removeprefix("torch."),
        "compile": c.compile,
        "channels_last": c.channels_last,
        "concept": concept,
    }


def actor_triplets_per_hour(r: dict) -> float:
    """Triplets per hour of a job's GPU actor: 3600 / (triplet - the refined mask, Steps 5-6). On a GPU a
    job runs the refine in CPU writer tasks beside the actor (`GenerateShard.finish_in_actor` is off), so
    this is one GPU's rate when its node's CPUs keep up with the writers (each needs the refine plus
    encode + write per sample); a CPU actor refines its own samples, so there the triplet's rate holds."""
    return 3600 / (r["triplet_s_per_sample"] - r["writer_refine_s_per_sample"])


def _capture(med: dict, batch: int, readouts: dict) -> dict:
    """The synthesis loop with the default readout's capture on and off; `overhead` = on / off - 1, and
    each other readout's the same way (`by_readout`)."""
    by = {"image_to_text": med["loop_on"] / med["loop_off"] - 1}
    by |= {n: med[f"loop_{n}"] / med["loop_off"] - 1 for n in readouts if n != "image_to_text"}
    return {
        "loop_on_s": med["loop_on"] / batch,
        "loop_off_s": med["loop_off"] / batch,
        "overhead": by["image_to_text"],
        "by_readout": by,
    }


def format_table(r: dict) -> str:
    if r["settings"].get("capture_only"):
        return _table(_head_rows(r) + _capture_rows(r))
    rows = [
        *_head_rows(r),
        ("plain diffusers", f"{r['plain_s_per_image']:.3f} s/image"),
        ("plain, guidance 7.5", f"{r['plain_cfg_s_per_image']:.3f} s/image"),
        ("triplet", f"{r['triplet_s_per_sample']:.3f} s/sample"),
        ("triplet / plain", f"{r['triplet_over_plain']:.3f}x (equal steps and guidance)"),
        *_capture_rows(r),
        ("stages", ", ".join(f"{k[:-2]} {v:.3f}" for k, v in r["stages_s_per_sample"].items()) + " s/sample"),
        (
            "actor CPU work",
            f"{1000 * r['actor_cpu_s_per_sample']:.1f} ms/sample besides the model calls (M_pre, drafts); "
            f"the writer's refine {1000 * r['writer_refine_s_per_sample']:.1f} ms/sample",
        ),
        (
            "encode + write",
            f"{r['encode_write_s_per_sample']:.4f} s/sample, {100 * r['encode_write_share']:.1f}% of "
            "triplet + write",
        ),
        (
            "edge snapping",
            f"{1000 * r['edges']['s_per_sample']:.2f} ms/sample, {100 * r['edges']['share']:.2f}% of a "
            f"triplet (masks.edges: {r['edges']['on']})",
        ),
        (
            "memory",
            f"peak RSS {r['memory']['peak_rss_bytes'] / 2**30:.2f} GiB; an actor call hands on "
            f"{r['memory']['call_bytes_per_sample'] / 2**20:.2f} MiB/sample"
            + (
                f"; GPU peak {r['memory']['gpu_peak_bytes'] / 2**30:.2f} GiB"
                if r["memory"]["gpu_peak_bytes"]
                else ""
            ),
        ),
    ]
    if r["flops"]:
        f = r["flops"]
        rows.append(
            (
                "FLOPs",
                f"{f['triplet_per_sample'] / 1e12:.3f} TFLOP/triplet, {f['plain_per_image'] / 1e12:.3f} "
                f"TFLOP/plain image ({f['triplet_per_sample'] / f['plain_per_image']:.2f}x)",
            )
        )
    t = r["throughput"]
    rows.append(
        (
            "throughput",
            f"{t['images_per_s']:.2f} plain images/s, {t['triplets_per_device_hour']:.0f} triplets per "
            "device-hour"
            + (f", MFU {100 * t['mfu']:.1f}%" if t["mfu"] is not None else "")
            + f"; a job's GPU actor, the refine in writer tasks: {actor_triplets_per_hour(r):.0f}",
        )
    )
    if r["compile_s"]:
        rows.append(("compile", ", ".join(f"{k} {v:.1f} s" for k, v in r["compile_s"].items())))
    return _table(rows)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _head_rows(r: dict) -> list[tuple[str, str]]:
    s, m = r["settings"], r["machine"]
    kinds = {
        "sd3": "MMDiT",
        "flux": "FLUX transformer",
        "flux2": "FLUX.2 transformer",
        "z_image": "Z-Image DiT",
    }
    kind = kinds.get(s.get("family"), "UNet")
    overrides = s.get("arch_overrides") or {}
    return [
        (
            "machine",
            f"{m['device_name']} ({m['device']}), {m['cpu_count']} CPUs, {m['torch_threads']} threads",
        ),
        ("versions", f"torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}"),
        (
            "settings",
            f"{s['model']} ({s['unet_params'] / 1e6:.1f}M {kind}) "
            + (f"with {overrides} " if overrides else "")
            + f"{s['resolution']} px, {s['dtype']}, "
            f"{s['scheduler']} {s['steps']} + {s['inpaint_steps']} steps, guidance {s['guidance']}, "
            f"batch {s['batch']}, {s['repeats']} repeats, compile {s['compile']}, channels_last "
            f"{s['channels_last']}",
        ),
    ]


def _capture_rows(r: dict) -> list[tuple[str, str]]:
    c = r["capture"]
    rows = [
        (
            "capture overhead",
            f"{100 * c['overhead']:+.2f}% ({c['loop_on_s']:.3f} vs {c['loop_off_s']:.3f} s/sample)",
        )
    ]
    for name, overhead in c.get("by_readout", {}).items():
        rows.append((f"  readout {name}", f"{100 * overhead:+.2f}% of the synthesis loop"))
    return rows


def summary_table(folder: str | Path) -> str:
    """A markdown table of every bench JSON in `folder` (docs/benchmarks.md's layout)."""
    lines = [
        "| run | model | device | dtype | sampler, steps | batch | compile | plain s/image "
        "| triplet s/sample | triplet / plain | capture | triplets / device-hour | MFU "
        "| GPU actor triplets / hour |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in sorted(Path(folder).glob("*.json")):
        r = json.loads(f.read_text())
        if not isinstance(r, dict) or "settings" not in r:
            continue  # not a bench row (the --flops-cache file, say)
        s = r["settings"]
        if s.get("capture_only"):  # the capture loops alone: their overhead, nothing else
            by = ", ".join(f"{n} {100 * v:+.1f}%" for n, v in r["capture"].get("by_readout", {}).items())
            device = r["machine"]["device_name"]
            lines.append(
                f"| {f.stem} | {s['model']} | {device} | {s['dtype']} | {s['scheduler']} {s['steps']} "
                f"| {s['batch']} | {s['compile']} | - | - | - | {by} | - | - | - |"
            )
            continue
        t = r["throughput"]
        mfu = f"{100 * t['mfu']:.1f}%" if t.get("mfu") is not None else "-"
        lines.append(
            f"| {f.stem} | {s['model']} | {r['machine']['device_name']} | {s['dtype']} | {s['scheduler']} "
            f"{s['steps']} + {s['inpaint_steps']} | {s['batch']} | {s['compile']} "
            f"| {r['plain_s_per_image']:.3f} | {r['triplet_s_per_sample']:.3f} "
            f"| {r['triplet_over_plain']:.3f}x "
            f"| {100 * r['capture']['overhead']:+.1f}% | {t['triplets_per_device_hour']:,.0f} | {mfu} "
            f"| {actor_triplets_per_hour(r):,.0f} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="toyworld", help="toyworld, sd15-arch (random weights) or a local dir")
    p.add_argument("--steps", type=int, default=20, help="synthesis steps (and the plain pipeline's)")
    p.add_argument(
        "--inpaint-steps", type=int, default=None, help="background inpainting steps (default: --steps)"
    )
    p.add_argument("--guidance", type=float, default=1.0, help="guidance scale (the paper samples with 1)")
    p.add_argument("--batch", type=int, default=1, help="samples per model call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resolution", type=int, default=None, help="default: the model's native resolution")
    p.add_argument(
        "--scheduler", default="ddim", help="ddim, dpm++, unipc or euler (synthesis and inpainting)"
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet (compile time reported apart)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on cuda, fp32 on cpu), fp32, fp16, bf16")
    p.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels_last memory format")
    p.add_argument("--concept", default="star")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one more call of each)")
    p.add_argument(
        "--flops-cache",
        default=None,
        metavar="FILE",
        help="reuse this model and setting's FLOP counts from FILE (JSON), or count them and add them",
    )
    p.add_argument(
        "--arch-set",
        action="append",
        default=[],
        metavar="COMPONENT.KEY=VALUE",
        help="change a shipped architecture's config (repeatable), e.g. a depth-reduced FLUX on the CPU: "
        "--arch-set transformer.num_layers=2 --arch-set text_encoder_2.num_layers=1",
    )
    p.add_argument(
        "--capture-only",
        action="store_true",
        help="only the synthesis loop with each readout's capture and without (no plain pipeline, triplet, "
        "FLOPs): for a model too large for the rest on this machine",
    )
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    p.add_argument("--summarize", default=None, metavar="DIR", help="only print a table of DIR's bench JSONs")


def arch_overrides(sets: list[str]) -> dict[str, dict]:
    """{component: {key: value}} from `--arch-set COMPONENT.KEY=VALUE` (values read as YAML scalars)."""
    import yaml

    from factory.errors import UserError

    out: dict[str, dict] = {}
    for item in sets:
        path, sep, value = item.partition("=")
        component, dot, key = path.partition(".")
        if not (sep and dot and component and key):
            raise UserError(
                f"--arch-set takes COMPONENT.KEY=VALUE, e.g. transformer.num_layers=2; got {item!r}"
            )
        out.setdefault(component, {})[key] = yaml.safe_load(value)
    return out


def main(a: argparse.Namespace) -> int:
    from factory.method.schedulers import SCHEDULERS

    if a.summarize:
        print(summary_table(a.summarize), end="")
        return 0
    if a.scheduler not in SCHEDULERS:
        from factory.errors import UserError

        raise UserError(f"unknown --scheduler {a.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    r = bench(
        a.model,
        a.steps,
        a.inpaint_steps,
        a.guidance,
        a.batch,
        a.repeats,
        a.resolution,
        a.scheduler,
        a.compile,
        a.device,
        a.dtype,
        a.channels_last,
        a.concept,
        not a.no_flops,
        a.flops_cache,
        arch_overrides(a.arch_set),
        a.capture_only,
    )
    print(format_table(r))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(r, indent=1, default=float) + "\n")
        print(f"wrote {a.out}")
    return 0
