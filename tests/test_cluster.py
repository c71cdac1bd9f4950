"""Cluster readiness: the KubeRay manifest and the local multi-node rehearsal agree with
configs/serve_gpu.yaml, and the app keeps every query when nodes are lost under load."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from collab.paths import REPO_ROOT
from deployments.app import deployment_options

SERVE_GPU = REPO_ROOT / "configs" / "serve_gpu.yaml"
SERVE_CLUSTER = REPO_ROOT / "configs" / "serve_cluster.yaml"
MANIFEST = REPO_ROOT / "configs" / "kuberay" / "rayservice.yaml"
ACCELERATOR_STAGES = {"VisionEncoder", "FirstPassDecoder", "RefinedDecoder"}


def make_rayservice():
    sys.path.insert(0, str(MANIFEST.parent))
    try:
        import make_rayservice

        return make_rayservice
    finally:
        sys.path.pop(0)


def test_the_rayservice_manifest_is_generated_from_serve_gpu():
    gen = make_rayservice()
    assert MANIFEST.read_text() == gen.render(), "run: python configs/kuberay/make_rayservice.py"
    manifest = yaml.safe_load(MANIFEST.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == yaml.safe_load(SERVE_GPU.read_text())


def limits_of(group: dict) -> dict:
    (c,) = group["template"]["spec"]["containers"]
    assert c["resources"]["requests"] == c["resources"]["limits"]  # guaranteed QoS: Ray's numbers are real
    return c["resources"]["limits"]


def test_pods_hold_the_deployments_of_serve_gpu_and_are_scraped():
    cluster = yaml.safe_load(MANIFEST.read_text())["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    opts = deployment_options(SERVE_GPU)
    gpu, cpu = groups["gpu"], groups["cpu"]
    for group in (gpu, cpu):  # each pod's Ray resources are its container's
        lim, params = limits_of(group), group["rayStartParams"]
        assert params["num-cpus"] == lim["cpu"] and params.get("num-gpus") == lim.get("nvidia.com/gpu")
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replicas on the head

    def need(names, key, at_max):
        total = 0.0
        for name in names:
            o = opts[name]
            n = (o.get("num_replicas") or o["autoscaling_config"]["max_replicas"]) if at_max else 1
            total += o["ray_actor_options"].get(key, 1 if key == "num_cpus" else 0) * n
        return total

    accel = {n for n, o in opts.items() if o["ray_actor_options"].get("num_gpus")}
    assert accel == ACCELERATOR_STAGES
    rest = set(opts) - accel
    pod_gpus, pod_cpus = float(limits_of(gpu)["nvidia.com/gpu"]), float(limits_of(gpu)["cpu"])
    assert need(accel, "num_gpus", False) <= pod_gpus and need(accel, "num_cpus", False) <= pod_cpus  # one of each
    assert gpu["maxReplicas"] == math.ceil(need(accel, "num_gpus", True) / pod_gpus)  # all at max_replicas
    assert gpu["maxReplicas"] * pod_cpus >= need(accel, "num_cpus", True)
    assert cpu["maxReplicas"] * float(limits_of(cpu)["cpu"]) >= need(rest, "num_cpus", True)
    assert need(rest, "num_cpus", False) <= float(limits_of(cpu)["cpu"])
    for group in [cluster["headGroupSpec"], gpu, cpu]:
        notes = group["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/port"] == group["rayStartParams"]["metrics-export-port"]


def test_the_local_cluster_config_mirrors_serve_gpu():
    gpu, local = deployment_options(SERVE_GPU), deployment_options(SERVE_CLUSTER)
    assert set(local) == set(gpu)
    for name, o in gpu.items():
        mine = local[name]
        assert mine["max_ongoing_requests"] == o["max_ongoing_requests"], name
        if "autoscaling_config" in o:
            assert mine["autoscaling_config"]["max_replicas"] == o["autoscaling_config"]["max_replicas"], name
        else:
            assert mine["num_replicas"] == o["num_replicas"]
        gpus = o["ray_actor_options"].get("num_gpus")
        assert mine["ray_actor_options"].get("num_gpus") == gpus, name  # the same fractions on (fake) GPUs
        if not gpus:  # CPU-side stages are pinned to CPU nodes by a custom resource
            assert "cpu_side" in mine["ray_actor_options"]["resources"], name
    served = yaml.safe_load(SERVE_CLUSTER.read_text())["applications"][0]
    assert served["import_path"] == yaml.safe_load(SERVE_GPU.read_text())["applications"][0]["import_path"]


@pytest.mark.slow
def test_nodes_lost_under_load_lose_no_query(tmp_path):
    """python -m benchmarks.cluster: a head and 5 worker nodes on this machine, placement as
    serve_gpu.yaml, answers through every node's proxy, DAG == pipeline, then an accelerator node and
    the session store's node killed under an 8-agent load (about 4 minutes here)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cluster", "--agents", "8", "--duration", "60", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert (tmp_path / "report.json").exists(), proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert not failed, (failed, proc.stdout[-3000:])
    load = report["load"]
    assert load["failed"] == 0 and load["answered"] == load["queries"] > 0
    assert [e["killed"] for e in load["events"]][0] == "accelerator-b"
    assert load["retries"] > 0  # the kills were felt, and retried through
    assert proc.returncode == 0
