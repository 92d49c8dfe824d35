"""FSDP2 building blocks: shard MiniMind's parameters, gradients and AdamW state over the ranks.

With plain DDP every GPU holds the whole model, its gradients and two fp32 AdamW moments (16 bytes
per parameter before activations); `torch.distributed.fsdp.fully_shard` keeps 1/N of each on every
rank and all-gathers one decoder layer at a time for its forward and backward. See
bench/bench_memory.py for what that means per GPU at 300M-1B parameters.

How a training loop uses this module (every call below is made on every rank):

    model = wrap_fsdp(model, run, optimizer)     # 7. after loading the weights; re-points `optimizer`
                                                 #    (built on the unsharded model) at the shards
    load_full_state(model, optimizer, ckp["model"], ckp["optimizer"])   # 6. resume, after wrapping
    for each micro-batch:
        no_sync(model, skip=not last_of_window)  # before the forward: accumulate without reducing
        loss.backward()
    norm = clip_grad_norm(params, args.grad_clip) # torch's clip_grad_norm_ on DTensor gradients
    model_state = full_model_state(model)        # collective; fp32 dict on rank 0, {} elsewhere
    optim_state = full_optimizer_state(model, optimizer)   # collective; plain torch format on rank 0
    # rank 0: save {k: v.half()} as the .pth and {"model": model_state, "optimizer": optim_state}
    # as the resume file: the same files, keys and layouts a single-process run writes.

Every helper also takes an unwrapped (or DDP) model, so the loop needs no `if fsdp:`.
Tiny CPU run of the two-rank check (gloo):
    torchrun --nproc_per_node 2 tests/fsdp_driver.py /tmp/fsdp_check
Writes nothing itself; the caller saves what full_model_state/full_optimizer_state return.
"""
import torch
import torch.distributed as dist
from torch import nn


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def wrap_fsdp(model: nn.Module, run, optimizers=()) -> nn.Module:
    """Shard `model` with fully_shard: each decoder layer is one unit (all-gathered for its own forward
    and backward, then freed), the root unit holds the tied embedding / LM head and the final norm.
    Under bf16/fp16 (run.dtype) the all-gathers carry that dtype and gradients are reduced in fp32
    (MixedPrecisionPolicy); the loop's autocast context stays as it is. `optimizers` (one or a list)
    built on the unsharded parameters are re-pointed at the sharded ones, keeping any state already
    loaded into them. With one process the model is returned unchanged, as wrap_ddp does."""
    if not (dist.is_initialized() and run.world_size > 1):
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    names = {id(p): n for n, p in model.named_parameters()}                # tied weight: one name
    saved = [opt.state_dict() if opt.state else None for opt in optimizers]
    mp = MixedPrecisionPolicy() if run.dtype == torch.float32 else \
        MixedPrecisionPolicy(param_dtype=run.dtype, reduce_dtype=torch.float32)
    mesh = init_device_mesh(run.device_type, (run.world_size,))
    with torch.no_grad():   # fully_shard keeps each rank's own values: start every rank from rank 0's weights
        for tensor in list(model.parameters()) + list(model.buffers()):   # (DDP does this at construction)
            dist.broadcast(tensor.data, src=0)
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    sharded = dict(model.named_parameters())
    for opt, state in zip(optimizers, saved):
        opt.state.clear()
        for group in opt.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        if state is not None:
            _set_optimizer_state(model, opt, state)
    return model


def _decoder_layers(model: nn.Module):
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise ValueError(f"wrap_fsdp: {type(model).__name__} has no .model.layers to shard")
    return list(inner.layers)


def no_sync(model, skip: bool) -> None:
    """Call before each micro-batch's forward. skip=True: this backward accumulates gradients locally
    and communicates nothing (every micro-batch of an accumulation window but the last);
    skip=False: it reduces them over the ranks (FSDP: reduce-scatter into the shards, DDP: all-reduce)."""
    if is_fsdp(model):
        model.set_requires_gradient_sync(not skip)
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = not skip


def clip_grad_norm(params, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ (it reduces the norm of sharded DTensor gradients over the
    ranks itself); returns the total norm before clipping as a float, the same on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_model_state(model) -> dict:
    """The whole fp32 state dict, on the CPU, with both tied keys, as a plain model's state_dict():
    on rank 0 (an FSDP model gathers it, every rank must call this); {} on the other FSDP ranks."""
    if not is_fsdp(model):
        return {k: v.detach().cpu() for k, v in getattr(model, "module", model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer) -> dict:
    """The whole optimizer state in torch's own format (state keyed by parameter index, as
    optimizer.state_dict() of an unsharded run): on rank 0; {} on the other FSDP ranks.
    A resume file holding it can be continued with or without FSDP, on any number of ranks."""
    if not is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    by_name = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(n for g in by_name["param_groups"] for n in g["params"])}
    return {"state": {index[name]: s for name, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def load_full_state(model, optimizer=None, model_state: dict = None, optim_state: dict = None) -> None:
    """Load a full (unsharded) model state dict and an optimizer state in torch's format, as written
    by a plain run or by full_model_state/full_optimizer_state; every rank passes the same dicts and
    keeps its own shard. None skips that part."""
    if not is_fsdp(model):
        if model_state is not None:
            getattr(model, "module", model).load_state_dict(model_state)
        if optimizer is not None and optim_state is not None:
            optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if model_state is not None:
        # a copy: set_model_state_dict replaces the dict's tensors by this rank's shards in place
        set_model_state_dict(model, dict(model_state), options=StateDictOptions(full_state_dict=True))
    if optimizer is not None and optim_state is not None:
        _set_optimizer_state(model, optimizer, optim_state)


def _set_optimizer_state(model, optimizer, optim_state: dict) -> None:
    """Index-keyed optimizer state -> parameter names (the optimizer's order) -> each rank's shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    by_name = {"state": {names[i]: dict(s) for i, s in optim_state["state"].items()},   # copies, as above
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
