"""The training loop end to end: overfitting, exact resume, preemption, non-finite stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxft.config import load_config
from jaxft.errors import ConfigError
from jaxft.train.loop import TrainingError, train
from jaxft.train.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_run_inputs, write_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_run_inputs(tmp_path_factory.mktemp("inputs"), rows=4)


def _cfg(tmp_path, inputs, *overrides, **sections):
    return load_config(write_config(tmp_path, inputs, **sections), list(overrides))


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_overfits_a_few_rows(tmp_path, inputs, mode):
    overrides = {"full": ["train.method=full"], "lora": ["lora.r=16"],
                 "qlora": ["lora.r=16", "quant.base=nf4"]}[mode]
    cfg = _cfg(tmp_path, inputs, "train.steps=80", "optim.lr=1e-2", "optim.warmup_steps=5",
               *overrides)
    result = train(cfg, progress=False, verbose=False)
    assert result.status == "completed" and result.steps == 80
    assert result.losses[0] > 5.0 and result.losses[-1] < 0.05, result.losses[::10]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "config.yaml").exists()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def _spawn(config: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "jaxft", "train", str(config), *overrides,
                             "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(_losses(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def test_resume_after_sigkill_is_bitwise_exact(tmp_path, inputs):
    common = ["train.steps=20", "train.save_every=4", "lora.dropout=0.1", "data.pack=true"]
    straight = _cfg(tmp_path / "a", inputs, *common, "train.output_dir=" + str(tmp_path / "a/run"))
    expected = train(straight, progress=False, verbose=False).losses

    config = write_config(tmp_path / "b", inputs)
    run_dir = tmp_path / "b" / "run"
    kill_at = int(np.random.default_rng().integers(9, 16))  # varies; failures name it
    proc = _spawn(config, *common)
    _wait_for_step(run_dir, proc, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = run_dir / "checkpoints"
    finished = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert finished and finished[-1] <= kill_at, f"killed at step {kill_at}: {finished}"
    # A write that was cut off leaves only a temporary directory: it must be ignored.
    (ckpts / f"{finished[-1] + 4}.orbax-checkpoint-tmp-1234").mkdir()
    resumed = train(load_config(config, common), progress=False, verbose=False)
    assert resumed.steps == 20 and len(resumed.losses) < 20, f"killed at step {kill_at}"
    got = _losses(run_dir)
    assert sorted(got) == list(range(1, 21))
    assert [got[i] for i in range(1, 21)] == expected, f"killed at step {kill_at}"  # bitwise


def test_sigterm_writes_checkpoint_and_exits_zero(tmp_path, inputs):
    config = write_config(tmp_path, inputs)
    run_dir = tmp_path / "run"
    proc = _spawn(config, "train.steps=100000", "train.save_every=0")
    _wait_for_step(run_dir, proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "SIGTERM: checkpoint written at step" in out and "preempted" in out
    steps = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) >= 3


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path, inputs):
    cfg = _cfg(tmp_path, inputs, "train.steps=12", "train.save_every=5")

    def poison(step, batch):
        if step == 7:  # the 8th step sees a NaN in its data
            batch = dict(batch, loss_mask=np.full(batch["loss_mask"].shape, np.nan, np.float32))
        return batch

    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step 8.*"
                                            r"last good checkpoint is step 5"):
        train(cfg, progress=False, verbose=False, batch_hook=poison)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [5]
    # The checkpoint is intact: a resumed run continues from it and finishes.
    result = train(cfg, progress=False, verbose=False)
    assert result.steps == 12 and len(result.losses) == 7


def test_skip_nonfinite_goes_on(tmp_path, inputs):
    cfg = _cfg(tmp_path, inputs, "train.steps=6", "train.on_nonfinite=skip")

    def poison(step, batch):
        return dict(batch, loss_mask=np.full(batch["loss_mask"].shape, np.nan, np.float32)) \
            if step == 2 else batch

    result = train(cfg, progress=False, verbose=False, batch_hook=poison)
    assert result.steps == 6 and np.isnan(result.losses[2])


def test_early_stopping_and_best_checkpoint(tmp_path, inputs):
    # Validation answers contradict the training answers: once the model memorises the training
    # rows, validation loss rises, and early stopping must end the run at the best point.
    rows = [json.loads(line) for line in Path(inputs["train"]).read_text().splitlines()]
    val = tmp_path / "contradicting.jsonl"
    with open(val, "w") as f:
        for row in rows:
            b, a, _ = row["messages"][1]["content"].split()  # answers are "b a b"
            row["messages"][1]["content"] = f"{a} {b} {a}"
            f.write(json.dumps(row) + "\n")
    cfg = _cfg(tmp_path, inputs, "train.steps=120", "train.eval_every=5",
               "train.early_stopping_patience=2", "optim.lr=1e-2", "optim.warmup_steps=2",
               f"data.validation={val}")
    result = train(cfg, progress=False, verbose=False)
    assert result.status == "early_stopped" and result.steps < 120
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
            if "val_loss" in r]
    assert result.best_val_loss == min(vals) and vals[-1] > min(vals)
    best = [int(p.name) for p in (tmp_path / "run" / "best").iterdir() if p.name.isdigit()]
    assert best == [result.best_step]


def test_bad_batch_geometry_is_a_config_error(tmp_path, inputs):
    cfg = _cfg(tmp_path, inputs, "data.batch_size=6", "train.grad_accum=4")
    with pytest.raises(ConfigError, match="data.batch_size=6 must be divisible"):
        train(cfg, progress=False, verbose=False)
