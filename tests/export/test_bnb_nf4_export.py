"""bitsandbytes NF4 export: transformers + bitsandbytes (CPU) load it as the same quantized model."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.export.bnb_nf4 import save_bnb_nf4
from jaxft.models import forward, key_table, load_hf
from jaxft.models.hf import hf_tensor
from jaxft.models.safetensors_io import SafetensorsFile
from jaxft.quant import NF4Weight, bnb_quantization_config, nf4_from_bnb

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
bnb_nn = pytest.importorskip("bitsandbytes.nn")
F = pytest.importorskip("bitsandbytes.functional")

# Every linear's in_features (64, 128) is a multiple of the block size 64. bitsandbytes 0.50 on
# the CPU needs that twice: its 2-D dequantize_4bit indexes absmax per row and gives wrong values
# on AVX-512 machines for rows that are a multiple of 16 but not of the block size, and its
# AVX512-BF16 inference path repacks weights per row of whole blocks (it raises otherwise).
# Real models (hidden 2048, intermediate 8192, ...) satisfy it too.
TINY = {"intermediate_size": 128}
TOL = 1e-5  # fp32 logits (~3.4 max); measured 2.4e-6 llama, 2.2e-6 qwen2: both dequantize, then matmul


def _tokens(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (2, 24), dtype=np.int64)


def _load_bnb(path, **kwargs):
    """``from_pretrained`` with loading info, on bitsandbytes' exact (dequantize + matmul) path.

    On CPUs with AVX512-BF16, Linear4bit's no-grad inference repacks the weight with bf16 block
    scales and computes in bf16 (a 4e-2 logits difference here); switched off, it dequantizes in
    fp32 as jaxft does, so the comparison measures the checkpoint, not that approximation.
    """
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, **kwargs
    )
    for module in model.modules():
        if isinstance(module, bnb_nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model.eval(), info


def _read(out) -> dict[str, np.ndarray]:
    index = out / "model.safetensors.index.json"
    names = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.is_file() else ["model.safetensors"])
    tensors = {}
    for name in names:
        f = SafetensorsFile(out / name)
        assert f.metadata == {"format": "pt"}
        tensors.update({k: f.get(k) for k in f.keys()})  # noqa: SIM118 (not a dict)
    return tensors


def _bits(a) -> np.ndarray:
    """Raw bytes of a numpy array or CPU torch tensor (bf16 included), for bitwise comparison."""
    if isinstance(a, torch.Tensor):
        a = a.detach().contiguous()
        a = (a.view(torch.int16) if a.dtype == torch.bfloat16 else a).numpy()
    return np.ascontiguousarray(a).view(np.uint8)


def _assert_no_key_errors(info) -> None:
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info


@pytest.mark.parametrize(("kind", "overrides"), [("llama", {}),
                                                 ("qwen2", {"tie_word_embeddings": True})])
def test_nf4_export_loads_as_the_same_model(hf_model_factory, tmp_path, kind, overrides):
    path, _ = hf_model_factory(kind, **TINY, **overrides)
    config, params = load_hf(path, quant="nf4")
    out = save_bnb_nf4(tmp_path / "bnb", config, params, compute_dtype="float32",
                       dtype="float32", source_dir=path)
    hf = json.loads((out / "config.json").read_text())
    assert hf["quantization_config"] == bnb_quantization_config("float32")
    assert hf["dtype"] == "float32"
    assert (out / "generation_config.json").is_file()

    model, info = _load_bnb(out)
    _assert_no_key_errors(info)
    written = _read(out)
    n_linear = 0
    for entry in key_table(config):
        ours = hf_tensor(params, entry, config.scan_layers, np.float32)  # NF4 is dequantized
        if not entry.is_linear_weight:
            np.testing.assert_array_equal(
                _bits(model.get_parameter(entry.hf_name)), _bits(ours), err_msg=entry.hf_name)
            continue
        n_linear += 1
        layer = model.get_submodule(entry.module)
        assert isinstance(layer, bnb_nn.Linear4bit) and layer.compute_dtype == torch.float32
        w = layer.weight
        theirs = F.dequantize_4bit(w.data, w.quant_state, quant_type="nf4")
        np.testing.assert_array_equal(_bits(theirs.float()), _bits(ours), err_msg=entry.module)
        # The NF4 bytes are written as they are, not re-quantized.
        q = params["layers"]
        for k in entry.path:
            q = q[k]
        assert isinstance(q, NF4Weight)
        back = nf4_from_bnb(entry.module, written)
        for name in ("codes", "absmax", "nested_absmax", "offset"):
            np.testing.assert_array_equal(getattr(back, name), np.asarray(getattr(q, name))[
                entry.layer], err_msg=f"{entry.module} {name}")
    assert n_linear == 7 * config.num_layers

    tokens = _tokens(config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(tokens)).logits.float().numpy()
    got = np.asarray(forward(config, params, jnp.asarray(tokens, jnp.int32)))
    assert np.abs(got - ref).max() <= TOL


def test_unscanned_sharded_export_writes_the_same_tensors(hf_model_factory, tmp_path):
    path, _ = hf_model_factory("llama", **TINY)
    config, params = load_hf(path, quant="nf4")
    config_u, params_u = load_hf(path, quant="nf4", scan_layers=False)
    one = save_bnb_nf4(tmp_path / "one", config, params, dtype="bfloat16")
    sharded = save_bnb_nf4(tmp_path / "sharded", config_u, params_u, dtype="bfloat16",
                           max_shard_bytes=16 * 1024)
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2
    for layer in range(config.num_layers):  # a module's quant state is never split over shards
        for module in ("self_attn.q_proj", "mlp.down_proj"):
            prefix = f"model.layers.{layer}.{module}.weight"
            assert len({v for k, v in weight_map.items() if k.startswith(prefix)}) == 1
    a, b = _read(one), _read(sharded)
    assert list(a) == list(b)  # same keys, in the same order
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert a[k].tobytes() == b[k].tobytes(), k
    _, info = _load_bnb(sharded)
    _assert_no_key_errors(info)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_export_equals_bitsandbytes_quantization(hf_model_factory, tmp_path, dtype):
    """Quantizing dense weights here gives bitsandbytes' bytes: transformers quantizing the same
    checkpoint on load (NF4, double quant) holds a state dict equal to our file, key for key."""
    path, _ = hf_model_factory("llama", **TINY)
    config, params = load_hf(path)  # dense fp32
    assert not any(isinstance(x, NF4Weight) for x in params["layers"]["mlp"].values())
    out = save_bnb_nf4(tmp_path / "dense", config, params, compute_dtype="float32", dtype=dtype)
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    ref, info = _load_bnb(path, quantization_config=quant, dtype=getattr(torch, dtype))
    _assert_no_key_errors(info)
    theirs = ref.state_dict()
    ours = _read(out)
    assert sorted(ours) == sorted(theirs)
    for k, v in ours.items():
        assert tuple(v.shape) == tuple(theirs[k].shape), k
        np.testing.assert_array_equal(_bits(v), _bits(theirs[k]), err_msg=k)
