"""The training loop: a plain ``for`` loop with logging, evaluation and checkpointing inline.

``train(cfg)`` loads the model and data, resumes from the run directory's latest checkpoint when
there is one, and runs the jitted step until ``train.steps``, early stopping, the end of the data,
or SIGTERM (which writes a checkpoint and returns). A non-finite loss or gradient stops the run
with a message (``train.on_nonfinite=stop``) without writing over the last good checkpoint, or
skips the update (``skip``).
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxft.config import Config, save_config
from jaxft.errors import ConfigError, DataError, JaxftError
from jaxft.train import setup
from jaxft.train.checkpoint import RunCheckpoints, abstract_with_shardings
from jaxft.train.metrics import MetricsWriter, plot_preference, plot_run
from jaxft.train.objectives import REFERENCE_FREE, objective_loss_fn
from jaxft.train.perf import CompiledOnFirstCall, flops_per_token, peak_flops
from jaxft.train.sharding import batch_sharding, make_mesh, tree_shardings
from jaxft.train.step import make_eval_step, make_step

BatchHook = Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]


class TrainingError(JaxftError, RuntimeError):
    """The run cannot go on (non-finite loss, data problems); the message says why."""


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # completed | early_stopped | preempted | data_exhausted
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    best_val_loss: float | None = None
    best_step: int | None = None
    plot: Path | None = None
    exports: dict[str, Path] = field(default_factory=dict)


class _Preemption:
    """Turns SIGTERM into a flag that the loop checks between steps."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _next_batch(it: Any, accum: int, stacked: bool) -> dict[str, np.ndarray] | None:
    """The next step's data: one batch split into ``accum`` micro-batches (SFT), or ``accum``
    whole batches stacked (preference objectives: a pair never straddles micro-batches)."""
    if not stacked:
        batch = next(it, None)
        if batch is None:
            return None
        return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}
    parts = [next(it, None) for _ in range(accum)]
    if any(p is None for p in parts):
        return None
    return {k: np.stack([p[k] for p in parts]) for k in parts[0]}


