"""``jaxft quickstart``: the embedded end-to-end default, on a CPU, offline, in a few minutes.

Stages (each writes under the output directory):
  1. data       generated prose chats, an "integration engine" instruction set, its JSON Schema
  2. tokenizer  byte-level BPE with ChatML, trained on that text
  3. base       a tiny Llama-architecture model, full fine-tuning on the prose (it learns to chat
                and answers requests in friendly prose: the "before" model)
  4. before     JSON validity of the base on held-out requests
  5. sft        LoRA SFT on the instruction set (some answers carry filler, as real logs do);
                PEFT adapter and merged HF exports
  6. after      JSON validity again
  7. dpo        DPO (LoRA on the merged SFT model; the reference is that model with the adapter
                off) on pairs preferring bare JSON over the same JSON wrapped in filler
  8. after-dpo  JSON validity and filler rate again; held-out preference accuracy
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxft.errors import JaxftError
from jaxft.quickstart import corpus

MARKER = ".jaxft-quickstart"


@dataclass(frozen=True)
class Preset:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    seq_len: int
    batch: int
    base_steps: int
    sft_steps: int
    n_prose: int
    n_train: int
    n_heldout: int
    dpo_steps: int = 40
    base_lr: float = 3e-3
    sft_lr: float = 1e-2
    dpo_lr: float = 1e-3
    dpo_beta: float = 0.1
    dpo_sft_weight: float = 1.0  # RPO: keeps the chosen JSON likely (plain DPO degrades it here)
    lora_r: int = 16


PRESETS = {
    "tiny": Preset(vocab_size=768, hidden=128, layers=4, heads=4, kv_heads=2, intermediate=352,
                   seq_len=128, batch=16, base_steps=300, sft_steps=300, n_prose=1000,
                   n_train=400, n_heldout=48),
    # For tests of the pipeline's plumbing (no quality expected).
    "smoke": Preset(vocab_size=400, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64,
                    seq_len=128, batch=4, base_steps=3, sft_steps=3, n_prose=60, n_train=40,
                    n_heldout=4, dpo_steps=2),
    "small": Preset(vocab_size=2048, hidden=256, layers=6, heads=8, kv_heads=4, intermediate=704,
                    seq_len=512, batch=16, base_steps=400, sft_steps=300, n_prose=3000,
                    n_train=1500, n_heldout=100, base_lr=1e-3, sft_lr=1e-3),
}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def _prepare_out(out: Path) -> None:
    """Replace a previous quickstart's outputs; never delete a directory that is not one."""
    if out.exists():
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise JaxftError(f"{out} exists and was not written by jaxft quickstart; "
                             "choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by jaxft quickstart; replaced by the next run\n")


def _train_config(model: Path, run_dir: Path, data: dict, p: Preset, **sections: Any) -> Any:
    from jaxft.config import config_from_dict

    raw: dict[str, Any] = {
        "model": {"path": str(model)},
        "data": {"template": "chatml", "seq_len": p.seq_len, "batch_size": p.batch,
                 "num_epochs": None, "seed": 0, **data},
        "optim": {"warmup_ratio": 0.05, "clip_norm": 1.0},
        "train": {"output_dir": str(run_dir), "log_every": 1},
        "export": {"dtype": "float32"},  # a tiny model: keep the exports exact
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw, "quickstart")


