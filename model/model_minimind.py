"""MiniMind: a tiny decoder-only language model in both of the original's families, faithful to their checkpoints.

- MiniMind2 (the default; state-dict keys, shapes and numerics of the original fa82707 release)
- minimind-3 (config.model_family = "minimind3"; the original's newest model, laid out as Qwen3): per-head RMSNorm
  on queries and keys before RoPE (q_norm, k_norm), an explicit head_dim, FFN size ceil(pi*hidden/64)*64, eps 1e-6,
  RMSNorm scaled in float32, top-1 MoE without shared experts and with a Switch-style aux loss, N(0, 0.02) init.
  A config.json written by the original's newest code loads as it is (its keys name the family).
Features of both:
- GQA attention through F.scaled_dot_product_attention on every path (prefill, decode, padded
  batches, packed rows), with an explicit-mask reference path kept next to it (config.flash_attn=False)
- packed rows: position_ids that restart at 0 mark sample starts; attention is then block-diagonal causal,
  never computing the masked-out blocks: on CPU sample by sample, on CUDA through varlen flash attention
  (flash-attn's or torch's, bf16/fp16) or FlexAttention with a document mask (packed_kernel() picks)
- RoPE in the half-split ("rotate half") layout, with YaRN extrapolation (config.inference_rope_scaling)
- SwiGLU feed-forward (MiniMind2: intermediate size = 64 * ceil(int(8/3 * hidden) / 64))
- RMSNorm computed in float32
- tied input embedding / LM head
- MoE feed-forward: softmax gate, top-k routing with normalised weights (MiniMind2: shared experts and
  the DeepSeek-style load-balancing aux loss, sequence-level or batch-level)
- a growable KV cache that never re-copies the whole cache on each decode step
- transformers PreTrainedModel + GenerationMixin: generate(), save_pretrained(), AutoModel registration

This file imports nothing from the project: scripts/convert_model.py copies it into exported
transformers folders, where it runs under trust_remote_code.
"""
import contextlib
import functools
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers >= 5: init functions that respect already-loaded weights
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers
    from torch.nn import init

YARN_ROPE_SCALING = {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 2048,
                     "attention_factor": 1.0, "type": "yarn"}


# ---- Config ----
FAMILIES = ("minimind2", "minimind3")
# config keys that only one family has: a config.json written by the original's newest code (minimind-3) has the
# second set and no `model_family`; one written by fa82707 (MiniMind2) has the first
MINIMIND2_KEYS = ("n_routed_experts", "n_shared_experts", "aux_loss_alpha", "seq_aux", "scoring_func")
MINIMIND3_KEYS = ("head_dim", "num_experts", "moe_intermediate_size", "router_aux_loss_coef")
_UNSET = object()   # "not given": the family decides the default


def family_defaults(family: str) -> dict:
    """The defaults in which the two families differ (minimind-3: the original's newest model, Qwen3-style)."""
    if family == "minimind3":
        return dict(hidden_size=768, num_key_value_heads=4, rms_norm_eps=1e-6, num_experts_per_tok=1)
    return dict(hidden_size=512, num_key_value_heads=2, rms_norm_eps=1e-5, num_experts_per_tok=2)


