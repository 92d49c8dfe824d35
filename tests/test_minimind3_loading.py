"""Loading minimind-3 (the original's newest family) through model/loading.py, as every entry point does: the
original's `.pth` without a .json (config from the tensor shapes, no flag), a transformers folder with the original's
config.json, a stock Qwen3 / Qwen3-MoE folder (the original's published format; fused experts too), the family's own
tokenizer and chat template, --model_family checked against the weight, bad shapes and unknown config keys as one
line and exit code 2; the engine, eval_llm.py and the server answering with a tiny minimind-3 model."""
import argparse
import json
import re
import runpy
import shutil
import sys

import pytest
import torch

from model.chat_format import build_prompt, parse_output
from model.cli import add_model_args
from model.engine import Engine, SamplingParams
from model.loading import (FAMILY_TOKENIZER_DIR, TOKENIZER_DIR, find_weight, load_model, load_native, load_tokenizer,
                           load_transformers, load_weights, qwen3_to_minimind_config, shapes_config)
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.weights import LoadError, save_weights, weight_path
from tests.conftest import GOLDENS, ROOT, tiny_config

MM3_TOKENIZER = FAMILY_TOKENIZER_DIR["minimind3"]


def golden(kind):
    return torch.load(GOLDENS / f"model3_{kind}.pt")


def original_pth(directory, kind="dense", name="full_sft", edit=None):
    """The original's weight file: a plain torch.save of the fp16 state dict (both tied keys, no .json)."""
    state = dict(golden(kind)["state_dict"])
    if edit:
        edit(state)
    path = directory / f"{name}_64{'_moe' if kind == 'moe' else ''}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def parse(argv):
    return add_model_args(argparse.ArgumentParser(allow_abbrev=False)).parse_args([*map(str, argv), "--device", "cpu"])


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def close(model, g):
    return (logits(model, g["input_ids"]) - g["logits"]).abs().max().item() <= 1e-5


def copy_tokenizer(folder, template_marker=None):
    """The minimind-3 tokenizer files in `folder`; template_marker: appended to the chat template (so a test can
    tell the folder's template from the shipped one)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(MM3_TOKENIZER / "tokenizer.json", folder)
    cfg = json.loads((MM3_TOKENIZER / "tokenizer_config.json").read_text(encoding="utf-8"))
    if template_marker:
        cfg["chat_template"] += template_marker
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")


def qwen3_folder(folder, kind="dense", fused=False):
    """The original's convert_torch2transformers: a stock Qwen3ForCausalLM / Qwen3MoeForCausalLM built from the
    golden weights and saved by transformers (safetensors), its config.json patched as the original's exporter does
    (rope_theta, rope_scaling null, no rope_parameters), plus the tokenizer. fused=True rewrites each layer's experts
    as transformers 5 holds them in memory (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    g = golden(kind)
    c, state = g["config_json"], {k: v.float() for k, v in g["state_dict"].items()}
    common = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                  num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                  num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
                  max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c["rms_norm_eps"],
                  rope_theta=c["rope_theta"], tie_word_embeddings=c["tie_word_embeddings"])
    if kind == "dense":
        model = Qwen3ForCausalLM(Qwen3Config(**common, use_sliding_window=False, sliding_window=None))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, num_experts=c["num_experts"],
                                                   num_experts_per_tok=c["num_experts_per_tok"],
                                                   moe_intermediate_size=c["moe_intermediate_size"],
                                                   norm_topk_prob=c["norm_topk_prob"]))
        if any(k.endswith("experts.gate_up_proj") for k in model.state_dict()):   # transformers 5 holds them fused
            state = fuse(state, c["num_hidden_layers"], c["num_experts"])
    model.load_state_dict(state, strict=True)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(rope_theta=c["rope_theta"], rope_scaling=None)
    config.pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if fused:
        files = list(folder.glob("*.safetensors"))
        saved = {k: v for f in files for k, v in load_file(f).items()}
        for f in files:
            f.unlink()
        save_file(fuse(saved, c["num_hidden_layers"], c["num_experts"]), folder / "model.safetensors")
    copy_tokenizer(folder)
    return folder


