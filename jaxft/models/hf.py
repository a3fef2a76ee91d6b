"""Hugging Face checkpoint import (``load_hf``) and export (``save_hf``), safetensors only.

Both directions walk ``jaxft.models.hf_keys.key_table``. Import reads tensor by tensor from
memory-mapped files into preallocated (stacked) host buffers, so the model is never held twice;
with ``quant="nf4"`` each decoder linear weight is quantized as it streams in, so host memory peaks
near the NF4 model plus one tensor. Pickled ``.bin``/``.pt`` checkpoints are refused: nothing
executes code from a checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxft.errors import CheckpointError
from jaxft.models.config import LlamaConfig
from jaxft.models.hf_keys import IGNORED_SUFFIXES, KeyEntry, get_path, key_table, set_path
from jaxft.models.llama import Params, abstract_params
from jaxft.models.safetensors_io import SafetensorsFile, save_file
from jaxft.quant.nf4 import NF4Weight, nf4_dequantize, nf4_quantize

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def open_checkpoint(root: Path) -> dict[str, SafetensorsFile]:
    """Map every tensor name of the checkpoint in ``root`` to the file that holds it."""
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(weight_map.values())):
            if not (root / shard).is_file():
                raise CheckpointError(f"{root / shard}: shard listed in {index.name} is missing")
            files[shard] = SafetensorsFile(root / shard)
        return {name: files[shard] for name, shard in weight_map.items()}
    single = root / "model.safetensors"
    if single.is_file():
        f = SafetensorsFile(single)
        return {k: f for k in f.keys()}
    pickled = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"{root}: only pickled weights ({', '.join(pickled)}) were found. jaxft loads "
            "safetensors only, because unpickling can execute code; convert them once with "
            "transformers (`AutoModelForCausalLM.from_pretrained(d).save_pretrained(d, "
            "safe_serialization=True)`) in an environment you trust."
        )
    raise CheckpointError(f"{root}: no model.safetensors or model.safetensors.index.json found")


def _expected_hf_shape(abstract: Params, entry: KeyEntry, scan: bool) -> tuple[int, ...]:
    shape = tuple(get_path(abstract, entry.param_path(scan)).shape)
    if entry.layer is not None and scan:
        shape = shape[1:]
    return shape[::-1] if entry.transpose else shape


def load_hf(
    path: str | Path,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    scan_layers: bool = True,
    remat: str = "none",
    quant: str | None = None,
    block_size: int = 64,
    double_quant: bool = True,
) -> tuple[LlamaConfig, Params]:
    """Load an HF Llama-family checkpoint into ``(config, params)``.

    ``dtype`` is the parameter dtype, ``compute_dtype`` the activation dtype (default: ``dtype``).
    ``quant="nf4"`` stores every decoder linear weight as an ``NF4Weight`` (bitsandbytes layout);
    embeddings, norms and ``lm_head`` stay dense, as bitsandbytes does.
    """
    root = Path(path)
    if quant not in (None, "none", "nf4"):
        raise CheckpointError(f"quant={quant!r}: expected none or nf4")
    tensors = open_checkpoint(root)
    config = LlamaConfig.from_json(
        root / "config.json", dtype=compute_dtype or dtype, param_dtype=dtype,
        scan_layers=scan_layers, remat=remat,
    )
    table = key_table(config)
    _check_names(root, config, table, tensors)
    abstract = abstract_params(config)
    pdt = np_dtype(dtype)
    quantize = _quantizer(block_size, double_quant, pdt) if quant == "nf4" else None
    params: dict[str, Any] = {}
    # Scanned layers: one preallocated host buffer per parameter, [num_layers, ...], filled layer
    # by layer and handed to the device once its last layer is in.
    stacks: dict[tuple[str, ...], Any] = {}
    filled: dict[tuple[str, ...], int] = {}
    for entry in table:
        f = tensors.pop(entry.hf_name)  # a shard is unmapped once its last tensor is read
        arr = f.get(entry.hf_name)
        want = _expected_hf_shape(abstract, entry, scan_layers)
        if tuple(arr.shape) != want:
            raise CheckpointError(
                f"{f.path}: tensor {entry.hf_name} has shape {list(arr.shape)}, but "
                f"{root / 'config.json'} implies {list(want)}: the config does not match the weights"
            )
        path = entry.param_path(scan_layers)
        if quantize is not None and entry.is_linear_weight:
            value: Any = quantize(arr)  # an NF4Weight on the device
        else:
            value = arr.T if entry.transpose else arr  # a view of the file, cast when copied
        if entry.layer is None or not scan_layers:
            if not isinstance(value, NF4Weight):
                buf = _host_empty(value.shape, pdt)
                buf[...] = value  # the one copy out of the file, cast to the parameter dtype
                value = jax.device_put(buf, may_alias=True)
            set_path(params, path, value)
            continue
        if path not in stacks:
            stacks[path] = _host_stack(value, config.num_layers, pdt)
        for buf, x in zip(jax.tree.leaves(stacks[path]), jax.tree.leaves(value)):
            buf[entry.layer] = x
        filled[path] = filled.get(path, 0) + 1
        if filled[path] == config.num_layers:
            set_path(params, path, jax.device_put(stacks.pop(path), may_alias=True))
    return config, params


def _host_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised 64-byte-aligned host array.

    The CPU backend adopts such a buffer on ``device_put(..., may_alias=True)`` instead of copying
    it (numpy's own large allocations sit 16 bytes past a page boundary, which it copies), so a
    parameter is built in place; other backends copy it to the device as usual.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _host_stack(value: Any, num_layers: int, pdt: np.dtype) -> Any:
    """Host buffers for ``num_layers`` stacked copies of ``value`` (an NF4Weight or a dense view)."""
    if isinstance(value, NF4Weight):
        return jax.tree.map(lambda x: _host_empty((num_layers, *x.shape), np.dtype(x.dtype)),
                            value)
    return _host_empty((num_layers, *value.shape), pdt)


def _quantizer(block_size: int, double_quant: bool, pdt: np.dtype) -> Callable[[Any], NF4Weight]:
    """HF ``[out, in]`` weight -> NF4Weight, quantized in the parameter dtype as bitsandbytes
    quantizes the weight it loaded; the cast happens inside the jitted function."""
    fn = jax.jit(lambda w: nf4_quantize(w.astype(pdt), block_size=block_size,
                                        double_quant=double_quant))
    return lambda w_oi: fn(jax.device_put(np.ascontiguousarray(w_oi)))


def _check_names(
    root: Path, config: LlamaConfig, table: list[KeyEntry], tensors: dict[str, SafetensorsFile]
) -> None:
    wanted = {e.hf_name for e in table}
    unexpected = sorted(
        k for k in tensors
        if k not in wanted
        and not k.endswith(IGNORED_SUFFIXES)
        and not (k == "lm_head.weight" and config.tie_word_embeddings)
    )
    missing = sorted(wanted - set(tensors))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(
                f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        raise CheckpointError(
            f"{root}: the weights do not match config.json ({'; '.join(parts)}). Check that "
            "config.json belongs to these weights."
        )


def param_value(params: Params, entry: KeyEntry, scan_layers: bool) -> Any:
    """The value of ``entry`` in ``params``, its layer sliced out of a scanned stack."""
    value = get_path(params, entry.param_path(scan_layers))
    if entry.layer is not None and scan_layers:
        value = jax.tree.map(lambda x: x[entry.layer], value)
    return value


def hf_tensor(params: Params, entry: KeyEntry, scan_layers: bool, dtype: np.dtype) -> np.ndarray:
    """The HF-layout tensor of ``entry`` from ``params`` (NF4 weights are dequantized)."""
    value = param_value(params, entry, scan_layers)
    if isinstance(value, NF4Weight):
        return np.asarray(nf4_dequantize(value, jnp.float32)).astype(dtype)
    arr = np.asarray(value)
    return (arr.T if entry.transpose else arr).astype(dtype)


def save_hf(
    out_dir: str | Path,
    config: LlamaConfig,
    params: Params,
    *,
    dtype: str | None = None,
    source_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write an HF checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads as it is.

    Tensors are written in ``dtype`` (default: the config's param dtype), sharded with an index
    above ``max_shard_bytes``. ``generation_config.json`` and tokenizer files are copied from
    ``source_dir`` when given.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or config.param_dtype
    npdt = np_dtype(dtype)
    table = key_table(config)
    abstract = abstract_params(config)
    sizes = [
        int(np.prod(_expected_hf_shape(abstract, e, config.scan_layers))) * npdt.itemsize
        for e in table
    ]
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map = {}
    for name, idx in zip(names, shards):
        tensors = {table[i].hf_name: hf_tensor(params, table[i], config.scan_layers, npdt)
                   for i in idx}
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update({table[i].hf_name: name for i in idx})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = config.to_hf(dtype=dtype)
    hf.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    if source_dir is not None:
        copy_side_files(source_dir, out)
    return out


def copy_side_files(source_dir: str | Path, out: Path) -> None:
    """Copy ``generation_config.json`` and tokenizer files that exist in ``source_dir``."""
    for name in ("generation_config.json", *TOKENIZER_FILES):
        src = Path(source_dir) / name
        if src.is_file() and src.resolve() != (out / name).resolve():
            shutil.copyfile(src, out / name)


def architecture(
    path: str | Path | None, config_json: str | Path | None = None, **runtime: Any
) -> LlamaConfig:
    """The architecture of a run: ``path``'s config.json, or ``config_json`` when given instead."""
    if path is not None and (Path(path) / "config.json").is_file():
        return LlamaConfig.from_json(Path(path) / "config.json", **runtime)
    if config_json is not None:
        return LlamaConfig.from_json(config_json, **runtime)
    where = f"{path}/config.json" if path is not None else "model.path"
    raise CheckpointError(f"{where} not found; set model.path to a checkpoint directory "
                          "(or model.config to a config.json for planning)")
