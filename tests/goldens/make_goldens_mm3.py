"""Golden vectors from upstream minimind HEAD (d65ef2c, "minimind-3"), made by running upstream's own code.

Not run by the tests: they read the files it wrote (tests/goldens/mm3_*.json). It needs an extracted upstream
tree, which is not part of this repository:

    git --git-dir <mirror of jingyaogong/minimind> archive d65ef2c model trainer dataset scripts eval_llm.py | tar -x -C /tmp/mm3
    python tests/goldens/make_goldens_mm3.py /tmp/mm3 /tmp/mm3_goldens_out
    cp /tmp/mm3_goldens_out/mm3_{chat_templates,sft_loss_masks,data_pretrain}.json tests/goldens/

Runs on CPU in well under a minute (torch 2.13 + transformers 5.23 + tokenizers 0.23 + jinja2).
`datasets` is not needed: it is stubbed, because lm_dataset.py imports it at module level.
The model part writes *.pt files and meta.json next to the json files; tests/goldens/README.md says what is in
each file.
"""
import json, os, random, sys, types

SRC, OUT = sys.argv[1], sys.argv[2]
os.makedirs(OUT, exist_ok=True)
sys.path.insert(0, SRC)

# --- stub `datasets` (only used by the Dataset constructors, which we bypass) ---
stub = types.ModuleType("datasets")
stub.load_dataset = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stub"))
stub.Features = stub.Sequence = stub.Value = lambda *a, **k: None
sys.modules.setdefault("datasets", stub)

import torch
import transformers
from transformers import AutoTokenizer
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, precompute_freqs_cis
from dataset import lm_dataset as LD

torch.set_num_threads(1)
meta = {"torch": torch.__version__, "transformers": transformers.__version__, "upstream_commit": "d65ef2c"}

# ---------------------------------------------------------------- model
IDS = torch.tensor([[1, 872, 3019, 25, 201, 26, 201, 201, 4059, 2, 201, 1, 1078, 538, 201, 310],
                    [1, 320, 275, 201, 5632, 99, 43, 17, 2, 0, 1000, 6399, 21, 22, 27, 35]])


def build(use_moe, seed=1234):
    torch.manual_seed(seed)
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, use_moe=use_moe)
    return cfg, MiniMindForCausalLM(cfg)


def model_goldens(tag, use_moe):
    cfg, m = build(use_moe)
    sd = m.state_dict()
    info = {
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id")},
        "state_dict": [[k, list(v.shape)] for k, v in sd.items()],
        "n_params_unique": sum(p.numel() for p in m.parameters()),
        "tied": m.lm_head.weight is m.model.embed_tokens.weight,
        "init_std_q_proj": m.model.layers[0].self_attn.q_proj.weight.std().item(),
    }
    torch.save({k: v.clone() for k, v in sd.items()}, f"{OUT}/{tag}_state_dict.pt")
    m.eval()
    with torch.no_grad():
        out = m(IDS, labels=IDS)
        info["eval_loss_labels=ids"] = out.loss.item()
        info["eval_aux_loss"] = float(out.aux_loss)
        # left-padded batch with attention mask (slow attention path)
        am = torch.ones_like(IDS); am[1, :3] = 0
        out_m = m(IDS, attention_mask=am)
        # KV-cache consistency: prefill 10 tokens then feed 6 one by one
        o1 = m(IDS[:, :10], use_cache=True)
        pkv, steps = o1.past_key_values, []
        for t in range(10, 16):
            o = m(IDS[:, t:t + 1], past_key_values=pkv, use_cache=True)
            pkv = o.past_key_values
            steps.append(o.logits[:, -1])
        kv_err = (torch.stack(steps, 1) - out.logits[:, 10:]).abs().max().item()
        info["kv_cache_max_abs_err_vs_full"] = kv_err
        # multi-token prefill on non-empty cache (fixed upstream in 1279a61)
        o2 = m(IDS[:, 10:], past_key_values=o1.past_key_values, use_cache=True)
        info["chunked_prefill_max_abs_err"] = (o2.logits - out.logits[:, 10:]).abs().max().item()
        gen = m.generate(IDS[:, :8], max_new_tokens=8, do_sample=False, eos_token_id=2)
        info["greedy_generate_ids"] = gen.tolist()
    m.train()
    out_t = m(IDS, labels=IDS)
    info["train_loss_labels=ids"] = out_t.loss.item()
    info["train_aux_loss"] = float(out_t.aux_loss)
    torch.save({"input_ids": IDS, "attention_mask_row1_leftpad3": am, "logits_eval": out.logits,
                "logits_eval_masked": out_m.logits, "hidden_states_final_norm": out.hidden_states},
               f"{OUT}/{tag}_logits.pt")
    return info


