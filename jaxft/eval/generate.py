"""Batched sampling with a KV cache: greedy, temperature, top-k, top-p, stop on EOS.

Prompts are left-padded into one ``[b, P]`` block (``P`` rounded up to a multiple of 16 so that
similar batches share a compilation); padding slots have segment id 0, so no query attends to
them, and positions count real tokens only (as transformers derives them from the attention
mask). The prefill and the whole decoding loop run in one jitted call (``lax.while_loop``): no
recompilation per token, and the loop ends early when every row has produced an end token. Stop
strings are applied to the decoded text afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models.config import LlamaConfig
from jaxft.models.llama import Transformer, init_cache


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off


def _filter_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) filtering, in fp32."""
    logits = logits.astype(jnp.float32) / s.temperature
    neg = jnp.finfo(jnp.float32).min
    if s.top_k > 0:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if s.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) >= s.top_p
        drop = jnp.zeros_like(drop_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    return logits


def _sample(logits: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
    if s.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, _filter_logits(logits, s), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def _generate(config: LlamaConfig, sampling: Sampling, params: Any, lora: Any,
              tokens: jax.Array, segment: jax.Array, positions: jax.Array, rng: jax.Array,
              end_ids: jax.Array, pad_id: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, p = tokens.shape
    n = sampling.max_new_tokens
    model = Transformer(config)
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    kv_segment = jnp.concatenate([segment, jnp.ones((b, n), jnp.int32)], axis=1)
    cache = init_cache(config, b, p + n)
    logits, cache = model.apply(variables, tokens, segment, positions, cache, 0, kv_segment)
    next_pos = positions[:, -1] + 1
    # The first new token comes from the prompt's logits; each iteration then feeds the previous
    # token and samples the next, so no forward pass is spent after the last token.
    tok = _sample(logits[:, -1], jax.random.fold_in(rng, 0), sampling)
    out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, end_ids)

    def cond(carry: tuple) -> jax.Array:
        i, _, _, done, _, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        i, prev, out, done, cache, pos = carry
        logits, cache = model.apply(variables, prev[:, None], jnp.ones((b, 1), jnp.int32),
                                    pos[:, None], cache, p + i - 1, kv_segment)
        tok = _sample(logits[:, -1], jax.random.fold_in(rng, i), sampling)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, i].set(tok)
        return i + 1, tok, out, done | jnp.isin(tok, end_ids), cache, pos + 1

    carry = (jnp.int32(1), tok, out, done, cache, next_pos)
    _, _, out, done, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, done


def generate_ids(
    config: LlamaConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    lora: Any = None,
    sampling: Sampling = Sampling(),
    end_ids: Sequence[int] = (),
    pad_id: int = 0,
    seed: int = 0,
) -> list[list[int]]:
    """New tokens for each prompt (up to and including the first end token)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    width = -(-longest // 16) * 16
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segment = np.zeros((len(prompts), width), np.int32)
    for r, prompt in enumerate(prompts):
        tokens[r, width - len(prompt):] = prompt
        segment[r, width - len(prompt):] = 1
    positions = np.maximum(np.cumsum(segment, axis=1) - 1, 0).astype(np.int32)
    ends = np.asarray(list(end_ids) or [-1], np.int32)
    out, _ = _generate(config, sampling, params, lora, jnp.asarray(tokens),
                       jnp.asarray(segment), jnp.asarray(positions), jax.random.PRNGKey(seed),
                       jnp.asarray(ends), jnp.int32(pad_id))
    result, stop = [], set(end_ids)
    for row in np.asarray(out).tolist():
        cut = next((k + 1 for k, t in enumerate(row) if t in stop), len(row))
        result.append(row[:cut])
    return result


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the first occurrence of any stop string."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]
