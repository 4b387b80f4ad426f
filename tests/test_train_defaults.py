"""Fine-tuning defaults by method, and the warnings that name settings known to distort."""
from __future__ import annotations

import logging

import pytest

from cogrt.train import loop
from cogrt.train.loop import TrainConfig, resolve_defaults


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(loop, "_warned", set())


def cfg(**kw):
    return TrainConfig(model="m", data="d", out="o", **kw)


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "cogrt.train.loop" and r.levelno == logging.WARNING]


def test_each_method_gets_its_own_rate(caplog):
    caplog.set_level(logging.WARNING)
    assert resolve_defaults(cfg(method="full")).lr == 1e-5
    assert resolve_defaults(cfg(method="lora", rank=32, alpha=16.0)).lr == 1e-4
    assert resolve_defaults(cfg(method="lora", lr=3e-4)).lr == 3e-4  # an explicit rate is kept
    assert warnings_of(caplog) == []  # the defaults, and alpha = rank/2, warn about nothing
    with pytest.raises(ValueError, match="from scratch"):
        resolve_defaults(cfg(method="full", from_scratch=True))
    assert resolve_defaults(cfg(method="full", from_scratch=True, lr=2e-3)).lr == 2e-3
    assert warnings_of(caplog) == []  # nothing to distort when training from scratch


def test_full_fine_tuning_above_5e_5_warns_once(caplog):
    caplog.set_level(logging.WARNING)
    resolve_defaults(cfg(method="full", lr=5e-5))
    assert warnings_of(caplog) == []  # at the limit: no warning
    resolve_defaults(cfg(method="full", lr=2e-4))
    resolve_defaults(cfg(method="full", lr=1e-3))
    msgs = warnings_of(caplog)
    assert len(msgs) == 1 and "warp" in msgs[0] and "2e-4" in msgs[0] and "1e-5" in msgs[0]


def test_lora_alpha_below_half_the_rank_warns_once(caplog):
    caplog.set_level(logging.WARNING)
    resolve_defaults(cfg(method="lora", rank=64, alpha=16.0))
    resolve_defaults(cfg(method="lora", rank=64, alpha=8.0))
    msgs = warnings_of(caplog)
    assert len(msgs) == 1 and "alpha 16 is below half the rank (64)" in msgs[0]
    resolve_defaults(cfg(method="full", rank=64, alpha=1.0, lr=1e-5))  # alpha means nothing without a LoRA
    assert len(warnings_of(caplog)) == 1


def test_the_cli_leaves_the_rate_to_the_method():
    import argparse

    from cogrt.train.cli import add_commands
    ap = argparse.ArgumentParser()
    add_commands(ap.add_subparsers())
    a = ap.parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--method", "full"])
    assert a.lr is None and "1e-5" in ap._subparsers._group_actions[0].choices["train"].format_help()
