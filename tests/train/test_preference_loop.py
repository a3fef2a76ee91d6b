"""Preference objectives through `jaxft train`: the same loop, sharding, checkpoints and plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxft.config import load_config
from jaxft.train.loop import train
from jaxft.train.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_run_inputs, write_config  # noqa: E402

NAMES = ["alpha", "bravo", "delta", "kilo", "lima", "oscar", "papa", "romeo", "tango", "echo",
         "golf", "hotel", "india", "juliet", "mike", "quebec", "sierra", "victor", "whiskey",
         "yankee"]


GOOD = ["sure", "yes", "okay", "right", "agreed"]
BAD = ["never", "nope", "wrong", "denied", "refused"]


def _pairs(path: Path, names: list[str], kto: bool = False) -> str:
    """Preferred answers start with a word of GOOD, dispreferred ones with a word of BAD; the
    words vary per pair, so an untrained model prefers chosen on about half of the pairs."""
    rng = np.random.default_rng(len(names))
    with open(path, "w") as f:
        for i, a in enumerate(names):
            b = names[(i + 3) % len(names)]
            prompt = f"code {a} {b}"
            good, bad = f"{rng.choice(GOOD)} {a} {b}", f"{rng.choice(BAD)} {a} {b}"
            if kto:
                f.write(json.dumps({"prompt": prompt, "completion": good, "label": True}) + "\n")
                f.write(json.dumps({"prompt": prompt, "completion": bad, "label": False}) + "\n")
            else:
                f.write(json.dumps({"prompt": prompt, "chosen": good, "rejected": bad}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    inputs = make_run_inputs(root, rows=4)
    return root, inputs


def _run(tmp_path, inputs, *overrides, kto=False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    train_file = _pairs(tmp_path / "pairs.jsonl", NAMES[:12] * 2, kto)
    val_file = _pairs(tmp_path / "val.jsonl", NAMES[12:] * 2, kto)
    config = write_config(tmp_path, inputs)
    cfg = load_config(config, [f"data.train={train_file}", f"data.validation={val_file}",
                               "data.batch_size=4", "data.pack=false", "data.seq_len=32",
                               "optim.warmup_steps=2", "optim.lr=5e-3", *overrides])
    result = train(cfg, progress=False, verbose=False)
    return result, read_metrics(tmp_path / "run" / "metrics.jsonl")


@pytest.fixture(scope="module")
def dpo_runs(setup, tmp_path_factory):
    """One DPO run per beta, shared by the tests below (whatever order or selection runs them)."""
    _, inputs = setup
    runs = {}
    for beta in (0.1, 1.0):
        out = tmp_path_factory.mktemp(f"dpo-{beta}")
        result, records = _run(out, inputs, "train.objective=dpo", f"train.beta={beta}",
                               "train.steps=60", "train.eval_every=20")
        runs[beta] = (out, result, [r for r in records if "val_loss" in r])
    return runs


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_learns_held_out_preferences(dpo_runs, beta):
    out, result, vals = dpo_runs[beta]
    assert result.status == "completed"
    assert vals[0]["step"] == 0 and 0.2 <= vals[0]["val_policy_accuracy"] <= 0.8  # ~chance
    assert vals[-1]["val_rewards/accuracies"] >= 0.9 and vals[-1]["val_policy_accuracy"] >= 0.9
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert (out / "run" / "preference.png").stat().st_size > 10_000


def test_eval_validation_loss_equals_the_runs_own(dpo_runs):
    """`jaxft eval`'s loss metric on a DPO run: the objective's validation loss with the base as
    reference, as the run logged it at its last step (not an SFT loss)."""
    from jaxft.data.tokens import load_tokenizer
    from jaxft.train.evaluate import validation_loss
    from jaxft.train.exporting import restore_trained

    out, _, vals = dpo_runs[0.1]
    cfg, config, params, lora, step = restore_trained(out / "run", "latest")
    assert step == vals[-1]["step"] == 60
    got = validation_loss(cfg, config, params, lora, load_tokenizer(cfg.model.tokenizer
                                                                     or cfg.model.path))
    for key in ("val_loss", "val_rewards/accuracies", "val_kl_ref"):
        np.testing.assert_allclose(got[key], vals[-1][key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_higher_beta_stays_closer_to_reference(dpo_runs):
    # With Adam both runs move at the same speed at first; the larger beta saturates its loss
    # sooner and stops pulling away from the reference (measured: 0.71 vs 0.95 nats/token).
    kl = {beta: vals[-1]["val_kl_ref"] for beta, (_, _, vals) in dpo_runs.items()}
    assert abs(kl[1.0]) < abs(kl[0.1])


@pytest.mark.parametrize("objective", ["ipo", "hinge", "orpo", "simpo"])
def test_other_pair_objectives_train(setup, tmp_path, objective):
    _, inputs = setup
    result, records = _run(tmp_path, inputs, f"train.objective={objective}", "train.steps=15",
                           "train.eval_every=15")
    vals = [r for r in records if "val_loss" in r]
    assert np.isfinite(result.losses).all() and result.losses[-1] < result.losses[0]
    assert vals[-1]["val_policy_accuracy"] > vals[0]["val_policy_accuracy"]


def test_kto_trains(setup, tmp_path):
    _, inputs = setup
    result, records = _run(tmp_path, inputs, "train.objective=kto", "train.steps=20",
                           "train.eval_every=20", kto=True)
    assert np.isfinite(result.losses).all() and result.losses[-1] < result.losses[0]
    assert any("kl" in k for k in records[-1])


def test_full_finetune_dpo_with_frozen_reference_and_accumulation(setup, tmp_path):
    _, inputs = setup
    result, records = _run(tmp_path, inputs, "train.objective=dpo", "train.method=full",
                           "train.steps=10", "train.grad_accum=2", "optim.lr=1e-3")
    assert result.losses[-1] < result.losses[0]
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference


@pytest.mark.parametrize("method", ["lora", "full"])
def test_precomputed_reference_gives_the_same_run(setup, tmp_path, method):
    _, inputs = setup
    common = ["train.objective=dpo", f"train.method={method}", "train.steps=6",
              "train.eval_every=3", "optim.lr=1e-3"]
    live, live_records = _run(tmp_path / "live", inputs, *common)
    pre, pre_records = _run(tmp_path / "pre", inputs, *common, "train.precompute_ref=true")
    assert (tmp_path / "pre" / "run" / "reference_logprobs.npz").exists()
    np.testing.assert_allclose(pre.losses, live.losses, rtol=1e-5, atol=1e-6)
    live_val = [r["val_loss"] for r in live_records if "val_loss" in r]
    pre_val = [r["val_loss"] for r in pre_records if "val_loss" in r]
    np.testing.assert_allclose(pre_val, live_val, rtol=1e-5, atol=1e-6)