def fuse(state, layers, experts):
    out = {k: v for k, v in state.items() if ".experts." not in k}
    for i in range(layers):
        p = f"model.layers.{i}.mlp.experts"
        gate = torch.stack([state[f"{p}.{e}.gate_proj.weight"] for e in range(experts)])
        up = torch.stack([state[f"{p}.{e}.up_proj.weight"] for e in range(experts)])
        out[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
        out[f"{p}.down_proj"] = torch.stack([state[f"{p}.{e}.down_proj.weight"] for e in range(experts)]).contiguous()
    return out


# ---- native .pth ----
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_original_pth_loads_without_flags_with_golden_logits_and_its_tokenizer(kind, tmp_path, capsys):
    out = tmp_path / "out"
    path = original_pth(out, kind)
    model, tokenizer, description = load_model(parse(["--save_dir", out]))
    assert description == f"native weights {path}" and model.config.model_family == "minimind3"
    assert model.config.use_moe == (kind == "moe") and model.config.tie_word_embeddings
    assert close(model, golden(kind))
    assert "open_thinking" in tokenizer.chat_template                     # model/minimind3, never model/
    err = capsys.readouterr().err
    assert f"note: {path.name} has no .json config: read as minimind-3 from its tensor shapes" in err
    assert "MiniMind2" not in err and "minimind3)" in err


def test_shapes_give_the_config_and_tied_or_untied_head(tmp_path):
    state = golden("moe")["state_dict"]
    cfg = shapes_config(state, "x.pth")
    expected = MiniMindConfig.from_dict(dict(golden("moe")["config_json"]))
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "moe_intermediate_size", "num_experts", "vocab_size", "use_moe",
                "tie_word_embeddings", "rms_norm_eps", "rope_theta", "num_experts_per_tok", "model_family"):
        assert getattr(cfg, key) == getattr(expected, key), key
    no_head = original_pth(tmp_path / "a", edit=lambda s: s.pop("lm_head.weight"))   # a tied head stored once
    assert close(load_native(no_head), golden("dense"))
    untied = original_pth(tmp_path / "b", edit=lambda s: s.update({"lm_head.weight": s["lm_head.weight"] * 2}))
    model = load_native(untied)
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, 2 * model.model.embed_tokens.weight)


def test_our_json_next_to_a_minimind3_weight_is_used(tmp_path):
    torch.manual_seed(0)
    cfg = MiniMindConfig(model_family="minimind3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rope_theta=5e5)
    path = save_weights(MiniMindForCausalLM(cfg), weight_path(tmp_path, "full_sft", cfg), cfg)
    assert load_native(path).config.rope_theta == 5e5                       # the .json, not the shapes' default


def test_find_weight_minimind3_names_the_768_files(tmp_path):
    for name in ("full_sft_512.pth", "full_sft_768.pth", "full_sft_768_moe.pth"):
        (tmp_path / name).write_bytes(b"")
    assert find_weight(tmp_path, "full_sft") == tmp_path / "full_sft_512.pth"
    assert find_weight(tmp_path, "full_sft", model_family="minimind3") == tmp_path / "full_sft_768.pth"
    assert find_weight(tmp_path, "full_sft", use_moe=1, model_family="minimind3") == tmp_path / "full_sft_768_moe.pth"
    assert find_weight(tmp_path, "full_sft", hidden_size=512, model_family="minimind3") == tmp_path / "full_sft_512.pth"
    assert find_weight(tmp_path, "full_sft", model_family="minimind2") == tmp_path / "full_sft_512.pth"


def test_trainers_from_weight_of_the_other_family_is_one_line(tmp_path):
    path = original_pth(tmp_path)
    with pytest.raises(LoadError, match=r"full_sft_64\.pth holds a minimind3 model, the config a minimind2 one "
                                        r"\(check --model_family"):
        load_weights(MiniMindForCausalLM(tiny_config()), path)
    model = MiniMindForCausalLM(MiniMindConfig.from_dict(dict(golden("dense")["config_json"])))
    load_weights(model, original_pth(tmp_path / "b", edit=lambda s: s.pop("lm_head.weight")))
    assert close(model.eval(), golden("dense"))


# ---- transformers folders ----
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_folder_with_the_originals_config_json_uses_its_own_tokenizer(kind, tmp_path):
    g, folder = golden(kind), tmp_path / "minimind-3"
    folder.mkdir()
    config = {**g["config_json"], "architectures": ["MiniMindForCausalLM"], "max_seq_len": 8192,
              "auto_map": {"AutoConfig": "model_minimind.MiniMindConfig",
                           "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(g["state_dict"], folder / "pytorch_model.bin")       # the original's save_pretrained(safe=False)
    copy_tokenizer(folder, template_marker="{#- this folder #}")
    model, tokenizer, _ = load_model(parse(["--load_from", folder]))
    assert model.config.model_family == "minimind3" and close(model, g)
    assert tokenizer.chat_template.endswith("{#- this folder #}")


@pytest.mark.parametrize("kind, fused", [("dense", False), ("moe", False), ("moe", True)])
def test_stock_qwen3_folder_loads_as_minimind3(kind, fused, tmp_path):
    folder = qwen3_folder(tmp_path / "minimind-3", kind, fused)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == ("qwen3" if kind == "dense" else "qwen3_moe")
    model, tokenizer, description = load_model(parse(["--load_from", folder]))
    assert isinstance(model, MiniMindForCausalLM) and model.config.model_family == "minimind3"
    assert description == f"transformers folder {folder}" and "open_thinking" in tokenizer.chat_template
    assert close(model, golden(kind))
    assert close(load_transformers(folder, model_family="minimind3"), golden(kind))


def test_qwen3_folder_without_tokenizer_uses_the_minimind3_one(tmp_path):
    folder = qwen3_folder(tmp_path / "q")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).unlink()
    _, tokenizer, _ = load_model(parse(["--load_from", folder]))
    assert tokenizer.chat_template == load_tokenizer(MM3_TOKENIZER).chat_template


QWEN3 = dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
             head_dim=8, intermediate_size=256, vocab_size=6400, rope_theta=1e6, rope_scaling=None,
             tie_word_embeddings=True)


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention biases"),
    ({"use_sliding_window": True, "sliding_window": 4096}, "sliding-window attention"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window attention"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope type 'linear' has no MiniMind equivalent"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6}}, "rope type 'dynamic'"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 1, "moe_intermediate_size": 256,
      "mlp_only_layers": [0]}, "dense layers among its MoE layers"),
    ({"model_type": "qwen3_moe", "num_experts_per_tok": 1, "moe_intermediate_size": 256}, "no num_experts"),
])
def test_qwen3_configs_minimind3_cannot_express_are_one_line(change, message):
    with pytest.raises(LoadError, match=rf"^cfg/config\.json: .*{message}") as err:
        qwen3_to_minimind_config({**QWEN3, **change}, "cfg/config.json")
    assert "\n" not in str(err.value)
    cfg = qwen3_to_minimind_config({**QWEN3, "head_dim": 16}, "x")   # Qwen3's free head_dim is minimind-3's too
    assert (cfg.model_family, cfg.head_dim, cfg.num_attention_heads) == ("minimind3", 16, 8)


