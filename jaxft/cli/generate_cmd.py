"""``jaxft generate MODEL_OR_RUN --prompt TEXT``: sample from a checkpoint or a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from an HF checkpoint or a run directory")
    p.add_argument("model", help="HF checkpoint directory, or a run directory (uses its adapter)")
    p.add_argument("--prompt", action="append", required=True,
                   help="a user message (repeat for a batch)")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--template", choices=["chatml", "tokenizer"], default=None,
                   help="chat template (default: the run's data.template, else tokenizer)")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _load(model: str, template: str | None):
    from jaxft.data import load_tokenizer

    root = Path(model)
    if (root / "config.yaml").is_file():  # a run directory
        from jaxft.train.exporting import restore_trained

        cfg, config, params, trainable, _ = restore_trained(root)
        lora = trainable if cfg.train.method == "lora" else None
        if lora is None:
            params = trainable
        tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
        return config, params, lora, tok, template or cfg.data.template
    from jaxft.models import load_hf

    config, params = load_hf(root)
    return config, params, None, load_tokenizer(str(root)), template or "tokenizer"


def run(args: argparse.Namespace) -> int:
    from jaxft.eval.generate import Sampling, generate_ids, truncate_at_stop
    from jaxft.eval.json_eval import end_token_ids, prompt_ids

    config, params, lora, tok, template = _load(args.model, args.template)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    batch = []
    for text in args.prompt:
        if args.raw:
            batch.append(tok(text)["input_ids"])
            continue
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        batch.append(prompt_ids(tok, msgs + [{"role": "user", "content": text}], template))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    outs = generate_ids(config, params, batch, lora=lora, sampling=sampling,
                        end_ids=end_token_ids(tok, config), pad_id=pad, seed=args.seed)
    for prompt, out in zip(args.prompt, outs):
        answer = truncate_at_stop(tok.decode(out, skip_special_tokens=True), args.stop)
        if len(outs) > 1:
            print(f"### {prompt}")
        print(answer)
    return 0
