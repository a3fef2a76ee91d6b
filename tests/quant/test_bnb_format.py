"""bitsandbytes checkpoint entries: byte-equal to bitsandbytes' own, readable both ways."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.errors import CheckpointError
from jaxft.quant import (
    bnb_quantization_config,
    nf4_dequantize,
    nf4_from_bnb,
    nf4_quantize,
    nf4_to_bnb,
)

PREFIX = "model.layers.0.self_attn.q_proj"
quantize_jit = jax.jit(nf4_quantize, static_argnames=("block_size", "double_quant"))


def _weights(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ours(w: np.ndarray, dtype: str, double_quant: bool = True):
    x = jnp.asarray(w).astype(jnp.dtype(dtype))
    return quantize_jit(x, double_quant=double_quant)


def _assert_same_entries(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)  # same keys, in bitsandbytes' order
    for key, value in ref.items():
        got = ours[key]
        assert isinstance(got, np.ndarray), key
        assert (got.dtype, got.shape) == (value.dtype, value.shape), key
        assert got.tobytes() == value.tobytes(), key


@pytest.mark.parametrize(
    ("shape", "dtype"), [((300, 70), "float32"), ((301, 71), "bfloat16"), ((128, 256), "bfloat16")]
)
def test_entries_equal_bnb_quant_state(bnb, shape, dtype):
    w = _weights(shape)
    packed, state = bnb.quantize(w, dtype)
    _assert_same_entries(nf4_to_bnb(PREFIX, _ours(w, dtype)), bnb.state_dict(PREFIX, packed, state))


def test_entries_without_double_quant_equal_bnb(bnb):
    w = _weights((300, 70), seed=1)
    packed, state = bnb.quantize(w, "float32", double_quant=False)
    ours = nf4_to_bnb(PREFIX, _ours(w, "float32", double_quant=False))
    assert f"{PREFIX}.weight.nested_absmax" not in ours
    _assert_same_entries(ours, bnb.state_dict(PREFIX, packed, state))


def _linear4bit_state_dict(bnb, w: np.ndarray, quant_storage: str) -> dict:
    """``Linear4bit.state_dict()`` of ``w`` (bf16) quantized on the CPU, as transformers saves."""
    torch = bnb.torch
    nn = pytest.importorskip("bitsandbytes.nn")
    storage = getattr(torch, quant_storage)
    out_features, in_features = w.shape
    layer = nn.Linear4bit(
        in_features, out_features, bias=False, quant_type="nf4", quant_storage=storage
    )
    weight = torch.from_numpy(w).to(torch.bfloat16)
    layer.weight = nn.Params4bit(
        weight, requires_grad=False, quant_type="nf4", blocksize=64, quant_storage=storage
    )
    layer = layer.to("cpu")  # quantizes
    return {f"{PREFIX}.{k}": v for k, v in layer.state_dict().items()}


def test_entries_equal_linear4bit_state_dict(bnb):
    w = _weights((192, 70), seed=2)
    ref = {k: v.numpy() for k, v in _linear4bit_state_dict(bnb, w, "uint8").items()}
    _assert_same_entries(nf4_to_bnb(PREFIX, _ours(w, "bfloat16")), ref)


def test_reads_torch_tensors_with_bfloat16_storage(bnb):
    """``bnb_4bit_quant_storage=bfloat16`` (FSDP) stores the same bytes as bf16 ``[n/4, 1]``."""
    w = _weights((192, 70), seed=5)
    entries = _linear4bit_state_dict(bnb, w, "bfloat16")
    assert entries[f"{PREFIX}.weight"].dtype == bnb.torch.bfloat16
    loaded = nf4_from_bnb(PREFIX, entries)
    ours = _ours(w, "bfloat16")
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(ours), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_quant_state_json():
    q = nf4_quantize(jnp.asarray(_weights((64, 96))).astype(jnp.bfloat16))
    raw = nf4_to_bnb(PREFIX + ".", q)[f"{PREFIX}.weight.quant_state.bitsandbytes__nf4"]
    state = json.loads(raw.tobytes())
    assert state == {
        "quant_type": "nf4",
        "blocksize": 64,
        "dtype": "bfloat16",
        "shape": [64, 96],
        "nested_blocksize": 256,
        "nested_dtype": "float32",
        "nested_offset": float(np.float32(q.offset)),
    }
    override = nf4_to_bnb(PREFIX, q, compute_dtype="float16")
    assert (
        json.loads(override[f"{PREFIX}.weight.quant_state.bitsandbytes__nf4"].tobytes())["dtype"]
        == "float16"
    )


@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip(double_quant):
    q = _ours(_weights((301, 71), seed=3), "bfloat16", double_quant)
    back = nf4_from_bnb(PREFIX, nf4_to_bnb(PREFIX, q))
    assert jax.tree.structure(back) == jax.tree.structure(q)  # static fields included
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(q), strict=True):
        assert (np.asarray(a).dtype, np.shape(a)) == (np.asarray(b).dtype, np.shape(b))
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_reads_bnb_and_bnb_reads_ours(bnb):
    """A bnb-quantized weight loads to the same bits; bnb dequantizes our entries like we do."""
    w = _weights((300, 70), seed=4)
    packed, state = bnb.quantize(w, "bfloat16")
    loaded = nf4_from_bnb(PREFIX, bnb.state_dict(PREFIX, packed, state))
    got = np.asarray(nf4_dequantize(loaded, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(got, bnb.dequantize(packed, state))

    entries = nf4_to_bnb(PREFIX, _ours(w, "bfloat16"))
    torch = bnb.torch
    weight = torch.from_numpy(entries.pop(f"{PREFIX}.weight"))
    stats = {k.removeprefix(f"{PREFIX}.weight."): torch.from_numpy(v) for k, v in entries.items()}
    state2 = bnb.F.QuantState.from_dict(stats, device=torch.device("cpu"))
    np.testing.assert_array_equal(bnb.dequantize(weight, state2), got)


def test_quantization_config_equals_transformers():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    for name, dtype in [("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
        ref = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        ).to_dict()
        ours = bnb_quantization_config(name)
        assert list(ours.items()) == list(ref.items())
    with pytest.raises(ValueError, match="compute_dtype"):
        bnb_quantization_config("int8")


def test_bad_checkpoints_are_clear_errors():
    q = nf4_quantize(jnp.asarray(_weights((64, 64))))
    good = nf4_to_bnb(PREFIX, q)

    missing = {k: v for k, v in good.items() if not k.endswith(".absmax")}
    with pytest.raises(CheckpointError, match=r"missing 'model.*q_proj\.weight\.absmax'"):
        nf4_from_bnb(PREFIX, missing)

    custom_map = dict(good)
    custom_map[f"{PREFIX}.weight.quant_map"] = good[f"{PREFIX}.weight.quant_map"] * 0.5
    with pytest.raises(CheckpointError, match=r"quant_map.*custom code map"):
        nf4_from_bnb(PREFIX, custom_map)

    fp4 = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in good.items()}
    with pytest.raises(CheckpointError, match="fp4"):
        nf4_from_bnb(PREFIX, fp4)

    truncated = dict(good)
    truncated[f"{PREFIX}.weight"] = good[f"{PREFIX}.weight"][:-1]
    with pytest.raises(CheckpointError, match="bytes for shape"):
        nf4_from_bnb(PREFIX, truncated)

    stacked = jax.vmap(nf4_quantize)(jnp.ones((2, 64, 64)))
    with pytest.raises(ValueError, match="stack"):
        nf4_to_bnb(PREFIX, stacked)
