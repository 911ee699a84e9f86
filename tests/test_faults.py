"""Faults injected for real, on real Ray on the CPU (docs/reliability.md). After each fault the job is
finished (by Ray's own retries, or by running the same command again) and the output must hold:

- every requested key exactly once (in the shards, or among the rejects kept aside);
- every committed tar reads back with the webdataset reader, and its stats agree with it;
- a manifest that agrees with the shards;
- no temporary file left behind.

The crashes use `factory.dataset.faults.crash_point`: the process ends with `os._exit(1)` the first time it
reaches the point, as a kill would, and Ray's retry runs through.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import webdataset as wds

from factory.dataset.config import load_config
from factory.dataset.specs import generation_shards

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOB = [
    "concepts=[{name: star, samples: 4}, {name: ring, samples: 4}]",
    "sampler.steps=4",
    "sampler.probe_t0=3",
    "inpaint.steps=4",
    "output.samples_per_shard=2",
    "resources.actors=2",
    "resources.num_cpus_per_actor=0.75",
    "filters.min_area=0.0",
    "filters.max_area=1.0",
    "filters.keep_rejected=true",
    "output.report_samples=2",
]


def _sets(out) -> list[str]:
    return [f"output.uri={out}", *JOB]


def _factory(out, env=None, extra=()):
    argv = [str(BIN / "factory"), "generate", "configs/toyworld.yaml"]
    for s in [*_sets(out), *extra]:
        argv += ["--set", s]
    return argv, {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}


def assert_output_whole(out: Path, sets: list[str] | None = None) -> None:
    """The four invariants of the module docstring."""
    cfg = load_config("configs/toyworld.yaml", sets or _sets(out))
    requested = sorted(s["key"] for t in generation_shards(cfg) for s in t.samples(cfg))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and not manifest["missing_shards"]
    seen, written = [], 0
    for shard in manifest["shards"]:
        stats = json.loads((out / shard["name"].replace(".tar", ".stats.json")).read_text())
        keys = [s["__key__"] for s in wds.WebDataset(str(out / shard["name"]), shardshuffle=False)]
        assert keys == stats["keys"] and len(keys) == shard["written"] == stats["written"]
        seen += keys
        written += len(keys)
    for tar in sorted((out / "rejected").glob("*.tar")) if (out / "rejected").exists() else []:
        seen += [s["__key__"] for s in wds.WebDataset(str(tar), shardshuffle=False)]
    assert sorted(seen) == requested, "every requested key exactly once"
    assert manifest["totals"]["written"] == written
    leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".factory-probe")]
    assert not leftovers
    assert not (out / "_parts").exists(), "a complete output keeps no parts"


def _digest(out: Path) -> dict[str, str]:
    """sha256 of every committed shard (tar with its stats file)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.glob("*.tar"))
        if (out / (p.stem + ".stats.json")).exists()
    }


@pytest.mark.slow  # ~50 s; the default lane's crash mid shard (below) kills an actor mid job as well
def test_a_generation_actor_dies_mid_job(tmp_path):
    out, marker = tmp_path / "out", tmp_path / "crashed"
    argv, env = _factory(out, {"CF_FAULT_GENERATE": str(marker)})
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists(), "the actor did not crash"
    assert_output_whole(out)


def test_a_crash_mid_shard_loses_one_call_and_keeps_the_parts_before_it(tmp_path):
    """Bounded loss: an actor dies after handing on one part of a 4-part shard; Ray's retry on a new actor
    skips that committed part (it keeps the dead actor's pid) and generates only the rest."""
    out, marker = tmp_path / "out", tmp_path / "crashed"
    extra = ["output.samples_per_shard=4", "resources.samples_per_call=1"]
    argv, env = _factory(out, {"CF_FAULT_MID_SHARD": str(marker)}, extra)
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists(), "the actor did not crash"
    dead = int(marker.read_text())
    assert_output_whole(out, [*_sets(out), *extra])
    parts = [p for st in out.glob("*.stats.json") for p in json.loads(st.read_text())["parts"]]
    assert len(parts) == 8
    by_dead = [p["name"] for p in parts if p["pid"] == dead]
    assert by_dead == ["part-000000-000001"], "exactly the part handed on before the crash survived it"


def test_a_crash_between_the_tar_commit_and_the_stats_commit(tmp_path):
    out, marker = tmp_path / "out", tmp_path / "crashed"
    argv, env = _factory(out, {"CF_FAULT_AFTER_TAR_COMMIT": str(marker)})
    first = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert marker.exists(), "the writer did not crash"
    if first.returncode != 0:  # the shard whose stats were lost is produced again by the same command
        again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
    assert_output_whole(out)


