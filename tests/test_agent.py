"""trainer/train_agent.py (agentic RL) and dataset/agent_dataset.py: the data format and its bad lines; multi-turn
rollouts with a scripted policy (sampled ids mask 1, template and tool results mask 0, the turn as sampled even
when the template rewrites it), the original's rewards by hand, failing tools as error observations through the
trainer, unfinished trajectories; CISPO/GRPO against hand-computed numbers; a tiny minimind-3 run with exact
resume; the OpenAI-compatible rollout engine against a fake server (token-id prompts, server log-probs, weight
reload with the API key)."""
import json
import math
import random
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from dataset.agent_dataset import AgentRLDataset
from dataset.demo_data import gen_agent_rl, write_jsonl
from dataset.tools import MOCK_RESULTS, ToolRunner, get_tools, is_error
from model.loading import FAMILY_TOKENIZER_DIR, load_native, load_tokenizer, load_transformers
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.weights import save_weights
from tests.conftest import tiny_train_args
from trainer import train_agent
from trainer.core.loop import TrainingError
from trainer.core.rollout_engine import OpenAIRolloutEngine, Sampled, parse_completion
from trainer.train_agent import agent_loss, agent_rewards, agent_rollouts, render

CALL = '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "北京"}}\n</tool_call>'
ANSWER = "28°C 28°C 28°C 28°C"
WEATHER = json.dumps(MOCK_RESULTS["get_current_weather"]({"location": "北京"}), ensure_ascii=False)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(FAMILY_TOKENIZER_DIR["minimind3"]))


def original_rep_penalty(text, n=3, cap=0.5):   # the original's, verbatim (train_agent.py L34-37)
    import re
    toks = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams)) if grams else 0.0


class ScriptedEngine:
    """A stand-in policy: turn k of every trajectory samples script[k] (the last entry repeats) as the tokenizer
    encodes it, then the EOS, cut to the turn's budget. `logps`: what it reports as the sampling log-probs."""

    def __init__(self, tokenizer, script, logps=None):
        self.tok, self.script, self.logps, self.prepared = tokenizer, script, logps, 0

    def prepare(self, model):
        self.prepared += 1

    def update_policy(self, model):
        pass

    @contextmanager
    def session(self, rows):
        def generate(prompts, params):
            out = []
            for ids, budget in zip(prompts, [p.max_tokens for p in params]):
                turn = self.tok.decode(ids).count("<|im_start|>assistant") - 1
                text = self.script[min(turn, len(self.script) - 1)]
                new = (self.tok(text, add_special_tokens=False).input_ids + [self.tok.eos_token_id])[:budget]
                out.append(Sampled(new, None if self.logps is None else [self.logps] * len(new)))
            return out
        yield generate


def weather_batch(tools=("get_current_weather", "calculate_math"), gt=("28°C",)):
    messages = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "北京现在多少度？"}]
    return {"messages": [messages], "tools": [get_tools(tools)], "gt": [list(gt)], "index": [0], "where": ["t:1"]}


def rollout_args(**kw):
    return SimpleNamespace(**{**dict(num_generations=2, max_total_len=4000, max_gen_len=200, max_turns=3,
                                     temperature=0.8), **kw})


def ids_of(tok, text):
    return tok(text, add_special_tokens=False).input_ids


