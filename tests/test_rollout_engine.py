"""trainer/core/rollout_engine.py against this project's own server (scripts/serve_openai_api.py) on 127.0.0.1,
tiny minimind-3 models: after a weight sync the server samples exactly what the in-process engine samples (greedy
batches, seeded single prompts) and returns the policy's raw log-probs; GRPO and agentic RL train with
--rollout_engine openai / sglang, the server's weights following the policy at each sync."""
import json
import math

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from model.engine import HF_TOP_K, SamplingParams  # noqa: E402
from model.loading import FAMILY_TOKENIZER_DIR, load_tokenizer, load_transformers  # noqa: E402
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402
from scripts.serve_openai_api import create_app  # noqa: E402
from tests.conftest import tiny_train_args  # noqa: E402
from tests.test_agent import agent_args, agent_chain, vary_rewards  # noqa: E402,F401 (agent_chain: a fixture)
from tests.test_serve import metric_value, running  # noqa: E402
from trainer import train_agent, train_grpo  # noqa: E402
from trainer.core import rl  # noqa: E402
from trainer.core.rl import completion_logps, rollout  # noqa: E402
from trainer.core.rollout_engine import OpenAIRolloutEngine, TorchRolloutEngine, create_rollout_engine  # noqa: E402

CFG = dict(model_family="minimind3", hidden_size=64, num_hidden_layers=2)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(FAMILY_TOKENIZER_DIR["minimind3"]))


@pytest.fixture
def server(tok):
    """Our server on a free local port with a tiny minimind-3 model of its own (not the policy), an API key and no
    prefix cache; yields (base URL, app)."""
    torch.manual_seed(123)
    app = create_app(MiniMindForCausalLM(MiniMindConfig(**CFG)).eval(), tok, api_key="sk-rl", prefix_cache=0,
                     max_seq_len=1024)
    with running(app) as srv:
        yield f"http://127.0.0.1:{srv.config.port}", app


def served(url: str, name: str, status=200) -> float:
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer sk-rl"}).text
    return metric_value(metrics, f'minimind_http_responses_total{{path="{name}",status="{status}"}}')


def chat(tok, question, thinking=False):
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True,
                                   open_thinking=thinking)


def test_the_server_samples_what_the_torch_engine_samples_after_a_sync(server, tok, tmp_path, monkeypatch):
    url, app = server
    monkeypatch.setenv("MINIMIND_API_KEY", "sk-rl")
    torch.manual_seed(0)
    policy = MiniMindForCausalLM(MiniMindConfig(**CFG)).half().float()   # fp16 values: the sync loses nothing
    http = OpenAIRolloutEngine(url, tok, tmp_path / "shared", interval=1)
    local = TorchRolloutEngine(policy, tok.eos_token_id)
    http.update_policy(policy)
    served_now = app.engine.model.state_dict()
    assert all(torch.equal(served_now[k], v) for k, v in policy.state_dict().items())
    prompts = [tok(chat(tok, q), add_special_tokens=False).input_ids for q in ("你好", "北京今天天气怎么样？", "1+1=?")]
    greedy = [SamplingParams(max_tokens=12, temperature=0)] * 3
    a, b = http.generate(prompts, greedy), local.generate(prompts, greedy)
    assert [s.ids for s in a] == [s.ids for s in b] and all(s.logps is None for s in b)
    for prompt, s in zip(prompts, a):      # the server's log-probs: the policy's own raw ones
        with torch.no_grad():
            ref = torch.log_softmax(policy(torch.tensor([prompt + s.ids])).logits[0, len(prompt) - 1:-1], -1)
        assert torch.allclose(torch.tensor(s.logps), ref.gather(1, torch.tensor(s.ids)[:, None])[:, 0], atol=1e-4)
    for seed, prompt in enumerate(prompts):   # seeded sampling, one prompt at a time: the same draws
        params = [SamplingParams(max_tokens=12, temperature=0.8, top_k=HF_TOP_K, top_p=0.85, seed=2 ** 61 + seed)]
        assert http.generate([prompt], params)[0].ids == local.generate([prompt], params)[0].ids
    # rl.rollout through either engine: the same greedy rollout; the server's log-probs ride along as the old ones
    args = type("A", (), {"max_seq_len": 64, "max_gen_len": 8, "temperature": 0})
    texts = [chat(tok, "你好"), chat(tok, "讲个故事", thinking=True)]
    torch.manual_seed(1)
    remote = rollout(policy, tok, texts, args, 2, engine=http)
    torch.manual_seed(1)
    here = rollout(policy, tok, texts, args, 2)
    assert torch.equal(remote.sequences, here.sequences) and here.sampler_logps is None
    on = remote.completion_mask.bool()
    with torch.no_grad():
        mine = completion_logps(policy, remote)[0]
    assert torch.allclose(remote.sampler_logps[on], mine[on], atol=1e-4) and torch.isnan(remote.sampler_logps[~on]).all()
    assert rl.rollout_logps(policy, remote, False) is remote.sampler_logps
    assert torch.equal(rl.old_or(remote.sampler_logps, mine)[~on], mine[~on])


