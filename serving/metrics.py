"""Prometheus metrics through Ray Serve's metrics API (exported by Ray as ray_cogrt_*, with the application,
deployment and replica as tags). Made once per process, on first use, inside the replica that reports them."""
from __future__ import annotations

import functools

STAGE_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640]


@functools.cache
def get():
    from ray.serve import metrics as m
    return dict(
        jobs=m.Gauge("cogrt_jobs", description="jobs in the store, by state", tag_keys=("state",)),
        backlog=m.Gauge("cogrt_backlog", description="jobs queued or running"),
        finished=m.Counter("cogrt_jobs_finished", description="jobs that ended, by final state",
                           tag_keys=("state",)),
        retries=m.Counter("cogrt_job_retries", description="jobs put back in the queue after a replica failed"),
        stage=m.Histogram("cogrt_stage_seconds", description="seconds per stage of a job",
                          boundaries=STAGE_BUCKETS, tag_keys=("stage",)),
        computed=m.Histogram("cogrt_fraction_steps_computed", description="the share of denoising steps a job ran "
                             "(the rest the step cache skipped)", boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
                                                                              0.9, 1.0]),
        lora_switches=m.Counter("cogrt_lora_switches", description="jobs that switched the fused LoRA set"),
        lora_seconds=m.Histogram("cogrt_lora_switch_seconds", description="seconds a LoRA switch took",
                                 boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]),
        peak_memory=m.Histogram("cogrt_peak_gpu_memory_gib", description="a job's peak GPU allocation",
                                boundaries=[1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128, 144]),
    )