# ---- data ----
def test_dataset_reads_the_original_format_and_names_a_bad_line(tmp_path):
    tools = get_tools(["calculate_math"])
    rows = [{"conversations": [{"role": "system", "content": "S", "tools": json.dumps(tools)},
                               {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}], "gt": ["2"]},
            {"conversations": [{"role": "system", "content": "", "tools": tools}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "x"}], "gt": []},
            {"conversations": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "x"}], "gt": [3.5]}]
    path = write_jsonl(tmp_path / "agent.jsonl", rows)
    ds = AgentRLDataset(path)
    assert len(ds) == 3
    assert ds[0] == {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "1+1?"}],
                     "tools": tools, "gt": ["2"], "index": 0, "where": f"{path}:1"}
    assert ds[1]["tools"] == tools and ds[2]["tools"] is None and ds[2]["gt"] == [3.5]
    bad = {"conversations": rows[0]["conversations"], "gt": "2"}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rows[2]) + "\n" + json.dumps(bad) + "\n{not json\n")
    with pytest.raises(ValueError, match=rf"^{path}:5: 'gt' must be a list"):
        AgentRLDataset(path)
    with pytest.warns(UserWarning, match="skipped 2 of 6 lines"):
        assert len(AgentRLDataset(path, skip_bad_lines=True)) == 4
    broken_tools = {"conversations": [{"role": "system", "content": "S", "tools": '[{"type": "function"}]'},
                                      {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "gt": []}
    write_jsonl(tmp_path / "b.jsonl", [broken_tools])
    with pytest.raises(ValueError, match=r"b.jsonl:1: message 0: tool 0 has no function name"):
        AgentRLDataset(tmp_path / "b.jsonl")


def test_demo_rows_are_answered_by_the_mock_tools(tmp_path):
    rows = gen_agent_rl(random.Random(0), 48)
    ds = AgentRLDataset(write_jsonl(tmp_path / "agent_rl.jsonl", rows))
    kinds = 0
    for i in range(len(ds)):
        s = ds[i]
        offered = {t["function"]["name"] for t in s["tools"]}
        assert offered <= set(MOCK_RESULTS) and all(isinstance(g, str) and g for g in s["gt"])
        kinds += not s["gt"]
    assert 0 < kinds < len(ds)     # a few rows need no tool


# ---- rollouts with a scripted policy ----
def test_observation_is_masked_and_the_reward_is_the_originals(tok):
    batch = weather_batch()
    with ToolRunner() as runner:
        trajs = agent_rollouts(ScriptedEngine(tok, [CALL, ANSWER]), tok, runner, batch, rollout_args(),
                               [False, False], [[0] * 3] * 2)
    prompt = ids_of(tok, render(tok, batch["messages"][0], batch["tools"][0], False, True))
    gen1, gen2 = ids_of(tok, CALL) + [tok.eos_token_id], ids_of(tok, ANSWER) + [tok.eos_token_id]
    obs = ids_of(tok, f"\n<|im_start|>user\n<tool_response>\n{WEATHER}\n</tool_response><|im_end|>\n"
                      "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    for t in trajs:
        assert t.ids == prompt + gen1 + obs + gen2
        assert t.policy == [0] * len(prompt) + [1] * len(gen1) + [0] * len(obs) + [1] * len(gen2)
        assert t.turns == [CALL, ANSWER] and not t.unfinished and (t.tool_calls, t.tool_errors, t.realigned) == (1, 0, 0)
        assert t.messages[-1] == {"role": "tool", "content": WEATHER}
    # by hand: one valid call for one gt value (+0.5), the gt in the final answer (+2.5), repetition (-0.5)
    assert original_rep_penalty(ANSWER) == 0.5
    assert agent_rewards(trajs, [["28°C"]] * 2, "rule", 1.0).tolist() == [2.5, 2.5]


def test_a_turn_the_template_rewrites_keeps_its_sampled_ids(tok):
    """Thinking on: the policy closes its reasoning without the newline the template puts before </think>. The
    re-rendered conversation no longer starts with the sampled ids (the original would train on other tokens);
    the trajectory keeps them and appends only the tokenized observation."""
    think = "查天气。</think>\n\n" + CALL
    batch = weather_batch()
    with ToolRunner() as runner:
        t = agent_rollouts(ScriptedEngine(tok, [think, "北京28°C。"]), tok, runner, batch, rollout_args(), [True, True],
                           [[0] * 3] * 2)[0]
    prompt = ids_of(tok, render(tok, batch["messages"][0], batch["tools"][0], True, True))
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n")
    gen1 = ids_of(tok, think) + [tok.eos_token_id]
    obs = ids_of(tok, f"\n<|im_start|>user\n<tool_response>\n{WEATHER}\n</tool_response><|im_end|>\n"
                      "<|im_start|>assistant\n<think>\n")
    assert t.ids[:len(prompt) + len(gen1) + len(obs)] == prompt + gen1 + obs and t.realigned == 1
    rerendered = ids_of(tok, render(tok, t.messages, batch["tools"][0], True, True))
    assert rerendered != prompt + gen1 + obs          # what the original's re-rendering would have used
    # reward: the text after </think> of each turn; one valid call, gt found, no repetition
    assert agent_rewards([t], [["28°C"]], "rule", 1.0).tolist() == [3.0]


def test_calls_in_the_last_turn_leave_the_trajectory_unfinished(tok):
    batch = weather_batch()
    with ToolRunner() as runner:
        t = agent_rollouts(ScriptedEngine(tok, [CALL]), tok, runner, batch, rollout_args(max_turns=2),
                           [False, False], [[0] * 2] * 2)[0]
        assert t.unfinished and len(t.turns) == 2 and t.tool_calls == 1     # the last turn's call is not run
        assert t.policy[-1] == 1 and t.ids[-1] == tok.eos_token_id          # nothing after the last policy token
        # by hand: 2 valid calls for 1 gt value (-0.5), no final answer (gt 0), unfinished (-0.5), repetition
        expected = -0.5 - 0.5 - original_rep_penalty(CALL)
        assert agent_rewards([t], [["28°C"]], "rule", 1.0).item() == pytest.approx(max(-3.0, expected))
        # a trajectory whose tool result does not fit in --max_total_len is unfinished too
        short = len(ids_of(tok, render(tok, batch["messages"][0], batch["tools"][0], False, True))) + 40
        t = agent_rollouts(ScriptedEngine(tok, [CALL, ANSWER]), tok, runner, batch, rollout_args(max_total_len=short),
                           [False, False], [[0] * 3] * 2)[0]
    assert t.unfinished and len(t.turns) == 1 and len(t.ids) <= short
    with pytest.raises(ValueError, match=r"^t:1: the prompt has \d+ tokens and --max_total_len 100 leaves no room"):
        agent_rollouts(ScriptedEngine(tok, [CALL]), tok, None, batch, rollout_args(max_total_len=100), [False] * 2,
                       [[0] * 3] * 2)


def test_no_tool_answers_get_the_format_terms_and_the_rule_score(tok):
    t = SimpleNamespace(turns=["想一想这个问题到底该怎么回答才好呢，我需要仔细想。</think>\n\n北京是28°C"], tools=None,
                        unfinished=False, prompt_messages=[])
    # length +0.5, think of 26 chars (+1.0), one </think> (+0.25), rule: 1 of 2 gt values (+0.5)
    assert agent_rewards([t], [["28°C", "晴"]], "rule", 1.0).item() == pytest.approx(2.25)
    calls_wrong = SimpleNamespace(turns=['<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>'],
                                  tools=get_tools(["calculate_math"]), unfinished=False, prompt_messages=[])
    # one unbalanced tag (-0.5); 0 valid calls for 1 gt + 1 invalid call: gap 2 (-1.0); the final text (after the
    # last </tool_call>) states no gt value and is what the repetition penalty reads
    expected = -0.5 - 1.0 - original_rep_penalty("<tool_call>")
    assert agent_rewards([calls_wrong], [["4"]], "rule", 1.0).item() == pytest.approx(expected)
    # --reward model: the reward model scores the answer after </think> to the sample's conversation, clipped to
    # [-3, 3], and only for trajectories without tool calls; the total is clipped to [-3, 3] again
    scored = []
    stub = SimpleNamespace(score=lambda convs: scored.extend(convs) or torch.full((len(convs),), 9.0))
    t.prompt_messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "北京几度？"}]
    rewards = agent_rewards([t, calls_wrong], [["28°C", "晴"], ["4"]], "model", 1.0, stub)
    assert rewards.tolist() == [3.0, pytest.approx(expected)]      # 1.75 + min(9, 3), clipped
    assert scored == [t.prompt_messages + [{"role": "assistant", "content": "北京是28°C"}]]


# ---- the loss ----
def test_cispo_and_grpo_losses_match_hand_computed_numbers():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.7], [-1.0, -1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.0, -0.5], [-0.3, -2.0, -0.1], [0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.1, -2.5, -0.4], [-0.2, -1.0, -0.9], [5.0, 5.0, 5.0]])
    adv, mask = torch.tensor([1.5, -0.5, 9.0]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    beta, eps, eps_high = 0.1, 0.2, 1.5

    def reference(kind):
        rows = []
        for i in range(2):       # the third row has no policy token: left out of the mean
            total = 0.0
            for j in range(3):
                if not mask[i, j]:
                    continue
                lp, o, rf, a = logp[i, j].item(), old[i, j].item(), ref[i, j].item(), adv[i].item()
                kl = math.exp(rf - lp) - (rf - lp) - 1
                r = math.exp(lp - o)
                if kind == "cispo":
                    total += -(min(r, eps_high) * a * lp - beta * kl)
                else:
                    total += -(min(r * a, min(max(r, 1 - eps), 1 + eps) * a) - beta * kl)
            rows.append(total / mask[i].sum().item())
        return sum(rows) / 2

    for kind in ("cispo", "grpo"):
        loss, kl = agent_loss(logp, old, ref, adv, mask, kind, beta, eps, eps_high)
        assert loss.item() == pytest.approx(reference(kind), rel=1e-6)
    # CISPO's ratio weight is a constant: d loss / d logp = -(min(r, eps_high) * A - beta * (1 - e^(ref - logp))) / n
    loss, _ = agent_loss(logp, old, ref, adv, mask, "cispo", beta, eps, eps_high)
    loss.backward()
    r = torch.exp(logp.detach() - old).clamp(max=eps_high)
    grad = -(r * adv[:, None] - beta * (1 - torch.exp(ref - logp.detach()))) * mask / mask.sum(1, keepdim=True).clamp(min=1) / 2
    assert torch.allclose(logp.grad, grad, atol=1e-6)
    empty, _ = agent_loss(logp, old, ref, adv, torch.zeros(3, 3), "grpo", beta, eps, eps_high)
    assert empty.item() == 0.0


# ---- the trainer ----
def test_flags_and_defaults_are_the_originals(monkeypatch):
    class Parsed(Exception):
        pass

    def stop(args):
        raise Parsed(args)
    monkeypatch.setattr(train_agent, "init_run", stop)
    with pytest.raises(Parsed) as caught:
        train_agent.main([])
    a = caught.value.args[0]
    assert (a.save_weight, a.from_weight, a.epochs, a.batch_size, a.learning_rate, a.accumulation_steps, a.grad_clip,
            a.log_interval, a.save_interval, a.max_seq_len, a.max_gen_len, a.max_total_len, a.num_generations, a.beta,
            a.loss_type, a.epsilon, a.epsilon_high, a.thinking_ratio, a.max_turns, a.rollout_engine,
            a.sglang_base_url, a.wandb_project, a.use_compile, a.debug_mode, a.debug_interval) == (
        "agent", "full_sft", 1, 2, 3e-7, 1, 1.0, 1, 10, 1024, 768, 2500, 4, 0.1, "cispo", 0.2, 5.0, 0.1, 3, "torch",
        "http://localhost:8998", "MiniMind-Agent-RL", 0, False, 20)
    assert a.data_path.endswith("dataset/agent_rl.jsonl") and a.demo_data == "agent_rl.jsonl"
    assert a.reward_model_path.endswith("internlm2-1_8b-reward") and a.sglang_shared_path is None
    for bad in (["--loss_type", "ppo"], ["--rollout_engine", "vllm"]):
        with pytest.raises(SystemExit):
            train_agent.main(bad)


def test_a_bad_data_line_is_one_error_line(agent_chain, tmp_path, capsys):
    from model.cli import cli
    lines = agent_chain[1].read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + ['{"conversations": [], "gt": []}']) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as caught:
        cli(lambda: train_agent.main(agent_args(agent_chain, tmp_path, data=bad)))
    err = capsys.readouterr().err.strip().splitlines()
    assert caught.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {bad}:3: conversations must")


