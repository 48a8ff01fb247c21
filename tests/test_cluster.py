"""cache-teacher on a real two-node Ray cluster: the cache equals the embedded run's.

Two Ray nodes run on this machine as separate process trees: ``ray start --head --block`` and
``ray start --address=HEAD --block``, one CPU each, with their own ``--temp-dir`` (so no other Ray
on the machine can discover them through /tmp/ray) and their own token file (Ray >= 2.59 turns token
authentication on for a head started where a token exists; every node and the driver then need
``RAY_AUTH_MODE=token`` and the token). ``distill cache-teacher --ray-address`` joins as a
subprocess with 2 one-thread workers: one CPU per node and one per worker forces one worker onto
each node.

Teardown never calls ``ray stop`` (that would stop every Ray on the machine, including other tests'
embedded Ray): each ``ray start --block`` gets SIGTERM (it then stops the processes it started), and
whatever is left of its process group (it runs in a session of its own) gets SIGKILL.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import DEMO_POLICY, DEMO_TEACHER, cache_config, demo_subset
from distill.cache import cache_teacher
from distill.format import MANIFEST_NAME
from distill.cache.reader import open_cache

SHARDS = ["train-000000.tar", "train-000001.tar"]
BIN = Path(sys.executable).parent
NODES_PROBE = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.time() + 60
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= 2 or time.time() > deadline:
        break
    time.sleep(0.5)
print(json.dumps([n["Resources"].get("CPU", 0) for n in alive]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 45) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"Ray head did not open port {port} in {timeout:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process (it stops its node), then SIGKILL its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # the group is the session this test created for it
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture
def two_node_cluster():
    """(address, env for drivers) of a head + one worker node, one CPU each; torn down afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="dray", dir="/tmp"))    # short: Ray's unix socket paths live below it
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
    port = _free_port()
    common = ["--block", "--num-cpus=1", f"--temp-dir={tmp}", "--disable-usage-stats",
              f"--dashboard-agent-listen-port={_free_port()}"]
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> subprocess.Popen:
        p = subprocess.Popen([str(BIN / "ray"), "start", *args, *common], env=env, cwd=tmp,
                             stdout=open(tmp / log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    try:
        # no --ray-client-server-port: that needs ray[client]; the runtime dependency is plain `ray`
        head = start(["--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={_free_port()}"],
                     "head.log")
        _wait_port(port, head)
        common[-1] = f"--dashboard-agent-listen-port={_free_port()}"
        start([f"--address=127.0.0.1:{port}"], "node.log")
        yield f"127.0.0.1:{port}", env, tmp
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


def test_two_node_cluster_cache_equals_embedded(tmp_path, two_node_cluster, ray_local):
    address, env, ray_tmp = two_node_cluster
    shards = demo_subset(tmp_path, SHARDS)

    # both nodes joined, one CPU each (so the 2 one-CPU workers below must run one per node)
    probe = subprocess.run([sys.executable, "-c", NODES_PROBE, address], env=env, capture_output=True,
                           text=True, timeout=90)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == [1.0, 1.0], probe.stdout

    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in DEMO_POLICY.items()))
    cmd = [str(BIN / "distill"), "cache-teacher", "--shards", str(shards), "--teacher", str(DEMO_TEACHER),
           "--out", str(tmp_path / "cluster"), "--epochs", "2", "--topk", "5", "--teacher-input-size", "32",
           "--batch-size", "64", "--policy", str(policy), "--workers", "2", "--threads", "1",
           "--ray-address", address, "--quiet"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]

    # the embedded run: this process's session Ray, one worker, same settings
    res = cache_teacher(cache_config(shards, tmp_path / "embedded"), DEMO_POLICY)
    assert not res.failed
    cluster, embedded = open_cache(tmp_path / "cluster"), open_cache(tmp_path / "embedded")
    assert cluster.num_records == embedded.num_records == res.records > 0
    assert cluster.to_table().equals(embedded.to_table())
    # byte-identical shard files too (same teacher, policy, seeds, shard order)
    files = {m: [(s["name"], s["file_sha256"]) for s in json.loads((tmp_path / m / MANIFEST_NAME).read_text())["shards"]]
             for m in ("cluster", "embedded")}
    assert files["cluster"] == files["embedded"]
