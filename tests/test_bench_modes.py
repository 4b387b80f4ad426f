"""bench/modes.py, bench/coldstart.py and bench/lora_switch.py run end to end on the CPU with a tiny preset and
write what they promise: every row or stage, with times and errors that make sense."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from cogrt.engine import modes

TINY = ["--device", "cpu", "--preset", "tiny-5b", "--frames", "9", "--height", "32", "--width", "32"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    """One thread, here and in the children: on these tiny shapes a second one only waits, and a busy core beside
    made each op take a scheduler tick (8 ms). And the benchmarks point Inductor's and Triton's caches at their own
    directory: put them back afterwards."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cpu_fast(mode, dev):
    """`fast` as the CPU can run it: exact's transforms with TeaCache (fp8 needs a GPU)."""
    if mode == "fast":
        return dataclasses.replace(modes.transforms_for("exact", dev), teacache=modes.FAST_TEACACHE)
    return modes.transforms_for(mode, dev)


def test_modes_benchmark(tmp_path, monkeypatch):
    from cogrt.bench import modes as bench_modes
    monkeypatch.setattr(bench_modes, "our_transforms", cpu_fast)
    out, results = tmp_path / "modes.json", tmp_path / "RESULTS.md"
    argv = TINY + ["--steps", "2", "--rows", "fast,int8-weight-only,exact,fp8,int8-dynamic", "--fast-real",
                   "--cache-dir", str(tmp_path / "cache"), "--json", str(out), "--results", str(results)]
    meta = bench_modes.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(meta))
    for key in ("gpu", "torch", "diffusers", "torchao", "commit", "preset", "command"):
        assert meta[key], key
    assert meta["weights"].startswith("random")
    rows = {r["row"]: r for r in meta["rows"]}
    # the baseline first, then the table's order; rows that were not asked for are absent
    assert list(rows) == ["diffusers", "exact", "fp8", "fast", "int8-dynamic", "int8-weight-only"]
    assert rows["fp8"]["status"] == "skipped" and "fp8" in rows["fp8"]["note"]
    ok = [r for r in rows.values() if r["row"] != "fp8"]
    for r in ok:
        assert r["status"] == "ok", r
        assert 0 < r["step_s"] and 0 < r["first_call_s"] and 0 < r["text_s"] and 0 < r["decode_s"], r
        assert r["peak_gib"] is None  # no CUDA
    base = rows["diffusers"]
    assert base["speedup_step"] == 1.0 and base["speedup_e2e"] == 1.0 and base["latents_rel_err_vs_diffusers"] == 0
    for name in ("diffusers", "exact", "int8-dynamic", "int8-weight-only"):
        r = rows[name]
        assert r["steps_run"] == 2 and r["steps_computed"] == 2 and "extrapolated from 2 steps" in r["e2e_label"]
        assert r["e2e_s"] == pytest.approx(r["text_s"] + 50 * r["denoise_s"] / 2 + r["decode_s"])
        assert r["speedup_step"] == pytest.approx(base["step_s"] / r["step_s"])
    # errors: exact against itself is exact; diffusers agrees in fp32; int8 differs, but not by much
    assert rows["exact"]["rel_err"] == 0.0
    assert rows["diffusers"]["rel_err"] < 1e-4
    for name in ("int8-dynamic", "int8-weight-only"):
        assert 0 < rows[name]["rel_err"] < 5e-2, rows[name]
    # the same noise and prompt: after the same 2 steps exact's latents are diffusers' up to fp32 rounding
    assert rows["exact"]["latents_rel_err_vs_diffusers"] < 1e-4
    fast = rows["fast"]
    assert fast["steps_run"] == 50 and fast["steps_computed"] == 22 and fast["e2e_label"].startswith("measured")
    assert fast["latents_rel_err_vs_diffusers"] is None  # 50 steps against the baseline's 2: not comparable
    assert fast["e2e_s"] == pytest.approx(fast["text_s"] + fast["denoise_s"] + fast["decode_s"], rel=0.05)
    text = results.read_text()
    assert "python -m cogrt.bench.modes" in text and "| exact |" in text and "skipped" in text


