"""The service as a cluster runs it: replicas that follow the job store's backlog (up, down, and from zero), and the
deployment files against the code."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
from serving_cases import generator_actors, replica_count, run_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "serving" / "deploy"


def test_replicas_follow_the_backlog_from_zero_up_and_down(ray_serve, tmp_path):
    """min 0, max 3: idle, the generator has no replica; a backlog starts replicas up to three (the first job's
    wait for one shows in its timings); once it drains they go back to none. Every job completes. The replica
    count over time is plotted (autoscale.png in the test's folder)."""
    from ray import serve
    svc = run_app(ray_serve, tmp_path, "scaled", autoscale=(0, 3), upscale_delay_s=1.0, downscale_delay_s=3.0)
    counts, stop = [], threading.Event()

    def watch():
        t0 = time.time()
        while not stop.is_set():
            counts.append((time.time() - t0, replica_count("scaled")))
            time.sleep(0.5)
    try:
        deadline = time.time() + 90
        while (replica_count("scaled") > 0 or generator_actors("scaled")) and time.time() < deadline:
            time.sleep(0.5)  # the app starts with one replica, which then idles and stops
        assert replica_count("scaled") == 0 and not generator_actors("scaled")
        with svc.client() as c:
            assert c.get("/readyz").status_code == 503  # no replica warmed up
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        ids = [svc.create(num_inference_steps=12, seed=i).json()["id"] for i in range(9)]
        done = [svc.wait(i, timeout=400) for i in ids]
        assert [d["status"] for d in done] == ["completed"] * 9
        wait = done[0]["cogrt"]["timings"]["queue_wait"]
        print(f"the first job after idle waited {wait:.1f} s for its replica")
        assert wait > 1.0  # it waited for a replica to start, and that wait is reported
        deadline = time.time() + 120
        while replica_count("scaled") > 0 and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        stop.set()
        serve.delete("scaled")
    peak = max(n for _, n in counts)
    plot(counts, tmp_path / "autoscale.png")
    print(f"replicas over time: {tmp_path / 'autoscale.png'}; peak {peak}")
    assert peak == 3, counts
    assert counts[-1][1] == 0, counts[-5:]
    assert len({d["cogrt"]["replica"] for d in done}) >= 2


def plot(counts: list[tuple[float, int]], path: Path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 2.8))
    ax = fig.subplots()
    ax.step([t for t, _ in counts], [n for _, n in counts], where="post")
    ax.set(xlabel="seconds", ylabel="generator replicas", title="replicas following the backlog (min 0, max 3)",
           ylim=(0, 3.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------------------------
def test_deployment_files_agree_with_the_code(tmp_path):
    from cogrt.serving import auth, config
    from cogrt.serving.app import app
    from cogrt.serving.options import APP, IMPORT_PATH, POLICY

    conf = yaml.safe_load((DEPLOY / "serve-config.yaml").read_text())
    # the file is what `cogrt serve --emit-config` writes for the flags in its header
    flags = [ln.strip("#\\ ").strip() for ln in (DEPLOY / "serve-config.yaml").read_text().splitlines()[1:4]]
    cmd = " ".join(flags).split()
    assert cmd[:3] == ["cogrt", "serve", "--emit-config"]
    out = tmp_path / "again.yaml"
    res = subprocess.run([sys.executable, "-m", "cogrt.engine.cli", "serve", "--emit-config", str(out), *cmd[4:]],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(out.read_text()) == conf
    app_conf = conf["applications"][0]
    assert app_conf["name"] == APP and app_conf["import_path"] == IMPORT_PATH
    deployments = {d["name"]: d for d in app_conf["deployments"]}
    assert set(deployments) == {"Ingress", "Dispatcher", "Generator"}
    assert deployments["Generator"]["autoscaling_config"]["policy"]["policy_function"] == POLICY
    assert deployments["Generator"]["ray_actor_options"]["num_gpus"] == 1
    port = conf["http_options"]["port"]

    # KubeRay: the same applications, a CPU head, a GPU worker group the autoscaler sizes, the secrets' env names,
    # the volumes for the model and the compile cache, and readiness through /readyz on the Serve port
    svc = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert svc["kind"] == "RayService" and svc["apiVersion"] == "ray.io/v1"
    assert yaml.safe_load(svc["spec"]["serveConfigV2"]) == conf
    cluster = svc["spec"]["rayClusterConfig"]
    import ray
    assert cluster["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2] and cluster["enableInTreeAutoscaling"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert {"containerPort": port, "name": "serve"} in head["ports"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    gpu = cluster["workerGroupSpecs"][0]
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and gpu["maxReplicas"] >= gpu["minReplicas"]
    env = {e["name"]: e for e in worker["env"]}
    assert auth.ENV in env and config.DB_ENV in env and config.OUTPUTS_ENV in env and "COGRT_CACHE" in env
    assert env[auth.ENV]["valueFrom"]["secretKeyRef"]["name"] == "cogrt-secrets"
    assert app_conf["args"]["compile_cache"].startswith(env["COGRT_CACHE"]["value"])
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert {"/models", "/cache"} <= mounts and app_conf["args"]["model"].startswith("/models")
    routes = set(app.openapi()["paths"])
    assert {"/readyz", "/healthz", "/v1/videos", "/v1/models"} <= routes, routes

    # the container: cogrt with the serving extras on a CUDA PyTorch image, bytecode compiled at build time
    docker = (DEPLOY / "Dockerfile").read_text()
    assert "FROM ${BASE}" in docker and "pytorch/pytorch" in docker and "cuda" in docker
    assert '".[serve,postgres]"' in docker and "compileall" in docker and f"EXPOSE {port}" in docker
    copied = {ln.split()[1] for ln in docker.splitlines() if ln.startswith("COPY ")}
    assert {"engine", "kernels", "serving", "train", "bench", "models", "pyproject.toml"} <= copied


def test_a_replica_over_two_ranks(ray_serve, tmp_path):
    """A generator replica spanning two ranks (the `cfg` layout; gloo processes on the CPU, as two GPUs would run
    it) serves jobs through the HTTP API. A rank killed mid-job takes its replica down: the job is retried on the
    rebuilt replica and completes."""
    import ray
    from ray import serve
    svc = run_app(ray_serve, tmp_path, "ranks", parallel="cfg", cpus_per_replica=1.0)
    try:
        ranks = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("cogrt-rank-")]
        assert len(ranks) == 1, ranks  # rank 1; rank 0 is the replica itself
        v = svc.wait(svc.create(seed=5).json()["id"])  # (its frames are one process's: tests/test_parallel.py)
        assert v["status"] == "completed" and v["cogrt"]["frames"] == 9

        vid = svc.create(num_inference_steps=24).json()["id"]
        with svc.client() as c:
            for _ in range(600):
                if c.get(f"/v1/videos/{vid}").json()["progress"] > 10:
                    break
                time.sleep(0.1)
        ray.kill(ray.get_actor(ranks[0], namespace="serve"), no_restart=True)
        done = svc.wait(vid, timeout=300)
        assert done["status"] == "completed" and done["cogrt"]["attempts"] == 2, done
    finally:
        serve.delete("ranks")
