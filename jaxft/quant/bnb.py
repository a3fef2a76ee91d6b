"""Reading and writing NF4 weights in the bitsandbytes / transformers checkpoint format.

For a module prefix ``P`` (e.g. ``model.layers.0.self_attn.q_proj``) a transformers checkpoint
quantized by bitsandbytes holds (``bitsandbytes.nn.Linear4bit._save_to_state_dict`` and
``bitsandbytes.functional.QuantState.as_dict(packed=True)``):

==============================================  =============================================
key                                             dtype / shape
==============================================  =============================================
``P.weight``                                    uint8 ``[ceil(n/2), 1]``
``P.weight.absmax``                             uint8 ``[nblocks]`` (fp32 without double quant)
``P.weight.quant_map``                          fp32 ``[16]``
``P.weight.nested_absmax``                      fp32 ``[ceil(nblocks/256)]`` (double quant only)
``P.weight.nested_quant_map``                   fp32 ``[256]`` (double quant only)
``P.weight.quant_state.bitsandbytes__nf4``      uint8 bytes of a JSON object
==============================================  =============================================

The JSON is ``json.dumps`` of ``{"quant_type", "blocksize", "dtype", "shape"}`` plus, with double
quantization, ``{"nested_blocksize", "nested_dtype", "nested_offset"}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxft.errors import CheckpointError
from jaxft.quant._maps import NF4_CODEBOOK, dynamic_map
from jaxft.quant.nf4 import NESTED_BLOCK_SIZE, VALID_BLOCK_SIZES, NF4Weight

_QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _key(prefix: str, suffix: str) -> str:
    return f"{prefix.rstrip('.')}.{suffix}"


def _check_dtype_name(dtype: str, what: str) -> None:
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"{what} must be one of {list(_COMPUTE_DTYPES)}, got {dtype!r}")


def nf4_to_bnb(
    prefix: str, q: NF4Weight, compute_dtype: str | None = None
) -> dict[str, np.ndarray]:
    """The bitsandbytes state-dict entries of one quantized weight, as numpy arrays.

    Args:
        prefix: the module path, e.g. ``"model.layers.0.mlp.down_proj"`` (keys get ``.weight``).
        q: one (unstacked) NF4 matrix; ``q.shape`` must be the PyTorch ``[out, in]`` shape.
        compute_dtype: ``"dtype"`` written in the quant state, the dtype bitsandbytes dequantizes
            to; defaults to ``q.dtype``, the dtype the weights had when quantized.

    Returns:
        New, writable host arrays with the keys, dtypes and shapes of the table in this module's
        docstring, in the order bitsandbytes writes them; byte for byte what
        ``Linear4bit.state_dict()`` holds for the same weight quantized by bitsandbytes on the CPU.
    """
    if q.codes.ndim != 1:
        raise ValueError(
            f"nf4_to_bnb({prefix!r}) needs one matrix, got a stack with leading axes "
            f"{q.batch_shape}; slice it first, e.g. jax.tree.map(lambda x: x[i], q)"
        )
    dtype = q.dtype if compute_dtype is None else compute_dtype
    _check_dtype_name(dtype, "compute_dtype")
    state: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": q.block_size,
        "dtype": dtype,
        "shape": list(q.shape),
    }
    out = {
        _key(prefix, "weight"): np.array(q.codes, np.uint8).reshape(-1, 1),
        _key(prefix, "weight.absmax"): np.array(q.absmax),
        _key(prefix, "weight.quant_map"): NF4_CODEBOOK.copy(),
    }
    if q.double_quant:
        out[_key(prefix, "weight.nested_absmax")] = np.array(q.nested_absmax, np.float32)
        out[_key(prefix, "weight.nested_quant_map")] = dynamic_map().copy()
        state |= {
            "nested_blocksize": NESTED_BLOCK_SIZE,
            "nested_dtype": "float32",
            "nested_offset": float(np.float32(q.offset)),
        }
    packed_state = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8).copy()
    out[_key(prefix, "weight." + _QUANT_STATE_KEY)] = packed_state
    return out


def _get(tensors: Mapping[str, Any], key: str) -> np.ndarray:
    if key not in tensors:
        raise CheckpointError(
            f"bitsandbytes checkpoint is missing {key!r}; is this module NF4-quantized "
            f"(quantization_config.bnb_4bit_quant_type = 'nf4')?"
        )
    value = tensors[key]
    if hasattr(value, "detach"):  # a torch tensor (torch is then importable)
        import torch

        value = value.detach().cpu().contiguous()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16: keep the bytes
            value = value.view(torch.int16)
        value = value.numpy()
    return np.asarray(value)


def _expect(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise CheckpointError(f"bitsandbytes checkpoint key {key!r}: {message}")


def _read_state(tensors: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    key = _key(prefix, "weight." + _QUANT_STATE_KEY)
    if key not in tensors and _key(prefix, "weight.quant_state.bitsandbytes__fp4") in tensors:
        raise CheckpointError(
            f"{prefix!r} is quantized to fp4; jaxft reads only nf4 "
            f"(bnb_4bit_quant_type='nf4'). Re-quantize the base model with nf4."
        )
    raw = _get(tensors, key)
    try:
        state = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"bitsandbytes checkpoint key {key!r}: not a JSON quant state"
        ) from err
    _expect(
        state.get("quant_type") == "nf4", key, f"quant_type {state.get('quant_type')!r} != 'nf4'"
    )
    _expect(
        state.get("blocksize") in VALID_BLOCK_SIZES,
        key,
        f"bad blocksize {state.get('blocksize')!r}",
    )
    _expect(isinstance(state.get("shape"), list), key, "missing shape")
    _expect(state.get("dtype") in _COMPUTE_DTYPES, key, f"unsupported dtype {state.get('dtype')!r}")
    return state


def _check_map(tensors: Mapping[str, Any], key: str, expected: np.ndarray) -> None:
    found = _get(tensors, key)
    same = found.shape == expected.shape and np.array_equal(
        found.astype(np.float32).view(np.uint32), expected.view(np.uint32)
    )
    _expect(
        same,
        key,
        "differs from the standard bitsandbytes map that jaxft dequantizes with; this checkpoint "
        "was written with a custom code map and cannot be read bit-exactly",
    )


def nf4_from_bnb(prefix: str, tensors: Mapping[str, Any]) -> NF4Weight:
    """Read one NF4 weight from bitsandbytes state-dict entries (the inverse of ``nf4_to_bnb``).

    Args:
        prefix: the module path (keys ``prefix + ".weight..."``).
        tensors: a mapping holding at least that module's keys (numpy arrays or CPU torch
            tensors); other keys are ignored.

    Returns:
        An ``NF4Weight`` whose children are host numpy arrays (``jax.device_put`` them as needed).

    Raises:
        CheckpointError: a key is missing, the quant state is not nf4, a shape or dtype is
            inconsistent, or ``quant_map`` / ``nested_quant_map`` differ from the standard maps
            (``nf4_dequantize`` uses constant maps, so others could not be reproduced).
    """
    state = _read_state(tensors, prefix)
    shape = tuple(int(d) for d in state["shape"])
    block_size = int(state["blocksize"])
    n = math.prod(shape)
    n_blocks = -(-n // block_size)
    weight_key = _key(prefix, "weight")
    codes = _get(tensors, weight_key)
    codes = codes.reshape(-1).view(np.uint8)  # bnb_4bit_quant_storage may be another dtype
    _expect(codes.size == -(-n // 2), weight_key, f"{codes.size} bytes for shape {list(shape)}")
    _check_map(tensors, _key(prefix, "weight.quant_map"), NF4_CODEBOOK)
    absmax_key = _key(prefix, "weight.absmax")
    absmax = _get(tensors, absmax_key).reshape(-1)
    _expect(absmax.size == n_blocks, absmax_key, f"{absmax.size} values, expected {n_blocks}")
    double_quant = "nested_offset" in state
    if double_quant:
        state_key = _key(prefix, "weight." + _QUANT_STATE_KEY)
        _expect(
            state.get("nested_blocksize") == NESTED_BLOCK_SIZE, state_key, "nested_blocksize != 256"
        )
        _expect(state.get("nested_dtype") == "float32", state_key, "nested_dtype != float32")
        _expect(absmax.dtype == np.uint8, absmax_key, f"dtype {absmax.dtype}, expected uint8")
        _check_map(tensors, _key(prefix, "weight.nested_quant_map"), dynamic_map())
        nested_key = _key(prefix, "weight.nested_absmax")
        nested = _get(tensors, nested_key).astype(np.float32).reshape(-1)
        n_nested = -(-n_blocks // NESTED_BLOCK_SIZE)
        _expect(nested.size == n_nested, nested_key, f"{nested.size} values, expected {n_nested}")
        offset = np.float32(state["nested_offset"])
    else:
        _expect(absmax.dtype.kind == "f", absmax_key, f"dtype {absmax.dtype}, expected float32")
        absmax = absmax.astype(np.float32)
        nested = np.zeros((0,), np.float32)
        offset = np.float32(0.0)
    return NF4Weight(
        codes=codes.copy(),
        absmax=absmax.copy(),
        nested_absmax=nested.copy(),
        offset=np.asarray(offset, np.float32),
        shape=shape,
        block_size=block_size,
        double_quant=double_quant,
        dtype=state["dtype"],
    )


def bnb_quantization_config(compute_dtype: str = "bfloat16") -> dict[str, Any]:
    """``quantization_config`` for config.json of an NF4 + double-quant checkpoint.

    Equal to ``transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype).to_dict()``
    (transformers 5), key order included.
    """
    _check_dtype_name(compute_dtype, "compute_dtype")
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }
