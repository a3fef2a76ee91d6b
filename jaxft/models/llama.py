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
from jaxft.nn.attention import attention_mask, dot_product_attention
from jaxft.nn.linear import Linear
from jaxft.nn.norm import RMSNorm, rms_norm
from jaxft.nn.rope import apply_rope, inv_frequencies, rope_cos_sin

Params = dict[str, Any]


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


class Attention(nn.Module):
    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Float[Array, "b t h"], cos: Array, sin: Array, mask: Array) -> Array:
        c = self.config
        b, t, _ = x.shape
        kw = dict(dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype))
        q = Linear(c.num_heads * c.head_dim, c.qkv_bias, name="q_proj", **kw)(x, self.deterministic)
        k = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, name="k_proj", **kw)(x, self.deterministic)
        v = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, name="v_proj", **kw)(x, self.deterministic)
        q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), cos, sin)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        out = dot_product_attention(q, k, v, mask).reshape(b, t, c.num_heads * c.head_dim)
        return Linear(c.hidden_size, c.o_bias, name="o_proj", **kw)(out, self.deterministic)


class MLP(nn.Module):
    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Float[Array, "b t h"]) -> Array:
        c = self.config
        kw = dict(dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype))
        det = self.deterministic
        gate = Linear(c.intermediate_size, c.mlp_bias, name="gate_proj", **kw)(x, det)
        up = Linear(c.intermediate_size, c.mlp_bias, name="up_proj", **kw)(x, det)
        return Linear(c.hidden_size, c.mlp_bias, name="down_proj", **kw)(nn.silu(gate) * up, det)


class DecoderLayer(nn.Module):
    """One pre-norm block. Signature fits ``nn.scan``: ``(carry, window, *broadcast) -> (carry, None)``."""

    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "b t h"],
        window: Int[Array, ""],
        cos: Array,
        sin: Array,
        segment_ids: Int[Array, "b t"],
        index: Int[Array, "b t"],
    ) -> tuple[Array, None]:
        c = self.config
        pdt = _dtype(c.param_dtype)
        mask = attention_mask(index, index, segment_ids, segment_ids, window)
        h = RMSNorm(c.rms_norm_eps, pdt, name="input_layernorm")(x)
        x = x + Attention(c, self.deterministic, name="self_attn")(h, cos, sin, mask)
        h = RMSNorm(c.rms_norm_eps, pdt, name="post_attention_layernorm")(x)
        x = x + MLP(c, self.deterministic, name="mlp")(h)
        return x, None


def _layer_class(config: LlamaConfig) -> type[nn.Module]:
    if config.remat == "none":
        return DecoderLayer
    policy = (
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable if config.remat == "dots" else None
    )
    return nn.remat(DecoderLayer, policy=policy, prevent_cse=not config.scan_layers)


class Transformer(nn.Module):
    """Token ids ``[b, t]`` -> logits ``[b, t, V]`` in the compute dtype."""

    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        tokens: Int[Array, "b t"],
        segment_ids: Int[Array, "b t"] | None = None,
        positions: Int[Array, "b t"] | None = None,
    ) -> Float[Array, "b t v"]:
        c = self.config
        dt, pdt = _dtype(c.dtype), _dtype(c.param_dtype)
        b, t = tokens.shape
        index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
        segment_ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        positions = index if positions is None else positions
        embedding = self.param(
            "embed_tokens", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size), pdt
        )
        x = jnp.take(embedding, tokens, axis=0).astype(dt)
        cos, sin = rope_cos_sin(positions, inv_frequencies(c.head_dim, c.rope_theta,
                                                           c.rope_parameters), dt)
        windows = jnp.asarray(c.layer_windows, jnp.int32)
        layer = _layer_class(c)
        if c.scan_layers:
            stack = nn.scan(
                layer,
                variable_axes={"params": 0, "lora": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_layers,
            )
            x, _ = stack(c, self.deterministic, name="layers")(x, windows, cos, sin, segment_ids,
                                                               index)
        else:
            for i in range(c.num_layers):
                x, _ = layer(c, self.deterministic, name=f"layers_{i}")(
                    x, windows[i], cos, sin, segment_ids, index
                )
        norm = self.param("norm", nn.initializers.ones, (c.hidden_size,), pdt)
        x = rms_norm(x, norm, c.rms_norm_eps)
        if c.tie_word_embeddings:
            return jnp.dot(x, embedding.astype(dt).T)
        return Linear(c.vocab_size, name="lm_head", dtype=dt, param_dtype=pdt)(x, self.deterministic)


def forward(
    config: LlamaConfig,
    params: Params,
    tokens: Int[Array, "b t"],
    *,
    lora: Params | None = None,
    segment_ids: Int[Array, "b t"] | None = None,
    positions: Int[Array, "b t"] | None = None,
    dropout_rng: jax.Array | None = None,
) -> Float[Array, "b t v"]:
    """Logits of ``tokens``; the pure function researchers import.

    ``lora`` is an adapter tree (``'lora'`` collection) or ``None`` for the base model.
    ``segment_ids`` (0 = padding) and ``positions`` (restarting per example) describe packed rows.
    LoRA dropout is active only when ``dropout_rng`` is given.
    """
    variables: dict[str, Any] = {"params": params}
    if lora is not None:
        variables["lora"] = lora
    deterministic = dropout_rng is None
    rngs = None if deterministic else {"dropout": dropout_rng}
    return Transformer(config, deterministic).apply(
        variables, tokens, segment_ids, positions, rngs=rngs
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
