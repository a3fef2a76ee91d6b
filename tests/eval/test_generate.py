"""Greedy generation equals transformers' generate(do_sample=False), dense and with LoRA."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from jaxft.eval.generate import Sampling, _filter_logits, generate_ids, truncate_at_stop
from jaxft.models import load_hf


def _prompts(vocab):
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, n).tolist() for n in (5, 11, 8)]


def _hf_greedy(model, prompts, new, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                             do_sample=False, pad_token_id=pad_id, eos_token_id=None)
    return out[:, width:].tolist()


@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("mistral",
                                                             {"sliding_window": 8})])
def test_greedy_matches_transformers(hf_model_factory, kind, overrides):
    path, model = hf_model_factory(kind, **overrides)
    config, params = load_hf(path)
    prompts = _prompts(config.vocab_size)
    ours = generate_ids(config, params, prompts, sampling=Sampling(max_new_tokens=12), pad_id=0)
    assert ours == _hf_greedy(model, prompts, 12, 0)


def test_greedy_with_peft_lora_matches(hf_model_factory, tmp_path):
    import transformers
    from peft import LoraConfig, get_peft_model

    from jaxft.peft import load_peft

    path, _ = hf_model_factory("qwen2")
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    config, params = load_hf(path)
    lora = load_peft(tmp_path / "adapter", config)
    prompts = _prompts(config.vocab_size)
    ours = generate_ids(config, params, prompts, lora=lora, sampling=Sampling(max_new_tokens=10))
    plain = generate_ids(config, params, prompts, sampling=Sampling(max_new_tokens=10))
    assert ours != plain  # the adapter changes what is generated
    assert ours == _hf_greedy(peft_model, prompts, 10, 0)


def test_stops_at_end_token_and_unrolled_layers(hf_model_factory):
    path, _ = hf_model_factory("llama")
    config, params = load_hf(path)
    prompts = _prompts(config.vocab_size)
    free = generate_ids(config, params, prompts, sampling=Sampling(max_new_tokens=10))
    end = free[0][3]
    stopped = generate_ids(config, params, prompts, sampling=Sampling(max_new_tokens=10),
                           end_ids=[end])
    assert stopped[0] == free[0][: free[0].index(end) + 1]
    config_u, params_u = load_hf(path, scan_layers=False)
    assert generate_ids(config_u, params_u, prompts, sampling=Sampling(max_new_tokens=10)) == free


def test_sampling_filters():
    logits = jax.numpy.log(jax.numpy.asarray([[0.5, 0.3, 0.15, 0.05]]))
    top2 = _filter_logits(logits, Sampling(temperature=1.0, top_k=2))
    assert (np.asarray(top2) > -1e30).tolist() == [[True, True, False, False]]
    nucleus = np.asarray(_filter_logits(logits, Sampling(temperature=1.0, top_p=0.7)))
    assert (nucleus > -1e30).tolist() == [[True, True, False, False]]
    assert truncate_at_stop("abc<END>def", ["<END>"]) == "abc"


def test_sampling_is_seeded(hf_model_factory):
    path, _ = hf_model_factory("llama")
    config, params = load_hf(path)
    s = Sampling(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9)
    a = generate_ids(config, params, _prompts(config.vocab_size), sampling=s, seed=1)
    b = generate_ids(config, params, _prompts(config.vocab_size), sampling=s, seed=1)
    c = generate_ids(config, params, _prompts(config.vocab_size), sampling=s, seed=2)
    assert a == b and a != c