# ---- the chat format ----
def test_minimind3_prompt_closes_an_empty_think_block_as_the_originals_eval_llm():
    tokenizer = load_tokenizer(MM3_TOKENIZER)
    messages = [{"role": "user", "content": "你好"}]
    prompt = build_prompt(tokenizer, messages)
    assert prompt == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                   open_thinking=False)   # the original's eval_llm default
    assert prompt == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert build_prompt(tokenizer, messages, raw=True) == "<|im_start|>你好"


# ---- generation ----
def tiny_minimind3(kind, seed=0):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig.from_dict(dict(golden(kind)["config_json"]))).eval()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_engine_greedy_equals_generate_for_minimind3(kind):
    model = tiny_minimind3(kind)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 6400, (n,), generator=g).tolist() for n in (3, 11, 25, 7)]
    with Engine(model, max_batch=3, prefill_chunk=8, eos_token_id=2) as engine:
        outs = engine.generate(prompts, [SamplingParams(max_tokens=6 + i) for i in range(len(prompts))])
    for i, (p, out) in enumerate(zip(prompts, outs)):
        ids = torch.tensor([p])
        alone = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6 + i, do_sample=False,
                               pad_token_id=0, eos_token_id=2)[0, len(p):].tolist()
        assert out.token_ids == alone


