"""Helpers shared by the preference and RL stages (DPO, PPO, GRPO, SPO), written once: per-token
log-probs, rollouts, rewards, the RL flags, the prompts and the optimizer with the original's RL schedule.
The loop is trainer/core/loop.py, as for every stage; an RL stage passes a rollout function
(sampling, rewards, reference log-probs) and an update function (the loss).

    roll = rollout(policy, tokenizer, prompts, args, num_return_sequences=G)    # sampled by model/engine.py
    roll = rollout(policy, tokenizer, prompts, args, G, engine=engine)  # or by --rollout_engine (rollout_engine.py)
    logp, aux = completion_logps(policy, roll)       # (N, R) log-probs of the sampled tokens, masks honoured
    old = rollout_logps(policy, roll, needed)        # the sampler's log-probs (a server's), else the policy's
    rewards, stats = reward_fn(messages, roll.texts, references)                # (N,) floats

Layout of a rollout: `sequences` is (N, P + R): P prompt columns, left-padded so that every
completion starts at column P, then R sampled columns (R = the longest completion). `completion_mask`
(N, R) is 1 up to and including the first EOS; pad tokens follow it. Every forward pass over a rollout
passes `attention_mask` (the original omitted it in GRPO/SPO, so left pads were attended).
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dataset.scoring import ANSWER_PART, answer_correct, format_reward, think_reward
from model.engine import HF_TOP_K, SamplingParams
from model.loading import ROOT
from trainer.core.loop import unwrap
from trainer.core.rollout_engine import TorchRolloutEngine, add_rollout_args
from trainer.core.stage import resolve_data

MINIMIND3_TOP_P = 0.85   # the top-p of the original minimind-3 generate() that its RL rollouts sample with

ASSISTANT_START = "<|im_start|>assistant\n"   # where a prompt with add_generation_prompt opens the answer


# ---- log-probs ----
def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | prefix) for every position: (B, T, V), (B, T) -> (B, T) in fp32.

    cross_entropy computes the log-softmax row by row without keeping a (B, T, V) log-prob tensor
    for the backward pass next to the logits (the original materialised it with log_softmax+gather)."""
    b, t, v = logits.shape
    return -F.cross_entropy(logits.reshape(-1, v).float(), targets.reshape(-1), reduction="none").view(b, t)


def sequence_logps(logp: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Masked per-sequence log-prob: the mean over supervised tokens (the original's DPO) or the sum."""
    total = (logp * mask).sum(-1)
    if reduction == "sum":
        return total
    return total / mask.sum(-1).clamp_min(1e-8)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's masked tokens, then over sequences (the original's GRPO/SPO reduction)."""
    return ((x * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(ref - pi) - (ref - pi) - 1 >= 0 (Schulman, "Approximating
    KL divergence", 2020): unbiased for samples from pi and never negative."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


# ---- rollouts ----
def generation_header(prompt: str) -> str | None:
    """The tail of a chat-templated prompt from its last assistant start: ASSISTANT_START itself with MiniMind2's
    template, plus an empty (or open) think block with minimind-3's ('<think>\n\n</think>\n\n'). None when the
    prompt does not end by opening an assistant turn."""
    at = prompt.rfind(ASSISTANT_START)
    if at < 0 or "<|im_end|>" in prompt[at:] or "<|im_start|>" in prompt[at + 1:]:
        return None
    return prompt[at:]


def encode_prompts(tokenizer, prompts, max_len: int, device="cpu"):
    """Tokenise chat-templated prompts, left-padded; keep the LAST `max_len` tokens of each, so the
    generation prompt is never cut (the original PPO right-truncated it away). -> (ids, mask), (B, P)."""
    headers = [generation_header(p) for p in prompts]
    for p, h in zip(prompts, headers):
        if h is None:
            raise ValueError(f"RL prompts must be chat-templated and end with the assistant start {ASSISTANT_START!r} "
                             f"(apply_chat_template(..., add_generation_prompt=True)); this one ends with {p[-40:]!r}")
    header = max(len(tokenizer(h, add_special_tokens=False).input_ids) for h in set(headers))
    if max_len < header:
        raise ValueError(f"--max_seq_len {max_len} is shorter than the assistant header ({header} tokens)")
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False,
                    return_token_type_ids=False)
    return enc.input_ids[:, -max_len:].to(device), enc.attention_mask[:, -max_len:].to(device)


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(N, R) long mask: 1 up to and including the first EOS; every position when there is none."""
    is_eos = completion_ids == eos_id
    r = completion_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], r, dtype=torch.long))
    return (torch.arange(r, device=completion_ids.device)[None, :] <= first[:, None]).long()


