"""Real Ray clusters on this machine: a multi-node cluster, and `ray job submit` against `ray start
--head`."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # a multi-node cluster, a Ray head in another process

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_pipeline_places_actors_on_more_than_one_node(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from factory.dataset.config import load_config
    from factory.dataset.pipeline import run_job

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = load_config(
            "configs/toyworld.yaml",
            [
                f"output.uri={tmp_path / 'out'}",
                "concepts=[{name: star, samples: 2}, {name: square, samples: 2}]",
                "sampler.steps=4",
                "sampler.probe_t0=3",
                "inpaint.steps=4",
                "output.samples_per_shard=1",
                "resources.actors=2",
                "resources.num_cpus_per_actor=0.75",
                "filters.min_area=0.0",
                # without it, one actor can drain the 4 tiny shards while the other still loads the model
                # (seen once, on a busy machine): wait until both are up
                "resources.wait_for_actors_s=300",
            ],
        )
        summary = run_job(cfg, "generate", progress=False)
        assert summary["complete"] and len(summary["nodes"]) == 2, summary["nodes"]
        nodes = {
            json.loads((tmp_path / "out" / f"shard-{i:06d}.stats.json").read_text())["node"] for i in range(4)
        }
        assert len(nodes) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_against_a_local_head(tmp_path):
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # AF_UNIX socket paths must stay < 108 bytes
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(tmp_path / "auth_token"),
    }
    (tmp_path / "auth_token").write_text("concept-factory-test-token-0123456789abcdef\n")
    gcs, dash = _free_port(), _free_port()
    ray_bin = str(BIN / "ray")
    head = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--disable-usage-stats",
            f"--temp-dir={ray_tmp}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert head.returncode == 0, head.stdout + head.stderr
    out = tmp_path / "shards"
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 60
        while time.time() < deadline:  # the job server comes up shortly after the head
            if (
                subprocess.run(
                    [ray_bin, "job", "list", "--address", address], env=env, capture_output=True, timeout=60
                ).returncode
                == 0
            ):
                break
            time.sleep(2)
        for _ in range(6):  # the job agent can come up after the job API answers (seen on a loaded machine)
            sub = subprocess.run(
                [
                    ray_bin,
                    "job",
                    "submit",
                    "--address",
                    address,
                    "--working-dir",
                    str(REPO),
                    "--",
                    "factory",
                    "generate",
                    "configs/toyworld.yaml",
                    "--set",
                    f"output.uri={out}",
                    "--set",
                    "concepts=[{name: ring, samples: 2}]",
                    "--set",
                    "sampler.steps=4",
                    "--set",
                    "sampler.probe_t0=3",
                    "--set",
                    "inpaint.steps=4",
                    "--set",
                    "resources.actors=1",
                    "--set",
                    "filters.min_area=0.0",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            log = sub.stdout + sub.stderr
            if "No available agent to submit job" not in log:
                break
            time.sleep(10)
        assert sub.returncode == 0, log
        assert "succeeded" in log.lower(), log
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["complete"] and (out / "shard-000000.tar").exists()
        # without the token the job API refuses the client
        noauth = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        refused = subprocess.run(
            [ray_bin, "job", "list", "--address", address],
            env=noauth,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode != 0
    finally:
        _stop_head(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _stop_head(temp_dir: Path) -> None:
    """Stop this test's head only (`ray stop` would end every Ray on the machine, a user's jobs too): its
    processes name its temp dir on their command lines; their workers exit with their raylet."""
    import psutil

    procs = [
        p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])
    ]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=30)
    for p in alive:
        p.kill()