meta["dense"] = model_goldens("dense_h64_l2", False)
meta["moe"] = model_goldens("moe_h64_l2", True)

# RoPE tables (head_dim 96 = minimind-3 768/8), plain and YaRN
rows = [0, 1, 2, 100, 2047, 4095, 32767]
c_plain, s_plain = precompute_freqs_cis(96, 32768, 1e6, None)
yarn = MiniMindConfig(inference_rope_scaling=True).rope_scaling
c_yarn, s_yarn = precompute_freqs_cis(96, 32768, 1e6, yarn)
torch.save({"rows": rows, "cos": c_plain[rows], "sin": s_plain[rows], "cos_yarn": c_yarn[rows],
            "sin_yarn": s_yarn[rows], "yarn_cfg": yarn}, f"{OUT}/rope_hd96.pt")

# ---------------------------------------------------------------- tokenizer / template
tok = AutoTokenizer.from_pretrained(f"{SRC}/model")
meta["tokenizer"] = {"len": len(tok), "bos": [tok.bos_token, tok.bos_token_id], "eos": [tok.eos_token, tok.eos_token_id],
                     "pad": [tok.pad_token, tok.pad_token_id], "unk": [tok.unk_token, tok.unk_token_id],
                     "ids": {t: tok.convert_tokens_to_ids(t) for t in ["<tool_call>", "</tool_call>", "<tool_response>",
                             "</tool_response>", "<think>", "</think>", "<|buffer9|>"]},
                     "encode_'<think>\\n\\n</think>\\n\\n'": tok("<think>\n\n</think>\n\n", add_special_tokens=False).input_ids,
                     "encode_'<|im_start|>assistant\\n'": tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids,
                     "encode_'<|im_end|>\\n'": tok("<|im_end|>\n", add_special_tokens=False).input_ids,
                     "encode_default_vs_nospecial_equal": tok("hi<|im_end|>").input_ids == tok("hi<|im_end|>", add_special_tokens=False).input_ids}