def _to_global(batch: dict[str, np.ndarray], mesh: Any, rules: dict,
               batch_axis: int) -> dict[str, jax.Array]:
    """Process-local arrays -> global arrays whose rows (``batch_axis``) are split over devices.
    ``ref_logps`` (precomputed reference log-probs, the same on every process) is replicated."""
    out = {}
    for k, v in batch.items():
        if k == "ref_logps":
            sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            continue
        sharding = batch_sharding(mesh, rules, ndim=v.ndim, batch_axis=batch_axis)
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def _reference_table(fn: Any, frozen: Any, it: Any, start: dict, n_batches: int, mesh: Any,
                     rules: dict) -> np.ndarray:
    """Reference log-probs ``[n_batches, examples]`` of the batches ``it`` yields from ``start``
    (the order is deterministic, so batch ``k`` of the run gets row ``k``)."""
    it.restore(start)
    rows = []
    for _ in range(n_batches):
        batch = next(it, None)
        if batch is None:
            break
        rows.append(np.asarray(jax.device_get(fn(frozen, _to_global(batch, mesh, rules, 0)))))
    it.restore(start)
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def _all_processes_have(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def _evaluate(eval_step: Any, state: dict, frozen: Any, val_iter: Any, start_state: dict,
              mesh: Any, rules: dict, ref_table: np.ndarray | None = None) -> dict[str, float]:
    """Validation metrics over the whole split: every summed output divided by the summed
    ``tokens`` (token NLL for SFT; per-pair means for preference objectives)."""
    val_iter.restore(start_state)
    local = list(val_iter)
    count = len(local)
    if jax.process_count() > 1:  # every process must run the same number of batches
        count = int(np.max(multihost_utils.process_allgather(np.asarray(count))))
    if count == 0:
        return {"val_loss": float("nan")}
    if not local:  # the others run `count` batches; this one has no batch to shape a pad from
        raise DataError(f"the validation split gives process {jax.process_index()} no batch while "
                        f"others have {count}: give it at least one batch per process")
    empty = {k: np.zeros_like(v) for k, v in local[0].items()}
    sums: dict[str, float] = {}
    for i in range(count):
        local_batch = dict(local[i] if i < len(local) else empty)
        if ref_table is not None:
            local_batch["ref_logps"] = ref_table[min(i, len(ref_table) - 1)]
        batch = _to_global(local_batch, mesh, rules, 0)
        out = jax.device_get(eval_step(state["trainable"], frozen, batch))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    n = max(sums.pop("tokens", 0.0), 1.0)
    result = {"val_loss": sums.pop("loss_sum") / n}
    result.update({f"val_{k}": v / n for k, v in sums.items()})
    return result


def _precompute_reference(cfg: Config, config: Any, frozen: Any, train_iter: Any,
                          train_start: dict, val_iter: Any, num_examples: int, mesh: Any,
                          rules: dict, run_dir: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference log-probs of every batch the run will see (``train.precompute_ref``), computed
    once and kept in ``reference_logprobs.npz`` so that a resumed run reuses them."""
    from jaxft.train.preference import preference_logprobs

    path = run_dir / "reference_logprobs.npz"
    n_train = cfg.train.steps * cfg.train.grad_accum
    if path.exists():
        cached = np.load(path)
        # A table covers the run if it was built for at least as many micro-batches (it is
        # shorter only when the data ran out first); a resume with more steps builds it again.
        if "n_train" in cached.files and int(cached["n_train"]) >= n_train:
            return cached["train"], (cached["val"] if cached["val"].size else None)

    @jax.jit
    def ref_fn(params: Any, batch: dict) -> jax.Array:
        return preference_logprobs(config, params, batch["tokens"], batch["targets"],
                                   batch["loss_mask"], batch["segment_ids"], batch["positions"],
                                   example_index=batch["example_index"],
                                   num_examples=num_examples)[0]

    train_table = _reference_table(ref_fn, frozen, train_iter, train_start, n_train, mesh, rules)
    val_table = None
    if val_iter is not None:
        start = val_iter.state()
        val_table = _reference_table(ref_fn, frozen, val_iter, start, 1 << 30, mesh, rules)
    if jax.process_index() == 0:
        np.savez(path, train=train_table, n_train=np.int64(n_train),
                 val=val_table if val_table is not None else np.zeros((0,), np.float32))
    return train_table, val_table


@dataclass
class _Run:
    """Everything a run holds while it trains (built by ``_prepare``)."""

    cfg: Config
    run_dir: Path
    say: Callable[..., None]
    preference: bool
    train_iter: Any
    val_iter: Any
    val_start: dict | None
    mesh: Any
    rules: dict
    frozen: Any
    state: dict
    step_fn: Any
    eval_fn: Any
    ckpts: RunCheckpoints
    meta: dict[str, Any]
    start: int
    flops_per_token: float
    ref_table: np.ndarray | None = None
    val_ref_table: np.ndarray | None = None

    def evaluate(self) -> dict[str, float]:
        return _evaluate(self.eval_fn, self.state, self.frozen, self.val_iter, self.val_start,
                         self.mesh, self.rules, self.val_ref_table)

    def save(self, step: int, best: bool = False) -> None:
        self.ckpts.save(step, self.state, self.train_iter.state(), dict(self.meta, step=step),
                        best=best)


def _check_geometry(cfg: Config, mesh: Any) -> None:
    accum, procs = cfg.train.grad_accum, jax.process_count()
    if cfg.data.batch_size % (accum * procs):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be divisible by "
                          f"train.grad_accum x processes = {accum * procs}")
    batch_axes = mesh.shape["data"] * mesh.shape["fsdp"]
    if (cfg.data.batch_size // accum) % batch_axes:
        raise ConfigError(f"the micro-batch ({cfg.data.batch_size // accum} rows) must be "
                          f"divisible by mesh data x fsdp = {batch_axes}")


def _prepare(cfg: Config, say: Callable[..., None]) -> _Run:
    """Data, model, sharded state, jitted step and evaluation, restored from the latest
    checkpoint of the run directory when there is one."""
    from jaxft.data import load_tokenizer

    run_dir = Path(cfg.train.output_dir)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rules = dict(cfg.mesh.rules)
    _check_geometry(cfg, mesh)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    train_iter, val_iter, num_examples = setup.build_data(cfg, tokenizer)
    train_start = train_iter.state()
    preference = num_examples is not None
    config, params = setup.load_model(cfg)
    adapter_rng = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 1)
    trainable, frozen = setup.split_trainable(cfg, config, params, adapter_rng)
    if preference and cfg.train.method == "full" and cfg.train.objective not in REFERENCE_FREE:
        frozen = params  # the reference: a frozen copy of the initial weights
    del params
    tx, schedule = setup.make_tx(cfg)
    frozen_sh = tree_shardings(frozen, rules, mesh)
    frozen = jax.device_put(frozen, frozen_sh)
    init = functools.partial(setup.init_state, tx=tx, seed=cfg.train.seed)
    abstract_state = jax.eval_shape(init, trainable)
    state_sh = setup.state_shardings(abstract_state, mesh, rules)
    state = jax.jit(init, out_shardings=state_sh)(trainable)
    del trainable
    loss_fn = objective_loss_fn(cfg, config, num_examples)
    tables: tuple[Any, Any] = (None, None)
    if preference and cfg.train.precompute_ref and cfg.train.objective not in REFERENCE_FREE:
        tables = _precompute_reference(cfg, config, frozen, train_iter, train_start, val_iter,
                                       num_examples, mesh, rules, run_dir)
        if cfg.train.method == "full":  # the reference copy is no longer needed in memory
            frozen, frozen_sh = {}, {}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step_fn = CompiledOnFirstCall(jax.jit(
        make_step(loss_fn, tx, schedule), in_shardings=(state_sh, frozen_sh, None),
        out_shardings=(state_sh, replicated), donate_argnums=(0,)))
    eval_fn = CompiledOnFirstCall(jax.jit(make_eval_step(loss_fn),
                                          in_shardings=(state_sh["trainable"], frozen_sh, None)))
    # Asynchronous saves on one process; across processes orbax's background finalisation and
    # the training loop's own collectives can interleave differently per process, so save
    # synchronously there.
    ckpts = RunCheckpoints(run_dir, keep=cfg.train.keep_checkpoints,
                           async_save=jax.process_count() == 1)
    meta: dict[str, Any] = {"best_val_loss": None, "best_step": None, "bad_evals": 0,
                            "tokens": 0, "base": setup.base_fingerprint(cfg.model.path)}
    start = ckpts.latest_step() or 0
    if start:
        state, data_state, meta = ckpts.restore(start, abstract_with_shardings(abstract_state,
                                                                               state_sh))
        train_iter.restore(data_state)
        say(f"resumed from {run_dir / 'checkpoints' / str(start)} (step {start})")
    return _Run(cfg, run_dir, say, preference, train_iter, val_iter,
                val_iter.state() if val_iter is not None else None, mesh, rules, frozen, state,
                step_fn, eval_fn, ckpts, meta, start,
                flops_per_token(config, state["trainable"], cfg.train.method, cfg.data.seq_len),
                *tables)


def _record(run: _Run, step: int, m: dict, batch: dict, seconds: float) -> dict[str, Any]:
    """The metrics line of one step; stops the run on a non-finite step unless told to skip."""
    cfg = run.cfg
    if not bool(m["finite"]):
        msg = (f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, "
               f"grad_norm={float(m['grad_norm'])})")
        if cfg.train.on_nonfinite == "stop":
            last = run.ckpts.latest_step()
            where = (f"the last good checkpoint is step {last} in {run.run_dir / 'checkpoints'}"
                     if last else "no checkpoint yet")
            raise TrainingError(f"{msg}; stopping ({where}). Lower optim.lr, check the data, or "
                                "set train.on_nonfinite=skip.")
        run.say(f"\n{msg}; update skipped (train.on_nonfinite=skip)")
    if run.preference:
        tokens = int(np.nansum(batch["loss_mask"])) * jax.process_count()
    else:
        tokens = int(m["tokens"]) if np.isfinite(m["tokens"]) else 0
    run.meta["tokens"] = int(run.meta["tokens"]) + tokens
    tok_s = batch["tokens"].size * jax.process_count() / max(seconds, 1e-9)
    peak = peak_flops()
    record = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]),
              "grad_norm": float(m["grad_norm"]), "tokens": tokens, "tokens_per_s": tok_s,
              "mfu": tok_s * run.flops_per_token / peak if peak else None}
    record.update({k: float(v) for k, v in m.items()
                   if k not in ("loss", "lr", "grad_norm", "tokens", "finite")})
    return record


def _validate(run: _Run, step: int, writer: MetricsWriter, bar: Any) -> tuple[bool, bool]:
    """Validation loss, best-checkpoint and early-stopping bookkeeping: ``(improved, stop)``."""
    t, meta = run.cfg.train, run.meta
    val_metrics = run.evaluate()
    val = val_metrics["val_loss"]
    writer.write({"step": step, **val_metrics})
    best = meta["best_val_loss"]
    improved = best is None or val < best - t.early_stopping_min_delta
    if improved:
        meta.update(best_val_loss=val, best_step=step, bad_evals=0)
    else:
        meta["bad_evals"] = int(meta["bad_evals"]) + 1
    if bar is not None:
        bar.write(f"step {step}: validation loss {val:.4f}" + (" (best)" if improved else ""))
    stop = not improved and bool(t.early_stopping_patience) and \
        meta["bad_evals"] >= t.early_stopping_patience
    return improved, stop


def train(cfg: Config, *, progress: bool = True, batch_hook: BatchHook | None = None,
          verbose: bool = True) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; see the module docstring."""
    t_start = time.perf_counter()
    lead = jax.process_index() == 0
    say = print if (verbose and lead) else (lambda *a, **k: None)
    if lead:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.train.output_dir) / "config.yaml")
    run = _prepare(cfg, say)
    t, accum = cfg.train, cfg.train.grad_accum
    writer = MetricsWriter(run.run_dir, enabled=lead, resume_step=run.start)
    bar = None
    if progress and lead:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=run.start, desc="train", unit="step", dynamic_ncols=True)
    status, losses, step = "completed", [], run.start
    t_prev = time.perf_counter()
    with _Preemption() as preempt:
        try:
            if run.val_iter is not None and t.eval_every and run.start == 0:
                # where the run starts from: informational, not a candidate for "best"
                writer.write({"step": 0, **run.evaluate()})
            while step < t.steps:
                batch = _next_batch(run.train_iter, accum, run.preference)
                if not _all_processes_have(batch is not None):
                    status = "data_exhausted"
                    say(f"\nthe data ran out after {step} steps (data.num_epochs="
                        f"{cfg.data.num_epochs}); stopping before train.steps={t.steps}")
                    break
                if batch_hook is not None:
                    batch = batch_hook(step, batch)
                if run.ref_table is not None:
                    batch["ref_logps"] = run.ref_table[step * accum:(step + 1) * accum]
                run.state, metrics = run.step_fn(run.state, run.frozen,
                                                 _to_global(batch, run.mesh, run.rules, 1))
                m = jax.device_get(metrics)
                step += 1
                now = time.perf_counter()
                record = _record(run, step, m, batch, now - t_prev)
                t_prev = now
                losses.append(record["loss"])
                if step % t.log_every == 0 or step == t.steps:
                    writer.write(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:,.0f}",
                                    mfu=f"{record['mfu']:.1%}" if record["mfu"] else "n/a")
                last_step = step == t.steps
                improved = stop_early = False
                if run.val_iter is not None and (
                        (t.eval_every and step % t.eval_every == 0) or last_step):
                    improved, stop_early = _validate(run, step, writer, bar)
                if (improved or last_step or stop_early or preempt.requested
                        or (t.save_every and step % t.save_every == 0)):
                    run.save(step, best=improved)
                t_prev = time.perf_counter()  # the next step's rate leaves out eval and save
                if stop_early:
                    status = "early_stopped"
                    say(f"\nearly stopping at step {step}: no validation improvement in "
                        f"{t.early_stopping_patience} evaluations")
                    break
                if preempt.requested:
                    status = "preempted"
                    say(f"\nSIGTERM: checkpoint written at step {step}; exiting")
                    break
            if status == "data_exhausted" and step > run.start:
                run.save(step)
        finally:
            run.ckpts.wait()
            run.ckpts.close()
            writer.close()
            run.train_iter.close()
            if run.val_iter is not None:
                run.val_iter.close()
            if bar is not None:
                bar.close()
    return _finish(run, status, step, losses, time.perf_counter() - t_start, lead)