@pytest.fixture(scope="module")
def agent_chain(tmp_path_factory):
    """A tiny minimind-3 full_sft weight (random init, the CLI's tiny size) and six demo agent prompts."""
    tmp = tmp_path_factory.mktemp("agent")
    torch.manual_seed(0)
    cfg = MiniMindConfig(model_family="minimind3", hidden_size=64, num_hidden_layers=2)
    save_weights(MiniMindForCausalLM(cfg), tmp / "out" / "full_sft_64.pth", cfg)
    rows = gen_agent_rl(random.Random(1), 6)
    for row in rows:   # one tool each: shorter prompts, a faster test
        row["conversations"][0]["tools"] = json.dumps(json.loads(row["conversations"][0]["tools"])[:1])
    return tmp, write_jsonl(tmp / "agent_rl.jsonl", rows)


def agent_args(chain, out, data=None, **flags):
    tmp, default = chain
    flags = {**dict(from_dir=tmp / "out", reward="rule", max_gen_len=8, max_total_len=1024, batch_size=2,
                    num_generations=2, learning_rate=1e-3, dtype="float32", max_steps=2), **flags}
    return tiny_train_args(out, data or default, tokenizer_path=FAMILY_TOKENIZER_DIR["minimind3"], **flags)


def vary_rewards(monkeypatch):
    """A random tiny model never calls a tool and writes answers the rules score alike: reward the length of the
    last turn mod 3, so the advantages are not all 0 and the weights move."""
    monkeypatch.setattr(train_agent, "trajectory_reward", lambda turns, tools, gt, unfinished: (len(turns[-1]) % 3, None))


