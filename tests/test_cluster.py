"""cache-teacher on a real two-node Ray cluster: the cache equals the embedded run's, also when the
worker node is lost mid-run.

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

A lost node is every process of the worker node's session SIGKILLed, Ray workers included (they
have process groups of their own; killing only the raylet leaves a busy worker to finish its task).
No health-check settings are needed: the driver sees the dead worker's connection drop at once
(ActorUnavailableError), and the run does not wait for Ray to declare the node dead.
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
ALL_SHARDS = [f"train-00000{i}.tar" for i in range(4)]   # enough that the run is still going when a node is lost
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


def _session(proc: subprocess.Popen) -> dict[int, str]:
    """{pid: command line} of every process in the session this test created for ``ray start``: its
    raylet and agents, and the workers the raylet started (they have process groups of their own;
    a Ray worker's command line names the task it runs, e.g. ``ray::CacheWorker.run``)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()   # after "pid (comm)": state ppid pgrp session
            if int(fields[3]) == proc.pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_text().replace("\0", " ")
        except (OSError, IndexError, ValueError):
            continue
    return found


def _kill_node(proc: subprocess.Popen) -> int:
    """A lost node: SIGKILL every process of its session (see _session); returns how many."""
    killed = 0
    for pid in _session(proc):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


@pytest.fixture
def two_node_cluster():
    """(address, env for drivers, temp dir, the worker node's ``ray start`` process) of a head + one
    worker node, one CPU each; torn down afterwards."""
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
        node = start([f"--address=127.0.0.1:{port}"], "node.log")
        yield f"127.0.0.1:{port}", env, tmp, node
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


def _both_nodes_joined(address: str, env: dict) -> None:
    """Both nodes joined, one CPU each (so 2 one-CPU workers must run one per node)."""
    probe = subprocess.run([sys.executable, "-c", NODES_PROBE, address], env=env, capture_output=True,
                           text=True, timeout=90)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == [1.0, 1.0], probe.stdout


def _cache_cmd(tmp_path: Path, shards: Path, out: Path, address: str) -> list[str]:
    """``distill cache-teacher`` joining the cluster with 2 one-thread workers."""
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in DEMO_POLICY.items()))
    return [str(BIN / "distill"), "cache-teacher", "--shards", str(shards), "--teacher", str(DEMO_TEACHER),
            "--out", str(out), "--epochs", "2", "--topk", "5", "--teacher-input-size", "32",
            "--batch-size", "64", "--policy", str(policy), "--workers", "2", "--threads", "1",
            "--ray-address", address, "--quiet"]


def _assert_equals_embedded(tmp_path: Path, shards: Path, cluster_out: Path) -> None:
    """The embedded run (this process's session Ray, one worker, same settings) has the same records
    and byte-identical shard files (same teacher, policy, seeds, shard order)."""
    res = cache_teacher(cache_config(shards, tmp_path / "embedded"), DEMO_POLICY)
    assert not res.failed
    cluster, embedded = open_cache(cluster_out), open_cache(tmp_path / "embedded")
    assert cluster.num_records == embedded.num_records == res.records > 0
    assert cluster.to_table().equals(embedded.to_table())
    files = {m: [(s["name"], s["file_sha256"]) for s in json.loads((m / MANIFEST_NAME).read_text())["shards"]]
             for m in (cluster_out, tmp_path / "embedded")}
    assert files[cluster_out] == files[tmp_path / "embedded"]


def test_two_node_cluster_cache_equals_embedded(tmp_path, two_node_cluster, ray_local):
    address, env, _, _ = two_node_cluster
    shards = demo_subset(tmp_path, SHARDS)
    _both_nodes_joined(address, env)
    run = subprocess.run(_cache_cmd(tmp_path, shards, tmp_path / "cluster", address), env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    _assert_equals_embedded(tmp_path, shards, tmp_path / "cluster")


def test_losing_the_worker_node_mid_run_still_completes_the_cache(tmp_path, two_node_cluster, ray_local):
    """SIGKILL the worker node's whole process tree while its worker runs a shard: the worker dies,
    its replacement cannot be placed (the head's one CPU is held by the live worker), and the run
    finishes every shard on the head's worker instead of waiting for the replacement."""
    address, env, _, node = two_node_cluster
    shards = demo_subset(tmp_path, ALL_SHARDS)
    _both_nodes_joined(address, env)
    out = tmp_path / "cluster"
    log = tmp_path / "run.log"
    with open(log, "wb") as f:
        run = subprocess.Popen(_cache_cmd(tmp_path, shards, out, address), env=env, stdout=f,
                               stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while (run.poll() is None and time.monotonic() < deadline
               and not any("CacheWorker.run" in c for c in _session(node).values())):
            time.sleep(0.05)
        assert run.poll() is None, "the run ended before the node could be killed: " + log.read_text()[-3000:]
        assert _kill_node(node) >= 3          # ray start, raylet, the busy worker: the node is lost
        rc = run.wait(timeout=240)            # a hang fails here instead of hanging CI
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "its Ray worker died" in text, text[-3000:]       # the node's worker was lost mid-shard
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert [s["name"] for s in manifest["shards"]] == ALL_SHARDS
    _assert_equals_embedded(tmp_path, shards, out)
