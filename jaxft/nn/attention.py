"""Segment-aware causal attention with grouped-query heads and an optional sliding window.

A query at row index ``i`` of segment ``s`` may attend to key ``j`` when ``j <= i`` (causal), the
key is in the same segment (``segment_ids``; 0 marks padding, which attends to and is attended by
nothing useful), and, with a window ``w > 0``, ``j > i - w`` (transformers'
``sliding_window_overlay``). Packed rows therefore never attend across examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

_MASKED = -1e30  # finite, so a fully masked (padding) row gives no NaN


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
