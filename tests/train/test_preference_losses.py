"""Preference losses against TRL 1.x's own code, run in float64 on the same fp32 inputs.

Each oracle calls the TRL trainer method itself (``DPOTrainer._compute_loss``,
``KTOTrainer._compute_loss``, ``ORPOTrainer.get_batch_loss_metrics``,
``CPOTrainer.get_batch_loss_metrics``) on an instance made without ``__init__`` that carries only
the attributes the method reads; the model is a stand-in returning the per-token log-probs.

Tolerance: ``|ours - trl| <= 1e-6 * max(1, |trl|)``. Ours is fp32, whose spacing at ``|x|`` is
``1.19e-7 * |x|``: an IPO loss near 25 (``(delta - 1/(2*0.1))^2``) or a summed log-prob near -100
cannot be nearer than ~1e-6 / ~4e-6 absolute even when correctly rounded, so above 1 the bound
is relative (about 8 fp32 ulps).
"""

from __future__ import annotations

import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxft.losses import dpo_loss, kto_loss, orpo_loss, sequence_logprobs, simpo_loss

BATCHES = (1, 3, 8)
CPU = types.SimpleNamespace(
    device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
    unwrap_model=lambda m: m,
)


def _close(ours, theirs, what: str) -> float:
    ours, theirs = float(ours), float(theirs)
    err = abs(ours - theirs)
    assert err <= 1e-6 * max(1.0, abs(theirs)), f"{what}: ours {ours!r} trl {theirs!r} err {err:.3g}"
    return err


def _trainer(cls, **attrs):
    """A TRL trainer instance without ``__init__``: only what the loss code reads."""
    t = object.__new__(cls)
    t.__dict__.update(accelerator=CPU, aux_loss_enabled=False, model=types.SimpleNamespace(
        training=True), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, **attrs)
    return t


def _model(log_probs_by_first_token: dict[int, torch.Tensor]):
    """Stand-in causal LM returning given per-token log-probs (picked by the row's first token)."""
    def call(input_ids, **_):
        lp = log_probs_by_first_token[int(input_ids[0, 0])]
        return types.SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp),
                                     mean_logits=torch.zeros_like(lp),
                                     is_top1=torch.zeros(lp.shape, dtype=torch.bool))
    return call


def _completion_batch(sums: np.ndarray, counts: np.ndarray, first_token: int = 0):
    """Rows whose completions have ``counts`` tokens and summed log-prob ``sums`` (exactly).

    The whole sum sits on the first completion target, so the float64 sum TRL takes is the fp32
    value ours gets; zeros elsewhere, as the fused LM head returns for ``-100`` labels.
    """
    n, width = len(sums), int(counts.max()) + 1
    completion_mask = torch.zeros(n, width + 1, dtype=torch.long)
    for i, c in enumerate(counts):
        completion_mask[i, 2:2 + c] = 1  # tokens 0-1 are the prompt
    log_probs = torch.zeros(n, width, dtype=torch.float64)
    log_probs[:, 1] = torch.from_numpy(sums.astype(np.float64))
    input_ids = torch.full((n, width + 1), first_token, dtype=torch.long)
    return input_ids, completion_mask, log_probs


def _pairs(rng, b):
    """fp32 summed log-probs of policy/reference, chosen/rejected, and completion lengths."""
    pol = -rng.uniform(5.0, 80.0, (2, b)).astype(np.float32)
    ref = (pol + rng.normal(0.0, 8.0, (2, b))).astype(np.float32)
    counts = rng.integers(1, 20, (2, b))
    return pol, ref, counts


def _trl_dpo(pol, ref, counts, beta, loss_type, label_smoothing=0.0):
    from trl import DPOTrainer

    input_ids, completion_mask, log_probs = _completion_batch(pol.reshape(-1), counts.reshape(-1))
    t = _trainer(DPOTrainer, ld_alpha=None, precompute_ref_logps=True, use_weighting=False,
                 f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
                 beta=beta, label_smoothing=label_smoothing)
    ref64 = torch.from_numpy(ref.astype(np.float64))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "completion_mask": completion_mask, "ref_chosen_logps": ref64[0],
              "ref_rejected_logps": ref64[1]}
    loss = DPOTrainer._compute_loss(t, _model({0: log_probs}), inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in t._metrics["train"].items()}