@dataclass
class Rollout:
    sequences: torch.Tensor        # (N, P+R) left-padded prompt + sampled completion
    attention_mask: torch.Tensor   # (N, P+R) prompt mask, then completion_mask
    completion_mask: torch.Tensor  # (N, R) 1 up to and including the first EOS
    prompt_len: int                # P
    texts: list                    # decoded completions, special tokens skipped (as the original)
    clipped: torch.Tensor          # (N,) True where --max_gen_len was reached without an EOS
    sampler_logps: torch.Tensor = None   # (N, R) fp32 the rollout server's log-probs (nan: not given), or None

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len:]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)

    @property
    def last_index(self) -> torch.Tensor:
        """(N,) index of each completion's last token (its EOS, or R-1 when it was cut off)."""
        return self.lengths - 1

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The rollout of `rows` only (a PPO minibatch), with the same columns."""
        rows = rows.to(self.sequences.device)
        return Rollout(self.sequences[rows], self.attention_mask[rows], self.completion_mask[rows], self.prompt_len,
                       [self.texts[i] for i in rows.tolist()], self.clipped[rows.to(self.clipped.device)],
                       None if self.sampler_logps is None else self.sampler_logps[rows])


@torch.no_grad()
def rollout(model, tokenizer, prompts, args, num_return_sequences: int = 1, autocast_ctx=None,
            engine=None) -> Rollout:
    """Sample completions for a batch of prompts through `engine` (trainer/core/rollout_engine.py; default: the
    batching engine model/engine.py in this process, eval mode, so MoE computes no aux loss, and the run's
    autocast precision): temperature sampling over the 50 likeliest tokens, as the original's generate() call
    (minimind-3: also top-p 0.85, its newest generate's default).
    Each completion has its own seed drawn from torch's global RNG (whichever engine samples), so a seeded or
    resumed run samples the same rollouts. Copies of a prompt are contiguous: row i*G + j. engine.prepare runs
    first (a server's weights are synced when due)."""
    raw = unwrap(model)
    ids, mask = encode_prompts(tokenizer, prompts, args.max_seq_len, next(raw.parameters()).device)
    rows = [row[keep].tolist() for row, keep in zip(ids.cpu(), mask.cpu().bool()) for _ in range(num_return_sequences)]
    top_p = MINIMIND3_TOP_P if raw.config.model_family == "minimind3" else 1.0   # the newest generate's default
    params = [SamplingParams(max_tokens=args.max_gen_len, temperature=args.temperature, top_k=HF_TOP_K, top_p=top_p,
                             seed=seed) for seed in torch.randint(2 ** 62, (len(rows),)).tolist()]
    engine = engine or TorchRolloutEngine(model, tokenizer.eos_token_id, getattr(autocast_ctx, "fast_dtype", None))
    engine.prepare(model)
    outs = engine.generate(rows, params)
    p, r = ids.shape[1], max(len(o.ids) for o in outs)
    completions = torch.full((len(rows), r), tokenizer.pad_token_id, dtype=torch.long)
    for row, out in zip(completions, outs):
        row[:len(out.ids)] = torch.tensor(out.ids, dtype=torch.long)
    completions = completions.to(ids.device)
    cmask = completion_mask(completions, tokenizer.eos_token_id)
    texts = tokenizer.batch_decode([o.ids for o in outs], skip_special_tokens=True)
    clipped = ~(completions == tokenizer.eos_token_id).any(1)
    sequences = torch.cat([ids.repeat_interleave(num_return_sequences, 0), completions], 1)
    sampler_logps = None
    if any(o.logps is not None for o in outs):
        sampler_logps = torch.full((len(rows), r), math.nan)
        for row, out in zip(sampler_logps, outs):
            if out.logps is not None:
                row[:len(out.logps)] = torch.tensor(out.logps, dtype=torch.float)
        sampler_logps = sampler_logps.to(ids.device)
    return Rollout(sequences, torch.cat([mask.repeat_interleave(num_return_sequences, 0), cmask], 1), cmask, p, texts,
                   clipped, sampler_logps)


def completion_logps(model, roll: Rollout):
    """Per-token log-probs of the sampled completion under `model`, with the rollout's attention mask;
    only the R+1 last positions go through the LM head. -> ((N, R) fp32, MoE aux loss)."""
    r = roll.completion_mask.shape[1]
    out = model(roll.sequences, attention_mask=roll.attention_mask, logits_to_keep=r + 1)
    return token_logps(out.logits[:, :-1], roll.completion_ids), out.aux_loss


def rollout_logps(model, roll: Rollout, needed: bool):
    """The old (rollout-time) log-probs of a rollout's tokens, (N, R) or None: the rollout server's where it gave
    them (its weights lag the policy by up to --save_interval rollouts, which the ratio then corrects, as with the
    original's SGLang engine); elsewhere the policy's own, computed now only when `needed` (several updates per
    rollout, or PPO): else the update's own log-probs, detached, stand in (old_or: ratio 1, and the same numbers,
    since the policy has not moved since the rollout). Pads stay nan; old_or fills them."""
    server = roll.sampler_logps
    if not needed or (server is not None and not torch.isnan(server[roll.completion_mask.bool()]).any()):
        return server
    local = completion_logps(model, roll)[0]
    return local if server is None else torch.where(torch.isnan(server), local, server)


def old_or(old_logp, logp: torch.Tensor) -> torch.Tensor:
    """The old log-probs an update uses: stop_grad(logp) where `old_logp` is None or nan (ratio 1)."""
    return logp.detach() if old_logp is None else torch.where(torch.isnan(old_logp), logp.detach(), old_logp)


# ---- prompts ----
def rl_collate(batch):
    """A list of prompt dicts -> a dict of lists (prompts, references, messages)."""
    return {key: [sample[key] for sample in batch] for key in batch[0]}


# ---- rewards ----
class RewardModel:
    """A local reward model directory: InternLM2-style remote code with get_score(tokenizer, messages)
    (the original's internlm2-1_8b-reward), or any AutoModelForSequenceClassification with one label."""

    def __init__(self, path, device="cpu"):
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"reward model directory {path} not found (no config.json). Download "
                                    "internlm2-1_8b-reward next to the repository, pass --reward_model_path, or train "
                                    "without a reward model: --reward rule (verifiable answers and format rules).")
        dtype = torch.float16 if "cuda" in str(device) else torch.float32   # fp16 as the original, on GPU only
        config = AutoConfig.from_pretrained(path, trust_remote_code=True, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True, local_files_only=True)
        auto = AutoModel if "AutoModel" in (getattr(config, "auto_map", None) or {}) else AutoModelForSequenceClassification
        self.model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=True, local_files_only=True)
        self.model.to(device).eval().requires_grad_(False)
        self.device = device
        if not hasattr(self.model, "get_score"):
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _text(self, messages) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

    @torch.no_grad()
    def score(self, conversations) -> torch.Tensor:
        """One float per conversation (a list of {"role", "content"} ending with the assistant reply)."""
        if hasattr(self.model, "get_score"):
            return torch.tensor([float(self.model.get_score(self.tokenizer, c)) for c in conversations])
        enc = self.tokenizer([self._text(c) for c in conversations], return_tensors="pt", padding=True,
                             padding_side="right", truncation=True, add_special_tokens=False).to(self.device)
        return self.model(**enc).logits[:, 0].float().cpu()