class MiniMindConfig(PretrainedConfig):
    """Both MiniMind families. `model_family` "minimind2" (the default: fa82707, "MiniMind2") or "minimind3" (the
    original's newest model: per-head q/k RMSNorm, explicit head_dim, FFN size ceil(pi*hidden/64)*64, eps 1e-6,
    top-1 MoE without shared experts and a Switch-style aux loss). When `model_family` is not given, the keys tell:
    any of MINIMIND3_KEYS (and none of MINIMIND2_KEYS) means minimind3, so both originals' config.json load as
    they are. A saved config lists its own family's keys only (MiniMind2's exactly as before)."""
    model_type = "minimind"

    def __init__(self, dropout: float = 0.0, bos_token_id: int = 1, eos_token_id: int = 2, hidden_act: str = "silu",
                 hidden_size=_UNSET, intermediate_size: int = None, max_position_embeddings: int = 32768,
                 num_attention_heads: int = 8, num_hidden_layers: int = 8, num_key_value_heads=_UNSET,
                 vocab_size: int = 6400, rms_norm_eps=_UNSET, rope_theta: int = 1000000.0,
                 inference_rope_scaling: bool = False, flash_attn: bool = True,
                 use_moe: bool = False, num_experts_per_tok=_UNSET, n_routed_experts: int = None,
                 n_shared_experts: int = None, scoring_func: str = None, aux_loss_alpha: float = None,
                 seq_aux: bool = None, norm_topk_prob: bool = True, model_family: str = None, head_dim: int = None,
                 num_experts: int = None, moe_intermediate_size: int = None, router_aux_loss_coef: float = None,
                 **kwargs):
        mm2 = {k: v for k, v in zip(MINIMIND2_KEYS, (n_routed_experts, n_shared_experts, aux_loss_alpha, seq_aux,
                                                     scoring_func)) if v is not None}
        mm3 = {k: v for k, v in zip(MINIMIND3_KEYS, (head_dim, num_experts, moe_intermediate_size,
                                                     router_aux_loss_coef)) if v is not None}
        if model_family is None:
            model_family = "minimind3" if mm3 and not mm2 else "minimind2"
        if model_family not in FAMILIES:
            raise ValueError(f"model_family {model_family!r}: expected one of {', '.join(FAMILIES)}")
        self.model_family = model_family
        given = dict(hidden_size=hidden_size, num_key_value_heads=num_key_value_heads, rms_norm_eps=rms_norm_eps,
                     num_experts_per_tok=num_experts_per_tok)
        given = {k: (v if v is not _UNSET else family_defaults(model_family)[k]) for k, v in given.items()}
        hidden_size = given["hidden_size"]
        self.dropout = dropout
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.hidden_act = hidden_act
        self.hidden_size = hidden_size
        if intermediate_size is None:
            if model_family == "minimind3":
                intermediate_size = math.ceil(hidden_size * math.pi / 64) * 64
            else:
                # The original computes this inside the first FeedForward and writes it back into the config;
                # we compute it once here, so a saved config.json shows the same number.
                intermediate_size = 64 * ((int(hidden_size * 8 / 3) + 64 - 1) // 64)
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        kv = given["num_key_value_heads"]
        self.num_key_value_heads = kv if kv is not None else num_attention_heads
        self.vocab_size = vocab_size
        self.rms_norm_eps = given["rms_norm_eps"]
        self.rope_theta = rope_theta
        self.inference_rope_scaling = inference_rope_scaling
        rope_scaling = kwargs.pop("rope_scaling", None)
        self.rope_scaling = rope_scaling or (dict(YARN_ROPE_SCALING) if inference_rope_scaling else None)
        self.flash_attn = flash_attn
        self.use_moe = use_moe
        self.num_experts_per_tok = given["num_experts_per_tok"]
        self.norm_topk_prob = norm_topk_prob
        if model_family == "minimind3":
            if mm2:
                raise ValueError(f"a minimind3 config has no {', '.join(mm2)} (MiniMind2 fields)")
            self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
            self.num_experts = num_experts if num_experts is not None else 4
            self.moe_intermediate_size = moe_intermediate_size or intermediate_size
            self.router_aux_loss_coef = router_aux_loss_coef if router_aux_loss_coef is not None else 5e-4
            # the same quantities under MiniMind2's names, read by code that serves both families (not saved)
            self.n_routed_experts, self.n_shared_experts = self.num_experts, 0
            self.aux_loss_alpha, self.seq_aux, self.scoring_func = self.router_aux_loss_coef, False, "softmax"
        else:
            extra = {k: v for k, v in mm3.items() if not (k == "head_dim" and v == hidden_size // num_attention_heads)}
            if extra:
                raise ValueError(f"a MiniMind2 config has no {', '.join(extra)} (minimind-3 fields: use "
                                 "model_family='minimind3')")
            self.head_dim = hidden_size // num_attention_heads
            self.n_routed_experts = n_routed_experts if n_routed_experts is not None else 4
            self.n_shared_experts = n_shared_experts if n_shared_experts is not None else 1
            self.scoring_func = scoring_func if scoring_func is not None else "softmax"
            self.aux_loss_alpha = aux_loss_alpha if aux_loss_alpha is not None else 0.01
            self.seq_aux = seq_aux if seq_aux is not None else True
            self.moe_intermediate_size = intermediate_size
        tie_word_embeddings = kwargs.pop("tie_word_embeddings", True)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings  # after super(): transformers 4 resets it to True there

    # transformers 5 turns `rope_scaling` into its own `rope_parameters` scheme; MiniMind keeps the
    # original field name and value (None or the YaRN dict), so it is stored as a plain attribute.
    @property
    def rope_scaling(self):
        return self.__dict__.get("_minimind_rope_scaling")

    @rope_scaling.setter
    def rope_scaling(self, value):
        self.__dict__["_minimind_rope_scaling"] = value

    def to_dict(self):
        out = super().to_dict()
        out.pop("_minimind_rope_scaling", None)
        out["rope_scaling"] = self.rope_scaling
        out.pop("rope_parameters", None)
        # each family's own keys only: MiniMind2's config.json stays as before; minimind-3's is the original's
        drop = MINIMIND2_KEYS if self.model_family == "minimind3" else MINIMIND3_KEYS + ("model_family",)
        for key in drop:
            out.pop(key, None)
        return out


# ---- Helpers: RMSNorm, RoPE/YaRN ----
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, scale_in_float32: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.scale_in_float32 = scale_in_float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad) \
                and not torch.compiler.is_compiling():
            return _RMSNormWithBackward.apply(x, self.weight, self.eps, self.scale_in_float32)
        return rms_norm(x, self.weight, self.eps, self.scale_in_float32)


def rms_norm(x, weight, eps, scale_in_float32):
    """The family's RMSNorm (mean of squares in float32). Under autocast the result leaves in autocast's dtype:
    every consumer is a projection that autocast would cast it to that dtype anyway (q/k/v, gate/up, the
    output layer, the MoE router), so the values they see are the same, and the float32 copy and one cast
    per consumer are saved."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if scale_in_float32:  # minimind-3: scale in float32, then cast (x's dtype out)
        out = (weight * normed).type_as(x)
    else:                 # MiniMind2: normalise in float32, cast back to x's dtype, then scale
        out = weight * normed.type_as(x)
    device = x.device.type
    return out.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else out


class _RMSNormWithBackward(torch.autograd.Function):
    """rms_norm's forward (the same ops) with a closed-form backward that needs only the input: autograd's own
    keeps the float32 input, the normalised output and the rsqrt for its six elementwise steps (bench_memory.py
    counts the activations saved, bench_cpu_step.py times a step with either). With n = x r, r = (mean(x^2) + eps)^-1/2 and gn = dL/dn = g w: dL/dx = r (gn - n mean(gn n)), dL/dw = sum g n
    (computed in float32; tests/test_output_loss.py compares both with autograd's)."""

    @staticmethod
    def forward(ctx, x, weight, eps, scale_in_float32):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return rms_norm(x, weight, eps, scale_in_float32)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
        normed = xf * rstd
        g = grad_out.float()
        grad_normed = g * weight.float()
        grad_x = (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True)).mul_(rstd)
        grad_w = (g * normed).reshape(-1, normed.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x.to(x.dtype), None if grad_w is None else grad_w.to(weight.dtype), None, None


def make_norm(dim: int, config) -> RMSNorm:
    """The RMSNorm of `config`'s family."""
    return RMSNorm(dim, eps=config.rms_norm_eps, scale_in_float32=config.model_family == "minimind3")


def precompute_freqs_cis(dim: int, end: int = 32768, rope_base: float = 1e6, rope_scaling: dict = None):
    """cos/sin tables [end, dim] in the half-split layout, optionally with YaRN frequency scaling.

    YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension", eq. 17-19): dimensions whose
    wavelength is short compared with the original context keep their frequency, long ones are divided
    by `factor`, with a linear ramp between the dimension indices given by beta_fast and beta_slow.
    """
    freqs = 1.0 / (rope_base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    attn_factor = 1.0
    if rope_scaling is not None:
        orig_max = rope_scaling.get("original_max_position_embeddings", 2048)
        factor = rope_scaling.get("factor", 16)
        beta_fast, beta_slow = rope_scaling.get("beta_fast", 32.0), rope_scaling.get("beta_slow", 1.0)
        attn_factor = rope_scaling.get("attention_factor", 1.0)
        if end / orig_max > 1.0:
            def inv_dim(b):  # the dimension index whose wavelength fits b times into orig_max
                return (dim * math.log(orig_max / (b * 2 * math.pi))) / (2 * math.log(rope_base))
            low = max(math.floor(inv_dim(beta_fast)), 0)
            high = min(math.ceil(inv_dim(beta_slow)), dim // 2 - 1)
            ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001), 0, 1)
            freqs = freqs * (1 - ramp + ramp / factor)
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    freqs_cos = torch.cat([torch.cos(freqs), torch.cos(freqs)], dim=-1) * attn_factor
    freqs_sin = torch.cat([torch.sin(freqs), torch.sin(freqs)], dim=-1) * attn_factor
    return freqs_cos, freqs_sin


@functools.lru_cache(maxsize=8)
def _rope_tables(dim: int, end: int, rope_base: float, rope_scaling_json, device: str):
    scaling = json.loads(rope_scaling_json) if rope_scaling_json is not None else None
    return precompute_freqs_cis(dim=dim, end=end, rope_base=rope_base, rope_scaling=scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q: (B, T, H, D), k: (B, T, KV, D), cos/sin: (B or 1, T, D) in float32.

    Half-precision q/k are promoted by the float32 tables, so the rotation runs in float32; the result is cast
    back to q's and k's own dtype, so that a float16/bfloat16 model hands SDPA q, k and v of one dtype. In
    float32 the cast is a no-op; under autocast it is the cast SDPA's autocast used to apply (same values and
    gradients).
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return ((q * cos) + (rotate_half(q) * sin)).to(q.dtype), ((k * cos) + (rotate_half(k) * sin)).to(k.dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KV, T, D) -> (B, KV*n_rep, T, D); head j uses kv head j // n_rep (= repeat_interleave)."""
    if n_rep == 1:
        return x
    bs, n_kv, slen, hd = x.shape
    return x[:, :, None].expand(bs, n_kv, n_rep, slen, hd).reshape(bs, n_kv * n_rep, slen, hd)


class MiniMindCache:
    """Key/value cache for generation, layout (B, KV, T, D) per layer, post-RoPE.

    Storage grows geometrically, so appending a token costs O(1) amortised instead of the
    O(T) torch.cat of the original. `update` returns views of the filled part.
    """
    is_compileable = False
    is_croppable = True

    def __init__(self, num_layers: int = 0):
        self.keys, self.values, self.length = [], [], []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length[layer_idx] if layer_idx < len(self.length) else 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        if layer_idx == len(self.keys):
            self.keys.append(None), self.values.append(None), self.length.append(0)
        start, new = self.length[layer_idx], k.shape[2]
        buf_k, buf_v = self.keys[layer_idx], self.values[layer_idx]
        if buf_k is None or start + new > buf_k.shape[2] or buf_k.shape[0] != k.shape[0]:
            capacity = max(2 * (start + new), 64)
            grown_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            grown_v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            if start:
                grown_k[:, :, :start] = buf_k[:, :, :start]
                grown_v[:, :, :start] = buf_v[:, :, :start]
            buf_k, buf_v = self.keys[layer_idx], self.values[layer_idx] = grown_k, grown_v
        buf_k[:, :, start:start + new] = k
        buf_v[:, :, start:start + new] = v
        self.length[layer_idx] = start + new
        return buf_k[:, :, :start + new], buf_v[:, :, :start + new]

    def crop(self, max_length: int):
        if max_length < 0:
            max_length = self.get_seq_length() + max_length
        self.length = [min(n, max_length) for n in self.length]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for i in range(len(self.keys)):
            self.keys[i] = self.keys[i].index_select(0, beam_idx.to(self.keys[i].device))
            self.values[i] = self.values[i].index_select(0, beam_idx.to(self.values[i].device))

    def to_legacy(self):
        """The original's format: a list of (k, v), each (B, T, KV, D)."""
        return [(k[:, :, :n].transpose(1, 2), v[:, :, :n].transpose(1, 2))
                for k, v, n in zip(self.keys, self.values, self.length)]

    @classmethod
    def from_legacy(cls, past):
        cache = cls()
        for i, (k, v) in enumerate(past):
            cache.update(k.transpose(1, 2), v.transpose(1, 2), i)
        return cache


# ---- The output layer's training loss without its logits ----
# Token-mean cross-entropy of an output layer without its logits tensor: `linear_cross_entropy(h, W, targets)`
# equals `F.cross_entropy((h @ W.T).float(), targets)`, forward and backward, but works through the tokens a
# chunk at a time and computes the gradients of h and W during the forward (the loss is a training step's
# last op), so the (tokens x vocab) logits, their log-softmax, its gradient and the zero-filled gradient of
# nll_loss never exist at full size (bench/bench_cpu_step.py times a step with and without it).
#
# Precision follows autocast as the plain path does: the matmuls run in the autocast dtype (inputs cast as
# autocast casts them), the log-softmax in float32, the gradient of the logits cast back to the matmul dtype.

CE_CHUNK = 256   # tokens per chunk: a 256 x 6,400 float32 block (6.5 MB) is about the L2/L3 sweet spot measured on CPU


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, chunk):
        n, (vocab, width) = hidden.shape[0], weight.shape
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # gradients in the inputs' own dtypes (float32 under autocast: no cast of the whole weight gradient)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        half = dtype != torch.float32
        w = weight.to(dtype)                                           # the cast autocast would make
        # blocks reused by every chunk: a fresh multi-MB tensor per chunk costs its page faults again (CPU)
        rows = min(chunk, n)
        block = hidden.new_empty(rows, vocab, dtype=torch.float32)
        block_half = hidden.new_empty(rows, vocab, dtype=dtype) if half else None
        part_h = hidden.new_empty(rows, width, dtype=dtype) if half and need_h else None
        part_w = w.new_empty(vocab, width) if half and need_w else None
        part_w32 = torch.empty_like(grad_w) if half and need_w else None   # its float32 copy, added to grad_w
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                h, t = hidden[s:s + chunk].to(dtype), targets[s:s + chunk, None]
                c = len(h)
                logits = block[:c]
                if half:                                               # the matmul in the half dtype, as autocast
                    torch.mm(h, w.t(), out=block_half[:c])
                    logits.copy_(block_half[:c])
                else:
                    torch.mm(h, w.t(), out=logits)
                top = logits.amax(dim=-1, keepdim=True)
                picked = logits.gather(1, t).sub_(top)
                g = logits.sub_(top).exp_()                            # one exp pass, in place
                norm = g.sum(dim=-1, keepdim=True)
                total += (norm.log() - picked).sum()                    # logsumexp - logit of the target
                # d(mean CE)/d logits = (softmax - onehot) / n
                g.mul_(1.0 / (norm * n)).scatter_add_(1, t, g.new_full((c, 1), -1.0 / n))
                if half:
                    g = block_half[:c].copy_(g)
                if need_h:
                    if half:
                        grad_h[s:s + c] = torch.mm(g, w, out=part_h[:c])
                    else:
                        torch.mm(g, w, out=grad_h[s:s + c])
                if need_w:
                    if half:
                        grad_w += part_w32.copy_(torch.mm(g.t(), h, out=part_w))
                    else:
                        grad_w.addmm_(g.t(), h)
        ctx.grads, ctx.weight_dtype = (grad_h, grad_w), weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.grads
        del ctx.grads
        if grad_out.item() != 1.0:      # 1/accumulation, or a loss scale: applied to the float32 gradients
            grad_h = None if grad_h is None else grad_h.mul_(grad_out)
            grad_w = None if grad_w is None else grad_w.mul_(grad_out)
        return grad_h, None if grad_w is None else grad_w.to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CE_CHUNK) -> torch.Tensor:
    """hidden (N, C), weight (V, C), targets (N,) int64 in [0, V) or -100 (ignored, as F.cross_entropy's
    ignore_index) -> the mean cross-entropy over the others (float32 scalar).
    Under autocast the matmuls run in its dtype (hidden and weight cast as autocast would cast them)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    if bool((targets < 0).any()):       # ignore_index -100 (a fixed-shape batch): the mean over the others
        keep = targets >= 0
        hidden, targets = hidden[keep], targets[keep]
    if hidden.shape[0] == 0 or not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        with torch.autocast(device, enabled=False):   # nothing to save: the plain computation
            return F.cross_entropy((hidden.to(dtype) @ weight.to(dtype).t()).float(), targets)
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk)


# ---- Attention ----
class PackedSpans(tuple):
    """The attention "mask" of packed rows on CPU: per row, the (start, end) of each sample. Attention then runs
    sample by sample (causal SDPA on each span), so the cross-sample blocks that a block-diagonal mask would
    compute and throw away (most of a 512-token row that holds ten short samples) are never computed."""


def packed_spans(position_ids: torch.Tensor, bsz: int) -> PackedSpans:
    """Samples start where position_ids restart at 0 (a row may also begin inside a sample)."""
    seq_len = position_ids.shape[-1]
    cuts = [[0] for _ in range(bsz)]
    for b, t in (position_ids.expand(bsz, -1)[:, 1:] == 0).nonzero().tolist():
        cuts[b].append(t + 1)
    return PackedSpans(tuple(zip(c, c[1:] + [seq_len])) for c in cuts)


PACKED_ATTENTION = None   # None = packed_kernel() decides; "spans", "varlen", "flex" or "mask" force one (tests)


def _find_varlen_kernel():
    """("flash_attn", flash_attn_varlen_func) when the flash-attn package is installed, else ("torch",
    torch.nn.attention.varlen.varlen_attn) where this torch has it, else None. Both run flash attention over
    concatenated sequences (cu_seqlens), CUDA and fp16/bf16 only."""
    import importlib.util
    if importlib.util.find_spec("flash_attn") is not None:
        try:
            from flash_attn import flash_attn_varlen_func
            return "flash_attn", flash_attn_varlen_func
        except Exception:     # built for another torch or CUDA: torch's own kernel then
            pass
    try:
        from torch.nn.attention.varlen import varlen_attn
        return "torch", varlen_attn
    except ImportError:
        return None


try:
    from torch.nn.attention.flex_attention import create_block_mask as _create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
    _FLEX = (_flex_attention, _create_block_mask)
except ImportError:   # pragma: no cover - torch < 2.5
    _FLEX = None
_VARLEN = _find_varlen_kernel()      # found at import: the forward (which torch.compile traces) only reads them


def varlen_kernel():
    """The varlen flash-attention kernel, (kind, function), or None (see _find_varlen_kernel)."""
    return _VARLEN


def flex_kernel():
    """(flex_attention, create_block_mask), or None on a torch without FlexAttention."""
    return _FLEX


_FLASH_CAPABLE = {}


@getattr(torch.compiler, "assume_constant_result", lambda fn: fn)   # a constant for torch.compile's tracing
def flash_capable(index: int) -> bool:
    """Whether CUDA device `index` runs flash attention (Ampere, sm80, or newer): varlen there; T4/V100 (fp16
    with a GradScaler) take FlexAttention."""
    if index not in _FLASH_CAPABLE:
        _FLASH_CAPABLE[index] = torch.cuda.get_device_capability(index) >= (8, 0)
    return _FLASH_CAPABLE[index]


def packed_kernel(x: torch.Tensor, dtype: torch.dtype, dropout: float, head_dim: int = 64) -> str:
    """How packed rows attend. CPU: "spans" (sample by sample; a kernel call is cheap there), or "mask" under
    torch.compile. CUDA: "varlen" for fp16/bf16 on sm80+ (flash attention over the concatenated samples), else "flex"
    (FlexAttention with a document mask: any dtype); "mask" (a dense block-diagonal mask, SDPA's math kernel)
    only with attention dropout, on other accelerators (MPS) or on a torch that has neither. None of the fused
    ones computes the cross-sample blocks."""
    if PACKED_ATTENTION is not None:
        return PACKED_ATTENTION
    if x.device.type == "cpu":
        return "mask" if torch.compiler.is_compiling() else "spans"
    if x.device.type != "cuda" or dropout > 0:
        return "mask"
    if dtype in (torch.float16, torch.bfloat16) and varlen_kernel() is not None and head_dim % 8 == 0 \
            and head_dim <= 256 and flash_capable(x.device.index or 0):
        return "varlen"
    return "flex" if flex_kernel() is not None else "mask"


class DocumentMask:
    """The attention "mask" of packed rows for a fused kernel. Samples start where position_ids restart at 0
    (and at every row's first column). "varlen": cu_seqlens (int32, the start of each sample in the flattened
    B x T tokens, then B x T; padded to `segments` + 1 entries with empty samples, so the shape is fixed for
    torch.compile) and max_seqlen (the row width, an upper bound). "flex": a BlockMask of "same sample and not
    in the future". Built on the device without a host sync."""

    def __init__(self, kind: str, position_ids: torch.Tensor, bsz: int, segments: int):
        self.kind = kind
        pos = position_ids.expand(bsz, -1)
        seq_len = pos.shape[1]
        starts = pos == 0
        starts[:, 0] = True                                       # a row may also begin inside a sample
        self.max_seqlen = seq_len
        if kind == "varlen":
            total = bsz * seq_len
            first = torch.nonzero_static(starts.reshape(-1), size=segments, fill_value=total).reshape(-1)
            self.cu_seqlens = torch.cat([first, first.new_full((1,), total)]).to(torch.int32)
        else:
            doc = starts.cumsum(-1)                                # (B, T): the sample of each position
            def same_sample_causal(b, h, q, kv):
                return (doc[b, q] == doc[b, kv]) & (q >= kv)
            create_block_mask = flex_kernel()[1]
            self.block_mask = create_block_mask(same_sample_causal, bsz, None, seq_len, seq_len,
                                                device=position_ids.device)


def packed_segments(position_ids: torch.Tensor, bsz: int, packed) -> int:
    """The cu_seqlens capacity: `packed` when the caller counted the samples (the trainers' collate: row starts
    plus restarts, rounded up to a power of two under --use_compile 1 so that the shape rarely changes; the
    extra entries are empty samples), else counted here (one host sync)."""
    if type(packed) is int and packed > 1:
        return packed
    starts = position_ids.expand(bsz, -1) == 0
    return int(starts[:, 1:].sum()) + bsz


def varlen_attention(xq, xk, xv, mask: DocumentMask, n_rep: int) -> torch.Tensor:
    """(N, H, D) queries and (N, KV, D) keys/values of the flattened packed rows -> (N, H, D), causal inside
    each sample of mask.cu_seqlens."""
    kind, fn = varlen_kernel()
    cu, longest = mask.cu_seqlens, mask.max_seqlen
    if kind == "flash_attn":                       # GQA natively
        return fn(xq, xk, xv, cu, cu, longest, longest, causal=True)
    params = _varlen_params(fn)
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}   # torch >= 2.11 / 2.10
    if n_rep > 1:
        if "enable_gqa" in params:
            causal["enable_gqa"] = True
        else:
            xk, xv = (t.repeat_interleave(n_rep, dim=1) for t in (xk, xv))
    return fn(xq, xk, xv, cu, cu, longest, longest, **causal)


_VARLEN_PARAMS = {}


def _varlen_params(fn) -> frozenset:
    """fn's parameter names (computed once per function, before any compiled forward reads them)."""
    if fn not in _VARLEN_PARAMS:
        import inspect
        _VARLEN_PARAMS[fn] = frozenset(inspect.signature(fn).parameters)
    return _VARLEN_PARAMS[fn]


if _VARLEN is not None and _VARLEN[0] == "torch":
    _varlen_params(_VARLEN[1])


_COMPILED_FLEX = {}


def flex_attention(xq, xk, xv, mask: DocumentMask, n_rep: int) -> torch.Tensor:
    """(B, H, T, D) / (B, KV, T, D) -> (B, H, T, D) through FlexAttention with mask.block_mask."""
    fn = flex_kernel()[0]
    if xq.device.type != "cpu" and not torch.compiler.is_compiling():   # eager flex is a reference loop
        if "fn" not in _COMPILED_FLEX:
            _COMPILED_FLEX["fn"] = torch.compile(fn)
        fn = _COMPILED_FLEX["fn"]
    return fn(xq, xk, xv, block_mask=mask.block_mask, enable_gqa=n_rep > 1)


def cpu_attention_in_fp32(xq: torch.Tensor) -> bool:
    """Half-precision attention that will be differentiated on CPU runs in float32: the CPU's flash-attention
    backward in bf16 is several times slower than in fp32 (bench/bench_cpu_step.py times a step with either),
    while q, k and v are small (tokens x hidden). Inputs are the
    bf16 values autocast would have given SDPA, only the kernel's arithmetic is wider; inference keeps its dtype."""
    return xq.device.type == "cpu" and xq.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()


class Attention(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        assert self.n_heads % self.n_kv_heads == 0
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.qk_norm = config.model_family == "minimind3"
        if self.qk_norm:  # minimind-3 (as Qwen3): RMSNorm over each head's queries and keys, before RoPE
            self.q_norm = make_norm(self.head_dim, config)
            self.k_norm = make_norm(self.head_dim, config)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.flash = config.flash_attn

    def forward(self, x, position_embeddings, attn_mask=None, cache=None):
        """x: (B, T, C). attn_mask: None (plain causal) or bool (B, 1, T, S), True = may attend."""
        bsz, seq_len, _ = x.shape
        xq = self.q_proj(x).view(bsz, seq_len, self.n_heads, self.head_dim)     # (B, T, H, D)
        xk = self.k_proj(x).view(bsz, seq_len, self.n_kv_heads, self.head_dim)  # (B, T, KV, D)
        xv = self.v_proj(x).view(bsz, seq_len, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            xq, xk = self.q_norm(xq), self.k_norm(xk)
        xq, xk = apply_rotary_pos_emb(xq, xk, *position_embeddings)
        if isinstance(attn_mask, DocumentMask) and attn_mask.kind == "varlen":   # packed rows, flattened
            out = varlen_attention(xq.flatten(0, 1), xk.flatten(0, 1), xv.flatten(0, 1), attn_mask, self.n_rep)
            return self.resid_dropout(self.o_proj(out.reshape(bsz, seq_len, -1)))
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)  # (B, H|KV, T, D)
        if cache is not None:
            xk, xv = cache.update(xk, xv, self.layer_idx)                       # (B, KV, S, D)
        dropout_p = self.dropout if self.training else 0.0
        dtype = xq.dtype
        if cpu_attention_in_fp32(xq):   # see there: fp32 kernels, a faster backward on CPU
            xq, xk, xv = xq.float(), xk.float(), xv.float()
        with torch.autocast(xq.device.type, enabled=False) if dtype != xq.dtype else contextlib.nullcontext():
            out = self.attend(xq, xk, xv, attn_mask, seq_len, dropout_p)
        out = out.to(dtype).transpose(1, 2).reshape(bsz, seq_len, -1)           # (B, T, H*D)
        return self.resid_dropout(self.o_proj(out))

    def attend(self, xq, xk, xv, attn_mask, seq_len, dropout_p):
        """(B, H, T, D) queries, (B, KV, S, D) keys and values -> (B, H, T, D)."""
        if isinstance(attn_mask, PackedSpans):  # packed rows: plain causal attention inside each sample
            # unbind/split (not slicing): their backward is one stack/cat, not a zero-filled copy per sample
            rows = []
            for q, k, v, row in zip(xq.unbind(0), xk.unbind(0), xv.unbind(0), attn_mask):
                sizes = [e - s for s, e in row]
                rows.append(torch.cat([F.scaled_dot_product_attention(
                    qs[None], ks[None], vs[None], dropout_p=dropout_p, is_causal=True, enable_gqa=self.n_rep > 1)[0]
                    for qs, ks, vs in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1))], dim=1))
            out = torch.stack(rows)
        elif isinstance(attn_mask, DocumentMask):
            out = flex_attention(xq, xk, xv, attn_mask, self.n_rep)
        elif self.flash:
            # a plain causal mask only when the queries start at key 0; with a cache and no padding
            # a single query sees every key, otherwise the explicit mask carries causality
            is_causal = attn_mask is None and xk.shape[2] == seq_len and seq_len > 1
            out = F.scaled_dot_product_attention(xq, xk, xv, attn_mask=attn_mask, dropout_p=dropout_p,
                                                 is_causal=is_causal, enable_gqa=self.n_rep > 1)
        else:
            out = self.eager_attention(xq, xk, xv, attn_mask)
        return out

    def eager_attention(self, xq, xk, xv, attn_mask):
        """Reference path: explicit scores, additive masks, fp32 softmax (as the original's slow path)."""
        seq_len, total = xq.shape[2], xk.shape[2]
        xk, xv = repeat_kv(xk, self.n_rep), repeat_kv(xv, self.n_rep)
        scores = (xq @ xk.transpose(-2, -1)) / math.sqrt(self.head_dim)          # (B, H, T, S)
        if attn_mask is None:
            causal = torch.full((seq_len, total), float("-inf"), device=scores.device)
            scores = scores + torch.triu(causal, diagonal=total - seq_len + 1)
        else:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        scores = self.attn_dropout(F.softmax(scores.float(), dim=-1).type_as(xq))
        return scores @ xv