TOOLS = [{"type": "function", "function": {"name": "get_current_weather", "description": "获取天气",
          "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}]
CONVS = {
    "plain_user": dict(messages=[{"role": "user", "content": "你好"}]),
    "system_user_assistant": dict(messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                            {"role": "assistant", "content": "A"}]),
    "assistant_reasoning_content": dict(messages=[{"role": "user", "content": "Q"},
                                                  {"role": "assistant", "content": "A", "reasoning_content": "\nR1\nR2\n"}]),
    "assistant_think_in_content": dict(messages=[{"role": "user", "content": "Q"},
                                                 {"role": "assistant", "content": "<think>\nR\n</think>\n\nA"}]),
    "multi_turn": dict(messages=[{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                                 {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]),
    "tools_full": dict(messages=[{"role": "system", "content": "SYS"}, {"role": "user", "content": "北京天气？"},
                                 {"role": "assistant", "content": "", "tool_calls": [{"name": "get_current_weather", "arguments": {"location": "北京"}}]},
                                 {"role": "tool", "content": "{\"temp\": \"28°C\"}"},
                                 {"role": "assistant", "content": "28°C"}], tools=TOOLS),
    "tools_openai_style_two_calls": dict(messages=[{"role": "user", "content": "Q"},
                                                   {"role": "assistant", "content": "ok", "tool_calls": [
                                                       {"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
                                                       {"id": "c1", "type": "function", "function": {"name": "g", "arguments": {}}}]},
                                                   {"role": "tool", "content": "R1"}, {"role": "tool", "content": "R2"}], tools=TOOLS),
}
rendered = {}
for name, c in CONVS.items():
    for agp in (False, True):
        variants = [None] if not agp else [None, True, False, "enable_thinking=False"]
        for ot in variants:
            kw = dict(tokenize=False, add_generation_prompt=agp, tools=c.get("tools"))
            if ot == "enable_thinking=False":
                kw["enable_thinking"] = False
            elif ot is not None:
                kw["open_thinking"] = ot
            key = f"{name}|agp={agp}|open_thinking={ot}"
            s = tok.apply_chat_template(c["messages"], **kw)
            kwargs = {k: v for k, v in kw.items() if k not in ("tokenize", "tools")}
            rendered[key] = {"messages": c["messages"], "tools": c.get("tools"), "kwargs": kwargs,
                             "text": s, "ids": tok(s, add_special_tokens=False).input_ids}
json.dump(rendered, open(f"{OUT}/mm3_chat_templates.json", "w"), ensure_ascii=False, indent=1)

# ---------------------------------------------------------------- loss masks (SFT / DPO) using HEAD's code
sft = LD.SFTDataset.__new__(LD.SFTDataset)
sft.tokenizer, sft.max_length = tok, 384
sft.bos_id = tok(f"{tok.bos_token}assistant\n", add_special_tokens=False).input_ids
sft.eos_id = tok(f"{tok.eos_token}\n", add_special_tokens=False).input_ids
masks = {"bos_id": sft.bos_id, "eos_id": sft.eos_id, "max_length": 384, "samples": {}}
SFT_SAMPLES = {  # stored the way SFTDataset's Features cast them (tools / tool_calls as JSON strings)
    "plain": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}],
    "reasoning": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "reasoning_content": "一加一等于二"}],
    "tool": [{"role": "system", "content": "", "tools": json.dumps(TOOLS, ensure_ascii=False)},
             {"role": "user", "content": "北京天气"},
             {"role": "assistant", "content": "", "tool_calls": json.dumps([{"name": "get_current_weather", "arguments": {"location": "北京"}}], ensure_ascii=False)},
             {"role": "tool", "content": "{\"t\":1}"}, {"role": "assistant", "content": "晴"}],
}
for name, conv in SFT_SAMPLES.items():
    prompt = sft.create_chat_prompt(conv)  # pre/post processing (random system prompt / empty-think removal) skipped
    for strip_empty in (False, True):
        p = prompt.replace("<think>\n\n</think>\n\n", "") if strip_empty else prompt
        ids = tok(p).input_ids[:sft.max_length]
        ids += [tok.pad_token_id] * (sft.max_length - len(ids))
        labels = sft.generate_labels(ids)
        masks["samples"][f"{name}|empty_think_removed={strip_empty}"] = {
            "conversations": conv, "prompt": p, "input_ids": ids, "labels": labels,
            "supervised_text": tok.decode([t for t, l in zip(ids, labels) if l != -100])}
# pre/post-processing randomness under a fixed seed
random.seed(0)
masks["pre_processing_chat_seed0_x5"] = [LD.pre_processing_chat([{"role": "user", "content": "x"}]) for _ in range(5)]
masks["post_processing_chat_seed0_x5"] = [LD.post_processing_chat("<think>\n\n</think>\n\nA") for _ in range(5)]
json.dump(masks, open(f"{OUT}/mm3_sft_loss_masks.json", "w"), ensure_ascii=False, indent=1)

# ---------------------------------------------------------------- pretrain samples using HEAD's code
pt = LD.PretrainDataset.__new__(LD.PretrainDataset)
pt.tokenizer, pt.max_length = tok, 64
pt.samples = [{"text": "你好，世界！MiniMind 是一个很小的语言模型。"},
              {"text": "def f(x):\n    return x * 2  # 3+5=8 😀"},
              {"text": "长文本会被截断。" * 12 + " The end is cut off."}]  # > 62 tokens: truncated, then EOS
pretrain = {"max_length": pt.max_length, "samples": pt.samples, "outputs": []}
for i in range(len(pt.samples)):
    input_ids, labels = pt[i]
    pretrain["outputs"].append({"input_ids": input_ids.tolist(), "labels": labels.tolist()})
json.dump(pretrain, open(f"{OUT}/mm3_data_pretrain.json", "w"), ensure_ascii=False, indent=1)

# RLAIF prompt (thinking on / off) via HEAD's RLAIFDataset.create_chat_prompt
rl = LD.RLAIFDataset.__new__(LD.RLAIFDataset)
rl.tokenizer = tok
rl_out = {}
for ratio in (0.0, 1.0):
    rl.thinking_ratio = ratio
    random.seed(1)  # pre_processing_chat: random() < 0.2 adds a system prompt
    rl_out[f"thinking_ratio={ratio}"] = rl.create_chat_prompt([{"role": "user", "content": "请解释光合作用"}, {"role": "assistant", "content": "无"}])
json.dump(rl_out, open(f"{OUT}/mm3_rlaif_prompts.json", "w"), ensure_ascii=False, indent=1)

json.dump(meta, open(f"{OUT}/meta.json", "w"), ensure_ascii=False, indent=1)
print("ok", json.dumps({k: meta[k] for k in ("torch", "transformers")}))