class Rewards:
    """The reward of each response, as a (N,) tensor plus stats to log.

    --reward model: reward-model score clipped to [-3, 3]; with --reasoning 1 and an <answer> part,
                    0.4 * score(full reply) + 0.6 * score(answer only) (the original, spec 6.8)
    --reward rule:  rule_weight * (answer matches the row's reference)
    --reward mixed: both summed.  With --reasoning 1, the format reward (0 .. 1.5) is always added.
    think_rules (a minimind-3 policy, GRPO and PPO): the original's newest rules instead (dataset/scoring.py
    think_reward: length, thought length, one '</think>', repetition penalty; -1.75 .. 1.75) are added under every
    --reward, and the reward model scores the answer after '</think>' (no <answer> format, no 0.4/0.6 blend).
    `range` is the (low, high) the rewards can take (SPO's tracker normalises with it)."""

    def __init__(self, kind: str, reasoning: bool, rule_weight: float = 1.0, model_path=None, device="cpu",
                 think_rules: bool = False):
        self.kind, self.reasoning, self.rule_weight, self.think_rules = kind, reasoning, rule_weight, think_rules
        self.model = RewardModel(model_path, device) if kind in ("model", "mixed") else None
        low, high = (-3.0, 3.0) if self.model else (0.0, 0.0)
        high += rule_weight if kind in ("rule", "mixed") else 0.0
        shaping = (-1.75, 1.75) if think_rules else (0.0, 1.5) if reasoning else (0.0, 0.0)
        self.range = (low + shaping[0], high + shaping[1])

    def __call__(self, messages, responses, references):
        n = len(responses)
        rewards, answers = torch.zeros(n), list(responses)
        if self.think_rules:
            shaped = [think_reward(r) for r in responses]
            rewards += torch.tensor([s for s, _ in shaped])
            answers = [a for _, a in shaped]
        elif self.reasoning:
            rewards += torch.tensor([format_reward(r) for r in responses])
        has_ref = [bool(ref) for ref in references]
        correct = torch.tensor([answer_correct(r, ref) for r, ref in zip(responses, references)], dtype=torch.float)
        if self.kind in ("rule", "mixed"):
            if not any(has_ref):
                raise ValueError("--reward rule/mixed needs a reference answer per row (a top-level \"answer\" "
                                 "field, as in dataset/demo/rlaif.jsonl); this batch has none. Use --reward model.")
            rewards += self.rule_weight * correct
        if self.model is not None:
            scores = self.model.score([m + [{"role": "assistant", "content": a}] for m, a in zip(messages, answers)])
            scores = scores.clamp(-3, 3)
            if self.reasoning and not self.think_rules:
                found = [(i, a.group(1).strip()) for i, a in enumerate(map(ANSWER_PART.search, responses)) if a]
                if found:
                    idx = torch.tensor([i for i, _ in found])
                    answer = self.model.score([messages[i] + [{"role": "assistant", "content": a}] for i, a in found])
                    scores[idx] = 0.4 * scores[idx] + 0.6 * answer.clamp(-3, 3)
            rewards += scores
        stats = {"reward": rewards.mean().item()}
        if any(has_ref):
            stats["acc"] = correct[torch.tensor(has_ref)].mean().item()
        return rewards, stats


