"""Helpers that make adapters with PEFT itself (the reference no one here wrote)."""

from __future__ import annotations

from pathlib import Path


def make_peft_adapter(base_dir: Path, out: Path, *, r: int = 8, alpha: float = 16, seed: int = 0,
                      targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                      use_rslora: bool = False, rank_pattern=None, alpha_pattern=None, use_dora: bool = False) -> Path:
    """A PEFT LoRA with random A and B (init_lora_weights=False) saved with save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                     use_rslora=use_rslora, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                     use_dora=use_dora, lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # PEFT's random init of B is small; make the delta clearly visible
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(out)
    return out


def peft_logits(base_dir: Path, adapters: dict[str, Path], ids: list[int], weights: dict[str, float] | None = None):
    """transformers+PEFT logits with one adapter, or a weighted combination of several."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft_model.load_adapter(adapters[n], adapter_name=n)
    if weights:
        peft_model.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type="cat")
        peft_model.set_adapter("mix")
    else:
        peft_model.set_adapter(names[0])
    peft_model.eval()
    with torch.no_grad():
        return peft_model(torch.tensor([ids])).logits[0].numpy()


def base_logits(base_dir: Path, ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(base_dir).eval()(torch.tensor([ids])).logits[0].numpy()


def peft_loss_and_grads(base_dir: Path, peft_dir: Path, tokens, mask):
    """PEFT+torch autograd: the masked next-token loss (labels -100 outside `mask`) and the gradient
    of every LoRA parameter, by PEFT's parameter name."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), peft_dir, is_trainable=True)
    ids = torch.from_numpy(tokens)
    labels = torch.where(torch.from_numpy(mask), ids, torch.full_like(ids, -100))
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.numpy() for n, p in model.named_parameters() if "lora_" in n}
