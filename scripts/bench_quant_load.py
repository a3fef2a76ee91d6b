"""Benchmark: host memory of ``load_hf(..., quant="nf4")`` on a Llama-3.2-1B-shaped checkpoint.

Writes a synthetic checkpoint (``configs/models/llama-3.2-1b.json``, random bf16 weights, written
with jaxft's safetensors writer in shards of ``--shard-gb``, one shard in memory at a time), then
loads it in a fresh subprocess per mode and reports the peak RSS (``VmHWM``) against the
process's RSS after importing jax and jaxft, and the size of the loaded parameter tree (NF4
linears and dense tensors separately).

    python scripts/bench_quant_load.py --out bench_quant_load.json [--dense] [--workdir DIR]

This is a benchmark, not a test: it takes minutes and ~3 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from jaxft._host import peak_rss_bytes, rss_bytes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "models" / "llama-3.2-1b.json"
GB = 1e9


class _Sampler(threading.Thread):
    """Polls /proc/self/status for the peaks of anonymous and file-backed resident memory.

    ``VmHWM`` counts the pages of memory-mapped checkpoint files that a load has touched; this
    splits the peak into process memory (RssAnon) and mapped file pages (RssFile, page cache that
    the kernel can drop). A poll can miss a short spike: ``VmHWM`` is the exact total.
    """

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak = interval, {"RssAnon": 0, "RssFile": 0}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self._done.set()
        self.join()
        return self.peak


def write_checkpoint(root: Path, shard_bytes: int, seed: int = 0) -> dict:
    """A random bf16 checkpoint of the config's shapes, holding one shard in memory at a time."""
    import ml_dtypes
    import numpy as np

    from jaxft.models import LlamaConfig, abstract_params, key_table
    from jaxft.models.safetensors_io import save_file

    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CONFIG, root / "config.json")
    config = LlamaConfig.from_json(CONFIG, scan_layers=False)
    abstract = abstract_params(config)
    rng = np.random.default_rng(seed)
    shards: list[list[str]] = []
    current: dict[str, np.ndarray] = {}
    sizes: dict[str, int] = {}

    def flush() -> None:
        save_file(current, root / f"shard-{len(shards)}.tmp")
        shards.append(list(current))
        current.clear()

    for entry in key_table(config):
        leaf = abstract
        for k in entry.param_path(False):
            leaf = leaf[k]
        shape = tuple(leaf.shape)[::-1] if entry.transpose else tuple(leaf.shape)
        sizes[entry.hf_name] = math.prod(shape) * 2
        if current and sum(sizes[k] for k in current) + sizes[entry.hf_name] > shard_bytes:
            flush()
        x = rng.standard_normal(shape, dtype=np.float32)
        x = x * np.float32(0.02) if len(shape) == 2 else 1.0 + np.float32(0.1) * x  # norms ~1
        current[entry.hf_name] = x.astype(ml_dtypes.bfloat16)
    flush()
    weight_map = {}
    for k, keys in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        (root / f"shard-{k}.tmp").replace(root / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return _describe(root, index)


def child(path: str, mode: str) -> None:
    """Runs in a fresh interpreter: baseline after imports, then one load; prints JSON."""
    import jax
    import numpy as np

    import jaxft  # noqa: F401
    from jaxft.models import load_hf
    from jaxft.quant import NF4Weight

    jax.numpy.zeros(1).block_until_ready()  # initialise the backend before the baseline
    baseline, baseline_peak = rss_bytes(), peak_rss_bytes()
    sampler = _Sampler()
    sampler.start()
    t0 = time.perf_counter()
    _, params = load_hf(path, dtype="bfloat16", quant="nf4" if mode == "nf4" else None)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    sampled = sampler.stop()
    peak, after = peak_rss_bytes(), rss_bytes()
    nf4 = dense = 0
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, NF4Weight)):
        if isinstance(leaf, NF4Weight):
            nf4 += leaf.nbytes
        else:
            dense += int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    print(json.dumps({
        "mode": mode, "load_seconds": seconds, "baseline_rss": baseline,
        "baseline_peak_rss": baseline_peak, "peak_rss": peak, "rss_after_load": after,
        "peak_above_baseline": peak - baseline, "params_nf4_bytes": nf4,
        "params_dense_bytes": dense, "params_bytes": nf4 + dense,
        "sampled_peak_rss_anon": sampled["RssAnon"], "sampled_peak_rss_file": sampled["RssFile"],
    }))


