"""Rollout engines (the original's trainer/rollout_engine.py): what samples the RL stages' completions, chosen
with --rollout_engine (flags: add_rollout_args; GRPO, PPO, SPO and agentic RL all take them).

    engine = create_rollout_engine(args, model, tokenizer, run, "grpo")
    engine.prepare(model)                                  # before each rollout: a server's weights synced when due
    outs = engine.generate(prompts, params)                # token-id prompts, a SamplingParams each -> [Sampled]
    with engine.session(rows) as generate:                 # several calls on one engine (a multi-turn rollout)
        outs = generate(prompts, params)
    engine.update_policy(model)                            # sync the weights now

--rollout_engine torch (default): TorchRolloutEngine, the policy itself in this process through the batching
engine (model/engine.py), in eval mode and the run's autocast precision; one Engine per session, so a
trajectory's later turns reuse its earlier keys. Its samples are exactly those the stages drew before this module
existed (same Engine settings, same per-request seeds), so seeded runs and resumes are unchanged.

--rollout_engine sglang / openai (one client): OpenAIRolloutEngine, an OpenAI-compatible server at
--sglang_base_url (this project's scripts/serve_openai_api.py, vLLM, SGLang), so rollouts run outside the trainer
and the server's continuous batching serves several trainer processes at once. Each completion is one
`POST /v1/completions` whose prompt is the token ids, with its own max_tokens, temperature, top_k, top_p and seed
(the same seed the torch engine would use: same weights and prompt, same tokens), asking for the sampled ids and
their log-probs (`logprobs`, vLLM's `return_tokens_as_token_ids` / `return_token_ids`). A reply without ids is
re-tokenized from its text; one without log-probs gives Sampled.logps None. A 429 (server busy) is retried.
Weight sync, as the original: before the first rollout, then every --save_interval rollouts and once training
ends (the stage scripts call update_policy), rank 0 saves the policy (fp16) as a transformers folder in
--sglang_shared_path and POSTs {"model_path": ...} to /update_weights_from_disk (SGLang's endpoint; this project's
server has it, behind its API key); a refused reload stops training. The API key, if the server wants one, comes
from MINIMIND_API_KEY or OPENAI_API_KEY (an environment variable keeps it out of `ps` and of the run's logged flags).

Log-probs. Sampled.logps are the log-probs of the sampled ids under the sampler's raw distribution: the
log-softmax of the logits before temperature, top-k and top-p, which is what the trainer's own forward pass gives
(trainer/core/rl.py completion_logps), so the two are the same kind and a ratio of them only measures the
server's weight lag (up to --save_interval rollouts, and fp16 rounding). This project's server and vLLM return
that by default; SGLang returns temperature-scaled log-probs unless started with SGLANG_RETURN_ORIGINAL_LOGPROB=1.
None (the torch engine, or a server that sent none): the caller uses the policy's own, recomputed locally.
"""
import json
import math
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from model.engine import Engine
from model.loading import ROOT
from trainer.core.loop import TrainingError, unwrap
from trainer.core.progress import is_main_process

BUSY_RETRIES = 120       # 429 answers (the server's queue is full) retried, Retry-After seconds apart (default 1)


class Sampled(NamedTuple):
    ids: list             # the sampled token ids (the EOS included when it ended the completion)
    logps: list | None    # their raw log-probs under the sampler's weights (nan: unknown), None when not given


def add_rollout_args(parser):
    """The original's rollout flags (train_grpo.py / train_ppo.py / train_agent.py), plus `openai`, a name for the
    same client."""
    parser.add_argument("--rollout_engine", type=str, default="torch", choices=["torch", "sglang", "openai"],
                        help="torch = the policy in this process (model/engine.py); sglang / openai = an "
                             "OpenAI-compatible server's /v1/completions at --sglang_base_url (this project's "
                             "scripts/serve_openai_api.py, vLLM, SGLang)")
    parser.add_argument("--sglang_base_url", type=str, default="http://localhost:8998", help="rollout server URL")
    parser.add_argument("--sglang_model_path", type=str, default=str(ROOT / "model"),
                        help="accepted for the original's command lines; the policy's own tokenizer is used")
    parser.add_argument("--sglang_shared_path", type=str, default=None,
                        help="folder the policy is saved to for the server to reload (default: "
                             "<checkpoint_dir>/sglang_ckpt_<stage>)")
    return parser


def create_rollout_engine(args, model, tokenizer, run, name: str, max_seq_len: int = None):
    """The original's factory: torch (this process) or an OpenAI-compatible server (sglang, openai). `name` (grpo,
    ppo, spo, agent) names the default shared folder; `max_seq_len` caps the torch engine's sequences."""
    if args.rollout_engine == "torch":
        return TorchRolloutEngine(model, tokenizer.eos_token_id, getattr(run.autocast_ctx, "fast_dtype", None),
                                  max_seq_len)
    shared = args.sglang_shared_path or Path(args.checkpoint_dir) / f"sglang_ckpt_{name}"
    return OpenAIRolloutEngine(args.sglang_base_url, tokenizer, shared, args.save_interval)