def test_tiny_run_writes_a_strict_weight_and_resumes_exactly(agent_chain, tmp_path, monkeypatch):
    vary_rewards(monkeypatch)
    path, loss = train_agent.main(agent_args(agent_chain, tmp_path / "full"))
    assert path == tmp_path / "full" / "out" / "agent_64.pth" and math.isfinite(loss)
    model = load_native(path)                            # strict: every key and shape
    assert model.config.model_family == "minimind3"
    base, full = torch.load(agent_chain[0] / "out" / "full_sft_64.pth"), torch.load(path)
    assert any(not torch.equal(base[k], full[k]) for k in base)
    log = [json.loads(line) for line in open(tmp_path / "full" / "out" / "agent_64_metrics.jsonl")]
    assert [r["step"] for r in log] == [1, 2] and {"reward", "kl", "turns", "tool_errors", "realigned"} <= set(log[0])
    train_agent.main(agent_args(agent_chain, tmp_path / "cut", max_steps=1))
    train_agent.main(agent_args(agent_chain, tmp_path / "cut", max_steps=2, from_resume=1))
    resumed = torch.load(tmp_path / "cut" / "out" / "agent_64.pth")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    a = torch.load(tmp_path / "full" / "ckpt" / "agent_64_resume.pth", weights_only=False)
    b = torch.load(tmp_path / "cut" / "ckpt" / "agent_64_resume.pth", weights_only=False)
    assert a["step"] == b["step"] == 2 and a["scheduler"]["_last_lr"] == b["scheduler"]["_last_lr"]