# ---- FeedForward / MoE ----
class FeedForward(nn.Module):
    def __init__(self, config: MiniMindConfig, intermediate_size: int = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.dropout = nn.Dropout(config.dropout if config.model_family == "minimind2" else 0.0)  # minimind-3 has none
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.dropout(self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class MoEGate(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.switch_aux = config.model_family == "minimind3"
        self.scoring_func = config.scoring_func
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty((self.n_routed_experts, config.hidden_size)))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, hidden_states):
        """(B, T, C) -> topk_idx (N, k), topk_weight (N, k), aux_loss (scalar tensor), N = B*T."""
        bsz, seq_len, h = hidden_states.shape
        logits = F.linear(hidden_states.view(-1, h), self.weight)                # (N, E)
        if self.scoring_func != "softmax":
            raise NotImplementedError(f"unsupported scoring function for MoE gating: {self.scoring_func}")
        scores = logits.softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob and (self.top_k > 1 or self.switch_aux):  # minimind-3 also for top-1 (weight p/(p+1e-20))
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        aux_loss = scores.new_zeros(())
        if self.training and self.alpha > 0.0 and self.switch_aux:
            # minimind-3: the Switch Transformer loss (Fedus et al. 2021, eq. 4) over all tokens of the batch,
            # alpha * E * sum_{slot, e} f_{slot,e} * P_e, f = share of tokens whose slot picks e, P = mean probability
            load = F.one_hot(topk_idx, num_classes=self.n_routed_experts).float().mean(0)    # (k, E)
            aux_loss = (load * scores.mean(0)).sum() * self.n_routed_experts * self.alpha
        elif self.training and self.alpha > 0.0:
            # Load-balancing loss of DeepSeekMoE (Dai et al. 2024, eq. 12-14): sum_e f_e * P_e, where f_e is
            # the expert's share of selections (1 = uniform) and P_e its mean routing probability.
            n_exp, k = self.n_routed_experts, self.top_k
            idx = topk_idx.view(bsz, -1)
            # With packed rows "sequence" means the whole row, not each sample in it: the loss is a
            # load-balancing regulariser over the tokens routed together, not a per-sample quantity.
            if self.seq_aux:  # per sequence (row), then averaged over the batch
                ce = torch.zeros(bsz, n_exp, device=hidden_states.device)
                ce.scatter_add_(1, idx, torch.ones(bsz, seq_len * k, device=hidden_states.device))
                ce = ce / (seq_len * k / n_exp)
                aux_loss = (ce * scores.view(bsz, seq_len, -1).mean(dim=1)).sum(dim=1).mean() * self.alpha
            else:  # over all tokens of the batch
                fi = F.one_hot(topk_idx.view(-1), num_classes=n_exp).float().mean(0) * n_exp
                aux_loss = (scores.mean(0) * fi).sum() * self.alpha
        return topk_idx, topk_weight, aux_loss


class MOEFeedForward(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        if config.model_family == "minimind3":  # gate first, as the original's state-dict order
            self.gate = MoEGate(config)
        self.experts = nn.ModuleList([FeedForward(config, config.moe_intermediate_size)
                                      for _ in range(config.n_routed_experts)])
        if config.model_family == "minimind2":
            self.gate = MoEGate(config)
        if config.n_shared_experts > 0:
            self.shared_experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_shared_experts)])
        self.aux_loss = None

    def forward(self, x):
        identity = x
        bsz, seq_len, h = x.shape
        topk_idx, topk_weight, aux_loss = self.gate(x)
        y = self.dispatch(x.view(-1, h), topk_idx, topk_weight).view(bsz, seq_len, h)
        if self.config.n_shared_experts > 0:
            for expert in self.shared_experts:
                y = y + expert(identity)
        self.aux_loss = aux_loss
        return y

    def dispatch(self, x, topk_idx, topk_weight):
        """One differentiable dispatch for training and inference: sort the (token, slot) pairs by
        expert, run each expert once on its contiguous block, then add the weighted outputs back."""
        n_tok, k = topk_idx.shape
        flat_idx = topk_idx.view(-1)                                              # (N*k,)
        order = flat_idx.argsort(stable=True)
        # one host sync per layer, and under torch.compile one graph break per layer: the experts' block sizes
        # are data (a static alternative runs every expert on every token, E/k times the FLOPs)
        counts = torch.bincount(flat_idx, minlength=len(self.experts)).tolist()
        token_of = order // k
        xs = x[token_of]                                                          # (N*k, C) grouped by expert
        outs, start, unused = [], 0, None
        for expert, count in zip(self.experts, counts):
            if count == 0:
                if self.training:  # keep every expert in the graph so DDP sees a gradient for it
                    touch = sum(p.sum() for p in expert.parameters()) * 0.0
                    unused = touch if unused is None else unused + touch
                continue
            outs.append(expert(xs[start:start + count]))
            start += count
        ys = torch.cat(outs) * topk_weight.view(-1)[order].unsqueeze(-1).to(outs[0].dtype)
        y = ys.new_zeros(n_tok, x.shape[-1]).index_add_(0, token_of, ys)
        return y if unused is None else y + unused.to(y.dtype)


