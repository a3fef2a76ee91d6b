"""bitsandbytes on the CPU as the oracle for jaxft.quant."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _torch_serial():
    """Run torch on one thread, without torch.compile, for the duration of a test.

    One thread: torch splits sums of >= 32768 elements over threads, which changes the fp32
    rounding of bitsandbytes' offset (jaxft replays the serial order). No compile: bitsandbytes
    wraps its reference dequantize in torch.compile, which only costs time here.
    """
    threads = torch.get_num_threads()
    dynamo = torch._dynamo.config.disable
    torch.set_num_threads(1)
    torch._dynamo.config.disable = True
    yield
    torch.set_num_threads(threads)
    torch._dynamo.config.disable = dynamo


def _quantize(w: np.ndarray, dtype: str, block_size: int = 64, double_quant: bool = True):
    """``bitsandbytes.functional.quantize_4bit`` of ``w`` (fp32 numpy) cast to ``dtype``."""
    t = torch.from_numpy(np.ascontiguousarray(w, np.float32)).to(TORCH_DTYPES[dtype])
    return F.quantize_4bit(
        t, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant
    )


def _dequantize(packed, state, dtype: str | None = None, flat: bool = True) -> np.ndarray:
    """``bitsandbytes.functional.dequantize_4bit`` as an fp32 numpy array of ``state.shape``.

    ``flat=True`` passes the shape as one axis. bitsandbytes 0.50's CPU kernel gives wrong
    values on AVX-512 machines when a row length is a multiple of 16 but not of the block size
    (it indexes absmax per row); blocks run over the flattened weight either way, so the flat
    call is the reference for every shape.
    """
    state = copy.copy(state)
    shape = tuple(state.shape)
    if dtype is not None:
        state.dtype = TORCH_DTYPES[dtype]
    if flat:
        state.shape = torch.Size([int(np.prod(shape))])
    out = F.dequantize_4bit(packed, state, quant_type="nf4")
    return out.float().numpy().reshape(shape)


def _state_dict(prefix: str, packed, state) -> dict[str, np.ndarray]:
    """What ``Linear4bit._save_to_state_dict`` writes for ``prefix``: weight, then quant state."""
    out = {f"{prefix}.weight": packed.numpy()}
    for key, value in state.as_dict(packed=True).items():
        out[f"{prefix}.weight.{key}"] = value.numpy()
    return out


@pytest.fixture
def bnb():
    """The oracle: ``quantize``, ``dequantize``, ``state_dict`` and bitsandbytes' modules."""
    return SimpleNamespace(
        quantize=_quantize,
        dequantize=_dequantize,
        state_dict=_state_dict,
        F=F,
        torch=torch,
    )