def run_quickstart(out: str | Path = "runs/quickstart", preset: str = "tiny", seed: int = 0,
                   progress: bool = True) -> dict[str, Any]:
    """Run every stage; returns the summary (also written to ``summary.json``)."""
    import jax

    from jaxft.data import load_tokenizer
    from jaxft.data.chat import render_chatml
    from jaxft.data.synthetic import train_bpe_tokenizer
    from jaxft.eval.generate import Sampling
    from jaxft.eval.json_eval import json_eval
    from jaxft.models import LlamaConfig, count_params, init_params, load_hf, save_hf
    from jaxft.train.exporting import export_run
    from jaxft.train.loop import train

    if preset not in PRESETS:
        raise JaxftError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out)
    _prepare_out(out)
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def stage(name: str) -> None:
        times[name] = time.perf_counter() - t0
        print(f"\n== {name} ({times[name]:.0f}s)", flush=True)

    stage("data")
    rows = corpus.build(seed, p.n_prose, p.n_train, p.n_heldout)
    d = out / "data"
    files = {
        "prose": _write_jsonl(d / "prose.jsonl", rows["prose"]),
        "sft": _write_jsonl(d / "sft_train.jsonl", rows["sft"]),
        "heldout": _write_jsonl(d / "heldout_prompts.jsonl", rows["heldout"]),
        "pairs": _write_jsonl(d / "pairs_train.jsonl", rows["pairs"]),
        "heldout_pairs": _write_jsonl(d / "pairs_heldout.jsonl", rows["heldout_pairs"]),
    }
    (d / "schema.json").write_text(json.dumps(corpus.schema(), indent=2))
    print(f"{len(rows['prose'])} prose chats, {len(rows['sft'])} instruction rows, "
          f"{len(rows['heldout'])} held-out requests -> {d}")

    stage("tokenizer")
    texts = [render_chatml(r["messages"]).text for r in rows["prose"] + rows["sft"]]
    tok = train_bpe_tokenizer(texts, p.vocab_size)
    tok.save_pretrained(out / "tokenizer")
    tok = load_tokenizer(str(out / "tokenizer"))
    print(f"byte-level BPE, {len(tok)} tokens, ChatML template -> {out / 'tokenizer'}")

    stage("base")
    arch = LlamaConfig(vocab_size=len(tok), hidden_size=p.hidden, intermediate_size=p.intermediate,
                       num_layers=p.layers, num_heads=p.heads, num_kv_heads=p.kv_heads,
                       head_dim=p.hidden // p.heads, rms_norm_eps=1e-5,
                       max_position_embeddings=2 * p.seq_len, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, bos_token_id=None)
    params = init_params(arch, jax.random.key(seed))
    save_hf(out / "base-init", arch, params, source_dir=out / "tokenizer")
    print(f"tiny Llama: {count_params(params):,} parameters, {p.layers} layers")
    base_cfg = _train_config(out / "base-init", out / "runs" / "base",
                             {"train": str(files["prose"])}, p,
                             train={"method": "full", "steps": p.base_steps},
                             optim={"lr": p.base_lr, "warmup_ratio": 0.05})
    base_run = train(base_cfg, progress=progress)
    export_run(out / "runs" / "base", "hf", out / "base", verbose=False)
    base_config, base_params = load_hf(out / "base")

    sampling = Sampling(max_new_tokens=64)
    schema_path = str(d / "schema.json")
    stage("before")
    before = json_eval(base_config, base_params, tok, files["heldout"], out / "eval" / "before",
                       schema_path=schema_path, sampling=sampling, tag="json")
    print(json.dumps(before))

    stage("sft")
    sft_cfg = _train_config(out / "base", out / "runs" / "sft",
                            {"train": str(files["sft"]), "validation_fraction": 0.1}, p,
                            train={"method": "lora", "steps": p.sft_steps,
                                   "eval_every": max(p.sft_steps // 4, 1)},
                            lora={"r": p.lora_r, "alpha": 2 * p.lora_r},
                            optim={"lr": p.sft_lr})
    sft_run = train(sft_cfg, progress=progress)
    adapter = export_run(out / "runs" / "sft", "peft", out / "adapter", verbose=False)
    merged = export_run(out / "runs" / "sft", "hf", out / "merged", verbose=False)

    stage("after")
    from jaxft.train.exporting import restore_trained

    _, _, _, lora, _ = restore_trained(out / "runs" / "sft")
    after = json_eval(base_config, base_params, tok, files["heldout"], out / "eval" / "after",
                      lora=lora, schema_path=schema_path, sampling=sampling, tag="json")
    print(json.dumps(after))

    stage("dpo")
    merged_config, merged_params = load_hf(merged)
    dpo_cfg = _train_config(merged, out / "runs" / "dpo",
                            {"train": str(files["pairs"]), "validation": str(files["heldout_pairs"]),
                             "pack": False}, p,
                            train={"method": "lora", "objective": "dpo", "beta": p.dpo_beta,
                                   "dpo_sft_weight": p.dpo_sft_weight, "steps": p.dpo_steps,
                                   "eval_every": max(p.dpo_steps // 2, 1)},
                            lora={"r": p.lora_r, "alpha": 2 * p.lora_r},
                            optim={"lr": p.dpo_lr})
    dpo_run = train(dpo_cfg, progress=progress)
    from jaxft.train.metrics import read_metrics

    vals = [r for r in read_metrics(out / "runs" / "dpo" / "metrics.jsonl") if "val_loss" in r]
    pref = {"reward_accuracy_before": vals[0]["val_rewards/accuracies"],
            "reward_accuracy_after": vals[-1]["val_rewards/accuracies"],
            "margin_after": vals[-1]["val_rewards/margins"],
            "policy_accuracy_before": vals[0]["val_policy_accuracy"],
            "policy_accuracy_after": vals[-1]["val_policy_accuracy"]}
    dpo_adapter = export_run(out / "runs" / "dpo", "peft", out / "adapter-dpo", verbose=False)

    stage("after-dpo")
    _, _, _, dpo_lora, _ = restore_trained(out / "runs" / "dpo")
    after_dpo = json_eval(merged_config, merged_params, tok, files["heldout"],
                          out / "eval" / "after-dpo", lora=dpo_lora, schema_path=schema_path,
                          sampling=sampling, tag="json")
    print(json.dumps(after_dpo))
    total = time.perf_counter() - t0
    summary = {
        "preset": preset, "seconds": round(total, 1),
        "base": {"steps": base_run.steps, "final_loss": base_run.losses[-1]},
        "sft": {"steps": sft_run.steps, "final_loss": sft_run.losses[-1],
                "best_val_loss": sft_run.best_val_loss},
        "dpo": {"steps": dpo_run.steps, "final_loss": dpo_run.losses[-1], **pref},
        "json_before": before, "json_after": after, "json_after_dpo": after_dpo,
        "paths": {"tokenizer": str(out / "tokenizer"), "base": str(out / "base"),
                  "adapter": str(adapter), "merged": str(merged),
                  "dpo_adapter": str(dpo_adapter),
                  "sft_loss_plot": str(out / "runs" / "sft" / "loss.png"),
                  "dpo_plot": str(out / "runs" / "dpo" / "preference.png"),
                  "samples": str(out / "eval" / "after-dpo" / "json_samples.jsonl")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + format_summary(summary))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    cols = [s["json_before"], s["json_after"], s["json_after_dpo"]]

    def pct(x: Any) -> str:
        return f"{100 * x:5.1f}%" if isinstance(x, (int, float)) else "  n/a"

    def row(label: str, key: str) -> str:
        return f"  {label:26} " + " ".join(f"{pct(c.get(key)):>9}" for c in cols)

    d = s["dpo"]
    lines = [
        f"jaxft quickstart ({s['preset']}) finished in {s['seconds']:.0f}s",
        "",
        f"  {'held-out requests':26} {'base':>9} {'+LoRA SFT':>9} {'+DPO':>9}",
        row("valid JSON (json.loads)", "json_valid"),
        row("matches the schema", "schema_valid"),
        row("exact answer", "exact_match"),
        row("conversational filler", "filler"),
        "",
        f"  held-out preference accuracy (implicit reward, bare JSON over filler): "
        f"{pct(d['reward_accuracy_before']).strip()} -> {pct(d['reward_accuracy_after']).strip()}"
        f", margin {d['margin_after']:.2f}",
        f"  (at step 0 the policy is its reference, so every reward ties at 0; the SFT model's "
        f"own log-probs already prefer bare JSON on {pct(d['policy_accuracy_before']).strip()})",
        f"  base model: {s['base']['steps']} steps of full fine-tuning, final loss "
        f"{s['base']['final_loss']:.3f}",
        f"  LoRA SFT:   {s['sft']['steps']} steps, final loss {s['sft']['final_loss']:.3f}, "
        f"best validation loss {s['sft']['best_val_loss']:.3f}",
        f"  DPO:        {d['steps']} steps, final loss {d['final_loss']:.3f}",
        "",
    ]
    width = max(len(k) for k in s["paths"])
    lines += [f"  {k.ljust(width)}  {v}" for k, v in s["paths"].items()]
    return "\n".join(lines)