def test_modes_benchmark_refuses_unknown_rows():
    from cogrt.bench import modes as bench_modes
    with pytest.raises(SystemExit):
        bench_modes.parse(TINY + ["--rows", "exact,turbo"])


def test_coldstart(tmp_path):
    from cogrt.bench.coldstart import main
    out, results = tmp_path / "cold.json", tmp_path / "RESULTS.md"
    meta = main(TINY + ["--mode", "exact", "--compile", "--json", str(out), "--results", str(results)])
    assert json.loads(out.read_text())["runs"].keys() == {"cold", "warm"}
    cold, warm = meta["runs"]["cold"], meta["runs"]["warm"]
    for r in (cold, warm):
        assert r["compiled"] and r["preset"] == "tiny-5b"
        s = r["stages"]
        assert all(v >= 0 for v in s.values()) and s["imports"] > 0 and s["warm_up"] > 0
        # from the parent's spawn time: the stages fit inside the total
        assert r["total_to_first_step"] >= s["imports"] + s["warm_up"] + s["first_step"]
        assert r["total_to_first_video"] > r["total_to_first_step"]
    # the second child found the first one's compiled code
    assert warm["stages"]["warm_up"] < 0.6 * cold["stages"]["warm_up"], (cold["stages"], warm["stages"])
    text = results.read_text()
    assert "python -m cogrt.bench.coldstart" in text and "| cold |" in text and "| warm |" in text


def test_coldstart_refuses_a_used_cache(tmp_path):
    from cogrt.bench.coldstart import main
    (tmp_path / "old").mkdir()
    with pytest.raises(SystemExit):
        main(TINY + ["--cache-dir", str(tmp_path)])


LORA = ["--device", "cpu", "--preset", "tiny-5b", "--mode", "int8-weight-only", "--rank", "4", "--repeats", "2"]


def test_lora_switch(tmp_path):
    from cogrt.bench.lora_switch import main
    out, results = tmp_path / "lora.json", tmp_path / "RESULTS.md"
    meta = main(LORA + ["--json", str(out), "--results", str(results)])
    assert json.loads(out.read_text())["switches"].keys() == {"none->A", "A->A", "A->B", "B->none"}
    assert meta["layers_rewritten"] == 2 * 2  # fused qkv and out in each of tiny-5b's 2 blocks
    sw = meta["switches"]
    assert sw["A->A"]["median_s"] == 0.0
    for name in ("none->A", "A->B", "B->none"):
        assert len(sw[name]["samples_s"]) == 2 and all(0 < x < 10 for x in sw[name]["samples_s"]), sw[name]
        assert math.isclose(sw[name]["median_s"], sum(sw[name]["samples_s"]) / 2)
    assert "python -m cogrt.bench.lora_switch" in results.read_text() and "| A->B |" in results.read_text()


def test_lora_switch_from_a_checkpoint(checkpoint):
    """--model: the originals come from the checkpoint file at the first switch, and are kept after it."""
    from cogrt.bench.lora_switch import main
    meta = main(LORA + ["--model", str(checkpoint("5b"))])
    assert "originals read from it" in meta["weights"] and meta["layers_rewritten"] == 4
    assert all(len(meta["switches"][s]["samples_s"]) == 2 for s in ("none->A", "A->B", "B->none"))


def test_lora_switch_notices_a_switch_that_does_nothing(monkeypatch):
    from cogrt.bench.lora_switch import main
    from cogrt.engine.lora import LoraState
    monkeypatch.setattr(LoraState, "switch", lambda self, loras, key=None: setattr(self, "key", key))
    with pytest.raises(RuntimeError, match="changed=False"):
        main(LORA)


def test_profile_spec_sets_transforms_over_a_mode():
    from cogrt.bench.profile import parse_spec
    assert parse_spec("fp8") == ("fp8", {})
    assert parse_spec("fp8:fused_ff=0:attention=triton") == ("fp8", {"fused_ff": False, "attention": "triton"})
    mode, over = parse_spec("exact:fused_ff=true")
    from cogrt.engine.modes import transforms_for
    assert transforms_for(mode, "cpu", **over).fused_ff is True