def test_failing_tools_become_error_observations_through_the_trainer(agent_chain, tmp_path, monkeypatch):
    """A tool that raises, loops, prints megabytes or returns what JSON cannot hold, arguments that are not JSON and
    a tool the sample does not offer: each is an error observation, the policy answers, the step completes."""
    from tests import tool_helpers
    bad = ["raises", "loops", "prints_10mb", "not_serialisable"]
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
             for n in bad]
    row = {"conversations": [{"role": "system", "content": "S", "tools": json.dumps(tools)},
                             {"role": "user", "content": "go"}, {"role": "assistant", "content": "无"}], "gt": ["done"]}
    data = write_jsonl(tmp_path / "bad_tools.jsonl", [row, row])
    calls = "".join(f'<tool_call>{{"name": "{n}", "arguments": {{}}}}</tool_call>' for n in bad)
    calls += '<tool_call>{"name": "raises", "arguments": "{oops"}</tool_call>'
    calls += '<tool_call>{"name": "get_current_time", "arguments": {}}</tool_call>'

    def runner(timeout):
        r = ToolRunner(timeout=timeout)
        for name in bad:
            r.register(name, getattr(tool_helpers, name))
        return r
    seen, real_rollouts = [], train_agent.agent_rollouts

    def keep(*args):
        trajs = real_rollouts(*args)
        seen.extend(trajs)
        return trajs
    monkeypatch.setattr(train_agent, "ToolRunner", runner)
    monkeypatch.setattr(train_agent, "agent_rollouts", keep)
    monkeypatch.setattr(train_agent, "create_rollout_engine", lambda *a: ScriptedEngine(a[2], [calls, "done"]))
    path, loss = train_agent.main(agent_args(agent_chain, tmp_path, data=data, max_steps=1, batch_size=1,
                                             tool_timeout=1.0, max_gen_len=400, max_total_len=2048))
    assert path.exists() and math.isfinite(loss)
    for t in seen:
        observations = [m["content"] for m in t.messages if m["role"] == "tool"]
        assert len(observations) == 6 and all(map(is_error, observations)) and t.turns[-1] == "done"
        for needle, obs in zip(["RuntimeError: boom", "timed out", "printed more than", "not JSON-serialisable",
                                "not a JSON object", "tool not found"], observations):
            assert needle in obs, (needle, obs)
    log = json.loads(open(tmp_path / "out" / "agent_64_metrics.jsonl").readline())
    assert len(seen) == 2 and log["tool_errors"] == 1.0 and log["tool_calls"] == 6 and log["unfinished"] == 0