def _finish(run: _Run, status: str, step: int, losses: list[float], seconds: float,
            lead: bool) -> TrainResult:
    """Plots, the result, and the exports the config asks for."""
    cfg, metrics = run.cfg, run.run_dir / "metrics.jsonl"
    plot = plot_run(metrics, run.run_dir / "loss.png",
                    title=f"{cfg.train.method} {cfg.train.objective}") if lead else None
    if lead and run.preference:
        plot_preference(metrics, run.run_dir / "preference.png",
                        title=f"{cfg.train.objective} (beta={cfg.train.beta})")
    result = TrainResult(run_dir=run.run_dir, status=status, steps=step,
                         tokens=int(run.meta["tokens"]), seconds=seconds, losses=losses,
                         best_val_loss=run.meta["best_val_loss"], best_step=run.meta["best_step"],
                         plot=plot)
    if lead and cfg.export.formats and status in ("completed", "early_stopped", "data_exhausted"):
        from jaxft.train.exporting import export_run

        for fmt in cfg.export.formats:
            result.exports[fmt] = export_run(run.run_dir, fmt, run.run_dir / "export" / fmt)
    return result


def summary(result: TrainResult) -> str:
    """The end-of-run table printed to the terminal."""
    rows = [
        ("status", result.status),
        ("steps", f"{result.steps:,}"),
        ("trained tokens", f"{result.tokens:,}"),
        ("time", f"{result.seconds:,.1f} s"),
        ("final train loss", f"{result.losses[-1]:.4f}" if result.losses else "n/a"),
        ("best validation loss",
         f"{result.best_val_loss:.4f} (step {result.best_step})"
         if result.best_val_loss is not None else "n/a"),
        ("checkpoints", str(result.run_dir / "checkpoints")),
        ("best checkpoint", str(result.run_dir / "best") if result.best_step else "n/a"),
        ("metrics", str(result.run_dir / "metrics.jsonl")),
        ("plot", str(result.plot) if result.plot else "n/a"),
    ] + [(f"export ({k})", str(v)) for k, v in result.exports.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)

