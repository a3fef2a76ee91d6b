"""Log-probabilities of target tokens: from logits, or fused with a dense output layer.

``token_logprobs(logits, targets)`` is the plain form. ``head_logprobs(x, w, targets)`` computes
the same ``(log p(target), logsumexp)`` from the final hidden states and the output weight without
keeping the ``[n, vocab]`` logits: rows are processed in chunks, and the forward pass also forms
``E = softmax(x w) w^T`` (``[n, hidden]``), from which the input gradient is

    dx = g_logp * (w[:, target]^T - E) + g_lse * E

with no second pass over the vocabulary. That product replaces the backward pass's
``dlogits w^T``, so a frozen output layer (LoRA, QLoRA) costs the same FLOPs as the plain form
while the step keeps neither the logits nor their gradient (2 x 67 MB at 2,048 tokens and a
vocabulary of 8,192; 2 x 1 GB at 2,048 tokens of Llama 3's 128,256). When ``w`` itself is
trained, its gradient is computed in the backward pass chunk by chunk, recomputing each chunk's
logits (one more ``x w`` product, only then).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jaxtyping import Array, Float, Int

# Rows per chunk: about this many logits (16 MB in fp32), at least MIN_ROWS rows.
CHUNK_ELEMENTS = 1 << 22
MIN_ROWS = 256


def token_logprobs(
    logits: Float[Array, "b t v"], targets: Int[Array, "b t"]
) -> tuple[Float[Array, "b t"], Float[Array, "b t"]]:
    """Log-probability of each target and ``logsumexp`` of each row, in fp32.

    A custom VJP keeps only the logits (in their own dtype) and ``lse``: the gradient
    ``onehot * g_logp + (g_lse - g_logp) * softmax`` is then one pass over the logits, where
    autodiff would also keep the exponentials and scatter the target's gradient.
    """
    return _logprobs(logits, targets.astype(jnp.int32))


@jax.custom_vjp
def _logprobs(logits: Array, targets: Array) -> tuple[Array, Array]:
    return _logprobs_fwd(logits, targets)[0]


def _logprobs_fwd(logits: Array, targets: Array) -> tuple[tuple[Array, Array], tuple]:
    logits32 = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits32, axis=-1)
    picked = jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0]  # a gather
    return (picked - lse, lse), (logits, targets, lse)


def _dlogits(logits: Array, targets: Array, lse: Array, g_logp: Array, g_lse: Array) -> Array:
    """``onehot(target) * g_logp + (g_lse - g_logp) * softmax(logits)`` in fp32."""
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    hit = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None]
    return jnp.where(hit, g_logp[..., None], 0.0) + (g_lse - g_logp)[..., None] * probs


def _logprobs_bwd(res: tuple, cotangents: tuple[Array, Array]) -> tuple[Array, None]:
    logits, targets, lse = res
    g_logp, g_lse = cotangents
    return _dlogits(logits, targets, lse, g_logp, g_lse).astype(logits.dtype), None


_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd)


def chunk_rows(n: int, vocab: int) -> int:
    """Rows per chunk of ``head_logprobs`` for ``n`` rows and a vocabulary of ``vocab``."""
    rows = max(MIN_ROWS, 1 << max(0, (CHUNK_ELEMENTS // vocab).bit_length() - 1))
    return min(rows, n)


def head_logprobs(
    x: Float[Array, "n h"],
    w: Float[Array, "h v"],
    targets: Int[Array, " n"],
    rows: int | None = None,
) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    """``token_logprobs(x @ w, targets)`` without keeping the logits (module docstring).

    ``x`` and ``w`` are in the compute dtype (the products run in it, the softmax in fp32);
    ``rows`` overrides the chunk size (``chunk_rows``). Gradients flow to ``x`` and, when it is
    differentiated, to ``w``.
    """
    n = x.shape[0]
    rows = chunk_rows(n, w.shape[1]) if rows is None else min(rows, n)
    return _head(x, w, targets.astype(jnp.int32), rows)


def _chunks(a: Array, rows: int) -> Array:
    """``[n, ...] -> [ceil(n / rows), rows, ...]``, zero-padded at the end."""
    pad = -a.shape[0] % rows
    if pad:
        a = jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)])
    return a.reshape(-1, rows, *a.shape[1:])


def _unchunk(a: Array, n: int) -> Array:
    return a.reshape(-1, *a.shape[2:])[:n]


def _contract_last(a: Array, b: Array) -> Array:
    """``a @ b^T`` for 2-D ``a [m, k]``, ``b [n, k]``."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())))


