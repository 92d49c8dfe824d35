"""LoRA for MiniMind, written from scratch (no peft), with the original MiniMind semantics.

Every square nn.Linear (in MiniMind: q_proj and o_proj of each layer) gets a low-rank adapter
`lora` with output = W x + B(A x). There is no alpha/rank scaling and no dropout, as in the original,
and B starts at zero, so a freshly adapted model computes exactly what it computed before.

    model = MiniMindForCausalLM(config)              # load full_sft weights into it first
    apply_lora(model, rank=8)
    freeze_non_lora(model)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    ...train...
    save_lora(model, "out/lora/lora_identity_512.pth")  # only the adapter, fp32

    apply_lora(model); load_lora(model, "out/lora/lora_identity_512.pth")   # inference
    merge_lora(model)   # optional: fold B @ A into W, the model is a plain MiniMind again

Adapter keys in files and state dicts: `model.layers.{i}.self_attn.{q_proj|o_proj}.lora.{A|B}.weight`.
"""
import os
from pathlib import Path
from typing import Union

import torch
from torch import nn

# wrappers whose attribute name leaks into parameter names: DDP (`module.`), torch.compile (`_orig_mod.`)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        nn.init.normal_(self.A.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.B.weight)  # B = 0: the adapter starts as an exact no-op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


def _add_lora_output(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
    # A forward hook rather than the original's closure-patched `forward`: the hook is a plain
    # module-level function of the module it runs on, so deepcopy, pickling, DDP and torch.compile
    # all see the copy's own adapter, and merge_lora can remove it through its handle.
    return output + module.lora(args[0])


def _strip_wrappers(name: str) -> str:
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _adapted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name without wrapper prefixes, module) for every module that carries an adapter."""
    return [(_strip_wrappers(name), m) for name, m in model.named_modules()
            if isinstance(getattr(m, "lora", None), LoRA)]


def apply_lora(model: nn.Module, rank: int = 8) -> None:
    """Attach a LoRA of `rank` to every square nn.Linear of `model`, in place.

    Raises ValueError if the model already has adapters: a second call would otherwise wrap the
    adapters' own square matrices or silently add a second, untrained adapter.
    """
    if any(isinstance(m, LoRA) for m in model.modules()):
        raise ValueError("apply_lora: the model already has LoRA adapters (apply_lora was called twice?)")
    targets = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.shape[0] == m.weight.shape[1]]
    for linear in targets:
        linear.lora = LoRA(linear.in_features, linear.out_features, rank,
                           device=linear.weight.device, dtype=linear.weight.dtype)
        linear.lora_hook = linear.register_forward_hook(_add_lora_output)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (every parameter whose name contains "lora", as in the original)."""
    return [p for name, p in model.named_parameters() if "lora" in name]


def freeze_non_lora(model: nn.Module) -> None:
    """Make the adapters the only trainable parameters."""
    for name, p in model.named_parameters():
        p.requires_grad = "lora" in name


def save_lora(model: nn.Module, path: Union[str, Path]) -> None:
    """Write only the adapter weights, as fp32 CPU tensors, atomically (a kill never leaves half a file)."""
    state = {f"{name}.lora.{key}": t.detach().float().cpu()
             for name, m in _adapted(model) for key, t in m.lora.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_lora(model: nn.Module, path: Union[str, Path]) -> None:
    """Load adapter weights saved by save_lora (or by the original, DDP-prefixed files included)
    into a model that apply_lora has already been called on. Every adapter must be in the file
    with its exact shape, and every adapter in the file must exist in the model."""
    adapted = _adapted(model)
    if not adapted:
        raise ValueError(f"load_lora({path}): the model has no LoRA adapters; call apply_lora(model, rank) first")
    device = next(model.parameters()).device
    state = {_strip_wrappers(k): v for k, v in torch.load(path, map_location=device, weights_only=True).items()}
    for name, m in adapted:
        sub = {}
        for key, param in m.lora.state_dict().items():
            full = f"{name}.lora.{key}"
            if full not in state:
                raise ValueError(f"{path}: missing LoRA key {full!r} (saved from a model with fewer layers?)")
            if state[full].shape != param.shape:
                raise ValueError(f"{path}: {full!r} has shape {tuple(state[full].shape)}, the model expects "
                                 f"{tuple(param.shape)} (different LoRA rank or hidden_size?)")
            sub[key] = state.pop(full)
        m.lora.load_state_dict(sub, strict=True)
    extra = [k for k in state if ".lora." in k]
    if extra:
        raise ValueError(f"{path}: LoRA keys with no matching module in the model (more layers?): {extra[:4]}")


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += B @ A) and remove it, in place. Afterwards the
    model has exactly the original state-dict keys and runs at the original speed."""
    for _, linear in _adapted(model):
        delta = linear.lora.B.weight.float() @ linear.lora.A.weight.float()  # (out, rank) @ (rank, in)
        linear.weight.add_(delta.to(linear.weight.dtype))
        linear.lora_hook.remove()
        del linear.lora, linear.lora_hook
