"""DPO with a LoRA policy whose reference is the same base with the adapter off, against peft.

A tiny transformers Llama gets a peft adapter with non-zero B (``init_lora_weights=False``); jaxft
loads both. On right-padded preference pairs of different prompt and completion lengths, policy
and reference completion log-probs, the DPO loss and its gradient with respect to the adapter
equal transformers + peft (reference: ``peft_model.disable_adapter()``), and the compiled
loss-and-grad step takes one copy of the base weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxft.losses import dpo_loss, preference_logprobs
from jaxft.models import load_hf
from jaxft.models.safetensors_io import SafetensorsFile
from jaxft.peft import load_peft, save_peft

BETA = 0.1
PROMPTS = (3, 5, 2)  # prompt lengths of the three pairs
CHOSEN = (4, 2, 6)  # completion lengths
REJECTED = (3, 5, 1)
SEQ = 12


def _pairs(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``[2B, S]`` chosen-then-rejected rows, right-padded; masks over the shifted targets."""
    rng = np.random.default_rng(seed)
    rows, masks = [], []
    lengths = [(p, c) for p, c in zip(PROMPTS, CHOSEN, strict=True)]
    lengths += [(p, r) for p, r in zip(PROMPTS, REJECTED, strict=True)]
    prompts = [rng.integers(1, vocab, p) for p in PROMPTS]
    for i, (p, c) in enumerate(lengths):
        tokens = np.zeros(SEQ, np.int64)
        tokens[:p] = prompts[i % len(PROMPTS)]
        tokens[p:p + c] = rng.integers(1, vocab, c)
        mask = np.zeros(SEQ, np.int64)
        mask[p:p + c] = 1
        rows.append(tokens)
        masks.append(mask)
    tokens, completion = np.stack(rows), np.stack(masks)
    real = (np.arange(SEQ)[None] < np.array([p + c for p, c in lengths])[:, None]).astype(np.int64)
    zero = np.zeros((len(rows), 1), np.int64)
    return {
        "tokens": tokens,
        "attention_mask": real,
        "completion_mask": completion,
        "targets": np.concatenate([tokens[:, 1:], zero], axis=1),
        "target_mask": np.concatenate([completion[:, 1:], zero], axis=1),
        "segment_ids": real,
        "positions": np.broadcast_to(np.arange(SEQ), tokens.shape).copy(),
    }


def _packed(batch, rows=((0, 3), (1, 5), (2, 4))) -> dict[str, jnp.ndarray]:
    """The same six sequences packed two per row, with ``example_index`` as the data pipeline."""
    lengths = batch["attention_mask"].sum(1)
    out = {k: np.zeros((len(rows), 2 * SEQ), np.int64) for k in
           ("tokens", "targets", "target_mask", "segment_ids", "positions")}
    out["example_index"] = np.full((len(rows), 2 * SEQ), -1, np.int64)
    for r, members in enumerate(rows):
        start = 0
        for seg, k in enumerate(members, start=1):
            n = lengths[k]
            span = slice(start, start + n)
            for key in ("tokens", "targets", "target_mask", "positions"):
                out[key][r, span] = batch[key][k, :n]  # the last target of a sequence is masked
            out["segment_ids"][r, span] = seg
            out["example_index"][r, span] = k
            start += n
    return {k: jnp.asarray(v, jnp.int32) for k, v in out.items()}


def _torch_logprobs(model, batch) -> torch.Tensor:
    """Completion log-probs summed in float64 from the model's fp32 logits."""
    logits = model(input_ids=torch.from_numpy(batch["tokens"]),
                   attention_mask=torch.from_numpy(batch["attention_mask"])).logits
    logp = torch.log_softmax(logits.double(), dim=-1)
    targets = torch.from_numpy(batch["targets"])
    picked = logp.gather(-1, targets[..., None])[..., 0]
    return (picked * torch.from_numpy(batch["target_mask"])).sum(-1)


