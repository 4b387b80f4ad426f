"""The trainer's data layer: manifests, buckets, decoding, the latent cache and the bucketed batch sampler."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from cogrt.engine.video import write_mp4
from cogrt.train.data import (BadVideo, DataError, Record, decode_video, parse_buckets, pick_bucket, probe_video,
                        read_manifest)
from cogrt.train.precompute import BucketBatchSampler, LatentDataset, PrecomputeError, collate, main, precompute


def gray_video(path, n, h=48, w=80, step=12):
    """Frame i is uniformly gray at level i*step, so decoded frames say which source frame they came from."""
    frames = np.stack([np.full((h, w, 3), min(255, i * step), np.uint8) for i in range(n)])
    return write_mp4(frames, path, fps=8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 good synthetic 9x64x64 clips + a corrupt file + a 5-frame clip + an empty caption, txt layout."""
    from cogrt.train.synthetic import write_dataset
    d = write_dataset(tmp_path_factory.mktemp("videos"), n=3, seed=0, frames=9, height=64, width=64)
    (d / "videos" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    gray_video(d / "videos" / "short.mp4", 5)
    prompts = (d / "prompts.txt").read_text().splitlines()
    videos = (d / "videos.txt").read_text().splitlines()
    prompts += ["", "a corrupt file", "a short clip"]  # a blank last line would be a trailing blank line
    videos += ["videos/000000.mp4", "videos/corrupt.mp4", "videos/short.mp4"]
    (d / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    (d / "videos.txt").write_text("\n".join(videos) + "\n")
    return d


# ----------------------------------------------------------------------------------------------------
# Manifests

def test_manifest_txt_dir(dataset):
    recs = read_manifest(dataset)
    assert len(recs) == 6  # the blank trailing line of prompts.txt is not a record
    assert recs[0].video == dataset / "videos" / "000000.mp4" and recs[0].video.is_file()
    assert recs[0].caption.startswith(("a ", "an ")) and recs[0].image is None
    assert recs[3].caption == "" and recs[3].video.name == "000000.mp4"


def test_manifest_csv_and_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    csv = 'caption,video,image\n"a cat, sleeping",a.mp4,a.png\nthe dog,/abs/b.mp4,\n\n'
    (tmp_path / "sub" / "data.csv").write_text(csv)
    recs = read_manifest(tmp_path / "sub" / "data.csv")
    assert recs == [Record("a cat, sleeping", tmp_path / "sub" / "a.mp4", tmp_path / "sub" / "a.png"),
                    Record("the dog", Path("/abs/b.mp4"), None)]
    rows = [{"text": "one", "clip": "v/1.mp4"}, {"text": "two", "clip": "v/2.mp4"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    recs = read_manifest(tmp_path / "m.jsonl", caption_column="text", video_column="clip")
    assert [r.caption for r in recs] == ["one", "two"] and recs[1].video == tmp_path / "v" / "2.mp4"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "caps.txt").write_text("x\ny\n")
    (tmp_path / "t" / "clips.txt").write_text("1.mp4\n2.mp4\n")
    recs = read_manifest(tmp_path / "t", caption_column="caps.txt", video_column="clips.txt")
    assert [r.video.name for r in recs] == ["1.mp4", "2.mp4"]


def test_manifest_errors(tmp_path):
    (tmp_path / "prompts.txt").write_text("a\nb\nc\n")
    (tmp_path / "videos.txt").write_text("1.mp4\n2.mp4\n")
    with pytest.raises(DataError, match="prompts.txt has 3 lines but videos.txt has 2"):
        read_manifest(tmp_path)
    (tmp_path / "prompts.txt").write_text("\n")
    (tmp_path / "videos.txt").write_text("")
    with pytest.raises(DataError, match="empty dataset"):
        read_manifest(tmp_path)
    (tmp_path / "d.csv").write_text("prompt,path\nx,1.mp4\n")
    with pytest.raises(DataError, match=r"no 'caption' column \(found: prompt, path\)"):
        read_manifest(tmp_path / "d.csv")
    (tmp_path / "d.jsonl").write_text('{"caption": "x"}\n')
    with pytest.raises(DataError, match=r"no 'video' column \(found: caption\)"):
        read_manifest(tmp_path / "d.jsonl")
    (tmp_path / "d.jsonl").write_text('{"caption": "x", "video": "1.mp4"}\n\n{"caption": "y"}\n')
    with pytest.raises(DataError, match="line 3 has no 'video'"):
        read_manifest(tmp_path / "d.jsonl")
    (tmp_path / "d.jsonl").write_text('{"caption": "x", "video": "1.mp4"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_manifest(tmp_path / "d.jsonl")
    with pytest.raises(DataError, match="not found"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "e.csv").write_text("caption,video\n")
    with pytest.raises(DataError, match="empty dataset"):
        read_manifest(tmp_path / "e.csv")


# ----------------------------------------------------------------------------------------------------
# Buckets

def test_parse_buckets():
    assert parse_buckets("49x480x720, 9x64x64,9x64x64") == [(9, 64, 64), (49, 480, 720)]
    assert parse_buckets([(17, 32, 48)]) == [(17, 32, 48)]
    with pytest.raises(DataError, match="8N\\+1"):
        parse_buckets("10x64x64")
    with pytest.raises(DataError, match="multiples of 16"):
        parse_buckets("9x60x64")
    with pytest.raises(DataError, match="FRAMESxHEIGHTxWIDTH"):
        parse_buckets("9x64")
    with pytest.raises(DataError, match="no buckets"):
        parse_buckets(" , ")


def test_pick_bucket():
    b = parse_buckets("9x64x64,17x64x64,9x64x112,49x480x720,9x128x128")
    assert pick_bucket(20, 64, 64, b) == (17, 64, 64)  # most frames that fit, closest area among squares
    assert pick_bucket(12, 60, 60, b) == (9, 64, 64)
    assert pick_bucket(300, 256, 256, b) == (9, 128, 128)
    assert pick_bucket(5, 64, 64, b) is None  # shorter than every bucket
    assert pick_bucket(100, 480, 720, b) == (49, 480, 720)
    assert pick_bucket(17, 70, 120, b) == (9, 64, 112)  # aspect ratio beats frame count


# ----------------------------------------------------------------------------------------------------
# Decoding

def test_decode_video(tmp_path):
    path = gray_video(tmp_path / "g.mp4", 20)
    assert probe_video(path) == (20, 48, 80)
    x = decode_video(path, 9, 32, 32)
    assert x.shape == (9, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # stride 20 // 9 = 2 from the start: frames 0, 2, ..., 16
    want = torch.tensor([2 * k * 12 / 127.5 - 1 for k in range(9)])
    torch.testing.assert_close(x.mean(dim=(1, 2, 3)), want, atol=0.03, rtol=0)
    consecutive = decode_video(gray_video(tmp_path / "h.mp4", 9), 9, 48, 48)
    assert consecutive.shape == (9, 3, 48, 48)


def test_bad_videos(tmp_path):
    (tmp_path / "r.mp4").write_bytes(os.urandom(1000))
    for path, reason in ((tmp_path / "r.mp4", "unreadable"), (tmp_path / "missing.mp4", "not found")):
        with pytest.raises(BadVideo, match=reason) as e:
            probe_video(path)
        assert e.value.path == path
        with pytest.raises(BadVideo, match=reason):
            decode_video(path, 9, 32, 32)
    with pytest.raises(BadVideo, match="too short"):
        decode_video(gray_video(tmp_path / "s.mp4", 5), 9, 32, 32)


# ----------------------------------------------------------------------------------------------------
# Precompute

def test_precompute_t2v(dataset, checkpoint, tmp_path, capsys):
    out = tmp_path / "cache"
    s = precompute(dataset, checkpoint("5b"), out, "9x64x64", device="cpu")
    assert (s.total, s.written, s.reused) == (6, 3, 0)
    reasons = {os.path.basename(k["video"]): k["reason"] for k in s.skipped}
    assert set(reasons) == {"corrupt.mp4", "short.mp4", "000000.mp4"}
    assert "unreadable" in reasons["corrupt.mp4"] and "too short" in reasons["short.mp4"]
    assert reasons["000000.mp4"] == "empty caption"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"] == 6 and summary["written"] == 3 and len(summary["skipped"]) == 3
    assert summary["buckets"] == [[9, 64, 64]] and summary["is_i2v"] is False
    assert summary["vae_scaling_factor"] == pytest.approx(0.7) and summary["invert_scale_latents"] is False
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [e["id"] for e in index] == ["000000", "000001", "000002"]
    assert index[0]["caption"] == read_manifest(dataset)[0].caption
    assert {(e["frames"], e["height"], e["width"], e["has_image"]) for e in index} == {(9, 64, 64, False)}
    t = load_file(str(out / index[1]["file"]))
    assert set(t) == {"latent_mean", "latent_logvar", "prompt_embeds"}
    assert t["latent_mean"].shape == t["latent_logvar"].shape == (16, 3, 8, 8)
    assert t["prompt_embeds"].shape == (226, 32) and t["latent_mean"].dtype == torch.float32
    assert not list(out.glob("samples/.*"))  # no temporary files left

    # a rerun (through the CLI) finds every sample and rewrites none
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("samples/*")}
    assert main(["--data", str(dataset), "--model", str(checkpoint("5b")), "--out", str(out),
                 "--buckets", "9x64x64", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 of 6" in printed and "3 already there" in printed and "corrupt.mp4" in printed
    assert {p: p.stat().st_mtime_ns for p in out.glob("samples/*")} == mtimes

    ds = LatentDataset(out)
    assert len(ds) == 3 and ds.buckets == [(9, 64, 64)] * 3 and ds.summary["written"] == 3
    loader = DataLoader(ds, batch_sampler=BucketBatchSampler(ds, 2, seed=0), collate_fn=collate)
    batches = list(loader)
    assert sorted(b["latent_mean"].shape[0] for b in batches) == [1, 2]
    assert batches[0]["bucket"] == (9, 64, 64) and batches[0]["prompt_embeds"].shape[1:] == (226, 32)


def test_precompute_i2v_deterministic(dataset, checkpoint, tmp_path):
    recs = read_manifest(dataset)[:2]
    a = precompute(recs, checkpoint("5b-i2v"), tmp_path / "a", "9x64x64", device="cpu", seed=3)
    precompute(recs, checkpoint("5b-i2v"), tmp_path / "b", "9x64x64", device="cpu", seed=3)
    assert a.is_i2v and a.written == 2
    ta, tb = (load_file(str(tmp_path / d / "samples" / "000001.safetensors")) for d in "ab")
    assert ta["image_mean"].shape == ta["image_logvar"].shape == (16, 1, 8, 8)
    assert ta["latent_mean"].shape == (16, 3, 8, 8)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0)
    item = LatentDataset(tmp_path / "a")[0]
    assert item["bucket"] == (9, 64, 64) and item["image_mean"].shape == (16, 1, 8, 8)


def test_precompute_nothing_usable(dataset, checkpoint, tmp_path):
    recs = [r for r in read_manifest(dataset) if r.video.name in ("corrupt.mp4", "short.mp4")]
    with pytest.raises(PrecomputeError, match="no usable samples.*corrupt.mp4.*short.mp4"):
        precompute(recs, checkpoint("5b"), tmp_path / "o", "9x64x64", device="cpu")
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["written"] == 0


# ----------------------------------------------------------------------------------------------------
# Batch sampler

BUCKETS = [(9, 64, 64)] * 11 + [(17, 64, 64)] * 7 + [(9, 64, 112)] * 5


def test_sampler_buckets_and_determinism():
    s = BucketBatchSampler(BUCKETS, batch_size=4, seed=1)
    e0 = list(s)
    assert all(len({BUCKETS[i] for i in b}) == 1 for b in e0)
    assert sorted(i for b in e0 for i in b) == list(range(len(BUCKETS)))
    assert len(e0) == len(s) == 3 + 2 + 2
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["batch"] == 0  # a finished epoch saves as the next
    e1 = list(s)  # iterating a finished epoch again moves on
    assert s.epoch == 1 and e1 != e0 and list(BucketBatchSampler(BUCKETS, 4, seed=1)) == e0
    assert list(BucketBatchSampler(BUCKETS, 4, seed=2)) != e0
    s.set_epoch(0)
    assert list(s) == e0
    dropped = list(BucketBatchSampler(BUCKETS, 4, seed=1, drop_last=True))
    assert len(dropped) == 2 + 1 + 1 and all(len(b) == 4 for b in dropped)


def test_sampler_resume():
    s = BucketBatchSampler(BUCKETS, batch_size=3, seed=5)
    s.set_epoch(4)
    full = s.batches()
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = s.state_dict()
    assert state["epoch"] == 4 and state["batch"] == 3
    r = BucketBatchSampler(BUCKETS, batch_size=3, seed=0)
    r.load_state_dict(json.loads(json.dumps(state)))
    r.set_epoch(4)  # a trainer's loop re-entering the same epoch keeps the position
    assert head + list(r) == full
    assert r.state_dict()["epoch"] == 5 and r.state_dict()["batch"] == 0


def _loop_stream(sampler, steps):
    """train.loop's pattern: batches forever, set_epoch(epoch + 1) after each pass."""
    while True:
        for idx in sampler:
            yield idx
            steps -= 1
            if steps == 0:
                return
        sampler.set_epoch(sampler.epoch + 1)


def test_sampler_resume_anywhere_in_a_training_loop():
    """Stopping after any step and resuming from state_dict gives the uninterrupted stream, epoch edges too."""
    whole = list(_loop_stream(BucketBatchSampler(BUCKETS, 4, seed=3), 20))
    assert len({tuple(b) for b in whole[:7]}) == 7 and whole[7:14] != whole[:7]  # 7 batches per epoch
    for k in range(1, 20):
        a = BucketBatchSampler(BUCKETS, 4, seed=3)
        head = list(_loop_stream(a, k))
        b = BucketBatchSampler(BUCKETS, 4, seed=3)
        b.load_state_dict(a.state_dict())
        assert head + list(_loop_stream(b, 20 - k)) == whole, k


def test_sampler_resume_with_epoch_loop():
    """The `for epoch in range(start, n): set_epoch(epoch); for batch in sampler` pattern, resumed mid-way and at
    an epoch's end, with start = state["epoch"]."""
    def run(sampler, start, stop_after=None):
        got = []
        for epoch in range(start, 3):
            sampler.set_epoch(epoch)
            for idx in sampler:
                got.append(idx)
                if len(got) == stop_after:
                    return got
        return got
    whole = run(BucketBatchSampler(BUCKETS, 4, seed=9), 0)
    assert len(whole) == 21
    for k in (3, 7, 14, 15):
        a = BucketBatchSampler(BUCKETS, 4, seed=9)
        head = run(a, 0, stop_after=k)
        state = a.state_dict()
        b = BucketBatchSampler(BUCKETS, 4, seed=9)
        b.load_state_dict(state)
        assert head + run(b, state["epoch"]) == whole, k


def test_sampler_shards():
    whole = BucketBatchSampler(BUCKETS, 4, seed=1).batches()  # 7 batches on one rank
    for ws in (2, 3, 7):
        parts = [BucketBatchSampler(BUCKETS, 4, seed=1, rank=r, world_size=ws).batches() for r in range(ws)]
        assert len({len(p) for p in parts}) == 1  # every rank takes the same number of steps
        interleaved = [parts[k % ws][k // ws] for k in range(ws * len(parts[0]))]
        assert interleaved[:len(whole)] == whole  # rank r has global batches r, r + ws, ...: each sample once
        assert interleaved[len(whole):] == whole[:len(interleaved) - len(whole)]  # then wrap-around padding
    parts = [BucketBatchSampler(BUCKETS, 4, seed=1, rank=r, world_size=7).batches() for r in range(7)]
    seen = [i for p in parts for b in p for i in b]
    assert sorted(seen) == list(range(len(BUCKETS)))  # no overlap where the batches divide evenly
    parts = [list(BucketBatchSampler(BUCKETS, 4, seed=1, drop_last=True, rank=r, world_size=3)) for r in range(3)]
    seen = [i for p in parts for b in p for i in b]
    assert len(seen) == len(set(seen)) and {len(p) for p in parts} == {1}