class TorchRolloutEngine:
    """--rollout_engine torch: the policy through model/engine.py in this process (see the module docstring)."""

    def __init__(self, model, eos_token_id: int, autocast_dtype=None, max_seq_len: int = None):
        self.model, self.eos_token_id = model, eos_token_id
        self.autocast_dtype, self.max_seq_len = autocast_dtype, max_seq_len

    def prepare(self, model):
        """Before each rollout: nothing to do, the engine samples from the live weights."""

    def update_policy(self, model):
        self.model = model

    @contextmanager
    def session(self, rows: int):
        raw = unwrap(self.model)
        was_training = raw.training
        raw.eval()
        try:
            with Engine(raw, max_batch=rows, max_seq_len=self.max_seq_len, eos_token_id=self.eos_token_id,
                        autocast_dtype=self.autocast_dtype) as engine:
                yield lambda prompts, params: [Sampled(list(req.token_ids), None)
                                               for req in engine.generate(prompts, params)]
        finally:
            raw.train(was_training)

    def generate(self, prompts: list, params: list) -> list:
        with self.session(len(prompts)) as generate:
            return generate(prompts, params)


class OpenAIRolloutEngine:
    """--rollout_engine sglang / openai: rollouts on an OpenAI-compatible server (see the module docstring)."""

    def __init__(self, base_url: str, tokenizer, shared_path, interval: int, timeout: float = 600):
        self.base_url, self.tokenizer, self.shared_path = base_url.rstrip("/"), tokenizer, Path(shared_path)
        self.interval, self.timeout = max(1, interval), timeout
        self.key = os.environ.get("MINIMIND_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.model_id, self.rollouts = None, 0

    def _request(self, path: str, body: dict = None, timeout: float = None) -> dict:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(BUSY_RETRIES + 1):
            req = urllib.request.Request(self.base_url + path, data=data, headers=headers,
                                         method="GET" if data is None else "POST")
            try:
                with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                    text = resp.read().decode("utf-8", "replace")
                break
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:300]
                if err.code == 429 and attempt < BUSY_RETRIES:
                    time.sleep(float(err.headers.get("Retry-After") or 1))
                    continue
                raise OSError(f"{self.base_url}{path}: HTTP {err.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError) as err:
                raise OSError(f"{self.base_url}{path}: {getattr(err, 'reason', err)}") from None
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            return {"text": text}

    def prepare(self, model):
        if self.rollouts % self.interval == 0:
            self.update_policy(model)
        self.rollouts += 1

    def update_policy(self, model):
        ok, why = True, ""
        if is_main_process():
            try:
                raw = unwrap(model)
                self.shared_path.mkdir(parents=True, exist_ok=True)
                state = {k: v.detach().half().cpu() if v.is_floating_point() else v.detach().cpu()
                         for k, v in raw.state_dict().items()}
                raw.save_pretrained(self.shared_path, state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(self.shared_path)
                self._request("/update_weights_from_disk", {"model_path": str(self.shared_path.resolve())})
            except (OSError, ValueError, RuntimeError) as err:
                ok, why = False, str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        if dist.is_initialized():
            flag = torch.tensor([float(ok)], device=next(unwrap(model).parameters()).device)
            dist.broadcast(flag, src=0)
            ok = bool(flag.item())
        if not ok:
            raise TrainingError(f"the rollout server at {self.base_url} did not load the policy from "
                                f"{self.shared_path}: {why or 'see rank 0'}")

    @contextmanager
    def session(self, rows: int):
        if self.model_id is None:
            try:
                self.model_id = self._request("/v1/models", timeout=30).get("data", [{}])[0].get("id") or "default"
            except (OSError, IndexError, AttributeError):
                self.model_id = "default"
        with ThreadPoolExecutor(max_workers=max(1, min(rows, 64))) as pool:
            yield lambda prompts, params: list(pool.map(self.complete, prompts, params))

    def generate(self, prompts: list, params: list) -> list:
        with self.session(len(prompts)) as generate:
            return generate(prompts, params)

    def complete(self, ids: list, params) -> Sampled:
        """One completion of the token ids `ids` with a model.engine.SamplingParams."""
        body = {"model": self.model_id, "prompt": [int(i) for i in ids], "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "n": 1, "logprobs": 1,
                "return_tokens_as_token_ids": True, "return_token_ids": True, "skip_special_tokens": False}
        if params.top_k > 0:             # absent = off everywhere (older vLLM refuse 0, SGLang wants -1)
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed   # < 2**62 from the stages; vLLM and SGLang take int64 seeds
        reply = self._request("/v1/completions", body)
        try:
            choice = reply["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise OSError(f"{self.base_url}/v1/completions: no choices in the reply: {str(reply)[:300]}") from None
        return parse_completion(choice, self.tokenizer)


def parse_completion(choice: dict, tokenizer) -> Sampled:
    """The sampled ids and log-probs of a /v1/completions choice: ids from `token_ids` or from logprobs tokens
    spelled "token_id:<id>" (vLLM), else the text re-tokenized (plus the EOS when finish_reason is "stop"); the
    log-probs only when there is one number per id."""
    logprobs = choice.get("logprobs") or {}
    tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
    ids = choice.get("token_ids")
    if ids is None and tokens and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        ids = [int(t.split(":", 1)[1]) for t in tokens]
    if ids is None:
        ids, values = tokenizer(choice.get("text") or "", add_special_tokens=False).input_ids, None
    ids = [int(i) for i in ids]
    if choice.get("finish_reason") == "stop" and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
        values = None if values is None else list(values) + [None]
    if values is None or len(values) != len(ids):
        return Sampled(ids, None)
    return Sampled(ids, [math.nan if v is None else float(v) for v in values])
