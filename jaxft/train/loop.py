"""The training loop: a plain ``for`` loop with logging, evaluation and checkpointing inline.

``train(cfg)`` loads the model and data, resumes from the run directory's latest checkpoint when
there is one, and runs the jitted step until ``train.steps``, early stopping, the end of the data,
or SIGTERM (which writes a checkpoint and returns). A non-finite loss or gradient stops the run
with a message (``train.on_nonfinite=stop``) without writing over the last good checkpoint, or
skips the update (``skip``).
"""

from __future__ import annotations

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
from jaxft.errors import ConfigError, JaxftError
from jaxft.train import setup
from jaxft.train.checkpoint import RunCheckpoints, abstract_with_shardings
from jaxft.train.metrics import MetricsWriter, plot_preference, plot_run
from jaxft.train.perf import flops_per_token, peak_flops
from jaxft.train.sharding import batch_sharding, make_mesh, tree_shardings
from jaxft.train.objectives import REFERENCE_FREE, objective_loss_fn
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


def _build_data(cfg: Config, tokenizer: Any) -> tuple[Any, Any, int | None]:
    """Train/validation iterators and, for preference objectives, examples per micro-batch."""
    from jaxft.data import build_iterators, build_preference_iterators

    kw = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if cfg.train.objective == "sft":
        return (*build_iterators(cfg.data, tokenizer, **kw), None)
    pairs = cfg.data.batch_size // cfg.train.grad_accum
    kind = "kto" if cfg.train.objective == "kto" else "pairs"
    train_it, val_it = build_preference_iterators(cfg.data, tokenizer, objective=kind,
                                                  batch_pairs=pairs, **kw)
    return train_it, val_it, 2 * pairs


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
    if not local:
        return {"val_loss": float("nan")}
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
        if cached["train"].shape[0] >= min(n_train, 1):
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
        np.savez(path, train=train_table,
                 val=val_table if val_table is not None else np.zeros((0,), np.float32))
    return train_table, val_table