def test_the_driver_is_killed_and_the_same_command_finishes_the_job(tmp_path):
    out = tmp_path / "out"
    argv, env = _factory(out, extra=["output.samples_per_shard=1"])
    sets = [*_sets(out), "output.samples_per_shard=1"]
    # three shards are generated, then the actors wait at their next shard: the kill lands mid-job however
    # fast the machine (a fast CI machine had finished all eight between two polls)
    held = {**env, "CF_HOLD_GENERATE": f"{tmp_path / 'tickets'}:3"}
    proc = subprocess.Popen(
        argv, cwd=REPO, env=held, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("*.stats.json"))) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, at once
    proc.wait(timeout=60)
    before = _digest(out)
    assert len(before) == 3, "kill the job mid-way, three shards committed"
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _digest(out)
    assert {k: after[k] for k in before} == before, "committed shards keep their bytes"
    assert_output_whole(out, sets)


def test_a_worker_node_is_removed_mid_job(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from factory.dataset.pipeline import run_job

    if ray.is_initialized():
        ray.shutdown()
    out = tmp_path / "out"
    sets = [*_sets(out), "output.samples_per_shard=1"]
    tickets = tmp_path / "tickets"  # one shard is generated, then the actors wait until released
    monkeypatch.setenv("CF_HOLD_GENERATE", f"{tickets}:1")  # the nodes' processes inherit it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    result = {}
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        job = threading.Thread(
            target=lambda: result.update(
                run_job(load_config("configs/toyworld.yaml", sets), "generate", progress=False)
            )
        )
        job.start()
        deadline = time.time() + 300
        while time.time() < deadline and not list(out.glob("*.stats.json")):
            time.sleep(0.2)
        time.sleep(1.0)  # both actors at their held next shard
        assert len(list(out.glob("*.stats.json"))) == 1 and job.is_alive(), "the node goes mid-job"
        cluster.remove_node(worker, allow_graceful=False)
        cluster.add_node(num_cpus=1)  # as an autoscaler would replace it
        (tickets / "release").touch()
        job.join(timeout=600)
        assert not job.is_alive()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert result.get("complete"), result
    assert_output_whole(out, sets)


# ----------------------------------------------------------------------------- an object store on loopback


class FlakyS3Proxy:
    """An HTTP proxy on 127.0.0.1 in front of moto's S3 server that answers the first PUT of a shard (`.tar`)
    with S3's 500 InternalError, as a store under load does; every other request goes through unchanged."""

    def __init__(self, upstream_port: int):
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        proxy = self
        self.failed: list[str] = []
        self.puts: list[tuple] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "PUT":
                    proxy.puts.append((self.path, len(body), dict(self.headers)))
                if self.command == "PUT" and self.path.split("?")[0].endswith(".tar") and not proxy.failed:
                    proxy.failed.append(self.path)
                    err = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    self.wfile.write(err)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))  # HEAD: the object's size
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_s3_endpoint_that_fails_its_first_put_and_no_credential_is_written(tmp_path):
    """moto's S3 server on loopback, through s3fs, behind a proxy that fails the first shard PUT. The job
    completes, the output is whole, and the credentials (a sentinel in the environment and one in
    output.storage_options) appear in no object, no stdout or stderr line and no Ray log."""
    import tempfile

    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer

    sentinel_env, sentinel_opt = "SENTINELENV0123456789abcdef", "SENTINELOPT0123456789abcdef"
    moto_port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    server.start()
    proxy = FlakyS3Proxy(moto_port)
    ray_tmp = tempfile.mkdtemp(prefix="cfr", dir="/tmp")  # short: Ray's AF_UNIX socket paths
    try:
        endpoint = f"http://127.0.0.1:{proxy.port}"
        creds = {
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        }
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", **creds).create_bucket(
            Bucket="cf-test"
        )
        out = "s3://cf-test/jobs/run1"
        options = (
            f"output.storage_options={{endpoint_url: '{endpoint}', key: testing, secret: {sentinel_opt}}}"
        )
        argv, env = _factory(out, extra=[options])
        env.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY=sentinel_env,
            AWS_DEFAULT_REGION="us-east-1",
            RAY_TMPDIR=ray_tmp,
        )
        r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert proxy.failed, "the proxy injected no failure"
        fs = fsspec.filesystem(
            "s3", endpoint_url=f"http://127.0.0.1:{moto_port}", key="testing", secret="testing"
        )
        local = tmp_path / "copy"
        fs.get("cf-test/jobs/run1/", str(local), recursive=True)
        assert_output_whole(local, [*_sets(local)])
        written = [p for p in local.rglob("*") if p.is_file()]
        logs = [
            p
            for p in Path(ray_tmp).rglob("*")
            if p.is_file() and p.suffix in (".log", ".out", ".err", ".json", "")
        ]
        assert len(written) > 5 and logs
        for sentinel in (sentinel_env, sentinel_opt):
            assert sentinel not in r.stdout + r.stderr
            for p in written + logs:
                try:
                    data = p.read_bytes()
                except OSError:
                    continue
                assert sentinel.encode() not in data, f"{sentinel} in {p}"
        job = json.loads((local / "job.json").read_text())
        assert job["config"]["output"]["storage_options"] == {
            k: "<redacted>" for k in ("endpoint_url", "key", "secret")
        }
    finally:
        proxy.close()
        server.stop()
