"""Rotary position embeddings in Hugging Face's split-half layout.

Reference: transformers/modeling_rope_utils.py (default, ``linear`` and ``llama3`` inverse
frequencies) and models/llama/modeling_llama.py (``rotate_half``, ``apply_rotary_pos_emb``).
HF q/k weights are used as they are: no permutation is needed with split-half rotation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


def inv_frequencies(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None
) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` in fp32, rescaled by ``scaling`` (HF rope_parameters).

    Supported ``rope_type``: ``default``, ``linear`` (divide by ``factor``) and ``llama3``
    (wavelength bands of Llama 3.1). Anything else is rejected rather than silently ignored.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise NotImplementedError(
        f"rope_type {kind!r} is not supported (supported: default, linear, llama3)"
    )


def rope_cos_sin(
    positions: Int[Array, "b t"], inv_freq: np.ndarray, dtype: jnp.dtype
) -> tuple[Float[Array, "b t d"], Float[Array, "b t d"]]:
    """``cos``/``sin`` of ``positions * inv_freq`` duplicated to ``head_dim``, computed in fp32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(
    x: Float[Array, "b t h d"], cos: Float[Array, "b t d"], sin: Float[Array, "b t d"]
) -> Float[Array, "b t h d"]:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = concat(-x2, x1)``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
