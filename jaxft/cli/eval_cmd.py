"""``jaxft eval CONFIG.yaml|RUN_DIR [key=value ...]``: validation loss and JSON validity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run (or a config's base model): loss, json")
    p.add_argument("target", help="a run directory, or a YAML config (evaluates the base model)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. eval.metrics=[loss,json]")
    p.add_argument("--checkpoint", default="auto", help="best | latest | STEP | auto")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/eval)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxft.config import load_config
    from jaxft.data import load_tokenizer
    from jaxft.eval.generate import Sampling
    from jaxft.eval.json_eval import json_eval
    from jaxft.train import setup
    from jaxft.train.evaluate import validation_loss

    target = Path(args.target)
    if (target / "config.yaml").is_file():
        from jaxft.train.exporting import restore_trained

        cfg, config, params, trainable, step = restore_trained(target, args.checkpoint)
        if args.overrides:
            cfg = load_config(target / "config.yaml", args.overrides)
        lora = trainable if cfg.train.method == "lora" else None
        base, params = params, (params if lora is not None else trainable)
        out = Path(args.out or target / "eval")
    else:
        cfg = load_config(target, args.overrides)
        config, params = setup.load_model(cfg)
        lora, step, base = None, 0, None
        out = Path(args.out or Path(cfg.train.output_dir) / "eval-base")
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    results: dict[str, object] = {"step": step}
    if "loss" in cfg.eval.metrics:
        results.update(validation_loss(cfg, config, params, lora, tok, reference=base))
    if "json" in cfg.eval.metrics:
        if not cfg.eval.prompts:
            from jaxft.errors import ConfigError

            raise ConfigError("eval.metrics has json but eval.prompts (a JSONL of prompts) is unset")
        e = cfg.eval
        results["json"] = json_eval(config, params, tok, e.prompts, out, lora=lora,
                                    schema_path=e.json_schema, template=cfg.data.template,
                                    sampling=Sampling(e.max_new_tokens, e.temperature, e.top_k,
                                                      e.top_p), batch_size=e.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0
