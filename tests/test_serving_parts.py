"""The service's parts without Ray: the job store on SQLite and on a real PostgreSQL server, what the model card
accepts (an image-to-video model too), API keys, byte ranges, and the Serve config that `cogrt serve` emits."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cogrt.serving.schema import ApiError, VideoCreateForm

pytest.importorskip("sqlalchemy")


def job(i: int, owner: str = "a", key: str = "", **kw) -> dict:
    now = time.time()
    return {**dict(id=f"video_{i:04d}", owner=owner, model="m", created_at=now + i * 1e-3, deadline_at=now + 3600,
                   params=json.dumps({"prompt": str(i)}), lora_key=key, max_attempts=2), **kw}


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on loopback, started with Debian's binaries (.ci/run installs them)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL is not installed here (Debian's postgresql package); .ci/run installs it")
    pytest.importorskip("psycopg")
    bindir = Path(bins[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="cogrt-pg-"))  # not under pytest's 0700 root: the server's user reads it
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    from serving_cases import free_port
    port = free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "cogrt", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "start", "-o",
                    f"-h 127.0.0.1 -p {port} -k {sock}"], check=True, capture_output=True)
    yield f"postgresql+psycopg://cogrt@127.0.0.1:{port}/postgres"
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    from cogrt.serving.store import JobStore
    url = f"sqlite:///{tmp_path / 'jobs.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres")
    s = JobStore(url)
    if request.param == "postgresql":
        from cogrt.serving.store import jobs
        with s.engine.begin() as c:
            c.execute(jobs.delete())
    yield s
    s.close()


def test_create_claim_finish_and_list(store):
    rows = [store.create(job(i))[0] for i in range(3)]
    assert [r["status"] for r in rows] == ["queued"] * 3 and store.queued() == 3 and store.backlog() == 3
    a = store.claim(lease_s=30)
    assert a["id"] == "video_0000" and a["status"] == "in_progress" and a["attempt"] == 1
    assert store.finish(a["id"], 1, status="completed", progress=100, result={"x": 1})
    assert not store.finish(a["id"], 1, status="failed")  # finished: no longer this attempt's to write
    assert store.get(a["id"])["status"] == "completed" and store.counts() == {"completed": 1, "queued": 2}
    page, more = store.list("a", None, 2, "desc")
    assert [r["id"] for r in page] == ["video_0002", "video_0001"] and more
    page, more = store.list("a", "video_0001", 2, "desc")
    assert [r["id"] for r in page] == ["video_0000"] and not more
    assert store.list("b", None, 10, "asc") == ([], False)


def test_claims_never_overlap_and_prefer_a_fused_lora_set(store):
    for i, key in enumerate(["", "A", "B", "A"]):
        store.create(job(i, key=key))
    first = store.claim(30, prefer={"A"}, bypass_s=60)  # the oldest has waited under a minute: an A goes first
    assert first["lora_key"] == "A"
    second = store.claim(30, prefer={"A"}, bypass_s=0)  # no bypass: strictly the oldest
    assert second["id"] == "video_0000"
    third = store.claim(30, bypass_s=60, avoid={"B"})  # the oldest left is B's; another replica runs B
    assert third["lora_key"] == "A"
    assert store.claim(30)["lora_key"] == "B" and store.claim(30) is None


def test_retries_then_fails_and_fences_stale_writers(store):
    store.create(job(0))
    a = store.claim(30)
    assert store.retry_or_fail(a["id"], 1, "replica_failed", "boom") == "queued"
    assert not store.heartbeat(a["id"], 1, 30)[0]  # the old attempt lost the job
    b = store.claim(30)
    assert b["attempt"] == 2 and store.heartbeat(b["id"], 2, 30, progress=40) == (True, False)
    assert store.retry_or_fail(b["id"], 2, "replica_failed", "boom") == "failed"
    failed = store.get(b["id"])
    assert failed["status"] == "failed" and "after 2 attempts" in failed["error_message"]
    assert store.retry_or_fail(b["id"], 2, "x", "y") is None


def test_expired_leases_deadlines_and_idempotency(store):
    store.create(job(0))
    a = store.claim(lease_s=-1)  # a lease that has run out already
    assert [j["id"] for j in store.expired_leases()] == [a["id"]]
    store.create(job(1, deadline_at=time.time() - 1))
    assert {j["id"] for j in store.past_deadline()} == {"video_0001"}
    assert store.fail_now("video_0001", "deadline_exceeded", "late")
    one, created = store.create(job(2, idempotency_key="k"))
    again, created_again = store.create(job(3, idempotency_key="k"))
    assert created and not created_again and again["id"] == one["id"]
    assert store.create(job(4, owner="b", idempotency_key="k"))[1]  # keys are per owner


def test_delete_queued_running_and_finished(store):
    for i in range(3):
        store.create(job(i))
    running = store.claim(30)
    assert store.delete("video_0001", "a")["status"] == "queued" and store.get("video_0001", deleted=True) is None
    assert store.delete(running["id"], "b") is None  # not b's
    store.delete(running["id"], "a")
    assert store.get(running["id"]) is None and store.heartbeat(running["id"], 1, 30) == (True, True)
    assert store.finished_deleted() == []  # still running: its replica stops it first
    store.finish(running["id"], 1, status="failed", error_code="cancelled")
    assert [j["id"] for j in store.finished_deleted()] == [running["id"]]


# ---------------------------------------------------------------------------------------------------------------
def card(checkpoint, variant, **cfg):
    from cogrt.serving.catalog import card_for
    from cogrt.serving.config import ServeConfig
    return card_for(ServeConfig(model=str(checkpoint(variant)), db="sqlite://", outputs="/tmp", **cfg))


def test_cards_from_the_checkpoint(checkpoint):
    t2v = card(checkpoint, "5b")
    assert t2v.sizes == ["64x64", "32x32"] and t2v.seconds == ["1"] and t2v.frames == [9] and t2v.modes == ["exact"]
    i2v = card(checkpoint, "5b-i2v")
    assert i2v.cfg.is_i2v and i2v.sizes == ["64x64"]  # learned positions: the native size only
    assert card(checkpoint, "1.5-5b").fps == 16


@pytest.mark.parametrize("fields,image,code,param", [
    ({}, False, "image_required", "input_reference"),
    ({"size": "32x32"}, True, "invalid_size", "size"),
    ({"teacache_threshold": "0.1"}, True, "teacache_unavailable", "teacache_threshold"),
    ({"cache": "fast"}, True, "invalid_cache", "cache"),  # no calibrated levels beside this checkpoint
])
def test_an_image_to_video_model_needs_its_image(checkpoint, fields, image, code, param):
    from cogrt.serving.catalog import resolve
    form = VideoCreateForm(prompt="a cat", **fields)
    with pytest.raises(ApiError) as e:
        resolve(card(checkpoint, "5b-i2v"), form, [], image, 2000)
    assert (e.value.code, e.value.param) == (code, param)
    if code == "invalid_size":
        assert "64x64" in e.value.message
    ok = resolve(card(checkpoint, "5b-i2v"), VideoCreateForm(prompt="a cat"), [], True, 2000)
    assert ok["frames"] == 9 and (ok["width"], ok["height"]) == (64, 64)


def test_cache_levels_from_the_models_calibration():
    """The bundled model ships step_cache.json: its levels are listed and a request for one reaches the engine."""
    from cogrt.serving.catalog import card_for, resolve
    from cogrt.serving.config import ServeConfig
    from cogrt.serving.schema import to_request
    c = card_for(ServeConfig(db="sqlite://", outputs="/tmp"))
    assert c.cache_levels == ["safe", "balanced", "fast"] and c.info([]).cache_levels == c.cache_levels
    params = resolve(c, VideoCreateForm(prompt="a cat", cache="balanced"), [], False, 2000)
    assert params["cache"] == "balanced" and to_request(params, {}).cache == "balanced"
    with pytest.raises(ApiError) as e:
        resolve(c, VideoCreateForm(prompt="a cat", cache="balanced", teacache_threshold=0.1), [], False, 2000)
    assert (e.value.code, e.value.param) == ("invalid_cache", "cache")


def test_keys_are_hashed_and_owners_apart(tmp_path):
    from cogrt.serving.auth import ANONYMOUS, Keys, hash_key, load_hashes
    f = tmp_path / "keys"
    f.write_text("# ops\nalpha\nbeta\n")
    hashes = load_hashes(str(f), env="gamma")
    assert len(hashes) == 3 and "alpha" not in json.dumps(hashes) and hash_key("alpha") in hashes
    keys = Keys(hashes)
    owners = {keys.owner(f"Bearer {k}") for k in ("alpha", "beta", "gamma")}
    assert len(owners) == 3 and None not in owners
    assert keys.owner("Bearer delta") is None and keys.owner(None) is None and keys.owner("alpha") is None
    assert Keys([]).owner(None) == ANONYMOUS


def test_byte_ranges():
    from cogrt.serving.limits import byte_range
    assert byte_range(None, 100) == (0, 100, 200)
    assert byte_range("bytes=0-9", 100) == (0, 10, 206)
    assert byte_range("bytes=90-", 100) == (90, 100, 206)
    assert byte_range("bytes=-5", 100) == (95, 100, 206)
    assert byte_range("bytes=50-500", 100) == (50, 100, 206)
    for bad in ("bytes=100-", "bytes=5-1", "items=0-1", "bytes=0-1,4-5", "bytes=-0", "bytes=a-b"):
        with pytest.raises(ApiError) as e:
            byte_range(bad, 100)
        assert e.value.status == 416, bad


def test_emit_config_is_the_app_build_app_makes(tmp_path):
    import yaml
    out = tmp_path / "serve.yaml"
    res = subprocess.run([sys.executable, "-m", "cogrt.engine.cli", "serve", "--emit-config", str(out),
                          "--autoscale", "0:3", "--db", f"sqlite:///{tmp_path}/j.db", "--outputs", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    conf = yaml.safe_load(out.read_text())
    from ray.serve.schema import ServeDeploySchema
    ServeDeploySchema.model_validate(conf)  # what `serve deploy` checks
    app = conf["applications"][0]
    assert app["import_path"] == "cogrt.serving.app:build_app" and app["args"]["autoscale"] == [0, 3]
    names = {d["name"]: d for d in app["deployments"]}
    assert set(names) == {"Ingress", "Dispatcher", "Generator"}
    auto = names["Generator"]["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (0, 3)
    assert auto["policy"]["policy_function"] == "cogrt.serving.autoscale:BacklogPolicy"


def test_a_running_job_stops_at_its_deadline_or_when_cancelled(store):
    from cogrt.serving.generator import Stop, _Lease, failure
    store.create(job(0))
    j = store.claim(30)
    lease = _Lease(store, j["id"], j["attempt"], 30, "r1")
    try:
        lease.step(10, time.time() + 60)  # fine
        with pytest.raises(Stop) as e:
            lease.step(20, time.time() - 1)
        assert failure(e.value) == ("deadline_exceeded", "the job ran past its deadline")
        store.delete(j["id"], "a")
        lease.last = 0  # the next step reports (and learns of the cancel) at once
        with pytest.raises(Stop) as e:
            lease.step(30, None)
        assert e.value.code == "cancelled"
    finally:
        lease.stop()


def test_engine_errors_become_job_errors():
    from cogrt.engine import OutOfMemory
    from cogrt.serving.generator import failure
    assert failure(OutOfMemory("out of GPU memory generating 49x480x720: ..."))[0] == "out_of_memory"
    assert failure(ValueError("num_frames must be 8N+1"))[0] == "invalid_request"
    assert failure(RuntimeError("boom")) == ("internal_error", "RuntimeError: boom")


def test_expired_outputs_are_found_once(store):
    store.create(job(0))
    j = store.claim(30)
    store.finish(j["id"], 1, status="completed", expires_at=time.time() - 1, video="videos/x.mp4")
    assert [r["id"] for r in store.expired()] == [j["id"]]
    store.mark_files_removed(j["id"])
    assert store.expired() == []


def test_outputs_and_loras_on_an_fsspec_url(tmp_path):
    """memory:// stands in for s3:// or gs://: files are put whole, read by range, fetched, removed."""
    from cogrt.serving.loras import LoraRegistry
    from cogrt.serving.storage import Storage
    s = Storage("memory://cogrt-test/outputs")
    assert not s.local
    local = tmp_path / "v.mp4"
    local.write_bytes(b"0123456789")
    assert s.put_file(local, "videos/a.mp4") == "videos/a.mp4" and not local.exists()
    assert s.size("videos/a.mp4") == 10 and s.read("videos/a.mp4", 2, 5) == b"234"
    assert s.fetch("videos/a.mp4", tmp_path).read_bytes() == b"0123456789"
    s.put_bytes(b"jpg", "videos/a.jpg")
    s.remove("videos/a.mp4", "videos/a.jpg", None)
    assert not s.exists("videos/a.mp4") and not s.exists("videos/a.jpg")
    import fsspec
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/cogrt-test/loras/style.safetensors", b"weights")
    fs.pipe_file("/cogrt-test/loras/concept/pytorch_lora_weights.safetensors", b"more")
    reg = LoraRegistry("memory://cogrt-test/loras", cache_dir=tmp_path / "cache")
    assert reg.names() == ["concept", "style"]
    assert Path(reg.path("style")).read_bytes() == b"weights"
    for bad in ("../loras/style", "/etc/passwd", "a/b", ".."):
        with pytest.raises(KeyError):
            reg.path(bad)
