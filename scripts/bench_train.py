"""Training throughput of workload W (shared/bench/WORKLOAD.md): jaxft against transformers + peft.

    .venv/bin/python scripts/bench_train.py [--reps 2] [--steps 20] [--warmup 3]
        [--allocators glibc,tcmalloc] [--modes lora,qlora] [--stacks jaxft,peft]
        [--out runs/bench/bench_train.json] [--quick]

One invocation builds W's model with transformers (``torch.manual_seed(0)``), saves it as fp32
safetensors, then, for every allocator, repetition and (mode, stack), runs one subprocess that
loads the model and trains W, alternating the stacks so that host noise spreads over both:

- jaxft: ``load_hf`` (``quant="nf4"`` for QLoRA) -> ``lora_init`` -> ``jax.jit(make_step(
  sft_loss_fn(...), optax.adamw(...)), donate_argnums=0)`` wrapped in ``CompiledOnFirstCall``:
  the step ``jaxft train`` runs.
- peft: ``LlamaForCausalLM.from_pretrained`` (QLoRA: bitsandbytes NF4, double quantization, fp32
  compute) -> ``get_peft_model`` -> a plain loop with ``torch.optim.AdamW``.

Allocators: ``glibc`` (the default malloc), ``glibc-tuned`` (the same malloc with
``GLIBC_MALLOC_ENV`` below, for both stacks alike) and ``tcmalloc`` (``LD_PRELOAD`` of
libtcmalloc_minimal.so.4, skipped with a note when the library is not installed; Debian:
``apt-get install libtcmalloc-minimal4``). Each allocator also times the best fp32 4096^3
``jnp.dot`` in its own subprocess; MFU uses the best rate of the whole invocation.

Reported per cell: median over repetitions of tokens/s, of the median step time, and of peak RSS
(the worker's ``VmHWM``: ``ru_maxrss`` would carry this driver's peak across ``exec``), plus
user/system CPU time and minor page faults of the measured steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 8192, 512, 1408, 8, 8, 4
ROWS, SEQ, BATCH = 256, 512, 4
RANK, ALPHA, LR = 16, 32.0, 2e-4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TCMALLOC = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)
# glibc malloc kept from returning memory to the OS and re-faulting it on every step: one arena,
# no mmap'd chunks, no trimming (WORKLOAD.md). Applied to both stacks alike.
GLIBC_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
    "MALLOC_TOP_PAD_": str(1 << 28),
}


# ----------------------------------------------------------------------------- workers


def _tokens():
    import numpy as np

    return np.random.default_rng(0).integers(6, VOCAB, (ROWS, SEQ), dtype=np.int32)


def _usage() -> dict[str, float]:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": r.ru_utime, "sys_s": r.ru_stime, "minflt": float(r.ru_minflt)}


def _timed_loop(run_step, warmup: int, steps: int) -> dict:
    """Warm-up steps (compilation included), then ``steps`` timed steps, each run to completion."""
    from jaxft._host import peak_rss_bytes  # no JAX import: also used by the peft worker

    losses = [run_step(i) for i in range(warmup)]
    before, times = _usage(), []
    for i in range(warmup, warmup + steps):
        t = time.perf_counter()
        losses.append(run_step(i))
        times.append(time.perf_counter() - t)
    after = _usage()
    wall = sum(times)
    return {
        "tokens_per_s": steps * BATCH * SEQ / wall,
        "step_s_median": statistics.median(times),
        "step_s": times,
        "losses": losses,
        "peak_rss_mb": peak_rss_bytes() / 2**20,  # VmHWM: not the driver's ru_maxrss
        **{k: after[k] - before[k] for k in after},
    }


def worker_jaxft(
    model_dir: str, quant: bool, warmup: int, steps: int, profile_dir: str | None = None
) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxft.models import load_hf
    from jaxft.peft import LoraSpec, lora_init
    from jaxft.train.perf import CompiledOnFirstCall, flops_per_token
    from jaxft.train.step import init_state, make_step, sft_loss_fn

    config, params = load_hf(model_dir, quant="nf4" if quant else None)
    lora = lora_init(
        jax.random.key(0), config, params, LoraSpec(r=RANK, alpha=ALPHA, targets=TARGETS)
    )
    tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    # As ``jaxft train`` runs it: compiled before its first run, the compiler's scratch memory
    # returned to the OS before the step allocates its workspace.
    jitted = jax.jit(make_step(sft_loss_fn(config, "lora"), tx), donate_argnums=(0,))
    step = CompiledOnFirstCall(jitted)
    state = init_state(lora, tx, 0)
    tokens = _tokens()
    targets = np.roll(tokens, -1, axis=1)
    loss_mask = np.ones_like(tokens)
    loss_mask[:, -1] = 0  # the last position predicts nothing: 4 x 511 trained targets
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ))

    def batch(i: int) -> dict:
        rows = slice(BATCH * i, BATCH * (i + 1))
        b = {
            "tokens": tokens[rows],
            "targets": targets[rows],
            "loss_mask": loss_mask[rows],
            "segment_ids": np.ones((BATCH, SEQ), np.int32),
            "positions": positions,
        }
        return {k: jnp.asarray(v)[None] for k, v in b.items()}  # [accum=1, micro, seq]

    def run_step(i: int) -> float:
        nonlocal state
        state, metrics = step(state, params, batch(i))
        return float(jax.block_until_ready(metrics)["loss"])

    if profile_dir:
        step.compiled = jitted.lower(state, params, batch(0)).compile()  # compiled once
        return _profile(step.compiled, run_step, profile_dir)
    out = _timed_loop(run_step, warmup, steps)
    out["flops_per_token"] = flops_per_token(config, lora, "lora", SEQ)
    out["versions"] = {"jax": jax.__version__}
    return out


def _profile(compiled, run_step, out_dir: str, steps: int = 2) -> dict:
    """Optimized HLO, XLA's memory plan, and a jax.profiler trace of ``steps`` warm steps,
    summarised as time per op and per part of the model (``op_name`` metadata of the HLO)."""
    import collections
    import re

    import jax
    from jax.profiler import ProfileData

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    hlo = compiled.as_text()
    (root / "step.hlo.txt").write_text(hlo)
    mem = compiled.memory_analysis()
    run_step(0), run_step(1)  # compile and warm up
    with jax.profiler.trace(str(root / "trace")):
        for i in range(2, 2 + steps):
            run_step(i)
    meta = dict(re.findall(r'^\s+(?:ROOT )?%(\S+) = .*?op_name="([^"]*)"', hlo, re.MULTILINE))
    ops: collections.Counter = collections.Counter()
    data = ProfileData.from_file(str(next((root / "trace").rglob("*.xplane.pb"))))
    for line in (ln for plane in data.planes for ln in plane.lines if "XLAEigen" in ln.name):
        for ev in line.events:
            if not ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "while", "end:")):
                ops[ev.name] += ev.duration_ns / steps / 1e6
    parts: collections.Counter = collections.Counter()
    for name, ms in ops.items():
        where = meta.get(name, "")
        part = next((p for p in _PARTS if p in where), "other")
        parts[("matmul " if where.endswith("dot_general") else "") + part] += ms
    return {
        "temp_mb": mem.temp_size_in_bytes / 2**20,
        "ms_per_step_by_part": dict(parts.most_common()),
        "top_ops_ms_per_step": {k: [v, meta.get(k, "")[-80:]] for k, v in ops.most_common(30)},
    }


_PARTS = (
    "self_attn/q_proj",
    "self_attn/k_proj",
    "self_attn/v_proj",
    "self_attn/o_proj",
    "self_attn",
    "mlp",
    "layernorm",
    "lm_head",
    "dynamic_update_slice",
    "dynamic_slice",
)


def worker_peft(model_dir: str, quant: bool, warmup: int, steps: int) -> dict:
    import peft
    import torch
    import transformers

    kwargs: dict = {"dtype": torch.float32}
    if quant:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
    lcfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS))
    model = peft.get_peft_model(model, lcfg)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    tokens = torch.from_numpy(_tokens().astype("int64"))

    def run_step(i: int) -> float:
        ids = tokens[BATCH * i : BATCH * (i + 1)]
        loss = model(input_ids=ids, labels=ids).loss  # mean over 4 x 511 shifted targets
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    out = _timed_loop(run_step, warmup, steps)
    out["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    return out


def worker_dot(n: int, reps: int) -> dict:
    from jaxft.train.perf import matmul_rate

    return {"flops_per_s": matmul_rate(n, reps), "n": n}


# ----------------------------------------------------------------------------- driver


def make_model(root: Path) -> str:
    """W's model: transformers' own init with seed 0, saved as fp32 safetensors."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    assert n == 31_990_272, n
    path = root / "w-model"
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def allocator_env(name: str) -> dict[str, str] | None:
    """Environment of a worker under ``name``; ``None`` when the allocator is not installed."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "LD_PRELOAD" and not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))
    }
    env.update(
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if name == "glibc-tuned":
        env.update(GLIBC_MALLOC_ENV)
    elif name == "tcmalloc":
        lib = next((p for p in TCMALLOC if Path(p).exists()), None)
        if lib is None:
            return None
        env["LD_PRELOAD"] = lib
    return env


def run_worker(env: dict[str, str], *args: str, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *args]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict], peak: float, flops: float | None) -> dict:
    """Medians over repetitions; MFU from ``flops`` per token (jaxft's count for the mode, from
    ``jaxft.train.perf.flops_per_token``: both stacks do the same work), if known."""
    med = lambda key: statistics.median(r[key] for r in runs)
    out = {
        k: med(k)
        for k in ("tokens_per_s", "step_s_median", "peak_rss_mb", "user_s", "sys_s", "minflt")
    }
    out["tokens_per_s_all"] = [r["tokens_per_s"] for r in runs]
    out["first_loss"], out["last_loss"] = runs[0]["losses"][0], runs[0]["losses"][-1]
    out["flops_per_token"] = flops
    out["mfu"] = None if flops is None else out["tokens_per_s"] * flops / peak
    return out


def bench(args: argparse.Namespace) -> dict:
    """Repetitions outermost, then allocators, then (mode, stack) cells in alternating order, so
    that a slow period of the host falls on every configuration rather than on one."""
    cells = [(m, s) for m in args.modes for s in args.stacks]
    envs = {a: allocator_env(a) for a in args.allocators}
    skipped = [f"{a}: library not found ({', '.join(TCMALLOC)})" for a, e in envs.items() if not e]
    envs = {a: e for a, e in envs.items() if e is not None}
    runs: dict = {a: {c: [] for c in cells} for a in envs}
    dots: dict = {a: [] for a in envs}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp))
        for rep in range(args.reps):
            for alloc, env in envs.items():
                dots[alloc].append(run_worker(env, "dot", str(args.dot_n), timeout=600))
                for mode, stack in cells if rep % 2 == 0 else cells[::-1]:
                    argv = (stack, model_dir, mode, str(args.warmup), str(args.steps))
                    r = run_worker(env, *argv, timeout=args.timeout)
                    runs[alloc][(mode, stack)].append(r)
                    print(
                        f"[rep {rep} {alloc}] {stack:5s} {mode:5s} {r['tokens_per_s']:8.1f}"
                        f" tok/s  rss {r['peak_rss_mb']:6.0f} MB",
                        file=sys.stderr,
                        flush=True,
                    )
    peak = max(d["flops_per_s"] for ds in dots.values() for d in ds)
    results: dict = {"allocators": {}, "skipped": skipped, "dot_flops_per_s": peak}
    for alloc, env in envs.items():
        res = {
            "env": {k: v for k, v in env.items() if k in ("LD_PRELOAD", *GLIBC_MALLOC_ENV)},
            "dot_flops_per_s": max(d["flops_per_s"] for d in dots[alloc]),
            "cells": {
                f"{s}/{m}": summarize(r, peak, _flops(runs[alloc], m))
                for (m, s), r in runs[alloc].items()
            },
            "runs": {f"{s}/{m}": r for (m, s), r in runs[alloc].items()},
        }
        res.update(_ratios(res["cells"], args.stacks))
        results["allocators"][alloc] = res
    return results


def _flops(runs: dict, mode: str) -> float | None:
    jaxft_runs = runs.get((mode, "jaxft"))
    return jaxft_runs[0]["flops_per_token"] if jaxft_runs else None


def _ratios(c: dict, stacks: list[str]) -> dict[str, float]:
    out = {}
    for mode in ("lora", "qlora"):
        if f"jaxft/{mode}" in c and f"peft/{mode}" in c:
            jx, pt = c[f"jaxft/{mode}"], c[f"peft/{mode}"]
            out[f"{mode}_speedup_vs_peft"] = jx["tokens_per_s"] / pt["tokens_per_s"]
    for s in stacks:
        if f"{s}/lora" in c and f"{s}/qlora" in c:
            ratio = c[f"{s}/qlora"]["step_s_median"] / c[f"{s}/lora"]["step_s_median"]
            out[f"{s}_qlora_over_lora_step"] = ratio
    return out


def print_table(results: dict) -> None:
    peak = results["dot_flops_per_s"]
    print(f"best fp32 jnp.dot: {peak / 1e9:.0f} GFLOP/s (MFU reference)")
    head = (
        f"{'allocator':12s} {'stack/mode':12s} {'tokens/s':>9s} {'step ms':>8s} {'MFU':>6s}"
        f" {'RSS MB':>7s} {'user s':>7s} {'sys s':>6s} {'minflt':>9s} {'loss 0 -> last':>16s}"
    )
    print(head)
    print("-" * len(head))
    for alloc, res in results["allocators"].items():
        for name, c in res["cells"].items():
            mfu = "n/a" if c["mfu"] is None else f"{100 * c['mfu']:5.1f}%"
            print(
                f"{alloc:12s} {name:12s} {c['tokens_per_s']:9.0f} {1e3 * c['step_s_median']:8.0f}"
                f" {mfu:>6s} {c['peak_rss_mb']:7.0f} {c['user_s']:7.1f}"
                f" {c['sys_s']:6.1f} {c['minflt']:9.0f}"
                f" {c['first_loss']:7.4f} -> {c['last_loss']:.4f}"
            )
        ratios = {k: v for k, v in res.items() if k.endswith(("_vs_peft", "_step"))}
        print(f"{alloc:12s} " + "  ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    for note in results["skipped"]:
        print(f"skipped {note}")


def profile(args: argparse.Namespace) -> dict:
    """jaxft's LoRA step under the first allocator: HLO, memory plan and trace in ``--profile``."""
    env = allocator_env(args.allocators[0])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp))
        argv = ("jaxft", model_dir, "lora", "0", "2", str(args.profile))
        return run_worker(env, *argv, timeout=args.timeout)


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--allocators", type=csv, default=["glibc", "glibc-tuned", "tcmalloc"])
    p.add_argument("--modes", type=csv, default=["lora", "qlora"])
    p.add_argument("--stacks", type=csv, default=["jaxft", "peft"])
    p.add_argument("--dot-n", type=int, default=4096)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per worker")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 rep, 1+2 steps, 1024^3 dot")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="instead: profile jaxft's LoRA step (HLO, memory, trace) into this dir",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.warmup, args.steps, args.dot_n = 1, 1, 2, 1024
    for a in args.allocators:
        if a not in ("glibc", "glibc-tuned", "tcmalloc"):
            p.error(f"unknown allocator {a!r}: expected glibc, glibc-tuned or tcmalloc")
    if (args.warmup + args.steps) * BATCH > ROWS:
        p.error(f"warmup + steps must be at most {ROWS // BATCH} (the data has {ROWS} rows)")
    return args


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--worker":
        kind, *rest = argv[1:]
        if kind == "dot":
            out = worker_dot(int(rest[0]), 5)
        else:
            model_dir, mode, warmup, steps, *profile_dir = rest
            fn = worker_jaxft if kind == "jaxft" else worker_peft
            out = fn(model_dir, mode == "qlora", int(warmup), int(steps), *profile_dir)
        print(json.dumps(out))
        return
    args = parse_args(argv)
    if args.profile:
        print(json.dumps(profile(args), indent=1))
        return
    results = bench(args)
    results["command"] = " ".join([".venv/bin/python", "scripts/bench_train.py", *argv])
    results["host"] = {
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    results["workload"] = {
        "reps": args.reps,
        "warmup": args.warmup,
        "steps": args.steps,
        "tokens_per_step": BATCH * SEQ,
    }
    lora = [r.get("lora_speedup_vs_peft") for r in results["allocators"].values()]
    results["lora_speedup_vs_peft"] = {
        a: r.get("lora_speedup_vs_peft") for a, r in results["allocators"].items()
    }
    results["lora_speedup_vs_peft_min"] = min((x for x in lora if x), default=None)
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