@pytest.fixture(scope="module")
def rlaif(tmp_path_factory):
    rows = [{"conversations": [{"role": "user", "content": f"{a}+{a}等于几？"}, {"role": "assistant", "content": "无"}],
             "answer": str(2 * a)} for a in range(6)]
    path = tmp_path_factory.mktemp("rlaif") / "rlaif.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_grpo_trains_with_rollouts_on_our_server(server, agent_chain, rlaif, tok, tmp_path, monkeypatch):
    """--rollout_engine sglang: every completion is sampled by the server (4 per step), which reloads the policy
    before rollouts 1 and 3 (--save_interval 2) and at the end; the old log-probs are the server's: the policy's
    own at step 1 (ratio 1 within 1e-4), one update behind at step 2 (the ratio measures the lag); at the end the
    server runs the trained policy, the weight file the run wrote."""
    url, app = server
    monkeypatch.setenv("MINIMIND_API_KEY", "sk-rl")
    monkeypatch.setattr(rl, "answer_correct", lambda text, ref: len(text) % 2 == 0)
    synced, real_sync = [], OpenAIRolloutEngine.update_policy
    monkeypatch.setattr(OpenAIRolloutEngine, "update_policy", lambda self, model: synced.append(
        {k: v.detach().half().clone() for k, v in model.state_dict().items()}) or real_sync(self, model))
    ratios, real_update = [], train_grpo.grpo_update

    def update(model, args, ro, k):
        logp = completion_logps(model, ro["roll"])[0].detach()
        on = ro["roll"].completion_mask.bool()
        ratios.append((logp - ro["old_logp"])[on].abs().max().item())
        return real_update(model, args, ro, k)
    monkeypatch.setattr(train_grpo, "grpo_update", update)
    argv = tiny_train_args(tmp_path, rlaif, from_dir=agent_chain[0] / "out", tokenizer_path=FAMILY_TOKENIZER_DIR["minimind3"],
                           reasoning=0, reward="rule", max_gen_len=8, batch_size=2, num_generations=2,
                           learning_rate=1e-2, dtype="float32", max_steps=3, save_interval=2,
                           rollout_engine="sglang", sglang_base_url=url, sglang_shared_path=tmp_path / "shared")
    path, loss = train_grpo.main(argv)
    assert math.isfinite(loss) and served(url, "/v1/completions") == 3 * 2 * 2
    assert served(url, "/update_weights_from_disk") == len(synced) == 3
    base = torch.load(agent_chain[0] / "out" / "full_sft_64.pth")
    assert all(torch.equal(synced[0][k], base[k]) for k in base)             # before step 1: the starting weights
    assert any(not torch.equal(synced[1][k], base[k]) for k in base)         # before step 3: the updated policy
    now, final = app.engine.model.state_dict(), torch.load(path)
    assert all(torch.equal(now[k].half(), synced[2][k]) and torch.equal(synced[2][k], final[k]) for k in final)
    assert ratios[0] < 1e-4 and ratios[1] > 1e-3 and ratios[2] < 1e-2      # step 2's server lags by one update
    on_disk = load_transformers(tmp_path / "shared").state_dict()
    assert all(torch.equal(on_disk[k].half(), final[k]) for k in on_disk)


def test_agent_trains_with_rollouts_on_our_server(server, agent_chain, tmp_path, monkeypatch):
    url, _ = server
    monkeypatch.setenv("MINIMIND_API_KEY", "sk-rl")
    vary_rewards(monkeypatch)
    path, loss = train_agent.main(agent_args(agent_chain, tmp_path, rollout_engine="openai", save_interval=1,
                                             sglang_base_url=url, sglang_shared_path=tmp_path / "shared"))
    assert path.exists() and math.isfinite(loss)
    assert served(url, "/update_weights_from_disk") == 3 and served(url, "/v1/completions") >= 2 * 2 * 2
    log = [json.loads(line) for line in open(tmp_path / "out" / "agent_64_metrics.jsonl")]
    assert [r["step"] for r in log] == [1, 2]


def test_a_wrong_key_stops_training_with_one_line(server, tok, tmp_path, monkeypatch):
    url, _ = server
    monkeypatch.setenv("MINIMIND_API_KEY", "sk-wrong")
    args = type("A", (), {"rollout_engine": "openai", "sglang_base_url": url, "sglang_shared_path": None,
                          "checkpoint_dir": str(tmp_path), "save_interval": 5})
    engine = create_rollout_engine(args, None, tok, None, "grpo")
    assert engine.shared_path == tmp_path / "sglang_ckpt_grpo"
    from trainer.core.loop import TrainingError
    with pytest.raises(TrainingError, match="did not load the policy.*401"):
        engine.prepare(MiniMindForCausalLM(MiniMindConfig(**CFG)))
