"""Segment-aware causal attention with grouped-query heads and an optional sliding window.

A query at row index ``i`` of segment ``s`` may attend to key ``j`` when ``j <= i`` (causal), the
key is in the same segment (``segment_ids``; 0 marks padding, which attends to and is attended by
nothing useful), and, with a window ``w > 0``, ``j > i - w`` (transformers'
``sliding_window_overlay``). Packed rows therefore never attend across examples.

Two implementations of the same maths:

- ``dot_product_attention``: plain softmax attention under an explicit ``[b, t, s]`` mask, the
  reference, and the path of generation with a KV cache (keys longer than queries).
- ``causal_attention``: a row attending to itself (training, prefill-free evaluation), with a
  custom VJP built for CPU matmul libraries (see ``_attention_fwd``): head-major layout, query
  blocks that skip the keys after the block (fully masked by causality), the mask applied inside
  the kernel rather than materialised, and the unnormalised exponentials kept for the backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

_MASKED = -1e30  # finite, so a fully masked (padding) row gives no NaN
BLOCK = 128  # query rows per block of causal_attention
_MAX_BLOCKS = 16  # longer rows get larger blocks: the blocks are unrolled in the program


def attention_mask(
    q_index: Int[Array, "b t"],
    kv_index: Int[Array, "b s"],
    q_segment: Int[Array, "b t"],
    kv_segment: Int[Array, "b s"],
    window: Int[Array, ""] | int = 0,
) -> Bool[Array, "b t s"]:
    """Boolean ``[b, t, s]`` mask: causal, same segment, non-padding key, inside the window."""
    qi = q_index[:, :, None]
    kj = kv_index[:, None, :]
    mask = (kj <= qi) & (q_segment[:, :, None] == kv_segment[:, None, :])
    mask &= kv_segment[:, None, :] != 0
    window = jnp.asarray(window)
    return mask & ((window <= 0) | (kj > qi - window))


def dot_product_attention(
    q: Float[Array, "b t hq d"],
    k: Float[Array, "b s hk d"],
    v: Float[Array, "b s hk d"],
    mask: Bool[Array, "b t s"],
) -> Float[Array, "b t hq d"]:
    """Softmax attention with ``hq = hk * g`` query heads sharing each key/value head (GQA/MQA).

    Scores and softmax in fp32, probabilities cast to the value dtype (as HF's eager attention).
    Einsum letters: b batch, t query, s key, k kv head, g group, d head dim.
    """
    b, t, hq, d = q.shape
    hk = k.shape[2]
    qg = q.reshape(b, t, hk, hq // hk, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq, d)


def causal_attention(
    q: Float[Array, "b t hq d"],
    k: Float[Array, "b t hk d"],
    v: Float[Array, "b t hk d"],
    segment_ids: Int[Array, "b t"],
    window: Int[Array, ""] | int = 0,
    block: int = BLOCK,
) -> Float[Array, "b t hq d"]:
    """Attention of a row over itself: ``dot_product_attention`` under
    ``attention_mask(arange, arange, segment_ids, segment_ids, window)``, with a custom VJP.

    A query row with no visible key (padding, segment 0) gives zeros instead of the reference's
    uniform average; nothing reads those rows. ``block`` query rows are processed at a time and
    see only the keys up to their last row: the keys after it are masked by causality, and their
    scores are never computed (one block when ``t`` is not a multiple of ``block``; doubled until
    there are at most 16 blocks).
    """
    b, t, hq, d = q.shape
    hk = k.shape[2]
    g = hq // hk
    block = _query_block(t, block)
    # Head-major, grouped: the g query heads of one kv head are rows t*g + j of one matrix, so a
    # block of query rows is a contiguous slice and every dot is one batched matmul over (b, hk).
    qh = q.reshape(b, t, hk, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hk, t * g, d)
    kh = k.transpose(0, 2, 1, 3)  # [b, hk, t, d]
    vh = v.transpose(0, 2, 1, 3)
    out = _attention(qh, kh, vh, segment_ids, jnp.asarray(window, jnp.int32), g, block)
    return out.reshape(b, hk, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, hq, d)


def _query_block(t: int, block: int) -> int:
    if t % block:
        return t
    while t // block > _MAX_BLOCKS and t % (2 * block) == 0:
        block *= 2
    return block


def _dot(x: Array, y: Array, contract: tuple[int, int]) -> Array:
    """Batched matmul over the two leading (b, hk) axes, accumulated in fp32."""
    dims = (((contract[0],), (contract[1],)), ((0, 1), (0, 1)))
    return jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32)


def _block_bias(segment_ids: Array, window: Array, i: int, block: int, groups: int) -> Array:
    """Additive mask ``[b, 1, block*g, keys]`` of query block ``i`` over keys ``[0, (i+1)*block)``:
    0 where the key is visible (causal, same non-zero segment, inside the window), else -1e30.
    One row per grouped query row ``r``, at position ``i * block + r // g``."""
    n_keys = (i + 1) * block
    query = i * block + np.arange(block * groups)[:, None] // groups
    key = np.arange(n_keys)[None, :]
    seg_q = jnp.repeat(segment_ids[:, i * block : n_keys], groups, axis=1)[:, None, :, None]
    seg_k = segment_ids[:, None, None, :n_keys]
    visible = (key <= query) & (seg_q == seg_k) & (seg_k != 0)
    visible &= (window <= 0) | (key > query - window)
    return jnp.where(visible, 0.0, _MASKED).astype(jnp.float32)


def _block_scores(qs, k, segment_ids, window, i, block, groups):
    """Masked scores ``[b, hk, block*g, keys]`` of query block ``i`` against the keys it may see
    (every later key is masked by causality and skipped). Hidden keys score about -1e30."""
    rows = slice(i * block * groups, (i + 1) * block * groups)
    s = _dot(qs[:, :, rows], k[:, :, : (i + 1) * block], (3, 3))
    return s + _block_bias(segment_ids, window, i, block, groups)


def _swap_last(x: Float[Array, "b h m n"]) -> Float[Array, "b h n m"]:
    """``swapaxes(x, 2, 3)`` computed as a product with the identity (exact). A transpose that
    moves the minor axis, fused by XLA into a reader that reads each element several times
    (RoPE's backward), is recomputed per read; a dot's output is materialised once."""
    eye = jnp.eye(x.shape[2], dtype=x.dtype)
    return jax.lax.dot_general(x, eye, (((2,), (0,)), ((), ()))).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, segment_ids, window, groups, block):
    return _attention_fwd(q, k, v, segment_ids, window, groups, block)[0]