def _head_chunk(xc: Array, w: Array, tc: Array) -> tuple[Array, Array, Array]:
    """One chunk's ``log p(target)``, ``lse`` and ``softmax(xc w) w^T``."""
    logits = jnp.dot(xc, w).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    probs = jnp.exp(logits - lse[:, None]).astype(w.dtype)
    return picked - lse, lse, _contract_last(probs, w)


def _head_apply(x: Array, w: Array, targets: Array, rows: int) -> tuple[Array, Array, Array]:
    n = x.shape[0]

    def body(_: None, chunk: tuple[Array, Array]) -> tuple[None, tuple[Array, Array, Array]]:
        return None, _head_chunk(chunk[0], w, chunk[1])

    if n <= rows:
        logp, lse, e = _head_chunk(x, w, targets)
    else:
        _, out = jax.lax.scan(body, None, (_chunks(x, rows), _chunks(targets, rows)))
        logp, lse, e = (_unchunk(o, n) for o in out)
    return logp, lse, e


def _head_impl(x: Array, w: Array, targets: Array, rows: int) -> tuple[Array, Array]:
    logp, lse, _ = _head_apply(x, w, targets, rows)
    return logp, lse


_head = jax.custom_vjp(_head_impl, nondiff_argnums=(3,))


def _head_fwd(x: CustomVJPPrimal, w: CustomVJPPrimal, targets: CustomVJPPrimal, rows: int):
    train_w = w.perturbed
    x, w, targets = x.value, w.value, targets.value
    logp, lse, e = _head_apply(x, w, targets, rows)
    # Residuals are pytrees: ``x`` is kept only when ``w``'s gradient will be needed.
    return (logp, lse), (x if train_w else None, w, targets, lse, e)


def _head_bwd(rows: int, res: tuple, cotangents: tuple) -> tuple[Array, Array | None, None]:
    x, w, targets, lse, e = res
    g_logp, g_lse = (
        jnp.zeros(g.shape, g.dtype) if isinstance(g, SymbolicZero) else g for g in cotangents
    )
    w_target = jnp.take(w, targets, axis=1).T.astype(jnp.float32)  # [n, h], a gather
    e32 = e.astype(jnp.float32)
    dx = g_logp[:, None] * (w_target - e32) + g_lse[:, None] * e32
    dw = None if x is None else _head_dw(x, w, targets, lse, g_logp, g_lse, rows)
    return dx.astype(e.dtype), dw, None


def _head_dw(x, w, targets, lse, g_logp, g_lse, rows) -> Array:
    """``x^T dlogits``, accumulated over row chunks with each chunk's logits recomputed."""

    def body(dw: Array, c: tuple) -> tuple[Array, None]:
        xc, tc, lc, gc, gl = c
        d = _dlogits(jnp.dot(xc, w), tc, lc, gc, gl).astype(w.dtype)
        return dw + jax.lax.dot_general(xc, d, (((0,), (0,)), ((), ()))).astype(jnp.float32), None

    chunks = tuple(_chunks(a, rows) for a in (x, targets, lse, g_logp, g_lse))  # pads: g = 0
    dw, _ = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), chunks)
    return dw.astype(w.dtype)


_head.defvjp(_head_fwd, _head_bwd, symbolic_zeros=True)
