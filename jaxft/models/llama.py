"""The Llama-family decoder as a functional linen module.

Parameter tree (scanned layers; unrolled layers use ``layers_0``, ``layers_1``, ... instead)::

    embed_tokens                               [V, H]
    layers/input_layernorm/scale               [L, H]
    layers/self_attn/{q,k,v,o}_proj/kernel     [L, in, out]   (+ bias for Qwen2 q/k/v)
    layers/post_attention_layernorm/scale      [L, H]
    layers/mlp/{gate,up,down}_proj/kernel      [L, in, out]
    norm                                       [H]
    lm_head/kernel                             [H, V]          (absent when embeddings are tied)

Adapters mirror these paths in the ``'lora'`` collection (``layers/self_attn/q_proj/adapter``).
Reference: transformers/models/llama/modeling_llama.py (and mistral, qwen2).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxft.models.config import LlamaConfig
from jaxft.nn.attention import attention_mask, causal_attention, dot_product_attention
from jaxft.nn.head import head_logprobs
from jaxft.nn.linear import Linear
from jaxft.nn.norm import Normed, RMSNorm, rms_norm
from jaxft.nn.rope import apply_rope, inv_frequencies, rope_cos_sin

Params = dict[str, Any]
KVCache = dict[str, Array]


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


class Attention(nn.Module):
    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Float[Array, "n h"] | Normed, cos: Array, sin: Array,
                 segment: Int[Array, "b t"], window: Int[Array, ""],
                 cache: KVCache | None = None, mask: Array | None = None,
                 cache_index: Array | None = None) -> tuple[Array, KVCache | None]:
        """``x`` holds the ``n = b * t`` rows of ``segment``'s ``[b, t]``. Without a cache, each
        row attends to itself (``causal_attention``). With a cache (``k``/``v`` ``[b, S, hk, d]``),
        this call's keys and values are written at ``cache_index`` and the queries attend over the
        whole cache under ``mask`` ``[b, t, S]``."""
        c = self.config
        b, t = segment.shape
        det = self.deterministic
        kw = dict(dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype))
        q = Linear(c.num_heads * c.head_dim, c.qkv_bias, name="q_proj", **kw)(x, det)
        k = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, name="k_proj", **kw)(x, det)
        v = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, name="v_proj", **kw)(x, det)
        q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), cos, sin)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if cache is None:
            out = causal_attention(q, k, v, segment, window)
        else:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            cache = {"k": k, "v": v}
            out = dot_product_attention(q, k, v, mask)
        out = out.reshape(b * t, c.num_heads * c.head_dim)
        return Linear(c.hidden_size, c.o_bias, name="o_proj", **kw)(out, det), cache


class MLP(nn.Module):
    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Float[Array, "n h"] | Normed) -> Array:
        c = self.config
        kw = dict(dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype))
        det = self.deterministic
        gate = Linear(c.intermediate_size, c.mlp_bias, name="gate_proj", **kw)(x, det)
        up = Linear(c.intermediate_size, c.mlp_bias, name="up_proj", **kw)(x, det)
        # SwiGLU is applied inside down_proj: only gate and up are kept for the backward pass.
        return Linear(c.hidden_size, c.mlp_bias, name="down_proj", **kw)(up, det, gate=gate)


class DecoderLayer(nn.Module):
    """One pre-norm block over 2-D activations ``[b * t, h]``. Fits ``nn.scan``:
    ``(carry, (window, cache), *broadcast) -> (carry, cache)``; ``cache`` is ``None`` outside
    generation."""

    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "n h"],
        per_layer: tuple[Int[Array, ""], KVCache | None],
        cos: Array,
        sin: Array,
        q_segment: Int[Array, "b t"],
        q_index: Int[Array, "b t"],
        kv_segment: Int[Array, "b s"],
        cache_index: Int[Array, ""] | None,
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        window, cache = per_layer
        pdt = _dtype(c.param_dtype)
        mask = None
        if cache is not None:
            kv_index = jnp.broadcast_to(jnp.arange(kv_segment.shape[1], dtype=jnp.int32)[None],
                                        kv_segment.shape)
            mask = attention_mask(q_index, kv_index, q_segment, kv_segment, window)
        # The norms' outputs go to the projections as their parts (x, rstd, weight): a LoRA
        # projection recomputes them in its backward pass instead of keeping them.
        h = RMSNorm(c.rms_norm_eps, pdt, name="input_layernorm")(x, parts=True)
        attn, cache = Attention(c, self.deterministic, name="self_attn")(
            h, cos, sin, q_segment, window, cache, mask, cache_index)
        x = x + attn
        h = RMSNorm(c.rms_norm_eps, pdt, name="post_attention_layernorm")(x, parts=True)
        x = x + MLP(c, self.deterministic, name="mlp")(h)
        return x, cache


def _layer_class(config: LlamaConfig) -> type[nn.Module]:
    if config.remat == "none":
        return DecoderLayer
    policy = (
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable if config.remat == "dots" else None
    )
    return nn.remat(DecoderLayer, policy=policy, prevent_cse=not config.scan_layers)


class Transformer(nn.Module):
    """Token ids ``[b, t]`` -> logits ``[b, t, V]`` in the compute dtype.

    Generation passes a ``cache`` (``init_cache``): keys/values of every layer, ``[L, b, S, hk, d]``
    (a list per layer when unrolled); the call writes its tokens at ``cache_index`` and returns
    ``(logits of the last position [b, 1, V], new_cache)``. ``kv_segment_ids`` ``[b, S]`` marks cache slots (0 = padding).
    Training passes ``targets`` ``[b, t]`` instead and gets ``(log p(target), logsumexp)``, each
    ``[b, t]`` in fp32, computed without materialising the logits (``jaxft.nn.head``).
    """

    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        tokens: Int[Array, "b t"],
        segment_ids: Int[Array, "b t"] | None = None,
        positions: Int[Array, "b t"] | None = None,
        cache: Any = None,
        cache_index: Int[Array, ""] | None = None,
        kv_segment_ids: Int[Array, "b s"] | None = None,
        targets: Int[Array, "b t"] | None = None,
    ) -> Any:
        c = self.config
        dt, pdt = _dtype(c.dtype), _dtype(c.param_dtype)
        b, t = tokens.shape
        offset = 0 if cache is None else cache_index
        q_index = jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32)[None], (b, t))
        segment_ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        positions = q_index if positions is None else positions
        kv_segment = segment_ids if cache is None else kv_segment_ids
        embedding = self.param(
            "embed_tokens", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size), pdt
        )
        x = jnp.take(embedding, tokens.reshape(b * t), axis=0).astype(dt)  # [b*t, h]
        cos, sin = rope_cos_sin(positions, inv_frequencies(c.head_dim, c.rope_theta,
                                                           c.rope_parameters), dt)
        windows = jnp.asarray(c.layer_windows, jnp.int32)
        layer = _layer_class(c)
        args = (cos, sin, segment_ids, q_index, kv_segment, cache_index)
        if c.scan_layers:
            stack = nn.scan(
                layer,
                variable_axes={"params": 0, "lora": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0,) + (nn.broadcast,) * len(args),
                length=c.num_layers,
            )
            x, new_cache = stack(c, self.deterministic, name="layers")(x, (windows, cache), *args)
        else:
            new_cache = [] if cache is not None else None
            for i in range(c.num_layers):
                x, layer_cache = layer(c, self.deterministic, name=f"layers_{i}")(
                    x, (windows[i], None if cache is None else cache[i]), *args)
                if cache is not None:
                    new_cache.append(layer_cache)
        norm = self.param("norm", nn.initializers.ones, (c.hidden_size,), pdt)
        x = rms_norm(x, norm, c.rms_norm_eps)
        if targets is not None and cache is None:  # (log p(target), lse), no [b, t, V] logits
            if c.tie_word_embeddings:
                logp, lse = head_logprobs(x, embedding.astype(dt).T, targets.reshape(b * t))
            else:
                logp, lse = Linear(c.vocab_size, name="lm_head", dtype=dt, param_dtype=pdt)(
                    x, self.deterministic, targets=targets.reshape(b * t))
            return logp.reshape(b, t), lse.reshape(b, t)
        if cache is not None:  # generation samples from the last position only
            x, t = x.reshape(b, t, -1)[:, -1], 1
        if c.tie_word_embeddings:
            logits = jnp.dot(x, embedding.astype(dt).T)
        else:
            logits = Linear(c.vocab_size, name="lm_head", dtype=dt, param_dtype=pdt)(
                x, self.deterministic)
        logits = logits.reshape(b, t, c.vocab_size)
        return logits if cache is None else (logits, new_cache)


def init_cache(config: LlamaConfig, batch: int, length: int) -> Any:
    """An empty key/value cache for ``length`` positions, in the compute dtype."""
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    dt = _dtype(config.dtype)
    if config.scan_layers:
        full = (config.num_layers, *shape)
        return {"k": jnp.zeros(full, dt), "v": jnp.zeros(full, dt)}
    return [{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}
            for _ in range(config.num_layers)]


def forward(
    config: LlamaConfig,
    params: Params,
    tokens: Int[Array, "b t"],
    *,
    lora: Params | None = None,
    segment_ids: Int[Array, "b t"] | None = None,
    positions: Int[Array, "b t"] | None = None,
    dropout_rng: jax.Array | None = None,
    targets: Int[Array, "b t"] | None = None,
) -> Float[Array, "b t v"] | tuple[Float[Array, "b t"], Float[Array, "b t"]]:
    """Logits of ``tokens``; the pure function researchers import.

    ``lora`` is an adapter tree (``'lora'`` collection) or ``None`` for the base model.
    ``segment_ids`` (0 = padding) and ``positions`` (restarting per example) describe packed rows.
    LoRA dropout is active only when ``dropout_rng`` is given. With ``targets`` (the token each
    position predicts), returns ``(log p(target), logsumexp)`` instead of the logits: what the
    losses need, without the ``[b, t, V]`` logits or their gradient ever being stored.
    """
    variables: dict[str, Any] = {"params": params}
    if lora is not None:
        variables["lora"] = lora
    deterministic = dropout_rng is None
    rngs = None if deterministic else {"dropout": dropout_rng}
    return Transformer(config, deterministic).apply(
        variables, tokens, segment_ids, positions, targets=targets, rngs=rngs
    )


def init_params(config: LlamaConfig, rng: jax.Array) -> Params:
    """Randomly initialised base parameters (normal(0.02) matrices, unit norms)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(config).init(rng, tokens)["params"]


def abstract_params(config: LlamaConfig) -> Params:
    """Shapes and dtypes of the parameters (``jax.ShapeDtypeStruct``), without memory."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def count_params(params: Params) -> int:
    """Number of parameters of a (possibly abstract) dense parameter tree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