def run_entry(module_file, argv, capsys):
    """`python {module_file} argv` in-process through its `cli(main)`: (exit code, stdout, stderr)."""
    capsys.readouterr()   # what the test printed before
    old = sys.argv
    sys.argv = [str(module_file), *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(module_file), run_name="__main__")
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def test_eval_llm_answers_with_a_minimind3_weight(tmp_path, monkeypatch, capsys):
    import io

    import eval_llm
    path = original_pth(tmp_path / "out")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    eval_llm.main(["--save_dir", str(tmp_path / "out"), "--device", "cpu", "--prompt", "你好", "--temperature", "0",
                   "--max_new_tokens", "12", "--repetition_penalty", "1.0"])
    lines = capsys.readouterr().out.splitlines()
    model, tokenizer = load_native(path), load_tokenizer(MM3_TOKENIZER)
    ids = tokenizer(build_prompt(tokenizer, [{"role": "user", "content": "你好"}]), return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=0, eos_token_id=2)
    text = parse_output(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))["content"]
    assert text and lines == [text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")]


def test_server_answers_a_chat_completion_with_a_minimind3_model(tmp_path):
    pytest.importorskip("fastapi")
    from scripts.serve_openai_api import build_parser, create_app
    from tests.test_serve import client, greedy, serving
    original_pth(tmp_path / "out", "moe")
    model, tokenizer, _ = load_model(build_parser().parse_args(["--save_dir", str(tmp_path / "out"),
                                                                "--device", "cpu"]))
    assert model.config.model_family == "minimind3" and "open_thinking" in tokenizer.chat_template
    messages = [{"role": "user", "content": "你好"}]
    with serving(create_app(model, tokenizer)) as url:
        r = client(url).chat.completions.create(model="minimind", messages=messages, temperature=0, max_tokens=10)
        chunks = list(client(url).chat.completions.create(model="minimind", messages=messages, temperature=0,
                                                          max_tokens=10, stream=True))
    text, prompt_tokens, completion_tokens = greedy(model, tokenizer, messages, 10)
    assert text   # the random model says something visible: the comparison is not vacuous
    assert r.choices[0].message.content == text and r.usage.prompt_tokens == prompt_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


# ---- the family flag, bad shapes, unknown config keys: one line, exit code 2 ----
def drop_layer0(state):
    for key in [k for k in state if k.startswith("model.layers.0.")]:
        del state[key]


def bad_q_norm(state):          # head_dim 16 fits layer 0 (64 rows = 4 heads of 16) but not layer 1 (q_norm 8)
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16, dtype=torch.float16)
    state["model.layers.0.self_attn.k_norm.weight"] = torch.ones(16, dtype=torch.float16)


def odd_q_norm(state):
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(7, dtype=torch.float16)


def odd_k_proj(state):
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(36, 64, dtype=torch.float16)


def few_kv_heads(state):        # 8 query heads cannot share 3 key/value heads
    for i in (0, 1):
        for p in ("k_proj", "v_proj"):
            state[f"model.layers.{i}.self_attn.{p}.weight"] = torch.zeros(24, 64, dtype=torch.float16)


def unknown_json_key(path):
    values = dict(golden("dense")["config_json"])
    values["attention_sink"] = True
    path.with_suffix(".json").write_text(json.dumps(values))


@pytest.mark.parametrize("edit, after, flags, message", [
    (drop_layer0, None, [], r"{path}: layer 0 missing \(found 1 of layers 0\.\.1\)"),
    (bad_q_norm, None, [], r"{path}: model\.layers\.1\.self_attn\.q_norm\.weight has shape \(8,\), the model "
                           r"expects \(16,\)"),
    (odd_q_norm, None, [], r"{path}: model\.layers\.0\.self_attn\.q_proj\.weight has 64 rows, not a whole number of "
                           r"heads of q_norm's size 7"),
    (odd_k_proj, None, [], r"{path}: model\.layers\.0\.self_attn\.k_proj\.weight has 36 rows, not a whole number"),
    (few_kv_heads, None, [], r"{path}: 8 query heads cannot share 3 key/value heads evenly"),
    (None, unknown_json_key, [], r"{json}: unknown config key attention_sink \(neither MiniMind2 nor minimind-3 has "
                                 r"it\)"),
    (None, None, ["--model_family", "minimind2"], r"--model_family minimind2 contradicts {path}, which holds a "
                                                  r"minimind3 model"),
    (None, None, ["--hidden_size", "128"], r"weight file .*full_sft_128\.pth not found"),
    (None, None, ["--num_hidden_layers", "8"], r"--num_hidden_layers 8 contradicts {path} \(num_hidden_layers=2 "
                                               r"by its tensor shapes\)"),
])
def test_bad_minimind3_input_is_one_line_and_exit_code_2(edit, after, flags, message, tmp_path, capsys):
    path = original_pth(tmp_path / "out", edit=edit)
    if after:
        after(path)
    code, out, err = run_entry(ROOT / "eval_llm.py", ["--save_dir", tmp_path / "out", "--device", "cpu",
                                                      "--prompt", "hi", *flags], capsys)
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    pattern = message.format(path=re.escape(str(path)), json=re.escape(str(path.with_suffix(".json"))))
    assert re.match("error: " + pattern, err), err


