"""A tiny end-to-end training setup built in the test: tokenizer, model, chat data, config."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def make_run_inputs(root: Path, rows: int = 12, seed: int = 0) -> dict[str, str]:
    """Write a tiny tokenizer + Llama checkpoint (jaxft-initialised) and chat JSONL under root."""
    import jax

    from jaxft.data.synthetic import tiny_tokenizer
    from jaxft.models import LlamaConfig, init_params, save_hf

    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        tok = tiny_tokenizer(vocab_size=384)
        vocab = len(tok)
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                             rms_norm_eps=1e-5, max_position_embeddings=256,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        params = init_params(config, jax.random.key(seed))
        # A trained model's logits span tens of nats; a random one with unit final norm cannot
        # exceed ~1 (|h| = sqrt(d), lm_head std 0.02), which no frozen-head LoRA can overcome.
        params["norm"] = params["norm"] * 10.0
        save_hf(model_dir, config, params)
        tok.save_pretrained(model_dir)
    data = root / "train.jsonl"
    val = root / "val.jsonl"
    names = ["alpha", "bravo", "delta", "kilo", "lima", "oscar", "papa", "romeo", "tango"]
    with open(data, "w") as f, open(val, "w") as g:
        for i in range(rows):
            a, b = names[i % len(names)], names[(3 * i + 1) % len(names)]
            row = {"messages": [{"role": "user", "content": f"code {a}"},
                                {"role": "assistant", "content": f"{b} {a} {b}"}]}
            f.write(json.dumps(row) + "\n")
            if i < 4:
                g.write(json.dumps(row) + "\n")
    return {"model": str(model_dir), "train": str(data), "validation": str(val)}


def write_config(root: Path, inputs: dict[str, str], **sections: dict) -> Path:
    cfg = {
        "model": {"path": inputs["model"]},
        "data": {"train": inputs["train"], "validation": inputs["validation"], "seq_len": 32,
                 "batch_size": 4, "num_epochs": None, "prefetch": 0},
        "lora": {"r": 8, "alpha": 16},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "clip_norm": 1.0},
        "train": {"steps": 10, "output_dir": str(root / "run"), "seed": 0},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