# ---- Block and model ----
class MiniMindBlock(nn.Module):
    def __init__(self, layer_id: int, config: MiniMindConfig):
        super().__init__()
        self.self_attn = Attention(config, layer_idx=layer_id)
        self.layer_id = layer_id
        self.input_layernorm = make_norm(config.hidden_size, config)
        self.post_attention_layernorm = make_norm(config.hidden_size, config)
        self.mlp = FeedForward(config) if not config.use_moe else MOEFeedForward(config)

    def forward(self, hidden_states, position_embeddings, attn_mask=None, cache=None):
        h = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attn_mask, cache) + hidden_states
        return h + self.mlp(self.post_attention_layernorm(h))


class MiniMindModel(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.vocab_size, self.num_hidden_layers = config.vocab_size, config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([MiniMindBlock(i, config) for i in range(self.num_hidden_layers)])
        self.norm = make_norm(config.hidden_size, config)
        freqs_cos, freqs_sin = self.rope_tables()
        self.register_buffer("freqs_cos", freqs_cos, persistent=False)
        self.register_buffer("freqs_sin", freqs_sin, persistent=False)

    def rope_tables(self):
        """Copies of the cos/sin tables of this config (computed once per process for each config: a 32k-row
        table costs ~0.1 s, and models are built and re-initialised often)."""
        c = self.config
        scaling = json.dumps(c.rope_scaling, sort_keys=True) if c.rope_scaling is not None else None
        tables = _rope_tables(c.head_dim, c.max_position_embeddings, c.rope_theta, scaling,
                              str(torch.get_default_device()))     # meta while transformers builds an empty model
        return tuple(t.clone() for t in tables)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, position_ids=None,
                packed=None, **kwargs):
        """Returns (hidden_states (B, T, C) after the final norm, cache or None, aux_loss). `packed`: whether
        position_ids restart inside a row (a trainer's collate knows it on the host; None = look, one host sync);
        an int > 1 also counts the samples (row starts + restarts, or more: the room of the varlen kernel's
        cu_seqlens on CUDA; fewer would merge the last samples)."""
        bsz, seq_len = input_ids.shape
        cache = past_key_values
        if isinstance(cache, (list, tuple)):
            cache = MiniMindCache.from_legacy(cache) if len(cache) and cache[0] is not None else None
        if cache is None and use_cache:
            cache = MiniMindCache()
        past_len = cache.get_seq_length() if cache is not None else 0
        total = past_len + seq_len

        if attention_mask is not None and attention_mask.dim() == 4:
            # a ready (B, 1, T, S) bool mask, True = may attend, with position_ids given: used as is, no host sync
            # (the engine's static decode step, which a CUDA graph replays)
            if position_ids is None or attention_mask.dtype != torch.bool:
                raise ValueError("a 4D attention_mask must be bool (True = may attend) and come with position_ids")
            return self.run_layers(input_ids, position_ids, attention_mask, cache, use_cache)
        padded = attention_mask is not None and not bool(attention_mask[:, -total:].all())
        # packed rows (several samples per row, transformers' "position_ids packing"): positions restart at 0
        # at each sample's first token, and each sample attends only to itself
        packed = (position_ids is not None and past_len == 0 and not padded and seq_len > 1
                  and (bool((position_ids[:, 1:] == 0).any()) if packed is None else packed))
        if position_ids is None:
            if padded:  # left padding must not shift positions: count real tokens only
                position_ids = (attention_mask[:, -total:].long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
            else:
                position_ids = torch.arange(past_len, total, device=input_ids.device).unsqueeze(0)
        attn_mask = None
        if padded:
            q_pos = torch.arange(past_len, total, device=input_ids.device)
            k_pos = torch.arange(total, device=input_ids.device)
            causal = k_pos[None, :] <= q_pos[:, None]                              # (T, S)
            attn_mask = causal[None] & attention_mask[:, -total:].bool()[:, None, :]  # (B, T, S)
            attn_mask = (attn_mask | (k_pos[None, :] == q_pos[:, None])[None]).unsqueeze(1)  # a pad query sees itself
        elif packed and self.config.flash_attn and (kind := packed_kernel(
                input_ids, self.attention_dtype(), self.config.dropout if self.training else 0.0,
                self.config.head_dim)) != "mask" and (cache is None or kind == "spans"):   # fused: no KV cache
            if kind == "spans":
                attn_mask = packed_spans(position_ids, bsz)
            else:
                attn_mask = DocumentMask(kind, position_ids, bsz, packed_segments(position_ids, bsz, packed))
        elif packed:  # block-diagonal causal: same sample (restart count) and not in the future
            sample = (position_ids == 0).cumsum(-1)                                   # (B|1, T)
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=input_ids.device).tril()
            attn_mask = ((sample[:, :, None] == sample[:, None, :]) & causal).unsqueeze(1)  # (B|1, 1, T, T)
        elif seq_len > 1 and past_len > 0:  # chunked prefill on top of a cache
            q_pos = torch.arange(past_len, total, device=input_ids.device)
            attn_mask = (torch.arange(total, device=input_ids.device)[None, :] <= q_pos[:, None])[None, None]

        return self.run_layers(input_ids, position_ids, attn_mask, cache, use_cache)

    def attention_dtype(self) -> torch.dtype:
        """The dtype q, k and v reach attention in: autocast's, else the weights'."""
        device = self.embed_tokens.weight.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.embed_tokens.weight.dtype

    def run_layers(self, input_ids, position_ids, attn_mask, cache, use_cache):
        position_embeddings = (self.freqs_cos[position_ids], self.freqs_sin[position_ids])  # (B|1, T, D)
        hidden_states = self.dropout(self.embed_tokens(input_ids))
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, attn_mask, cache)
        hidden_states = self.norm(hidden_states)
        aux_loss = sum((layer.mlp.aux_loss for layer in self.layers if isinstance(layer.mlp, MOEFeedForward)),
                       hidden_states.new_zeros(()))
        return hidden_states, cache if use_cache else None, aux_loss


