"""``jaxft quickstart``: the embedded end-to-end default.

Today it runs what exists: build a tiny Llama-architecture model, write it as a Hugging Face
checkpoint, load it back through the safetensors importer, and print its parameter count and
logits. Training, evaluation and export stages join as they land (see the README's table).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="run the embedded end-to-end default (tiny model, CPU)")
    p.add_argument("--out", default="runs/quickstart", help="output directory (replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxft.models import LlamaConfig, count_params, forward, init_params, load_hf, save_hf

    t0 = time.perf_counter()
    out = Path(args.out)
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    params = init_params(config, jax.random.key(args.seed))
    base_dir = save_hf(out / "base", config, params)
    config, params = load_hf(base_dir)
    tokens = jnp.asarray(np.random.default_rng(args.seed).integers(3, 512, (2, 16)), jnp.int32)
    logits = forward(config, params, tokens)
    print(f"model       : {config.model_type}, {config.num_layers} layers, hidden "
          f"{config.hidden_size}, {config.num_heads} heads / {config.num_kv_heads} kv heads")
    print(f"parameters  : {count_params(params):,}")
    print(f"checkpoint  : {base_dir} (HF safetensors, reloaded through jaxft.models.load_hf)")
    print(f"logits      : shape {tuple(logits.shape)}, first row {np.asarray(logits[0, 0, :5])}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0
