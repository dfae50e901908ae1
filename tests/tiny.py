"""Tiny random models of every supported family, built from configs in the test (vocab 512, to share a tokenizer)."""
from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox")


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig
    common = dict(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, head_dim=8)
    if model_type == "gpt2":
        kw = dict(vocab_size=512, n_embd=32, n_layer=3, n_head=4, n_positions=128, n_inner=48)
    elif model_type == "gpt_neox":
        kw = dict(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=128)
    elif model_type == "gemma3_text":
        kw = dict(common, sliding_window=16, layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    elif model_type == "gemma2":
        kw = dict(common, sliding_window=16)
    else:
        kw = dict(common)
    if model_type == "phi3":
        kw.pop("head_dim", None)
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "gpt2":
        kw.update(bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    model.eval()
    model.requires_grad_(False)
    # random init leaves norm gains at 1; perturb them so tests see the gain's effect
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_subject(model_type: str, tokenizer=None, seed: int = 0, **overrides):
    from neuronscope.subject import Subject
    return Subject.from_model(tiny_model(model_type, seed=seed, **overrides), tokenizer, name=f"tiny-{model_type}")