def _attention_fwd(q, k, v, segment_ids, window, groups, block):
    """Per query block: ``P = exp(S - max)`` (exactly 0 on hidden keys), ``O = P V / rowsum(P)``.
    Keeps ``q / sqrt(d)``, ``k``, ``v`` and each row's log-sum-exp: the backward recomputes
    ``P`` (under the same mask) rather than keeping every block of it, and does not need the
    output (its layer keeps the output in another layout, as the input of ``o_proj``)."""
    qs = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    outs, lses = [], []
    for i in range(q.shape[2] // (block * groups)):
        s = _block_scores(qs, k, segment_ids, window, i, block, groups)  # [b, hk, rows, keys]
        # A row that sees no key has max -1e30; the floor keeps its hidden keys at exp(-9e29) = 0.
        top = jnp.maximum(jnp.max(s, axis=-1, keepdims=True), 0.1 * _MASKED)
        p = jnp.exp(s - top)
        total = jnp.sum(p, axis=-1, keepdims=True)  # >= 1 unless the row sees no key
        o = _dot(p.astype(v.dtype), v[:, :, : s.shape[-1]], (3, 2)) / jnp.maximum(total, 1.0)
        outs.append(o.astype(q.dtype))
        lses.append(top + jnp.log(jnp.maximum(total, 1.0)))  # [b, hk, rows, 1]
    out = jnp.concatenate(outs, axis=2)  # [b, hk, rows, d]
    return out, (qs, k, v, lses, segment_ids, window)


def _attention_bwd(groups, block, res, d_out):
    """``dS = P * (dP - rowsum(P * dP))`` per block, with ``P`` recomputed under the mask.

    ``rowsum(P * dP) = dO . (P V) = rowsum(dO * O)``: taken from the block's own ``P`` and
    ``dP`` (every key a row sees is in its block), so the output is not a residual."""
    qs, k, v, lses, segment_ids, window = res
    d, t = qs.shape[-1], k.shape[2]
    dq, dk_t, dv_t = [], jnp.zeros(k.shape[:2] + (d, t), jnp.float32), 0.0  # [b, hk, d, t]
    for i, lse in enumerate(lses):
        rows = slice(i * block * groups, (i + 1) * block * groups)
        n_keys = (i + 1) * block
        p = jnp.exp(_block_scores(qs, k, segment_ids, window, i, block, groups) - lse)
        do = d_out[:, :, rows]  # [b, hk, block*g, d]
        dp = _dot(do, v[:, :, :n_keys], (3, 3))  # [b, hk, block*g, keys]
        delta = jnp.sum(p * dp, axis=-1, keepdims=True)
        ds = (p * (dp - delta)).astype(qs.dtype)
        dq.append(_dot(ds, k[:, :, :n_keys], (3, 2)))  # [b, hk, block*g, d]
        # dK^T = Q^T dS and dV^T = dO^T P: [d, keys], the fast form of these two products.
        pad = ((0, 0), (0, 0), (0, 0), (0, t - n_keys))
        dk_t = dk_t + jnp.pad(_dot(qs[:, :, rows], ds, (2, 2)), pad)
        dv_t = dv_t + jnp.pad(_dot(do.astype(v.dtype), p.astype(v.dtype), (2, 2)), pad)
    dq = jnp.concatenate(dq, axis=2) * (d**-0.5)
    dk, dv = _swap_last(dk_t), _swap_last(dv_t)
    return dq.astype(qs.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
