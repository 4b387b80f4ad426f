"""The video service end to end on the CPU: real Ray Serve, real SQLite, the bundled tiny model, the official openai
client. One app with two generator replicas and two API keys serves most tests; the module ends by killing one
of its replicas mid-job and by restarting the whole app on the same store."""
from __future__ import annotations

import concurrent.futures
import io
import json
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("ray")
from serving_cases import KEY_A, KEY_B, LORA, PROMPT, SMALL, generator_actors, run_app  # noqa: E402

APP = "main"


@pytest.fixture(scope="module")
def svc(ray_serve, tmp_path_factory):
    from ray import serve
    # lora_bypass_s: how long a job may be passed over for one of a free replica's LoRA set. On a loaded 2-core
    # machine the LoRA routing test's jobs wait longer than the default 30 s, and past it the dispatcher takes jobs
    # oldest first whatever their set (serving/store.py, claim): the test would check the fairness rule instead
    s = run_app(ray_serve, tmp_path_factory.mktemp("main"), APP, replicas=2, max_jobs_per_key=12, max_steps=100,
                lora_bypass_s=600.0)
    yield s
    serve.delete(APP)


def openai_client(svc, key=KEY_A):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{svc.url}/v1", api_key=key, max_retries=0)


def test_openai_client_end_to_end(svc, tmp_path):
    """create_and_poll, download_content (the mp4 decodes to the frames and size asked for), the thumbnail, list
    with pagination, delete."""
    import av
    client = openai_client(svc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks its videos API deprecated
        video = client.videos.create_and_poll(prompt=PROMPT, size="64x64", seconds="1",
                                              extra_body={"num_inference_steps": 3, "seed": 7}, poll_interval_ms=200)
        assert video.status == "completed" and video.progress == 100, video
        assert video.size == "64x64" and video.seconds == "1" and video.model == "cogrt-tiny"
        extra = video.model_extra["cogrt"]
        assert extra["frames"] == 9 and extra["seed"] == 7 and extra["steps_computed"] == 3
        assert {"queue_wait", "text", "denoise", "decode", "write"} <= set(extra["timings"])
        mp4 = tmp_path / "v.mp4"
        client.videos.download_content(video.id).write_to_file(mp4)
        with av.open(str(mp4)) as f:
            frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
        assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
        thumb = client.videos.download_content(video.id, variant="thumbnail").content
        from PIL import Image
        assert Image.open(io.BytesIO(thumb)).size == (64, 64)
        second = client.videos.create(prompt=PROMPT, size="64x64", seconds="1",
                                      extra_body={"num_inference_steps": 2})
        ids = [v.id for v in client.videos.list(limit=1, order="desc")]  # the SDK follows the pages
        assert ids[:2] == [second.id, video.id]
        assert client.videos.delete(video.id).deleted
        with pytest.raises(Exception) as e:
            client.videos.retrieve(video.id)
        assert getattr(e.value, "status_code", None) == 404
    for _ in range(50):  # a finished job's files go with it (the dispatcher removes them within a second or so)
        if not Path(svc.cfg.outputs, "videos", f"{video.id}.mp4").exists():
            break
        time.sleep(0.1)
    assert not Path(svc.cfg.outputs, "videos", f"{video.id}.mp4").exists()
    svc.wait(second.id)


def test_six_concurrent_jobs_and_lora_routing(svc):
    """Two replicas, six jobs at once with two LoRA sets: all complete, and jobs go to the replica that has their
    set fused, so the engine switches sets about once a replica, not once a job.

    The six are posted while each replica runs a longer job of one set, so that all six wait in the queue when the
    dispatcher first chooses among them. Posted to idle replicas, the order in which they arrive decides instead:
    were two of one set to arrive first, both replicas would take that set (a replica never idles while a job
    waits), and one would switch again."""
    sets = [json.dumps([{"name": LORA, "weight": 1.0}]), json.dumps([{"name": LORA, "weight": 0.5}])]
    first = []
    for i, s in enumerate(sets):  # one at a time: the second finds one replica busy, and goes to the other
        first.append(svc.create(loras=s, seed=10 + i, num_inference_steps=60).json()["id"])
        svc.wait(first[-1], until=("in_progress", "completed", "failed"))
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        posted = list(ex.map(lambda i: svc.create(loras=sets[i % 2], seed=i), range(6)))
    assert all(r.status_code == 202 for r in posted), [r.text for r in posted]
    with svc.client() as c:  # the premise: both longer jobs still run, so none of the six has been dispatched
        assert [c.get(f"/v1/videos/{v}").json()["status"] for v in first] == ["in_progress"] * 2
    done = [svc.wait(v) for v in first] + [svc.wait(r.json()["id"]) for r in posted]
    assert all(v["status"] == "completed" for v in done), done
    switches = sum(bool(v["cogrt"]["lora_switched"]) for v in done)
    replicas = {v["cogrt"]["replica"] for v in done}
    assert len(replicas) == 2 and switches <= 3, [(v["cogrt"]["replica"], v["cogrt"]["loras"],
                                                   v["cogrt"]["lora_switched"]) for v in done]


def test_events_stream_progress_then_the_final_object(svc):
    """The store takes a job's progress at most 4 times a second and the stream polls it as often, so the job runs
    60 steps, long enough on any machine for several values: a 12-step job (about 0.4 s of steps) showed only 2 on
    a loaded CI machine."""
    vid = svc.create(num_inference_steps=60).json()["id"]
    events = []
    with svc.client() as c, c.stream("GET", f"/v1/videos/{vid}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and events[-1][1]["status"] == "completed" and events[-1][1]["id"] == vid
    progress = [d["progress"] for k, d in events if k == "progress"]
    assert progress == sorted(progress) and len(set(progress)) >= 3, progress


def test_an_idle_replica_starts_a_job_at_once(svc):
    """The dispatcher is kicked by every new job: the time from the 202 to the job's start on an idle replica."""
    for r in [svc.create() for _ in range(1)]:
        svc.wait(r.json()["id"])
    time.sleep(1.0)  # both replicas idle
    waits = []
    for _ in range(3):
        v = svc.wait(svc.create().json()["id"])
        waits.append(v["cogrt"]["timings"]["queue_wait"])
    print(f"queue wait on an idle replica: {[round(w * 1000) for w in waits]} ms")
    assert min(waits) < 0.5, waits  # the GPU run measures the 100 ms target (bench/RESULTS.md); CI is noisy


def test_idempotency_key_returns_the_same_job(svc):
    with svc.client() as c:
        data = {"prompt": PROMPT, **SMALL}
        a = c.post("/v1/videos", data=data, headers={"Idempotency-Key": "retry-1"})
        b = c.post("/v1/videos", data=data, headers={"Idempotency-Key": "retry-1"})
        other = c.post("/v1/videos", data=data, headers={"Idempotency-Key": "retry-2"})
    assert a.status_code == 202 and b.status_code == 200 and a.json()["id"] == b.json()["id"] != other.json()["id"]
    svc.wait(a.json()["id"])


def test_auth_and_ownership(svc):
    with svc.client(None) as c:
        r = c.get("/v1/videos")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with svc.client("wrong-key") as c:
        assert c.get("/v1/models").status_code == 401
    mine = svc.create(KEY_A).json()["id"]
    with svc.client(KEY_B) as c:
        for path in (f"/v1/videos/{mine}", f"/v1/videos/{mine}/content", f"/v1/videos/{mine}/events"):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "video_not_found", path
        assert c.delete(f"/v1/videos/{mine}").status_code == 404
        assert mine not in [v["id"] for v in c.get("/v1/videos", params={"limit": 100}).json()["data"]]
    svc.wait(mine)


def test_a_public_bind_without_keys_is_refused(tmp_path):
    from cogrt.serving.config import ServeConfig
    with pytest.raises(ValueError, match="without API keys"):
        ServeConfig(host="0.0.0.0", db=f"sqlite:///{tmp_path}/j.db", outputs=str(tmp_path)).check_bind()
    ServeConfig(host="0.0.0.0", insecure_no_auth=True, db=f"sqlite:///{tmp_path}/j.db",
                outputs=str(tmp_path)).check_bind()
    out = subprocess.run([sys.executable, "-m", "cogrt.engine.cli", "serve", "--host", "0.0.0.0", "--db",
                          f"sqlite:///{tmp_path}/k.db", "--outputs", str(tmp_path)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=120)
    assert out.returncode == 2 and "without API keys" in out.stderr


BAD = [  # (fields, files, the param the error names, text the message must hold)
    ({"model": "sora-2"}, None, "model", "cogrt-tiny"),
    ({"size": "720x1280"}, None, "size", "64x64"),
    ({"seconds": "8"}, None, "seconds", "'1'"),
    ({"mode": "fp8"}, None, "mode", "exact"),
    ({"mode": "turbo"}, None, "mode", "exact"),
    ({"prompt": "   "}, None, "prompt", "empty"),
    ({"prompt": "x" * 2001}, None, "prompt", "2000"),
    ({"num_inference_steps": "0"}, None, "num_inference_steps", "between 1"),
    ({"num_inference_steps": "-3"}, None, "num_inference_steps", "between 1"),
    ({"guidance_scale": "nan"}, None, "guidance_scale", "finite"),
    ({"frames": "10"}, None, "frames", "9"),
    ({"loras": json.dumps([{"name": "nope", "weight": 1}])}, None, "loras", LORA),
    ({"loras": json.dumps([{"name": "../models/cogrt-tiny-concepts-lora", "weight": 1}])}, None, "loras", LORA),
    ({"loras": json.dumps([{"name": "/etc/passwd", "weight": 1}])}, None, "loras", "unknown LoRA"),
    ({"loras": "[{not json"}, None, "loras", "JSON"),
    ({"loras": json.dumps({"name": LORA})}, None, "loras", "list"),
    ({"bogus_field": "1"}, None, "bogus_field", "not permitted"),
    ({}, {"input_reference": ("a.png", b"not an image at all", "image/png")}, "input_reference", "PNG"),
]


@pytest.mark.parametrize("fields,files,param,says", BAD)
def test_bad_input_names_the_field_and_the_valid_values(svc, fields, files, param, says):
    data = {"prompt": PROMPT, **SMALL, **fields}
    with svc.client() as c:
        r = c.post("/v1/videos", data=data, files=files)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"] and err["type"] == "invalid_request_error", err


def test_images_an_image_for_text_to_video_a_bomb_and_a_big_one(svc):
    from PIL import Image

    def png(w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="PNG")
        return buf.getvalue()
    with svc.client() as c:
        r = c.post("/v1/videos", data={"prompt": PROMPT, **SMALL}, files={"input_reference": ("x.jpg", png(64, 64))})
        assert r.status_code == 400 and r.json()["error"]["code"] == "image_not_supported"
        bomb = png(5000, 5000)  # a few kB compressed, 25 megapixels decoded
        r = c.post("/v1/videos", data={"prompt": PROMPT, **SMALL}, files={"input_reference": ("b.png", bomb)})
        assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]
        r = c.post("/v1/videos", data={"prompt": PROMPT, **SMALL},
                   files={"input_reference": ("huge.bin", b"\0" * (svc.cfg.max_body_bytes + 10))})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unknown_job_and_error_shape(svc):
    with svc.client() as c:
        for r in (c.get("/v1/videos/video_nope"), c.delete("/v1/videos/video_nope"),
                  c.get("/v1/videos/video_nope/content"), c.get("/v1/nothing-here")):
            assert r.status_code == 404 and set(r.json()["error"]) == {"code", "message", "param", "type"}


def test_models_lists_sizes_lengths_modes_and_loras(svc):
    with svc.client() as c:
        m = c.get("/v1/models").json()["data"][0]
    assert m["id"] == "cogrt-tiny" and "64x64" in m["sizes"] and "128x128" in m["sizes"]
    assert m["seconds"] == ["1", "2", "3", "4", "5", "6"] and m["modes"] == ["exact"] and m["loras"] == [LORA]


def test_content_serves_byte_ranges(svc):
    v = svc.wait(svc.create().json()["id"])
    with svc.client() as c:
        whole = c.get(f"/v1/videos/{v['id']}/content")
        part = c.get(f"/v1/videos/{v['id']}/content", headers={"Range": "bytes=10-29"})
        tail = c.get(f"/v1/videos/{v['id']}/content", headers={"Range": "bytes=-16"})
        bad = c.get(f"/v1/videos/{v['id']}/content", headers={"Range": f"bytes={len(whole.content) + 5}-"})
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    assert whole.content[:12].find(b"ftyp") == 4  # an mp4
    assert part.status_code == 206 and part.content == whole.content[10:30]
    assert part.headers["content-range"] == f"bytes 10-29/{len(whole.content)}"
    assert tail.status_code == 206 and tail.content == whole.content[-16:]
    assert bad.status_code == 416


def test_delete_a_running_job_stops_it_and_removes_its_files(svc):
    vid = svc.create(num_inference_steps=100, size="128x128").json()["id"]
    svc.wait(vid, until=("in_progress",))
    with svc.client() as c:
        for _ in range(100):  # until it is past its first steps
            if c.get(f"/v1/videos/{vid}").json()["progress"] > 5:
                break
            time.sleep(0.1)
        assert c.delete(f"/v1/videos/{vid}").json() == {"id": vid, "object": "video.deleted", "deleted": True}
        assert c.get(f"/v1/videos/{vid}").status_code == 404
    from cogrt.serving.store import JobStore
    store = JobStore(svc.cfg.db)
    for _ in range(200):  # the replica stops at its next step; the dispatcher then removes the row
        if store.get(vid, deleted=True) is None:
            break
        time.sleep(0.1)
    assert store.get(vid, deleted=True) is None
    assert not Path(svc.cfg.outputs, "videos", f"{vid}.mp4").exists()


def test_schemathesis_finds_no_server_error(svc, tmp_path):
    """A bounded property-based run over the OpenAPI schema: no generated request gets a 5xx."""
    st = pytest.importorskip("schemathesis")
    out = subprocess.run([str(Path(sys.executable).parent / "st"), "run",
                          f"{svc.url}/openapi.json", "--url", svc.url, "--checks", "not_a_server_error",
                          "--max-examples", "8", "-H", f"Authorization: Bearer {KEY_B}", "--seed", "1",
                          "--request-timeout", "30", "--phases", "examples,coverage,fuzzing",
                          "--exclude-path-regex", "/events$"],  # a stream: it lasts as long as its job
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)  # (its cache goes there)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert st is not None
    # the jobs it made would keep the replicas busy for the tests after it
    with svc.client(KEY_B) as c:
        for v in c.get("/v1/videos", params={"limit": 100}).json()["data"]:
            c.delete(f"/v1/videos/{v['id']}")


def test_metrics_are_exported(svc, ray_serve):
    import httpx
    svc.wait(svc.create().json()["id"])
    deadline, text = time.time() + 30, ""
    while time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{ray_serve['metrics_port']}/metrics", timeout=10).text
        if "ray_cogrt_stage_seconds" in text and "ray_cogrt_jobs" in text:
            break
        time.sleep(1)
    for name in ("ray_cogrt_jobs", "ray_cogrt_backlog", "ray_cogrt_stage_seconds_bucket",
                 "ray_cogrt_fraction_steps_computed_bucket", "ray_cogrt_jobs_finished"):
        assert name in text, name


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Chromium is not installed here (Debian's chromium and chromium-driver); .ci/run installs them")
    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1280,1000"):
        opts.add_argument(flag)
    b = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))
    yield b
    b.quit()


def test_playground_in_a_real_browser(svc, browser, tmp_path):
    """The page at / against a live service on the tiny model: a prompt becomes a playing <video>, the job shows
    in the list, and an invalid size shows its error by the size field. Screenshots in the test's folder."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    b = browser
    b.get(f"{svc.url}/")
    b.find_element(By.ID, "key").send_keys(KEY_A)
    b.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
    wait = WebDriverWait(b, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    assert b.find_element(By.ID, "model").get_attribute("value") == "cogrt-tiny"
    assert b.find_elements(By.CSS_SELECTOR, "[data-lora='cogrt-tiny-concepts-lora']")  # the LoRA picker

    def fill(field, value):  # as a person's typing ends: the value, then its input event
        b.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                         b.find_element(By.ID, field), value)
    fill("size", "64x64")
    fill("num_inference_steps", "3")
    Select(b.find_element(By.ID, "seconds")).select_by_value("1")
    b.find_element(By.ID, "generate").click()
    WebDriverWait(b, 240).until(lambda d: d.execute_script(
        "const v = document.getElementById('video'); return v.readyState >= 2 && v.duration > 0"))
    duration = b.execute_script("return document.getElementById('video').duration")
    assert 0.5 < duration < 2.0, duration  # 9 frames at 8 fps
    wait.until(lambda d: "completed" in d.find_element(By.ID, "jobs").text)
    b.save_screenshot(str(tmp_path / "playground-video.png"))

    fill("size", "999x999")
    b.find_element(By.ID, "generate").click()
    err = b.find_element(By.CSS_SELECTOR, ".err[data-for='size']")
    wait.until(lambda d: err.text)
    assert "size must be one of" in err.text and "64x64" in err.text
    b.save_screenshot(str(tmp_path / "playground-error.png"))
    print(f"screenshots: {tmp_path}")


def test_a_killed_replica_mid_job_is_replaced_and_the_job_retried(svc):
    import ray
    vid = svc.create(num_inference_steps=30, size="128x128").json()["id"]
    v = svc.wait(vid, until=("in_progress",))
    with svc.client() as c:
        for _ in range(200):
            v = c.get(f"/v1/videos/{vid}").json()
            if v["progress"] > 5 and v["cogrt"]["replica"]:
                break
            time.sleep(0.1)
    victim = [a for a in generator_actors(APP) if a.endswith(v["cogrt"]["replica"])]
    assert victim, (v["cogrt"]["replica"], generator_actors(APP))
    ray.kill(ray.get_actor(victim[0], namespace="serve"), no_restart=True)
    done = svc.wait(vid, timeout=180)
    assert done["status"] == "completed" and done["cogrt"]["attempts"] == 2, done
    assert done["cogrt"]["replica"] != v["cogrt"]["replica"]


def test_restarting_the_app_loses_nothing(svc, ray_serve):
    """Completed jobs stay downloadable, and jobs queued or running when the app went away run after it is back
    (on one replica: enough to show it, and quicker to start)."""
    import dataclasses

    from ray import serve

    from cogrt.serving.app import build_app
    done = svc.wait(svc.create().json()["id"])
    waiting = [svc.create(num_inference_steps=10, seed=i).json()["id"] for i in range(3)]
    time.sleep(0.5)
    serve.delete(APP)
    serve.run(build_app(dataclasses.replace(svc.cfg, replicas=1).to_args()), name=APP, route_prefix=f"/{APP}")
    with svc.client() as c:
        assert c.get(f"/v1/videos/{done['id']}/content").status_code == 200
    finished = [svc.wait(v, timeout=240) for v in waiting]
    assert [f["status"] for f in finished] == ["completed"] * 3, finished
