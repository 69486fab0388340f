"""Settings written once: choices and ranges declared on the fields, checked in the CLI's words."""

from dataclasses import dataclass
from typing import Literal

import pytest

from ar2mdm.precompute.config import BuildConfig
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.settings import check_settings, setting
from ar2mdm.train.config import EvalConfig, FillConfig, SampleConfig, TrainConfig
from ar2mdm.train.sweep import SweepConfig


@dataclass
class Demo:
    k: int = setting(8, "k", at_least=1)
    eps: float = setting(0.5, "eps", above=0, below=1)
    frac: float = setting(0.5, "frac", at_least=0, at_most=1)
    lam: float = setting(0.5, "λ", flag="--lambda", at_least=0, at_most=1)
    window: int | None = setting(None, "window", at_least=1)
    mode: Literal["a", "b"] = setting("a", "mode")
    batch: int | Literal["auto"] = setting(16, "batch", at_least=1)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(k=0), "--k must be at least 1, got 0"),
        (dict(eps=1.0), "--eps must be in (0, 1), got 1.0"),
        (dict(eps=0.0), "--eps must be in (0, 1), got 0.0"),
        (dict(frac=1.5), "--frac must be in [0, 1], got 1.5"),
        (dict(lam=-0.1), "--lambda must be in [0, 1], got -0.1"),
        (dict(window=0), "--window must be at least 1, got 0"),
        (dict(mode="c"), "--mode must be one of a, b, got 'c'"),
        (dict(batch=0), "--batch must be at least 1, got 0"),
        (dict(batch="lots"), "--batch must be a whole number or auto, got 'lots'"),
    ],
)
def test_out_of_range_values_are_refused_in_the_cli_words(change, message):
    with pytest.raises(UserError) as e:
        check_settings(Demo(**change))
    assert str(e.value) == message


def test_edges_and_none_pass():
    check_settings(Demo(k=1, frac=0.0, lam=1.0, window=None))
    check_settings(Demo(frac=1.0, window=1, batch="auto"))


def test_every_default_is_in_its_own_range():
    for cfg in (
        BuildConfig(),
        TrainConfig(shards="s"),
        EvalConfig(run="r", data="d"),
        SampleConfig(run="r"),
        FillConfig(run="r", text="a [MASK]"),
        SweepConfig(shards="s", out="o", eval_data="d"),
    ):
        check_settings(cfg)