@pytest.mark.parametrize("target", ["minimind2 pth", "qwen3 folder", "minimind folder"])
def test_family_flag_contradicting_the_weight_names_both(target, tmp_path, capsys):
    if target == "minimind2 pth":
        torch.manual_seed(0)
        cfg = tiny_config()
        source = save_weights(MiniMindForCausalLM(cfg), weight_path(tmp_path, "full_sft", cfg), cfg)
        flags, named = ["--load_from", source, "--tokenizer_path", TOKENIZER_DIR], source.with_suffix(".json")
        found, typed = "minimind2", "minimind3"
        (tmp_path / "bare").mkdir()
        bare = shutil.copy(source, tmp_path / "bare" / source.name)           # no .json: its keys tell
        with pytest.raises(LoadError, match="--model_family minimind3 contradicts .*bare.*holds a minimind2 model"):
            load_native(bare, num_hidden_layers=2, model_family="minimind3")
    else:
        source = qwen3_folder(tmp_path / "q") if target == "qwen3 folder" else tmp_path / "m"
        if target == "minimind folder":
            source.mkdir()
            (source / "config.json").write_text(json.dumps(golden("dense")["config_json"]))
            torch.save(golden("dense")["state_dict"], source / "pytorch_model.bin")
        flags, named, found, typed = ["--load_from", source], source / "config.json", "minimind3", "minimind2"
    code, _, err = run_entry(ROOT / "scripts" / "serve_openai_api.py", [*flags, "--model_family", typed,
                                                                        "--device", "cpu"], capsys)
    assert code == 2 and err.strip() == (f"error: --model_family {typed} contradicts {named}, which holds a {found} "
                                         f"model; drop the flag or point at a {typed} weight"), err


def test_unknown_key_in_a_minimind_config_json_but_standard_keys_pass(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save(golden("dense")["state_dict"], folder / "pytorch_model.bin")
    standard = {**golden("dense")["config_json"], "torch_dtype": "float16", "use_cache": True, "pad_token_id": 0,
                "_attn_implementation_autoset": True, "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "config.json").write_text(json.dumps(standard))
    assert close(load_transformers(folder), golden("dense"))
    (folder / "config.json").write_text(json.dumps({**standard, "n_shared_expert": 1, "qk_layernorm": True}))
    with pytest.raises(LoadError, match=r"config\.json: unknown config keys n_shared_expert, qk_layernorm \(neither"):
        load_transformers(folder)


def test_minimind2_weights_keep_their_tokenizer_and_note(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = tiny_config(num_attention_heads=8)   # the heads MiniMind2 assumes without a .json
    path = save_weights(MiniMindForCausalLM(cfg), weight_path(tmp_path / "out", "full_sft", cfg))   # no .json
    model, tokenizer, _ = load_model(parse(["--save_dir", tmp_path / "out", "--num_hidden_layers", 2,
                                            "--model_family", "minimind2"]))
    assert model.config.model_family == "minimind2" and "open_thinking" not in tokenizer.chat_template
    assert tokenizer.chat_template == load_tokenizer(TOKENIZER_DIR).chat_template
    err = capsys.readouterr().err
    assert f"note: {path.name} has no .json config, so it was not trained with this repository" in err
    load_model(parse(["--save_dir", tmp_path / "out", "--num_hidden_layers", 2, "--tokenizer_path", MM3_TOKENIZER]))
    assert "the tokenizer in" in capsys.readouterr().err                       # the other family's tokenizer


@pytest.mark.parametrize("cfg", [
    {"model_type": "qwen3", "num_attention_heads": 0},
    {"model_type": "qwen3", "hidden_size": "64"},
    {"model_type": "qwen3", "rope_scaling": [1]},
    {"model_type": "minimind", "num_attention_heads": 0}], ids=["zero-heads", "str-size", "list-rope", "mm-zero-heads"])
def test_a_config_field_of_the_wrong_type_is_one_line(cfg, tmp_path):
    """Found in review: these raised ZeroDivisionError / TypeError / AttributeError (a 500 from /v1/reload)."""
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=256, vocab_size=6400)
    (tmp_path / "config.json").write_text(json.dumps({**base, **cfg}))
    with pytest.raises(LoadError, match="config.json: a field has a value MiniMind cannot use"):
        load_transformers(tmp_path)


def test_the_reload_loader_never_runs_a_folders_code(tmp_path):
    """Found in review: /v1/reload of a folder with another model_type went through trust_remote_code=True."""
    from scripts.serve_openai_api import weight_loader
    (tmp_path / "evil.py").write_text("open(__file__ + '.ran', 'w').write('x')\n")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "evil.C", "AutoModelForCausalLM": "evil.M"}}))
    with pytest.raises(LoadError, match="model_type 'evil': the reload endpoint loads only"):
        weight_loader("cpu")(str(tmp_path))
    assert not (tmp_path / "evil.py.ran").exists()