@dataclass
class MiniMindCausalLMOutput(CausalLMOutputWithPast):
    aux_loss: torch.FloatTensor = None


class MiniMindForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    _no_split_modules = ["MiniMindBlock"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True

    def __init__(self, config: MiniMindConfig = None):
        config = config or MiniMindConfig()
        super().__init__(config)
        self.model = MiniMindModel(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        if self.config.tie_word_embeddings or self.config.model_family == "minimind2":  # MiniMind2 always ties
            self.model.embed_tokens.weight = self.lm_head.weight
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """MiniMind2: PyTorch's default init, as fa82707 (which never ran an HF init); the tied embedding
        gets the Linear init U(+-1/sqrt(hidden)). minimind-3: N(0, 0.02) for every Linear and the embedding,
        as the original's newest code (transformers' init with its 0.02 fallback). Both rebuild the RoPE
        tables, which transformers leaves empty when it creates the model on the meta device."""
        if self.config.model_family == "minimind3" and isinstance(module, (nn.Linear, nn.Embedding, MoEGate)):
            init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, nn.Embedding):
            bound = 1 / math.sqrt(module.weight.shape[1])
            init.uniform_(module.weight, -bound, bound)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MoEGate):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, MiniMindModel):
            freqs_cos, freqs_sin = module.rope_tables()
            copy_ = getattr(init, "copy_", torch.Tensor.copy_)  # torch.nn.init (transformers 4) has no copy_
            copy_(module.freqs_cos, freqs_cos)
            copy_(module.freqs_sin, freqs_sin)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=False,
                logits_to_keep=0, labels=None, position_ids=None, logits_at=None, packed=None, loss_targets=None,
                **kwargs):
        """logits_at (training losses): flat indices into the batch x seq positions; logits are then computed
        for those positions only, shape (len(logits_at), vocab), so prompt and padding rows skip the output layer.
        loss_targets (with logits_at): the target of each of those positions; `loss` is then their token-mean
        cross-entropy and `logits` None (on CPU computed without the logits tensor: linear_cross_entropy)."""
        hidden_states, cache, aux_loss = self.model(input_ids, attention_mask, past_key_values, use_cache,
                                                    position_ids, packed)
        if logits_at is not None:
            hidden = hidden_states.flatten(0, 1).index_select(0, logits_at)
            if loss_targets is not None and hidden.device.type == "cpu" and not torch.compiler.is_compiling():
                loss = linear_cross_entropy(hidden, self.lm_head.weight, loss_targets)
                return MiniMindCausalLMOutput(loss=loss, past_key_values=cache, hidden_states=hidden_states,
                                              aux_loss=aux_loss)
            logits = self.lm_head(hidden)
            loss = None if loss_targets is None else F.cross_entropy(logits.float(), loss_targets)
            return MiniMindCausalLMOutput(loss=loss, logits=None if loss is not None else logits,
                                          past_key_values=cache, hidden_states=hidden_states, aux_loss=aux_loss)
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:  # shifted next-token loss, -100 = ignored (transformers convention)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return MiniMindCausalLMOutput(loss=loss, logits=logits, past_key_values=cache, hidden_states=hidden_states,
                                      aux_loss=aux_loss)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() would build a DynamicCache, which concatenates on every step; ours grows in place
        if (model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False
                and generation_config.cache_implementation is None):
            model_kwargs["past_key_values"] = MiniMindCache()
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def count_parameters(self) -> tuple:
        """(total, active) parameter counts; tied weights counted once, active = what one token uses."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        c = self.config
        if c.use_moe:
            per_expert = sum(p.numel() for p in self.model.layers[0].mlp.experts[0].parameters())
            inactive = c.num_hidden_layers * (c.n_routed_experts - c.num_experts_per_tok) * per_expert
        return total, total - inactive


def register_auto_classes():
    """Make AutoConfig / AutoModelForCausalLM know model_type "minimind" (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        AutoConfig.register("minimind", MiniMindConfig)
    except ValueError:
        pass
    try:
        AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM)
    except ValueError:
        pass


register_auto_classes()