# ---- flags, models, the loop ----
def add_rl_args(parser, **defaults):
    """Flags every RL stage shares, with the original's defaults (spec 6.5-6.7)."""
    parser.add_argument("--max_gen_len", type=int, default=1536, help="max new tokens per response")
    parser.add_argument("--reasoning", type=int, default=None, choices=[0, 1],
                        help="1 = start from reason_<hidden>.pth and add the think/answer format reward; 0 = full_sft. "
                             "Default 1 (the original fa82707's), 0 with --model_family minimind3 (its newest RL starts "
                             "from full_sft and has no reasoning stage)")
    parser.add_argument("--reward_model_path", type=str, default=str(ROOT.parent / "internlm2-1_8b-reward"),
                        help="local reward model directory (InternLM2 get_score or a sequence classifier)")
    parser.add_argument("--reward", type=str, default="model", choices=["model", "rule", "mixed"],
                        help="model = reward model (original); rule = verifiable answer vs the row's \"answer\"; mixed = sum")
    parser.add_argument("--rule_weight", type=float, default=1.0, help="reward for a correct answer (rule, mixed)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of the rollouts")
    parser.add_argument("--thinking_ratio", type=float, default=0.9,
                        help="minimind-3 only: share of prompts rendered with open_thinking=True (an open <think> "
                             "block), 0.0-1.0, drawn per prompt from (its index, --seed); no effect with MiniMind2's "
                             "template, which has no such switch")
    add_rollout_args(parser)
    parser.set_defaults(**defaults)
    return parser


def check_rl_args(args) -> None:
    """Reject bad values of the shared RL flags before anything is loaded (one line, exit 2)."""
    if not 0.0 <= args.thinking_ratio <= 1.0:
        raise ValueError(f"--thinking_ratio must be between 0 and 1, got {args.thinking_ratio}")


def rl_prompts(args, tokenizer):
    """The stage's prompts: --data_path (dataset/rlaif-mini.jsonl, or the demo prompts when absent)."""
    from dataset.lm_dataset import RLAIFDataset
    check_rl_args(args)
    return RLAIFDataset(resolve_data(args), tokenizer, skip_bad_lines=bool(args.skip_bad_lines),
                        thinking_ratio=args.thinking_ratio, seed=args.seed)


def base_weight(args) -> str:
    """Which weight the policy starts from: --from_weight, else reason (--reasoning 1) or full_sft. Also settles
    --reasoning when it was not typed: 0 for --model_family minimind3, else 1."""
    if args.reasoning is None:
        args.reasoning = 0 if getattr(args, "model_family", None) == "minimind3" else 1
    return args.from_weight or ("reason" if args.reasoning else "full_sft")


def frozen(model):
    return model.eval().requires_grad_(False)


def adamw_cosine(params, args, run, num_prompts: int, lr: float):
    """AdamW at `lr` with the original's RL schedule: (optimizer, CosineAnnealingLR over (iters // accum) * epochs
    optimizer steps down to lr / 10, where iters = this rank's batches per epoch)."""
    optimizer = torch.optim.AdamW(params, lr=lr, **run.adamw)
    iters = -(-num_prompts // (args.batch_size * run.world_size))
    t_max = max(1, (iters // args.accumulation_steps) * args.epochs)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=lr / 10)