DPO_CASES = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("hinge", 0.1, 0.0), ("ipo", 0.1, 0.0),
             ("ipo", 0.5, 0.0), ("robust", 0.1, 0.2)]
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected")


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("loss_type,beta,ls", DPO_CASES)
def test_dpo_matches_trl(b, loss_type, beta, ls):
    rng = np.random.default_rng(b)
    pol, ref, counts = _pairs(rng, b)
    want, want_metrics = _trl_dpo(pol, ref, counts, beta, loss_type, ls)
    kw = {"chosen_count": counts[0], "rejected_count": counts[1]} if loss_type == "ipo" else {}
    loss, metrics = jax.jit(dpo_loss, static_argnums=(4, 5, 6))(
        pol[0], pol[1], ref[0], ref[1], beta, loss_type, ls, **kw)
    _close(loss, want, f"{loss_type} loss")
    for key in REWARD_KEYS:
        _close(metrics[key], want_metrics[key], key)
    if loss_type == "ipo":  # the documented alternative: the caller passes averaged log-probs
        avg_p, avg_r = pol / counts, ref / counts
        loss, _ = dpo_loss(avg_p[0], avg_p[1], avg_r[0], avg_r[1], beta, "ipo")
        _close(loss, want, "ipo loss from averaged log-probs")


def test_dpo_rejects_label_smoothing_that_trl_ignores():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(x, x, x, x, 0.1, "sigmoid", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, 0.1, "exo_pair")


def _trl_kto(pol, ref, kl_pol, kl_ref, desirable, beta, wd, wu):
    from trl import KTOTrainer

    n = len(pol)
    counts = np.full(n, 3)
    ids, mask, lp = _completion_batch(pol, counts, first_token=0)
    kl_ids, kl_mask, kl_lp = _completion_batch(kl_pol, counts, first_token=1)
    t = _trainer(KTOTrainer, calculate_KL=True, precompute_ref_logps=True, loss_type="kto",
                 beta=beta, desirable_weight=wd, undesirable_weight=wu)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
              "KL_completion_mask": kl_mask, "label": torch.from_numpy(desirable),
              "ref_logps": torch.from_numpy(ref.astype(np.float64)),
              "ref_KL_logps": torch.from_numpy(kl_ref.astype(np.float64))}
    loss = KTOTrainer._compute_loss(t, _model({0: lp, 1: kl_lp}), inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in t._metrics["train"].items()}


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("beta,wd,wu,kl_shift", [(0.1, 1.0, 1.0, 3.0), (0.3, 1.0, 1.33, -3.0)])
def test_kto_matches_trl(b, beta, wd, wu, kl_shift):
    rng = np.random.default_rng(10 + b)
    pol = -rng.uniform(5.0, 80.0, b).astype(np.float32)
    ref = (pol + rng.normal(0.0, 8.0, b)).astype(np.float32)
    kl_pol = -rng.uniform(5.0, 80.0, b).astype(np.float32)
    # kl_shift < 0 makes mean(kl_pol - kl_ref) negative so that the clamp at 0 is exercised.
    kl_ref = (kl_pol - kl_shift + rng.normal(0.0, 1.0, b)).astype(np.float32)
    desirable = np.arange(b) % 3 != 1  # b = 1: desirable only (TRL's empty-rejected branch)
    want, want_metrics = _trl_kto(pol, ref, kl_pol, kl_ref, desirable, beta, wd, wu)
    loss, metrics = jax.jit(kto_loss, static_argnums=(5, 6, 7))(
        pol, ref, kl_pol, kl_ref, desirable, beta, wd, wu)
    _close(loss, want, "kto loss")
    assert (float(metrics["kl"]) == 0.0) == (kl_shift < 0)
    keys = ["kl", "rewards/chosen", "logps/chosen"]
    if b > 1:
        keys += ["rewards/rejected", "logps/rejected", "rewards/margins"]
    for key in keys:
        _close(metrics[key], want_metrics[key], key)


def _avg_pairs(rng, b):
    """Length-averaged log-probs on both sides of log1mexp's branch point -ln 2, some near 0."""
    x = -rng.uniform(0.0, 3.0, (2, b)) ** 2
    x[:, ::4] = -rng.uniform(1e-4, 1e-2, x[:, ::4].shape)
    return x.astype(np.float32)