# ---- the OpenAI-compatible rollout engine ----
class FakeServer:
    """/v1/models, /v1/completions answering a tool call then the answer (vLLM style: ids as "token_id:<id>" and
    their log-probs), /update_weights_from_disk recording what it was asked and the Authorization header."""

    def __init__(self, tok, reload_status=200):
        server, self.completions, self.reloads = self, [], []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.reply(200, {"data": [{"id": "fake-model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/update_weights_from_disk":
                    server.reloads.append((body, self.headers.get("Authorization")))
                    return self.reply(reload_status, {"success": reload_status == 200})
                server.completions.append(body)
                turn = tok.decode(body["prompt"]).count("<|im_start|>assistant") - 1
                ids = ids_of(tok, CALL if turn == 0 else ANSWER)[:body["max_tokens"] - 1] + [tok.eos_token_id]
                self.reply(200, {"choices": [{"text": tok.decode(ids, skip_special_tokens=True), "finish_reason": "stop",
                                              "logprobs": {"tokens": [f"token_id:{i}" for i in ids],
                                                           "token_logprobs": [-0.25] * len(ids)}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_openai_engine_samples_on_the_server_and_reloads_its_weights(agent_chain, tmp_path, monkeypatch, tok):
    server = FakeServer(tok)
    monkeypatch.setenv("MINIMIND_API_KEY", "sk-test")
    updates, real_update = [], train_agent.agent_update
    monkeypatch.setattr(train_agent, "agent_update", lambda model, args, ro: updates.append(ro) or real_update(model, args, ro))
    synced, real_sync = [], OpenAIRolloutEngine.update_policy

    def sync(self, model):
        synced.append({k: v.detach().half().clone() for k, v in model.state_dict().items()})
        return real_sync(self, model)
    monkeypatch.setattr(OpenAIRolloutEngine, "update_policy", sync)
    try:
        _, loss = train_agent.main(agent_args(agent_chain, tmp_path, rollout_engine="openai", save_interval=1,
                                              max_gen_len=400, sglang_base_url=server.url, sglang_shared_path=tmp_path / "shared"))
    finally:
        server.close()
    assert math.isfinite(loss)
    # before each rollout (--save_interval 1) and at the end: the policy saved as a transformers folder, then the
    # reload request
    assert len(synced) == len(server.reloads) == 3 and all(auth == "Bearer sk-test" for _, auth in server.reloads)
    assert server.reloads[0][0] == {"model_path": str((tmp_path / "shared").resolve())}
    shared = load_transformers(tmp_path / "shared")
    assert shared.config.model_family == "minimind3" and (tmp_path / "shared" / "tokenizer.json").exists()
    assert all(torch.equal(v.half(), synced[-1][k]) for k, v in shared.state_dict().items())
    body = server.completions[0]
    assert body["model"] == "fake-model" and body["logprobs"] == 1 and all(isinstance(i, int) for i in body["prompt"])
    assert len(server.completions) == 2 * 2 * 2 * 2        # 2 steps x 2 prompts x 2 generations x 2 turns
    ro = updates[0]        # the server's log-probs are the old ones, on the policy tokens only
    on = ro["mask"] > 0
    assert ro["old_logp"] is not None and on.any()
    assert torch.all(ro["old_logp"][on] == -0.25) and torch.isnan(ro["old_logp"][~on]).all()


def test_completion_replies_without_ids_or_logprobs_and_a_failed_reload(tok, tmp_path):
    text_only = parse_completion({"text": "北京28°C", "finish_reason": "stop"}, tok)
    assert text_only == Sampled(ids_of(tok, "北京28°C") + [tok.eos_token_id], None)
    ids = ids_of(tok, "ok")
    given = parse_completion({"text": "ok", "token_ids": ids, "finish_reason": "length",
                              "logprobs": {"tokens": ["o", "k"][:len(ids)], "token_logprobs": [-1.0] * len(ids)}}, tok)
    assert given == Sampled(ids, [-1.0] * len(ids))
    server = FakeServer(tok, reload_status=500)
    try:
        engine = OpenAIRolloutEngine(server.url, tok, tmp_path / "shared", interval=10)
        model = MiniMindForCausalLM(MiniMindConfig(model_family="minimind3", hidden_size=64, num_hidden_layers=2))
        with pytest.raises(TrainingError, match="did not load the policy"):
            engine.prepare(model)
    finally:
        server.close()


def test_weight_sync_reloads_this_projects_server(tok, tmp_path):
    """scripts/serve_openai_api.py's /update_weights_from_disk (behind its API key): the policy saved by the rollout
    engine is what the server then runs; a wrong key stops training with one line. (Rollouts on that server:
    tests/test_rollout_engine.py.)"""
    from scripts.serve_openai_api import create_app
    from tests.test_serve import running
    cfg = MiniMindConfig(model_family="minimind3", hidden_size=64, num_hidden_layers=2)
    torch.manual_seed(1)
    served, policy = MiniMindForCausalLM(cfg).eval(), MiniMindForCausalLM(cfg)
    app = create_app(served, tok, api_key="sk-right", prefix_cache=0, max_seq_len=1024)
    with running(app) as server:
        url = f"http://127.0.0.1:{server.config.port}"
        engine = OpenAIRolloutEngine(url, tok, tmp_path / "shared", interval=10)
        engine.key = "sk-wrong"
        with pytest.raises(TrainingError, match="did not load the policy.*401"):
            engine.update_policy(policy)
        engine.key = "sk-right"
        engine.update_policy(policy)
        now = app.engine.model.state_dict()
        assert all(torch.equal(now[k].half(), v.half()) for k, v in policy.state_dict().items())


def test_two_processes_train_on_their_own_prompts(agent_chain, tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank rolls out its share of the prompts, DDP averages the updates,
    rank 0 writes the weight."""
    import sys
    from tests.conftest import ROOT, run_launcher
    argv = agent_args(agent_chain, tmp_path, batch_size=1)
    res = run_launcher(lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                     "--master_port", str(port), str(ROOT / "trainer" / "train_agent.py"), *argv],
                       timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 processes" in res.stdout and "2 samples per optimizer step" in res.stdout
    load_native(tmp_path / "out" / "agent_64.pth")
    log = [json.loads(line) for line in open(tmp_path / "out" / "agent_64_metrics.jsonl")]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)


@pytest.mark.slow   # four 2-process launches: ~25 s
def test_two_processes_resume_exactly(agent_chain, tmp_path):
    """Found in review: only rank 0's RNG state was saved and every rank restored it, so after a resume both ranks
    drew the same rollout seeds. Interrupted after step 1 and resumed == uninterrupted, rollouts included."""
    import sys
    from tests.conftest import ROOT, run_launcher

    def launch(out, **flags):
        argv = agent_args(agent_chain, out, batch_size=1, save_interval=1, temperature=1.5, **flags)
        res = run_launcher(lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                         "--master_port", str(port), str(ROOT / "trainer" / "train_agent.py"), *argv],
                           timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return [json.loads(line) for line in open(out / "out" / "agent_64_metrics.jsonl")]

    whole = launch(tmp_path / "whole")
    launch(tmp_path / "cut", max_steps=1)
    resumed = launch(tmp_path / "cut", from_resume=1)
    same = lambda row: {k: v for k, v in row.items() if k in ("step", "loss", "reward", "resp_len", "turns", "avg_len", "response_len")}
    assert same(resumed[-1]) == same(whole[-1]), (resumed[-1], whole[-1])
    a, b = (torch.load(p / "out" / "agent_64.pth") for p in (tmp_path / "whole", tmp_path / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
