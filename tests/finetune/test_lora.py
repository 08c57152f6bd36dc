"""LoRA: a no-op at the start, only adapters train, merging is exact, and the forward equals PEFT's on transformers."""

import pytest
import torch

from gptlab import GPTModel, add_lora, instruction_collate, merge_lora
from gptlab.errors import UsageError
from gptlab.evaluate import calc_loss_batch
from gptlab.finetune.instructions import InstructionDataset
from gptlab.finetune.lora import LinearWithLoRA, lora_layers, merged_state_dict, trainable_parameters
from gptlab.finetune.settings import FinetuneConfig
from gptlab.pretrained.hf import hf_state
from tests.helpers import INSTRUCTIONS, tiny_config


def noisy_model(seed=0, **overrides):
    """A tiny model whose every weight (norms and biases too) is non-trivial."""
    torch.manual_seed(seed)
    model = GPTModel(tiny_config(context_length=96, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(param))
    return model.eval()


def batch():
    dataset = InstructionDataset(INSTRUCTIONS)
    return instruction_collate([dataset[i] for i in range(len(dataset))])


def test_fresh_adapters_change_nothing():
    model = noisy_model()
    inputs, _ = batch()
    with torch.no_grad():
        before = model(inputs)
        add_lora(model, rank=4, alpha=8.0)
        after = model(inputs)
    assert torch.equal(before, after)
    layers = lora_layers(model)
    assert len(layers) == 4 * model.config.n_layers  # qkv, out_proj, fc, proj of every block
    assert set(trainable_parameters(model)) == {f"{n}.lora.{p}" for n in layers for p in "AB"}


def test_training_moves_only_the_adapters_and_merging_is_exact():
    torch.manual_seed(1)
    model = GPTModel(tiny_config(context_length=96)).eval()  # GPT-2's initialisation: logits of GPT-2's scale
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=4, alpha=8.0, targets=("qkv", "fc"))
    inputs, targets = batch()
    optimizer = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2)
    model.train()
    for _ in range(5):
        optimizer.zero_grad()
        calc_loss_batch(inputs, targets, model, "cpu").backward()
        optimizer.step()
    model.eval()
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.linear.weight, base[f"{name}.weight"])  # frozen: bit for bit
        assert layer.lora.B.abs().sum() > 0
    assert torch.equal(model.tok_emb.weight, base["tok_emb.weight"])
    with torch.no_grad():
        unmerged = model(inputs)
        plain = GPTModel(model.config).eval()
        plain.load_state_dict(merged_state_dict(model))
        torch.testing.assert_close(plain(inputs), unmerged, atol=1e-5, rtol=0)
        merge_lora(model)
        assert not lora_layers(model) and type(model.trf_blocks[0].att.qkv) is torch.nn.Linear
        torch.testing.assert_close(model(inputs), unmerged, atol=1e-5, rtol=0)


def test_rank_and_targets_are_checked():
    with pytest.raises(UsageError, match="at least 1"):
        add_lora(noisy_model(), rank=0)
    with pytest.raises(UsageError, match="unknown LoRA target"):
        add_lora(noisy_model(), targets=("c_attn",))
    with pytest.raises(UsageError, match="--lora-r must be at least 1, got -2"):
        FinetuneConfig(lora_r=-2)
    model = add_lora(noisy_model(), rank=2)
    with pytest.raises(UsageError, match="no Linear layer"):
        add_lora(model, rank=2)


def test_forward_equals_peft_lora_on_transformers():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    ours = noisy_model(2)
    config = ours.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.emb_dim,
        n_layer=config.n_layers, n_head=config.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    missing, unexpected = hf.load_state_dict(hf_state(ours), strict=False)
    assert not unexpected and all(k == "lm_head.weight" or "attn.bias" in k for k in missing)
    hf.tie_weights()
    rank, alpha = 4, 12.0
    lora_config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, fan_in_fan_out=True,
                                  target_modules=["c_attn", "c_proj", "c_fc"])
    theirs = peft.get_peft_model(hf, lora_config).eval()
    add_lora(ours, rank=rank, alpha=alpha)
    names = {"att.qkv": "attn.c_attn", "att.out_proj": "attn.c_proj", "ff.fc": "mlp.c_fc", "ff.proj": "mlp.c_proj"}
    modules = dict(theirs.named_modules())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            _, i, local = name.split(".", 2)
            target = modules[f"base_model.model.transformer.h.{i}.{names[local]}"]
            layer.lora.A.copy_(torch.randn(layer.lora.A.shape, generator=g) * 0.3)
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g) * 0.3)
            target.lora_A["default"].weight.copy_(layer.lora.A.T)  # PEFT keeps them as nn.Linear weights
            target.lora_B["default"].weight.copy_(layer.lora.B.T)
        ids = torch.randint(0, config.vocab_size, (3, 12), generator=g)
        expected = theirs(ids).logits
        torch.testing.assert_close(ours.eval()(ids), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(merge_lora(ours)(ids), theirs.merge_and_unload()(ids).logits, atol=1e-5, rtol=0)


def test_lora_keeps_dropout_out_of_eval():
    model = noisy_model(4)
    add_lora(model, rank=2, alpha=4.0, dropout=0.5)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.B.normal_()
    inputs, _ = batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(inputs), model(inputs))
    assert all(isinstance(m, LinearWithLoRA) for m in lora_layers(model).values())