def _trl_metrics_call(cls, chosen, rejected, nll, **attrs):
    t = _trainer(cls, **attrs)
    c, r = (torch.from_numpy(v.astype(np.float64)) for v in (chosen, rejected))
    logits = torch.zeros(len(c), 2, 3, dtype=torch.float64)
    t.concatenated_forward = lambda model, batch: (c, r, logits, logits, torch.tensor(
        float(nll), dtype=torch.float64))
    loss, metrics = cls.get_batch_loss_metrics(t, None, {})
    return float(loss), metrics


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(b, beta):
    from trl.experimental.orpo import ORPOTrainer

    rng = np.random.default_rng(20 + b)
    avg = _avg_pairs(rng, b)
    nll = np.float32(rng.uniform(0.5, 3.0))
    want, want_metrics = _trl_metrics_call(ORPOTrainer, avg[0], avg[1], nll, beta=beta)
    loss, metrics = jax.jit(orpo_loss, static_argnums=3)(avg[0], avg[1], nll, beta)
    _close(loss, want, "orpo loss")
    for key in (*REWARD_KEYS, "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        _close(metrics[key], want_metrics[key], key)


def test_orpo_gradient_is_finite_at_probability_one():
    # TRL's log1mexp(0) = -inf; the clamp keeps the loss and its gradient finite.
    grad = jax.grad(lambda c: orpo_loss(c, jnp.array([-1.0, -0.5]), 1.0)[0])(jnp.array([0.0, -0.3]))
    assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("beta,gamma,ls,cpo_alpha", [(0.1, 0.5, 0.0, 0.0), (2.0, 0.5, 0.0, 0.0),
                                                     (2.5, 1.4, 0.1, 0.0), (2.0, 0.5, 0.0, 1.0)])
def test_simpo_matches_trl_cpo(b, beta, gamma, ls, cpo_alpha):
    from trl.experimental.cpo import CPOTrainer

    rng = np.random.default_rng(30 + b)
    avg = _avg_pairs(rng, b)
    nll = np.float32(rng.uniform(0.5, 3.0))
    want, want_metrics = _trl_metrics_call(
        CPOTrainer, avg[0], avg[1], nll if cpo_alpha else 0.0, beta=beta, simpo_gamma=gamma,
        label_smoothing=ls, cpo_alpha=cpo_alpha, loss_type="simpo", alpha=0.0)
    loss, metrics = simpo_loss(avg[0], avg[1], beta, gamma, ls, chosen_nll=nll,
                               cpo_alpha=cpo_alpha)
    _close(loss, want, "simpo loss")
    for key in REWARD_KEYS:
        _close(metrics[key], want_metrics[key], key)


@pytest.mark.parametrize("b", BATCHES)
def test_sequence_logprobs_matches_trl_get_batch_logps(b):
    from trl.experimental.orpo import ORPOTrainer

    rng = np.random.default_rng(40 + b)
    t, v = 12, 50
    logits = (3.0 * rng.standard_normal((b, t, v))).astype(np.float32)
    labels = rng.integers(0, v, (b, t))
    for i in range(b):  # prompt of 1-4 tokens, then completion, then right padding
        p, end = rng.integers(1, 5), rng.integers(6, t + 1)
        labels[i, :p] = labels[i, end:] = -100
    targets = np.concatenate([labels[:, 1:], np.full((b, 1), -100)], axis=1)
    mask = targets != -100
    for average in (False, True):
        want = ORPOTrainer.get_batch_logps(torch.from_numpy(logits.astype(np.float64)),
                                           torch.from_numpy(labels), average_log_prob=average)
        got, count = sequence_logprobs(jnp.asarray(logits), jnp.asarray(np.where(mask, targets, 0)),
                                       jnp.asarray(mask), average=average)
        np.testing.assert_array_equal(np.asarray(count), mask.sum(1))
        for g, w in zip(np.asarray(got), want.numpy(), strict=True):
            _close(g, w, f"sequence_logprobs average={average}")


def test_valid_mask_equals_the_loss_of_the_valid_pairs():
    """A partly filled last batch: masked means equal the losses of the smaller batch TRL sees."""
    rng = np.random.default_rng(50)
    pol, ref, counts = _pairs(rng, 8)
    avg = _avg_pairs(rng, 8)
    valid = np.arange(8) < 5
    desirable = np.arange(8) % 3 != 1
    cases = [
        (dpo_loss, (pol[0], pol[1], ref[0], ref[1], 0.1, "sigmoid"), {}),
        (dpo_loss, (pol[0], pol[1], ref[0], ref[1], 0.1, "ipo"),
         {"chosen_count": counts[0], "rejected_count": counts[1]}),
        (kto_loss, (pol[0], ref[0], pol[1], ref[1], desirable, 0.1, 1.0, 1.33), {}),
        (orpo_loss, (avg[0], avg[1], np.float32(1.5), 0.1), {}),
        (simpo_loss, (avg[0], avg[1], 2.0, 0.5), {}),
    ]
    for fn, args, kw in cases:
        loss, metrics = fn(*args, **kw, valid=valid)
        sub = [a[valid] if isinstance(a, np.ndarray) and a.shape == (8,) else a for a in args]
        want, want_metrics = fn(*sub, **{k: v[valid] for k, v in kw.items()})
        np.testing.assert_allclose(float(loss), float(want), rtol=1e-6, err_msg=fn.__name__)
        for key, value in want_metrics.items():
            np.testing.assert_allclose(float(metrics[key]), float(value), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{fn.__name__} {key}")
