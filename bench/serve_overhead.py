"""What the service adds to a job, on one GPU (issue: serving). In one run:

1. in process: `pipe.generate` plus the mp4 write, back to back, in each mode (the baseline);
2. `cogrt serve` started as its own process on the same checkpoint and compile cache: the seconds to /readyz, and
   where a replica's seconds went (its load timings, from the replica's log);
3. the same requests through HTTP with the official openai client (create, poll every 50 ms, download): the
   seconds each adds over (1);
4. `--jobs` jobs submitted at once: all complete, and the GPU's idle time between consecutive jobs (the next job's
   engine start minus the last one's engine end, from the jobs' own timestamps).

    python -m cogrt.bench.serve_overhead --model /tmp/ck5b --modes fp8,fast --steps 6 --repeats 3 --jobs 8 \\
        --json serve-overhead.json
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a panda playing guitar in a bamboo forest, sunlight through the leaves"


def in_process(a, modes) -> dict:
    import torch

    from cogrt.engine import load_pipeline
    from cogrt.engine.video import write_mp4
    t0 = time.perf_counter()
    pipe = load_pipeline(a.model, mode=a.load_mode, warm_up=True, cache_dir=a.cache_dir)
    out = {"load_s": time.perf_counter() - t0, "load": pipe.load_timings}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            times = []
            for i in range(a.repeats + 1):  # the first is a warm-up at this request's size
                t = time.perf_counter()
                res = pipe.generate(PROMPT, num_inference_steps=a.steps, seed=i, mode=mode, **request_size(a))
                write_mp4(res.frames, Path(tmp) / "v.mp4", res.fps, a.video_preset)
                times.append(time.perf_counter() - t)
            out[mode] = {"seconds": times[1:], "median_s": statistics.median(times[1:])}
            print(f"in process, {mode}: {[round(x, 3) for x in times[1:]]} s", flush=True)
    del pipe
    gc.collect()
    torch.cuda.empty_cache()
    return out


def request_size(a) -> dict:
    return {k: v for k, v in (("num_frames", a.frames), ("height", a.height), ("width", a.width)) if v}


def start_server(a, state: Path) -> tuple[subprocess.Popen, float]:
    env = dict(os.environ, COGRT_STATE=str(state))
    cmd = [sys.executable, "-m", "cogrt.engine.cli", "serve", "--model", a.model, "--mode", a.load_mode, "--port",
           str(a.port), "--compile-cache", a.cache_dir, "--max-steps", "1000", "--max-queued-jobs", "1000",
           "--video-preset", a.video_preset]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import httpx
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"cogrt serve exited: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{a.port}/readyz", timeout=2).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def replica_load_log() -> list[str]:
    """The generator replicas' "ready in" lines from Ray's logs: their own load and warm-up seconds."""
    lines = []
    for f in glob.glob("/tmp/ray/session_latest/logs/serve/replica_*Generator*.log"):
        lines += [ln.strip() for ln in Path(f).read_text().splitlines() if "ready in" in ln]
    return lines


def through_http(a, modes) -> dict:
    import warnings

    import openai
    warnings.simplefilter("ignore", DeprecationWarning)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key="none", max_retries=0, timeout=600)
    size = request_size(a)
    extra = {"num_inference_steps": a.steps, **({"frames": size["num_frames"]} if "num_frames" in size else {})}
    fields = {"size": f"{size['width']}x{size['height']}"} if "width" in size else {}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            rows = []
            for i in range(a.repeats + 1):
                t = time.perf_counter()
                v = client.videos.create_and_poll(prompt=PROMPT, **fields, poll_interval_ms=50,
                                                  extra_body={**extra, "seed": i, "mode": mode})
                client.videos.download_content(v.id).write_to_file(Path(tmp) / "v.mp4")
                wall = time.perf_counter() - t
                info = v.model_extra["cogrt"]
                assert v.status == "completed", v
                rows.append({"wall_s": wall, "server_s": v.completed_at - v.created_at,
                             "engine_s": info["timings"]["total"], "write_s": info["timings"]["write"],
                             "queue_wait_s": info["timings"]["queue_wait"]})
            rows = rows[1:]
            out[mode] = {"runs": rows, "median_s": statistics.median(r["wall_s"] for r in rows),
                         "queue_wait_ms": [round(r["queue_wait_s"] * 1000, 1) for r in rows]}
            print(f"HTTP, {mode}: {[round(r['wall_s'], 3) for r in rows]} s, queue wait "
                  f"{out[mode]['queue_wait_ms']} ms", flush=True)
    return out


def back_to_back(a) -> dict:
    import httpx
    size = request_size(a)
    data = {"prompt": PROMPT, "num_inference_steps": str(a.steps), "mode": a.load_mode}
    if "width" in size:
        data["size"] = f"{size['width']}x{size['height']}"
    if "num_frames" in size:
        data["frames"] = str(size["num_frames"])
    with httpx.Client(base_url=f"http://127.0.0.1:{a.port}", timeout=60) as c:
        t0 = time.perf_counter()
        ids = [c.post("/v1/videos", data={**data, "seed": str(i)}).json()["id"] for i in range(a.jobs)]
        done = {}
        while len(done) < len(ids):
            for i in ids:
                if i not in done:
                    v = c.get(f"/v1/videos/{i}").json()
                    if v["status"] in ("completed", "failed"):
                        done[i] = v
            time.sleep(0.2)
        wall = time.perf_counter() - t0
    jobs = sorted(done.values(), key=lambda v: v["cogrt"]["engine_started_at"] or 0)
    statuses = [v["status"] for v in jobs]
    spans = [(v["cogrt"]["engine_started_at"], v["cogrt"]["engine_ended_at"]) for v in jobs]
    gaps = [b[0] - a_[1] for a_, b in zip(spans, spans[1:])]
    out = {"jobs": a.jobs, "completed": statuses.count("completed"), "wall_s": wall, "gaps_s": gaps,
           "idle_total_s": sum(gaps), "per_job_engine_s": [e - s for s, e in spans]}
    print(f"back to back: {out['completed']}/{a.jobs} completed in {wall:.1f} s; GPU idle between jobs "
          f"{[round(g * 1000) for g in gaps]} ms, {sum(gaps):.3f} s in total", flush=True)
    return out


def import_times() -> list[tuple[str, float]]:
    """`python -X importtime` of what a replica imports to load a pipeline: the top-level packages by seconds."""
    code = ("import cogrt.engine.pipeline as p; p._imports(torchao=True, dynamo=True); import ray.serve, fastapi, "
            "sqlalchemy")
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True).stderr
    top: dict[str, float] = {}
    for line in err.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) == 1:  # a top-level import: its cumulative time
            top[m.group(3)] = top.get(m.group(3), 0) + int(m.group(1)) / 1e6
    return sorted(top.items(), key=lambda kv: -kv[1])[:12]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--load-mode", default="fp8", help="the mode the pipeline and the service load")
    ap.add_argument("--modes", default="fp8,fast", help="the request modes to measure")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--port", type=int, default=8800)
    ap.add_argument("--video-preset", default="veryfast", help="the mp4 writer's, in process and in the service")
    ap.add_argument("--cache-dir", default=None, help="the compile cache both share (default: a fresh one)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    a.cache_dir = a.cache_dir or tempfile.mkdtemp(prefix="cogrt-cache-")
    modes = a.modes.split(",")
    out = {"command": "python -m cogrt.bench.serve_overhead " + " ".join(sys.argv[1:] if argv is None else argv),
           "steps": a.steps}
    out["in_process"] = in_process(a, modes)  # also fills the compile cache the server then starts warm from
    with tempfile.TemporaryDirectory() as state:
        proc, ready = start_server(a, Path(state))
        out["readiness"] = {"to_readyz_s": ready, "replica": replica_load_log()}
        print(f"cogrt serve: /readyz after {ready:.1f} s; {out['readiness']['replica']}", flush=True)
        try:
            out["http"] = through_http(a, modes)
            out["overhead_s"] = {m: out["http"][m]["median_s"] - out["in_process"][m]["median_s"] for m in modes}
            print(f"added per job through HTTP: {json.dumps({k: round(v, 3) for k, v in out['overhead_s'].items()})}",
                  flush=True)
            out["back_to_back"] = back_to_back(a)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    out["import_times_s"] = import_times()
    print(f"imports (s): {out['import_times_s']}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