def _torch_dpo(policy: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """TRL 1.16 ``DPOTrainer._compute_loss``, sigmoid (parity shown in test_preference_losses)."""
    c, r = policy.chunk(2)
    rc, rr = ref.chunk(2)
    return -torch.nn.functional.logsigmoid(BETA * ((c - rc) - (r - rr))).mean()


def _batch_arrays(batch):
    keys = ("tokens", "targets", "target_mask", "segment_ids", "positions")
    return {k: jnp.asarray(batch[k], jnp.int32) for k in keys}


def _dpo_step(config):
    """Loss and its gradient w.r.t. the adapter; the reference is ``base`` with ``lora=None``."""
    def logprobs(base, batch, lora):
        lp, _ = preference_logprobs(config, base, batch["tokens"], batch["targets"],
                                    batch["target_mask"], batch["segment_ids"],
                                    batch["positions"], lora=lora)
        return jnp.split(lp, 2)

    def step(lora, base, batch):
        ref_c, ref_r = jax.lax.stop_gradient(logprobs(base, batch, None))

        def loss_fn(lora):
            pol_c, pol_r = logprobs(base, batch, lora)
            return dpo_loss(pol_c, pol_r, ref_c, ref_r, BETA)[0]

        return jax.value_and_grad(loss_fn)(lora)

    return step


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.fixture
def setup(hf_model_factory, tmp_path):
    import transformers
    from peft import LoraConfig, get_peft_model

    root = tmp_path
    path, _ = hf_model_factory("llama")
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    lora_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                             "up_proj", "down_proj"])
    peft_model = get_peft_model(base, lora_config).eval()
    peft_model.save_pretrained(root / "adapter")
    config, params = load_hf(path)
    lora = load_peft(root / "adapter", config)
    return config, params, lora, peft_model, _pairs(config.vocab_size), root


def test_dpo_logprobs_and_loss_match_peft(setup):
    config, params, lora, peft_model, batch, _ = setup
    with torch.no_grad():
        want_pol = _torch_logprobs(peft_model, batch)
        with peft_model.disable_adapter():
            want_ref = _torch_logprobs(peft_model, batch)
    want_loss = float(_torch_dpo(want_pol, want_ref))
    b = _batch_arrays(batch)
    fn = jax.jit(lambda lora_: preference_logprobs(
        config, params, b["tokens"], b["targets"], b["target_mask"], b["segment_ids"],
        b["positions"], lora=lora_))
    pol, count = fn(lora)
    ref, _ = fn(None)
    np.testing.assert_array_equal(np.asarray(count), batch["target_mask"].sum(1))
    assert np.abs(want_pol.numpy() - want_ref.numpy()).min() > 1e-2  # the adapter is not a no-op
    assert np.abs(np.asarray(pol) - want_pol.numpy()).max() <= 1e-5
    assert np.abs(np.asarray(ref) - want_ref.numpy()).max() <= 1e-5
    loss, _ = dpo_loss(*jnp.split(pol, 2), *jnp.split(ref, 2), BETA)
    assert abs(float(loss) - want_loss) <= 1e-5

    # Packed rows (segments isolate the sequences) give the same per-example log-probs.
    p = _packed(batch)
    packed, packed_count = jax.jit(lambda lora_: preference_logprobs(
        config, params, p["tokens"], p["targets"], p["target_mask"], p["segment_ids"],
        p["positions"], lora=lora_, example_index=p["example_index"], num_examples=6))(lora)
    np.testing.assert_array_equal(np.asarray(packed_count), np.asarray(count))
    assert np.abs(np.asarray(packed) - want_pol.numpy()).max() <= 1e-5


def test_dpo_grad_matches_peft_and_holds_one_base_copy(setup):
    config, params, lora, peft_model, batch, root = setup
    b = _batch_arrays(batch)
    compiled = jax.jit(_dpo_step(config)).lower(lora, params, b).compile()
    loss, grads = compiled(lora, params, b)

    peft_model.zero_grad()
    with torch.no_grad(), peft_model.disable_adapter():
        ref = _torch_logprobs(peft_model, batch)
    want = _torch_dpo(_torch_logprobs(peft_model, batch), ref)
    want.backward()
    assert abs(float(loss) - want.detach().item()) <= 1e-5
    # Name the JAX gradients through the PEFT export table so that they line up with peft's.
    names = SafetensorsFile(save_peft(root / "grads", config, grads) / "adapter_model.safetensors")
    theirs = {n.replace(".default", ""): p.grad.numpy()
              for n, p in peft_model.named_parameters() if "lora_" in n}
    assert sorted(theirs) == sorted(names.keys())
    scale = max(np.abs(g).max() for g in theirs.values())
    for name, g in theirs.items():
        np.testing.assert_allclose(names.get(name), g, rtol=0, atol=1e-5 * scale, err_msg=name)

    mem = compiled.memory_analysis()
    base_b, lora_b, batch_b = _nbytes(params), _nbytes(lora), _nbytes(b)
    print(f"\nDPO step memory: arguments {mem.argument_size_in_bytes} B = base {base_b} + lora "
          f"{lora_b} + batch {batch_b}; outputs {mem.output_size_in_bytes} B; temps "
          f"{mem.temp_size_in_bytes} B")
    assert mem.argument_size_in_bytes == base_b + lora_b + batch_b
    assert mem.argument_size_in_bytes < 2 * base_b
    # Gradients for the adapter only, none for the base: the outputs are the adapter gradients, the
    # fp32 loss and XLA's table of 8-byte output pointers.
    n_outputs = 1 + len(jax.tree.leaves(lora))
    assert mem.output_size_in_bytes <= lora_b + 4 + 8 * n_outputs
