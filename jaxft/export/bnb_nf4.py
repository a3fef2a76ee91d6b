"""Export a model as a transformers checkpoint in bitsandbytes' 4-bit (NF4 + double quant) format.

``AutoModelForCausalLM.from_pretrained(out)`` loads the result with bitsandbytes as a pre-quantized
model (SPECS.md section 1): every decoder linear weight is written as bitsandbytes' packed codes
plus quant state (``jaxft.quant.nf4_to_bnb``), every other tensor (embeddings, norms, ``lm_head``,
biases) dense. NF4 kernels are written byte for byte as they are; dense kernels are quantized here
exactly as bitsandbytes would quantize them. Tensors are produced one module at a time and written
shard by shard, so at most one shard of output is held in memory.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models.config import LlamaConfig
from jaxft.models.hf import copy_side_files, hf_tensor, np_dtype, param_value
from jaxft.models.hf_keys import key_table
from jaxft.models.llama import Params
from jaxft.models.safetensors_io import save_file
from jaxft.quant import NF4Weight, bnb_quantization_config, nf4_quantize, nf4_to_bnb


def _module_tensors(
    config: LlamaConfig, params: Params, npdt: np.dtype, block_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """The checkpoint's tensors, grouped so that a module's quant state is never split."""
    quantize = jax.jit(functools.partial(nf4_quantize, block_size=block_size, double_quant=True))
    for entry in key_table(config):
        if not entry.is_linear_weight:
            yield {entry.hf_name: hf_tensor(params, entry, config.scan_layers, npdt)}
            continue
        q = param_value(params, entry, config.scan_layers)
        if not isinstance(q, NF4Weight):
            # As bitsandbytes quantizes the [out, in] weight it loaded in the checkpoint's dtype.
            q = quantize(jnp.asarray(hf_tensor(params, entry, config.scan_layers, npdt)))
        # The quant state's dtype stays q.dtype (the weight's dtype when quantized), as
        # bitsandbytes writes it; compute_dtype only goes to config.json.
        yield nf4_to_bnb(entry.module, q)


def save_bnb_nf4(
    out_dir: str | Path,
    config: LlamaConfig,
    params: Params,
    *,
    compute_dtype: str = "bfloat16",
    dtype: str = "bfloat16",
    source_dir: str | Path | None = None,
    block_size: int = 64,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``params`` as a bitsandbytes NF4 checkpoint that transformers loads as it is.

    Args:
        out_dir: output directory (created).
        config: the architecture; ``config.json`` is ``config.to_hf(dtype=dtype)`` plus
            ``quantization_config`` (NF4, double quantization, ``bnb_4bit_compute_dtype``).
        params: base parameters; decoder linear kernels may be ``NF4Weight`` (written as they
            are, never re-quantized) or dense ``[in, out]`` (quantized here in ``dtype``, with
            double quantization and ``block_size``).
        compute_dtype: bitsandbytes' compute dtype written to ``quantization_config``.
        dtype: dtype of the dense tensors (embeddings, norms, ``lm_head``, biases).
        source_dir: copy ``generation_config.json`` and tokenizer files from here when given.
        block_size: NF4 block size for dense kernels.
        max_shard_bytes: start a new shard (with an index) beyond this many bytes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npdt = np_dtype(dtype)
    shards: list[list[str]] = []
    current: dict[str, np.ndarray] = {}
    used = total = 0

    def flush() -> None:
        save_file(current, out / f"model-{len(shards) + 1:05d}.part", metadata={"format": "pt"})
        shards.append(list(current))
        current.clear()

    for group in _module_tensors(config, params, npdt, block_size):
        size = sum(a.nbytes for a in group.values())
        if current and used + size > max_shard_bytes:
            flush()
            used = 0
        current.update(group)
        used += size
        total += size
    flush()
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [
        f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)
    ]
    for k, name in enumerate(names):
        (out / f"model-{k + 1:05d}.part").replace(out / name)
    if n == 1:  # no stale index of an earlier sharded export next to the single file
        (out / "model.safetensors.index.json").unlink(missing_ok=True)
    else:
        weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = config.to_hf(dtype=dtype)
    hf["quantization_config"] = bnb_quantization_config(compute_dtype)
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    if source_dir is not None:
        copy_side_files(source_dir, out)
    return out