def measure(path: Path, mode: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    cmd = [sys.executable, __file__, "--child", str(path), "--mode", mode]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"{mode} load failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(ckpt: dict, runs: list[dict]) -> None:
    print(f"checkpoint (bf16): {ckpt['checkpoint_bytes'] / GB:.3f} GB in {ckpt['shards']} shards;"
          f" largest tensor {ckpt['largest_tensor']} {ckpt['largest_tensor_bytes'] / GB:.3f} GB")
    rows = [
        ("params in memory", "params_bytes"),
        ("  NF4 linears", "params_nf4_bytes"),
        ("  dense (embed, norms)", "params_dense_bytes"),
        ("baseline RSS (jax+jaxft)", "baseline_rss"),
        ("peak RSS", "peak_rss"),
        ("peak RSS - baseline", "peak_above_baseline"),
        ("RSS after load", "rss_after_load"),
        ("sampled peak RssAnon", "sampled_peak_rss_anon"),
        ("sampled peak RssFile (mmap)", "sampled_peak_rss_file"),
    ]
    print(f"{'GB':<28}" + "".join(f"{r['mode']:>12}" for r in runs))
    for label, key in rows:
        print(f"{label:<28}" + "".join(f"{r[key] / GB:>12.3f}" for r in runs))
    print(f"{'load seconds':<28}" + "".join(f"{r['load_seconds']:>12.1f}" for r in runs))
    for r in runs:
        excess = r["peak_above_baseline"] - r["params_bytes"] - ckpt["largest_tensor_bytes"]
        print(f"{r['mode']}: peak - baseline - params - largest bf16 tensor = {excess / GB:.3f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="where to write the checkpoint (kept); "
                    "default: a temporary directory, removed afterwards")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--dense", action="store_true", help="also measure a plain bf16 load")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="shard size of the checkpoint")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="nf4", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.mode)
        return
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="jaxft-bench-")
    root = (args.workdir or Path(tmp)) / f"llama-3.2-1b-synthetic-{args.shard_gb:g}gb-shards"
    try:
        t0 = time.perf_counter()
        if (root / "model.safetensors.index.json").is_file():
            ckpt = _describe(root, json.loads((root / "model.safetensors.index.json").read_text()))
        else:
            ckpt = write_checkpoint(root, int(args.shard_gb * GB))
        print(f"checkpoint ready in {time.perf_counter() - t0:.0f} s: {root}", flush=True)
        runs = [measure(root, "nf4")] + ([measure(root, "dense")] if args.dense else [])
        report(ckpt, runs)
        if args.out:
            args.out.write_text(json.dumps({"checkpoint": ckpt, "runs": runs}, indent=2))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _describe(root: Path, index: dict) -> dict:
    """The summary ``write_checkpoint`` returns, for a checkpoint written by an earlier run."""
    from jaxft.models.safetensors_io import SafetensorsFile

    sizes = {}
    for shard in sorted(set(index["weight_map"].values())):
        f = SafetensorsFile(root / shard)
        keys = f.keys()
        sizes.update({k: math.prod(f.shape(k)) * f.dtype(k).itemsize for k in keys})
    largest = max(sizes, key=sizes.get)
    return {"checkpoint_bytes": sum(sizes.values()), "largest_tensor": largest,
            "largest_tensor_bytes": sizes[largest],
            "shards": len(set(index["weight_map"].values()))}


if __name__ == "__main__":
    main()