def train(cfg: Config, *, progress: bool = True, batch_hook: BatchHook | None = None,
          verbose: bool = True) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; see the module docstring."""
    from jaxft.data import load_tokenizer

    t_start = time.perf_counter()
    run_dir = Path(cfg.train.output_dir)
    lead = jax.process_index() == 0
    say = print if (verbose and lead) else (lambda *a, **k: None)
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accum = cfg.train.grad_accum
    if cfg.data.batch_size % (accum * jax.process_count()):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be divisible by "
                          f"train.grad_accum x processes = {accum * jax.process_count()}")

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    train_iter, val_iter, num_examples = _build_data(cfg, tokenizer)
    train_start = train_iter.state()
    preference = num_examples is not None
    config, params = setup.load_model(cfg)
    plan_mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rules = dict(cfg.mesh.rules)
    batch_axes = plan_mesh.shape["data"] * plan_mesh.shape["fsdp"]
    if (cfg.data.batch_size // accum) % batch_axes:
        raise ConfigError(f"the micro-batch ({cfg.data.batch_size // accum} rows) must be "
                          f"divisible by mesh data x fsdp = {batch_axes}")

    rng = jax.random.PRNGKey(cfg.train.seed)
    trainable, frozen = setup.split_trainable(cfg, config, params, jax.random.fold_in(rng, 1))
    if preference and cfg.train.method == "full" and cfg.train.objective not in REFERENCE_FREE:
        frozen = params  # the reference: a frozen copy of the initial weights
    del params
    tx, schedule = setup.make_tx(cfg)
    frozen_sh = tree_shardings(frozen, rules, plan_mesh)
    frozen = jax.device_put(frozen, frozen_sh)
    abstract_state = jax.eval_shape(lambda t: setup.init_state(t, tx, cfg.train.seed), trainable)
    state_sh = setup.state_shardings(abstract_state, plan_mesh, rules)
    state = jax.jit(lambda t: setup.init_state(t, tx, cfg.train.seed),
                    out_shardings=state_sh)(trainable)
    del trainable

    loss_fn = objective_loss_fn(cfg, config, num_examples)
    ref_table = val_ref_table = None
    if preference and cfg.train.precompute_ref and cfg.train.objective not in REFERENCE_FREE:
        ref_table, val_ref_table = _precompute_reference(
            cfg, config, frozen, train_iter, train_start, val_iter, num_examples, plan_mesh,
            rules, run_dir)
        if cfg.train.method == "full":  # the reference copy is no longer needed in memory
            frozen, frozen_sh = {}, {}
    replicated = jax.sharding.NamedSharding(plan_mesh, jax.sharding.PartitionSpec())
    step_fn = jax.jit(make_step(loss_fn, tx, schedule),
                      in_shardings=(state_sh, frozen_sh, None),
                      out_shardings=(state_sh, replicated), donate_argnums=(0,))
    eval_fn = jax.jit(make_eval_step(loss_fn), in_shardings=(state_sh["trainable"], frozen_sh,
                                                             None))

    ckpts = RunCheckpoints(run_dir, keep=cfg.train.keep_checkpoints)
    meta: dict[str, Any] = {"best_val_loss": None, "best_step": None, "bad_evals": 0,
                            "tokens": 0, "base": setup.base_fingerprint(cfg.model.path)}
    start = ckpts.latest_step() or 0
    if start:
        state, data_state, meta = ckpts.restore(start, abstract_with_shardings(abstract_state,
                                                                               state_sh))
        train_iter.restore(data_state)
        say(f"resumed from {run_dir / 'checkpoints' / str(start)} (step {start})")
    val_start = val_iter.state() if val_iter is not None else None
    writer = MetricsWriter(run_dir, enabled=lead, resume_step=start)
    seq = cfg.data.seq_len
    fpt = flops_per_token(config, state["trainable"], cfg.train.method, seq)
    peak = peak_flops()
    bar = None
    if progress and lead:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step",
                   dynamic_ncols=True)
    status, losses = "completed", []
    step = start
    t_prev = time.perf_counter()
    with _Preemption() as preempt:
        try:
            if val_iter is not None and cfg.train.eval_every and start == 0:
                # where the run starts from: informational, not a candidate for "best"
                writer.write({"step": 0, **_evaluate(eval_fn, state, frozen, val_iter,
                                                     val_start, plan_mesh, rules,
                                                     val_ref_table)})
            while step < cfg.train.steps:
                batch = _next_batch(train_iter, accum, preference)
                if not _all_processes_have(batch is not None):
                    status = "data_exhausted"
                    say(f"\nthe data ran out after {step} steps (data.num_epochs="
                        f"{cfg.data.num_epochs}); stopping before train.steps={cfg.train.steps}")
                    break
                if batch_hook is not None:
                    batch = batch_hook(step, batch)
                if ref_table is not None:
                    batch["ref_logps"] = ref_table[step * accum:(step + 1) * accum]
                state, metrics = step_fn(state, frozen, _to_global(batch, plan_mesh, rules, 1))
                m = jax.device_get(metrics)
                step += 1
                now = time.perf_counter()
                if not bool(m["finite"]):
                    msg = (f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, "
                           f"grad_norm={float(m['grad_norm'])})")
                    if cfg.train.on_nonfinite == "stop":
                        last = ckpts.latest_step()
                        where = (f"the last good checkpoint is step {last} in "
                                 f"{run_dir / 'checkpoints'}" if last else "no checkpoint yet")
                        raise TrainingError(f"{msg}; stopping ({where}). Lower optim.lr, check "
                                            "the data, or set train.on_nonfinite=skip.")
                    say(f"\n{msg}; update skipped (train.on_nonfinite=skip)")
                tokens = int(batch["loss_mask"].sum()) * jax.process_count() if preference \
                    else (int(m["tokens"]) if np.isfinite(m["tokens"]) else 0)
                meta["tokens"] = int(meta["tokens"]) + tokens
                dt = now - t_prev
                t_prev = now
                tok_s = batch["tokens"].size * jax.process_count() / max(dt, 1e-9)
                record = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]),
                          "grad_norm": float(m["grad_norm"]), "tokens": tokens,
                          "tokens_per_s": tok_s, "mfu": tok_s * fpt / peak if peak else None}
                record.update({k: float(v) for k, v in m.items()
                               if k not in ("loss", "lr", "grad_norm", "tokens", "finite")})
                losses.append(float(m["loss"]))
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    writer.write(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{tok_s:,.0f}",
                                    mfu=f"{record['mfu']:.1%}" if record["mfu"] else "n/a")
                last_step = step == cfg.train.steps
                improved, stop_early = False, False
                if val_iter is not None and ((cfg.train.eval_every and
                                              step % cfg.train.eval_every == 0) or last_step):
                    val_metrics = _evaluate(eval_fn, state, frozen, val_iter, val_start,
                                            plan_mesh, rules, val_ref_table)
                    val = val_metrics["val_loss"]
                    writer.write({"step": step, **val_metrics})
                    best = meta["best_val_loss"]
                    if best is None or val < best - cfg.train.early_stopping_min_delta:
                        meta.update(best_val_loss=val, best_step=step, bad_evals=0)
                        improved = True
                    else:
                        meta["bad_evals"] = int(meta["bad_evals"]) + 1
                        patience = cfg.train.early_stopping_patience
                        stop_early = bool(patience) and meta["bad_evals"] >= patience
                    if bar is not None:
                        bar.write(f"step {step}: validation loss {val:.4f}"
                                  + (" (best)" if improved else ""))
                save = (improved or last_step or stop_early or preempt.requested
                        or (cfg.train.save_every and step % cfg.train.save_every == 0))
                if save:
                    ckpts.save(step, state, train_iter.state(), dict(meta, step=step),
                               best=improved)
                if stop_early:
                    status = "early_stopped"
                    say(f"\nearly stopping at step {step}: no validation improvement in "
                        f"{cfg.train.early_stopping_patience} evaluations")
                    break
                if preempt.requested:
                    status = "preempted"
                    say(f"\nSIGTERM: checkpoint written at step {step}; exiting")
                    break
            if status == "data_exhausted" and step > start:
                ckpts.save(step, state, train_iter.state(), dict(meta, step=step))
        finally:
            ckpts.wait()
            ckpts.close()
            writer.close()
            train_iter.close()
            if val_iter is not None:
                val_iter.close()
            if bar is not None:
                bar.close()
    plot = plot_run(run_dir / "metrics.jsonl", run_dir / "loss.png",
                    title=f"{cfg.train.method} {cfg.train.objective}") if lead else None
    if lead and preference:
        plot_preference(run_dir / "metrics.jsonl", run_dir / "preference.png",
                        title=f"{cfg.train.objective} (beta={cfg.train.beta})")
    result = TrainResult(run_dir=run_dir, status=status, steps=step, tokens=int(meta["tokens"]),
                         seconds=time.perf_counter() - t_start, losses=losses,
                         best_val_loss=meta["best_val_loss"], best_step=meta["best_step"],
                         plot=plot)
    if lead and cfg.export.formats and status in ("completed", "early_stopped", "data_exhausted"):
        from jaxft.train.exporting import export_run

        for fmt in cfg.export.formats:
            result.exports[fmt] = export_run(run_dir, fmt, run_dir / "export" / fmt)
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

