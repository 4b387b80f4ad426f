"""`cogrt bench serve`: load on a running cogrt service (any base URL and key), the way platform teams measure it.

- closed loop (`--clients N`): N clients, each submitting a job and waiting for it before the next;
- open loop (`--rate R`): jobs arrive as a Poisson process, R a second, whatever is still running.
Requests are drawn (seeded) from the mix given: prompts, sizes, modes and LoRA sets. It reports the jobs accepted,
rejected (429/503) and failed; queue wait and end-to-end seconds at p50/p95/p99; videos per hour and per GPU-hour
(`--gpus`, the service's); and LoRA switches per job. JSON with every job, and a PNG plot.

    python -m cogrt.bench.serve_load --url http://127.0.0.1:8000 --clients 4 --jobs 10 --modes fp8 \\
        --steps 8 --json closed.json --plot closed.png
    python -m cogrt.bench.serve_load --url ... --rate 0.08 --jobs 10 --loras a,b,c --json open.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

PROMPTS = ("a panda playing guitar in a bamboo forest", "a red fox running through fresh snow",
           "waves rolling onto a sandy beach at sunset", "a busy city street at night with neon signs")


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]  # noqa: E731
    return {"p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99), "mean": sum(xs) / len(xs)}


class Load:
    def __init__(self, a):
        import httpx
        self.a, self.rng = a, random.Random(a.seed)
        headers = {"Authorization": f"Bearer {a.key}"} if a.key else {}
        self.http = httpx.AsyncClient(base_url=a.url.rstrip("/"), headers=headers, timeout=120)
        self.jobs: list[dict] = []

    def draw(self) -> dict:
        a = self.a
        data = {"prompt": self.rng.choice(PROMPTS), "num_inference_steps": str(a.steps),
                "seed": str(self.rng.randrange(2**31))}
        for field, options in (("size", a.sizes), ("mode", a.modes), ("seconds", a.seconds)):
            if options:
                data[field] = self.rng.choice(options.split(","))
        if a.loras:
            name = self.rng.choice(a.loras.split(","))
            data["loras"] = json.dumps([{"name": name, "weight": 1.0}]) if name != "none" else "[]"
        return data

    async def one(self, data: dict) -> None:
        rec = {"submitted": time.time(), "request": data}
        self.jobs.append(rec)
        r = await self.http.post("/v1/videos", data=data)
        if r.status_code in (429, 503):
            rec["outcome"] = f"rejected {r.status_code}"
            return
        if r.status_code >= 300:
            rec.update(outcome=f"error {r.status_code}", error=r.text[:300])
            return
        vid = r.json()["id"]
        while True:
            await asyncio.sleep(self.a.poll)
            v = (await self.http.get(f"/v1/videos/{vid}")).json()
            if v["status"] in ("completed", "failed"):
                break
        rec.update(outcome=v["status"], id=vid, done=time.time(), e2e_s=time.time() - rec["submitted"],
                   queue_wait_s=v["cogrt"]["timings"].get("queue_wait"), lora_switched=v["cogrt"]["lora_switched"],
                   replica=v["cogrt"]["replica"], error=v.get("error"))

    async def closed(self, clients: int, total: int) -> None:
        left = iter(range(total))

        async def client():
            for _ in left:
                await self.one(self.draw())
        await asyncio.gather(*(client() for _ in range(clients)))

    async def open(self, rate: float, total: int) -> None:
        tasks = []
        for _ in range(total):
            tasks.append(asyncio.create_task(self.one(self.draw())))
            await asyncio.sleep(self.rng.expovariate(rate))
        await asyncio.gather(*tasks)


def summarize(jobs: list[dict], wall: float, gpus: float) -> dict:
    done = [j for j in jobs if j.get("outcome") == "completed"]
    out = {
        "submitted": len(jobs), "completed": len(done),
        "rejected": sum(j.get("outcome", "").startswith("rejected") for j in jobs),
        "failed": sum(j.get("outcome") == "failed" for j in jobs),
        "errors": sum(j.get("outcome", "").startswith("error") for j in jobs),
        "lost": sum("outcome" not in j for j in jobs), "wall_s": wall,
        "e2e_s": percentiles([j["e2e_s"] for j in done]),
        "queue_wait_s": percentiles([j["queue_wait_s"] for j in done if j["queue_wait_s"] is not None]),
        "lora_switches_per_job": sum(bool(j["lora_switched"]) for j in done) / max(len(done), 1),
    }
    span = (max(j["done"] for j in done) - min(j["submitted"] for j in jobs)) if done else wall
    out["videos_per_hour"] = 3600 * len(done) / span if span else 0.0
    out["videos_per_gpu_hour"] = out["videos_per_hour"] / gpus
    return out


def plot(jobs: list[dict], summary: dict, path: str, title: str) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    done = sorted((j for j in jobs if j.get("outcome") == "completed"), key=lambda j: j["done"])
    t0 = min(j["submitted"] for j in jobs)
    ax1.plot([j["done"] - t0 for j in done], range(1, len(done) + 1), drawstyle="steps-post")
    ax1.set(xlabel="seconds", ylabel="videos completed", title=f"{summary['videos_per_hour']:.0f} videos/hour")
    for key, label in (("e2e_s", "end to end"), ("queue_wait_s", "queue wait")):
        xs = sorted(j[key] for j in done if j.get(key) is not None)
        ax2.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    ax2.set(xlabel="seconds", ylabel="fraction of jobs", title="latency CDF")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", default=None)
    ap.add_argument("--clients", type=int, default=None, help="closed loop: this many clients")
    ap.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals, jobs a second")
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sizes", default=None, help="WxH,... drawn from (default: the model's)")
    ap.add_argument("--seconds", default=None, help="lengths drawn from (default: the model's)")
    ap.add_argument("--modes", default=None, help="modes drawn from (default: the service's)")
    ap.add_argument("--loras", default=None, help="LoRA names drawn from, one a job; 'none' for none")
    ap.add_argument("--gpus", type=float, default=1.0, help="the GPUs the service runs on, for videos per GPU-hour")
    ap.add_argument("--poll", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    a = ap.parse_args(argv)
    if (a.clients is None) == (a.rate is None):
        ap.error("give --clients (closed loop) or --rate (open loop)")
    load = Load(a)

    async def run():
        t0 = time.time()
        await (load.closed(a.clients, a.jobs) if a.clients else load.open(a.rate, a.jobs))
        await load.http.aclose()
        return time.time() - t0
    wall = asyncio.run(run())
    summary = summarize(load.jobs, wall, a.gpus)
    kind = f"closed loop, {a.clients} clients" if a.clients else f"open loop, {a.rate:g} jobs/s"
    summary.update(kind=kind, command="python -m cogrt.bench.serve_load " + " ".join(sys.argv[1:] if argv is None
                                                                                     else argv))
    print(json.dumps(summary, indent=1), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "jobs": load.jobs}, indent=1))
    if a.plot:
        plot(load.jobs, summary, a.plot, kind)
    return summary


if __name__ == "__main__":
    main()
