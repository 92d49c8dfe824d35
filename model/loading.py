"""Loading MiniMind models, written once: every entry point uses this module (eval_llm.py, the server, the
web demo, the eval scripts, convert_model.py, the benches, and the trainers for their weight files).

    # in a script (the flags are model/cli.py's):
    #   args = add_model_args(argparse.ArgumentParser(allow_abbrev=False)).parse_args()
    #   model, tokenizer, description = load_model(args)

What it does, each in one place:
  * finding a weight by stage, size and MoE (find_weight): the size flags name the file; when no size flag
    was typed and the original's default `{weight}_512.pth` is absent, the one `{weight}_<hidden>[_moe].pth`
    in the folder is used, and several are an error that lists them with the flags that pick each;
  * the family (MiniMind2 or minimind-3): a weight's keys say it (minimind-3 has `self_attn.q_norm`), a config
    its fields; a typed --model_family that contradicts them is an error naming both;
  * its config (native_config): the `.json` the trainers write next to the weight (a typed size flag that
    contradicts it is an error), else for minimind-3 the tensor shapes (the original's published `.pth` files
    have no `.json`), else for MiniMind2 the size in the file name and the size flags; a config key that neither
    family's original nor transformers writes is an error;
  * native `.pth` files (read and CRC-checked by model/weights.py), loaded strictly (every key, every shape);
    transformers folders (MiniMind, Llama and Qwen3 folders -- the last the original's published minimind-3
    format -- are read directly into MiniMindForCausalLM, any other architecture through AutoModelForCausalLM);
    LoRA adapters, a name under `{save_dir}/lora/` (also the original's name without `_moe`) or a path, merged
    into the weights; the tokenizer (the folder's own, else the family's: model/ or model/minimind3/), which never
    runs custom code;
  * paths the user types (resolve_path): an absolute path as given; a relative path against the current
    directory when it exists there, else against the repository root (ROOT, defined here once), so the
    original's `--save_dir out` and `--load_from model` work from any directory;
  * errors are model/weights.py's LoadError, whose message is one line naming the file and what to do
    (NotFoundError, for a missing file, is a LoadError and also a FileNotFoundError).
Reads files only; writes nothing. Imports model_minimind, model_lora, weights and cli only.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import torch

from model.cli import FAMILY_HIDDEN, SIZE_DEFAULTS, typed_sizes
from model.model_lora import apply_lora, load_lora, merge_lora
from model.model_minimind import YARN_ROPE_SCALING, MiniMindConfig, MiniMindForCausalLM
from model.weights import LoadError, NotFoundError, read_state_dict, short_error, weight_path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "model"
# each family's shipped tokenizer: ours for MiniMind2, the original's newest (tools, thinking) for minimind-3
FAMILY_TOKENIZER_DIR = {"minimind2": TOKENIZER_DIR, "minimind3": ROOT / "model" / "minimind3"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# which stage writes which weight prefix (for error messages)
PRODUCED_BY = {"pretrain": "trainer/train_pretrain.py", "full_sft": "trainer/train_full_sft.py",
               "dpo": "trainer/train_dpo.py", "reason": "trainer/train_reason.py",
               "full_dist": "trainer/train_distillation.py", "ppo_actor": "trainer/train_ppo.py",
               "grpo": "trainer/train_grpo.py", "spo": "trainer/train_spo.py"}
_WEIGHT_NAME = re.compile(r"(?P<prefix>.+)_(?P<hidden>\d+)(?P<moe>_moe)?")


# ---- paths ----
def resolve_path(path) -> Path:
    """A path the user typed: absolute as given; relative, against the cwd when it exists there, else against
    the repository root (where the original's relative defaults point)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.absolute()
    return ROOT / p


def is_transformers_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def has_tokenizer(folder) -> bool:
    return Path(folder).is_dir() and any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def _size_flags(path: Path) -> str:
    """The flags that name weight file `path` (layers from its .json when there is one)."""
    m = _WEIGHT_NAME.fullmatch(path.stem)
    flags = f"--hidden_size {m['hidden']}" if m else ""
    try:
        config = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        flags += f" --num_hidden_layers {config['num_hidden_layers']}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return flags + (" --use_moe 1" if m and m["moe"] else "")


def _same_stage(save_dir: Path, weight: str, use_moe=None) -> list:
    """The `{weight}_<hidden>[_moe].pth` files in save_dir (only MoE or only dense ones when use_moe is given)."""
    if not save_dir.is_dir():
        return []
    found = []
    for p in sorted(save_dir.glob("*.pth")):
        m = _WEIGHT_NAME.fullmatch(p.stem)
        if m and m["prefix"] == weight and (use_moe is None or bool(m["moe"]) == bool(use_moe)):
            found.append(p)
    return found


def missing_weight(path, what_to_set: str = "--save_dir, --weight and the size flags") -> str:
    """One line for a weight file that does not exist: the stage that writes it, and the sizes that do exist."""
    path = Path(path)
    m = _WEIGHT_NAME.fullmatch(path.stem)
    prefix = m["prefix"] if m else path.stem
    stage = PRODUCED_BY.get(prefix)
    text = f"weight file {path} not found: " + (f"it is written by {stage}; run that stage first, or check "
                                                f"{what_to_set}" if stage else f"check {what_to_set}")
    others = [p for p in _same_stage(path.parent, prefix) if p != path]
    if others:
        text += "; " + "; ".join(f"{p.name} exists: add {_size_flags(p)}" for p in others)
    return text


def find_weight(save_dir, weight: str, hidden_size: int = None, use_moe: int = None, model_family: str = None) -> Path:
    """The native weight `{save_dir}/{weight}_{hidden}[_moe].pth`. None means the flag was not typed: the
    original's default (512, dense; 768 with model_family minimind3: `full_sft_768.pth`) names the file, and when
    it is missing the one `{weight}_<hidden>[_moe].pth` in save_dir is used (several: a LoadError listing them with
    the flags that pick each)."""
    save_dir = Path(save_dir)
    default_hidden = FAMILY_HIDDEN[model_family] if model_family else SIZE_DEFAULTS["hidden_size"]
    path = weight_path(save_dir, weight, argparse.Namespace(hidden_size=hidden_size or default_hidden,
                                                            use_moe=bool(use_moe)))
    if path.is_file():
        return path
    if hidden_size is None:
        found = _same_stage(save_dir, weight, use_moe)
        if len(found) == 1:
            return found[0]
        if found:
            raise LoadError(f"{path.name} not found and {save_dir} has several {weight} weights: "
                            + ", ".join(f"{p.name} ({_size_flags(p)})" for p in found) + "; pick one with its flags")
    raise NotFoundError(missing_weight(path, "--save_dir, --weight and the size flags, or --load_from a "
                                             "transformers folder"))


# ---- families ----
def state_family(state: dict) -> str:
    """The family of a state dict: minimind3 when it has per-head query norms (`self_attn.q_norm`), else minimind2."""
    return "minimind3" if any(k.endswith("self_attn.q_norm.weight") for k in state) else "minimind2"


def check_family(model_family, found: str, source) -> None:
    """A typed --model_family (None: not typed) that is not the family `source` holds is a LoadError naming both."""
    if model_family and model_family != found:
        raise LoadError(f"--model_family {model_family} contradicts {source}, which holds a {found} model; drop the "
                        f"flag or point at a {model_family} weight")


def _check_sizes(given: dict, values: dict, source, how: str) -> None:
    """A typed size (not None in `given`) that differs from `values` (the config's) is a LoadError."""
    for key, value in given.items():
        if value is not None and key in values and (bool(value) if key == "use_moe" else value) != values[key]:
            raise LoadError(f"--{key} {value} contradicts {source} ({key}={values[key]}{how}); drop the flag or point "
                            "at the right weight file")


# ---- configs ----
# transformers' own PretrainedConfig keys, which any saved config.json may carry: 4.x (the originals' exports) and
# 5.x (read from the installed version in known_config_keys)
TRANSFORMERS_CONFIG_KEYS = frozenset("""
    _name_or_path _commit_hash _attn_implementation_autoset _attn_implementation_internal architectures auto_map
    model_type transformers_version dtype torch_dtype use_bfloat16 return_dict output_hidden_states output_attentions
    torchscript tf_legacy_loss pruned_heads tie_word_embeddings chunk_size_feed_forward is_encoder_decoder is_decoder
    cross_attention_hidden_size add_cross_attention tie_encoder_decoder max_length min_length do_sample early_stopping
    num_beams num_beam_groups diversity_penalty temperature top_k top_p typical_p repetition_penalty length_penalty
    no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens finetuning_task id2label label2id
    tokenizer_class prefix bos_token_id pad_token_id eos_token_id sep_token_id decoder_start_token_id
    task_specific_params problem_type use_cache initializer_range rope_parameters rope_scaling
    """.split())
# keys the originals' own code writes beyond MiniMindConfig's fields (the trainers' and exporter's max_seq_len)
ORIGINAL_EXTRA_KEYS = frozenset({"max_seq_len"})


def known_config_keys() -> set:
    """Every key a MiniMind config (config.json or the .json next to a weight) may hold: both families' fields,
    the originals' extra keys and transformers' standard ones."""
    from transformers import PretrainedConfig
    return (set(MiniMindConfig().to_dict()) | set(MiniMindConfig(model_family="minimind3").to_dict())
            | set(PretrainedConfig().to_dict()) | TRANSFORMERS_CONFIG_KEYS | ORIGINAL_EXTRA_KEYS | {"model_family"})


def minimind_config(values: dict, source) -> MiniMindConfig:
    """A MiniMindConfig from a saved config dict (either family, told by its keys); a key no MiniMind config has,
    or fields that do not go together, are a LoadError naming `source`."""
    unknown = sorted(set(values) - known_config_keys())
    if unknown:
        raise LoadError(f"{source}: unknown config key{'s' * (len(unknown) > 1)} {', '.join(unknown)} (neither "
                        "MiniMind2 nor minimind-3 has it); remove it or point at a MiniMind config")
    values = {k: v for k, v in values.items()
              if k not in ("auto_map", "architectures", "dtype", "torch_dtype", "transformers_version")}
    try:
        return MiniMindConfig.from_dict(values)
    except (ValueError, TypeError) as err:
        raise LoadError(f"{source}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _tensor_shape(state: dict, key: str, dims: int, source) -> tuple:
    if key not in state:
        raise LoadError(f"{source}: no {key}, which a minimind-3 weight has (its tensors fit neither family)")
    shape = tuple(state[key].shape)
    if len(shape) != dims:
        raise LoadError(f"{source}: {key} has shape {shape}, expected {dims} dimension{'s' * (dims > 1)}")
    return shape


def shapes_config(state: dict, source) -> MiniMindConfig:
    """The minimind-3 config of a state dict without a config (the original's published `.pth` files): hidden size
    and vocab from the embedding, layers from the keys, head_dim from q_norm, heads and key/value heads from q_proj
    and k_proj rows / head_dim, the FFN size from gate_proj (an expert's in MoE), experts from mlp.gate rows, and a
    tied head when lm_head is absent or equal to the embedding. What the shapes cannot tell keeps the original's
    defaults (top-1 routing, rope_theta 1e6, 32768 positions, eps 1e-6). Shapes that do not fit: a LoadError."""
    vocab, hidden = _tensor_shape(state, "model.embed_tokens.weight", 2, source)
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"model\.layers\.(\d+)\.", k))})
    if not layers:
        raise LoadError(f"{source}: no model.layers.* weights")
    if layers != list(range(len(layers))):
        missing = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise LoadError(f"{source}: layer{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} missing (found "
                        f"{len(layers)} of layers 0..{layers[-1]})")
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    (head_dim,) = _tensor_shape(state, attn + "q_norm.weight", 1, source)
    q_rows = _tensor_shape(state, attn + "q_proj.weight", 2, source)[0]
    k_rows = _tensor_shape(state, attn + "k_proj.weight", 2, source)[0]
    for name, rows in (("q_proj", q_rows), ("k_proj", k_rows)):
        if head_dim == 0 or rows % head_dim:
            raise LoadError(f"{source}: {attn}{name}.weight has {rows} rows, not a whole number of heads of "
                            f"q_norm's size {head_dim}")
    heads, kv_heads = q_rows // head_dim, k_rows // head_dim
    if kv_heads == 0 or heads % kv_heads:
        raise LoadError(f"{source}: {heads} query heads cannot share {kv_heads} key/value heads evenly (q_proj "
                        f"{q_rows} rows, k_proj {k_rows} rows, head_dim {head_dim})")
    use_moe = mlp + "gate.weight" in state
    if use_moe:
        experts = _tensor_shape(state, mlp + "gate.weight", 2, source)[0]
        intermediate = _tensor_shape(state, mlp + "experts.0.gate_proj.weight", 2, source)[0]
    else:
        experts, intermediate = None, _tensor_shape(state, mlp + "gate_proj.weight", 2, source)[0]
    head = state.get("lm_head.weight")
    tied = head is None or (head.shape == state["model.embed_tokens.weight"].shape
                            and torch.equal(head, state["model.embed_tokens.weight"]))
    return MiniMindConfig(model_family="minimind3", hidden_size=hidden, num_hidden_layers=len(layers),
                          num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                          intermediate_size=intermediate, moe_intermediate_size=intermediate, vocab_size=vocab,
                          use_moe=use_moe, num_experts=experts, tie_word_embeddings=tied)


def native_config(path, hidden_size: int = None, num_hidden_layers: int = None, use_moe: int = None,
                  rope_scaling: bool = False, model_family: str = None, state: dict = None) -> MiniMindConfig:
    """The MiniMindConfig of native weight `path`: its `.json` (a size given here that contradicts it is a
    LoadError), else a minimind-3 weight's tensor shapes (shapes_config), else (MiniMind2) the size in the file
    name (`_{hidden}[_moe]`) and the size arguments, else the original's defaults. `state`: the file's state dict
    when already read (else it is read when there is no .json). model_family: the typed --model_family (None: not
    typed), checked against what the file holds. rope_scaling=True turns YaRN on."""
    path = Path(path)
    given = {"hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers, "use_moe": use_moe}
    config_file = path.with_suffix(".json")
    if config_file.is_file():
        try:
            values = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise LoadError(f"{config_file}: not a readable config ({short_error(err)}); delete it and pass the size "
                            "flags") from None
        if not isinstance(values, dict):
            raise LoadError(f"{config_file}: not a config (a JSON object of fields); delete it and pass the size flags")
        _check_sizes(given, values, config_file, "")
        config = minimind_config(values, config_file)
        check_family(model_family, config.model_family, config_file)
    else:
        if state is None and path.is_file():
            state = read_state_dict(path)
        if state is not None and state_family(state) == "minimind3":
            config = shapes_config(state, path)
            _check_sizes(given, {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                                 "use_moe": config.use_moe}, path, " by its tensor shapes")
        else:
            m = _WEIGHT_NAME.fullmatch(path.stem)
            named = {"hidden_size": int(m["hidden"]), "use_moe": bool(m["moe"])} if m else {}
            values = {key: value if value is not None else named.get(key, SIZE_DEFAULTS[key])
                      for key, value in given.items()}
            values["use_moe"] = bool(values["use_moe"])
            config = MiniMindConfig.from_dict(values)
        check_family(model_family, config.model_family, path)
    if rope_scaling:
        config.inference_rope_scaling, config.rope_scaling = True, dict(YARN_ROPE_SCALING)
    return config


def _rope(cfg: dict, source, default_theta: float):
    """(rope_theta, rope_scaling) of a Llama/Qwen3 config.json (transformers 4 or 5 layout); YaRN is the only
    scaling MiniMind has."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise LoadError(f"{source}: rope type {rope_type!r} has no MiniMind equivalent")
    scaling = None
    if rope_type == "yarn":
        scaling = {**YARN_ROPE_SCALING, **{k: rope[k] for k in YARN_ROPE_SCALING if k in rope and k != "type"}}
    return rope.get("rope_theta", cfg.get("rope_theta", default_theta)), scaling


def llama_to_minimind_config(cfg: dict, source) -> MiniMindConfig:
    """A Llama config.json as a (MiniMind2) MiniMindConfig; anything MiniMind cannot express is a LoadError."""
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
        raise LoadError(f"{source}: this Llama uses biases or a non-SiLU activation, which MiniMind does not have")
    heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads):
        raise LoadError(f"{source}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
    rope_theta, scaling = _rope(cfg, source, 1e6)
    return MiniMindConfig(hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
                          num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads", heads),
                          intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                          max_position_embeddings=cfg.get("max_position_embeddings", 32768),
                          rms_norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=rope_theta,
                          inference_rope_scaling=scaling is not None, rope_scaling=scaling,
                          tie_word_embeddings=cfg.get("tie_word_embeddings", True),
                          bos_token_id=cfg.get("bos_token_id", 1), eos_token_id=cfg.get("eos_token_id", 2))


QWEN3_TYPES = ("qwen3", "qwen3_moe")


def qwen3_to_minimind_config(cfg: dict, source) -> MiniMindConfig:
    """A stock Qwen3 / Qwen3-MoE config.json (how the original publishes minimind-3) as a minimind-3
    MiniMindConfig; anything minimind-3 cannot express (biases, sliding windows, dense layers inside an MoE model,
    another activation or rope type) is a LoadError. Missing fields take transformers' Qwen3 defaults."""
    if cfg.get("attention_bias"):
        raise LoadError(f"{source}: this Qwen3 uses attention biases, which minimind-3 does not have")
    if cfg.get("hidden_act", "silu") != "silu":
        raise LoadError(f"{source}: activation {cfg['hidden_act']!r}; minimind-3 uses silu")
    if cfg.get("use_sliding_window") or any(t != "full_attention" for t in cfg.get("layer_types") or ()):
        raise LoadError(f"{source}: this Qwen3 uses sliding-window attention, which minimind-3 does not have")
    moe = cfg.get("model_type") == "qwen3_moe"
    if moe and (cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1):
        raise LoadError(f"{source}: this Qwen3-MoE has dense layers among its MoE layers (mlp_only_layers / "
                        "decoder_sparse_step), which minimind-3 does not have")
    rope_theta, scaling = _rope(cfg, source, 10000.0)   # transformers' Qwen3 default

    def given(key, default):   # a key missing or null (transformers 5 writes "bos_token_id": null) takes `default`
        return default if cfg.get(key) is None else cfg[key]
    try:
        heads = cfg["num_attention_heads"]
        fields = dict(model_family="minimind3", hidden_size=cfg["hidden_size"],
                      num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
                      num_key_value_heads=given("num_key_value_heads", heads),
                      head_dim=given("head_dim", cfg["hidden_size"] // heads),
                      intermediate_size=cfg.get("intermediate_size") if moe else cfg["intermediate_size"],
                      vocab_size=cfg["vocab_size"], max_position_embeddings=given("max_position_embeddings", 32768),
                      rms_norm_eps=given("rms_norm_eps", 1e-6), rope_theta=rope_theta,
                      inference_rope_scaling=scaling is not None, rope_scaling=scaling,
                      tie_word_embeddings=given("tie_word_embeddings", False),
                      bos_token_id=given("bos_token_id", 1), eos_token_id=given("eos_token_id", 2))
        if moe:   # the router's aux-loss coefficient keeps minimind-3's (the original's exporter does not write it)
            fields.update(use_moe=True, num_experts=given("num_experts", cfg.get("num_local_experts")),
                          num_experts_per_tok=cfg["num_experts_per_tok"],
                          moe_intermediate_size=cfg["moe_intermediate_size"],
                          norm_topk_prob=given("norm_topk_prob", False))
            if fields["num_experts"] is None:
                raise KeyError("num_experts")
    except KeyError as err:
        raise LoadError(f"{source}: no {err.args[0]} in this Qwen3 config") from None
    return MiniMindConfig(**fields)


def unfuse_experts(state: dict, source) -> dict:
    """Qwen3-MoE weights with each layer's experts fused (`mlp.experts.gate_up_proj` [E, 2I, H] and
    `mlp.experts.down_proj` [E, H, I], transformers 5's in-memory layout) as MiniMind's per-expert keys
    (`mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`); per-expert files are returned as they are."""
    for key in [k for k in state if k.endswith(".mlp.experts.gate_up_proj")]:
        prefix = key[: -len("gate_up_proj")]
        gate_up, down = state.pop(key), state.pop(prefix + "down_proj", None)
        if down is None or gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] % 2:
            raise LoadError(f"{source}: fused experts {key} {tuple(gate_up.shape)} without a matching "
                            f"{prefix}down_proj [experts, hidden, intermediate]")
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            state[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, :inter]
            state[f"{prefix}{e}.up_proj.weight"] = gate_up[e, inter:]
            state[f"{prefix}{e}.down_proj.weight"] = down[e]
    return state


def _fill_tied(state: dict, config) -> dict:
    """A tied pair stored once (save_pretrained, or a .pth without lm_head) gets its other key."""
    if config.tie_word_embeddings:
        for a, b in (("lm_head.weight", "model.embed_tokens.weight"), ("model.embed_tokens.weight", "lm_head.weight")):
            if a not in state and b in state:
                state[a] = state[b]
    return state


def load_state(model, state: dict, source) -> None:
    """Strict load of `state` into `model`: a missing, unexpected or mis-shaped key is a LoadError naming `source`."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    family = getattr(model.config, "model_family", "minimind2")
    if family != state_family(state) and (missing or unexpected):
        raise LoadError(f"{source} holds a {state_family(state)} model, the config a {family} one (check "
                        "--model_family, or the .json next to the weight)")
    hint = "(check --hidden_size, --num_hidden_layers and --use_moe, or the .json next to the weight)"
    if missing or unexpected:
        moe_file, moe_model = any(".experts." in k for k in state), bool(getattr(model.config, "use_moe", False))
        kind = (f" The file holds a {'MoE' if moe_file else 'dense'} model, the config a "
                f"{'MoE' if moe_model else 'dense'} one." if moe_file != moe_model else "")
        raise LoadError(f"{source} does not fit this model:{kind} missing {missing[:4]}{'...' * (len(missing) > 4)}, "
                        f"unexpected {unexpected[:4]}{'...' * (len(unexpected) > 4)} {hint}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise LoadError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(own[key].shape)} {hint}")
    model.load_state_dict(state, strict=True)


def load_weights(model, path) -> None:
    """Load native weight file `path` into `model` (the trainers' --from_weight), verified and strict."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(missing_weight(path, "--from_weight, --save_dir and the size flags"))
    load_state(model, _fill_tied(read_state_dict(path), model.config), path)


# ---- models ----
def load_native(path, hidden_size: int = None, num_hidden_layers: int = None, use_moe: int = None,
                rope_scaling: bool = False, model_family: str = None) -> MiniMindForCausalLM:
    """A MiniMind model (fp32, eval mode) with the weights of native file `path` and its config (native_config)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(missing_weight(path))
    state = read_state_dict(path)
    config = native_config(path, hidden_size, num_hidden_layers, use_moe, rope_scaling, model_family, state)
    model = MiniMindForCausalLM(config)
    load_state(model, _fill_tied(state, config), path)
    return model.eval()


def _folder_state(folder: Path) -> dict:
    from safetensors.torch import load_file
    files = sorted(folder.glob("*.safetensors"))
    if files:
        try:
            return {k: v for f in files for k, v in load_file(f).items()}
        except Exception as err:  # safetensors raises its own error type for a damaged file
            raise LoadError(f"{folder}: unreadable safetensors file ({short_error(err)})") from None
    if (folder / "pytorch_model.bin").is_file():  # the original exporter's format
        return read_state_dict(folder / "pytorch_model.bin")
    raise NotFoundError(f"{folder}: no *.safetensors or pytorch_model.bin weight file")


def load_transformers(folder, rope_scaling: bool = False, model_family: str = None):
    """The model of a transformers folder (fp32, eval mode). MiniMind (either family), Llama (as MiniMind2) and
    Qwen3 / Qwen3-MoE folders (as minimind-3: the original publishes minimind-3 so) are read directly into
    MiniMindForCausalLM (no remote code runs, same strict checks as native weights); any other architecture goes
    through AutoModelForCausalLM(trust_remote_code=True), local files only. model_family: the typed
    --model_family (None: not typed), checked against the folder's config."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise NotFoundError(f"{config_file} not found: not a transformers model folder")
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LoadError(f"{config_file}: not a readable config ({short_error(err)})") from None
    if not isinstance(cfg, dict):
        raise LoadError(f"{config_file}: not a config (a JSON object of fields)")
    model_type = cfg.get("model_type")
    if model_type not in ("minimind", "llama", *QWEN3_TYPES):
        from transformers import AutoModelForCausalLM
        if rope_scaling:
            print(f"--inference_rope_scaling ignored for model_type {model_type}", file=sys.stderr)
        return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True,
                                                    dtype=torch.float32).eval()
    convert = {"minimind": minimind_config, "llama": llama_to_minimind_config}.get(model_type, qwen3_to_minimind_config)
    try:
        lm_config = convert(cfg, config_file)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as err:
        if isinstance(err, LoadError):
            raise
        # a field of the wrong type or value (e.g. "hidden_size": "64", 0 heads, a list as rope_scaling)
        raise LoadError(f"{config_file}: a field has a value MiniMind cannot use ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:120] if str(err) else ''})") from None
    check_family(model_family, lm_config.model_family, config_file)
    if rope_scaling:
        lm_config.inference_rope_scaling, lm_config.rope_scaling = True, dict(YARN_ROPE_SCALING)
    state = _fill_tied(unfuse_experts(_folder_state(folder), folder), lm_config)
    model = MiniMindForCausalLM(lm_config)
    load_state(model, state, folder)
    return model.eval()


def add_lora(model, lora_weight, save_dir=None) -> Path:
    """Attach the LoRA adapter `lora_weight` (a .pth path, or a name: `{save_dir}/lora/{name}_{hidden}[_moe].pth`,
    or the original's `{name}_{hidden}.pth`), then merge it into the weights, so generation runs at the base
    model's speed. Returns the adapter file."""
    path = resolve_path(lora_weight)
    if not path.is_file():
        if save_dir is None:
            raise NotFoundError(f"LoRA file {path} not found")
        lora_dir = Path(save_dir) / "lora"
        path = weight_path(lora_dir, lora_weight, model.config)
        legacy = lora_dir / f"{lora_weight}_{model.config.hidden_size}.pth"  # the original never adds _moe
        path = legacy if not path.is_file() and legacy.is_file() else path
    if not path.is_file():
        raise NotFoundError(f"LoRA file {path} not found: it is written by trainer/train_lora.py "
                            f"--lora_name {lora_weight}; or pass a .pth path to --lora_weight")
    state = read_state_dict(path)
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora.A.weight")}
    if len(ranks) != 1:
        raise LoadError(f"{path}: not a LoRA file (expected lora.A/B weights of one rank, found ranks {sorted(ranks)})")
    apply_lora(model, rank=ranks.pop())
    try:
        load_lora(model, path)
    except ValueError as err:
        raise LoadError(str(err).splitlines()[0]) from None
    merge_lora(model)
    return path


def load_tokenizer(folder=TOKENIZER_DIR):
    """The tokenizer in `folder` (local files only; trust_remote_code=False: a MiniMind tokenizer needs no code)."""
    from transformers import AutoTokenizer
    folder = resolve_path(folder)
    if not has_tokenizer(folder):
        raise NotFoundError(f"no tokenizer in {folder} (tokenizer.json / tokenizer_config.json); pass --tokenizer_path")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def family_of(model):
    """The family of a loaded model (minimind2 or minimind3); None for an architecture loaded through
    AutoModelForCausalLM."""
    return getattr(model.config, "model_family", None) if isinstance(model, MiniMindForCausalLM) else None


def tokenizer_folder(family, source=None, tokenizer_path=None) -> Path:
    """The tokenizer of a model of `family` loaded from `source`: --tokenizer_path when given; else `source` when
    it holds a tokenizer (a transformers folder, or the --load_from folder of native weights), except the repo's
    model/ (MiniMind2's tokenizer, the --load_from default) for a minimind-3 model; else the family's shipped
    tokenizer (FAMILY_TOKENIZER_DIR: model/ or model/minimind3/; model/ for other architectures)."""
    if tokenizer_path:
        return resolve_path(tokenizer_path)
    own = FAMILY_TOKENIZER_DIR.get(family, TOKENIZER_DIR)
    if source is not None and has_tokenizer(source) and not (
            Path(source).resolve() == TOKENIZER_DIR.resolve() and own.resolve() != TOKENIZER_DIR.resolve()):
        return Path(source)
    return own


def load_model(args):
    """(model, tokenizer, description) from the flags of add_model_args; the model is fp32, in eval mode, on
    args.device. What --load_from is decides the loader, never its name: a folder with config.json is a
    transformers folder, a .pth file is that weight, any other folder holds the tokenizer of the native weight
    find_weight picks in --save_dir. The family comes from the weight (a typed --model_family must agree), and
    the tokenizer is the model's own (tokenizer_folder). Raises LoadError (one line)."""
    source = resolve_path(args.load_from)
    sizes = typed_sizes(args)
    family_flag = getattr(args, "model_family", None)
    path = None
    if is_transformers_folder(source):
        model = load_transformers(source, args.inference_rope_scaling, family_flag)
        description = f"transformers folder {source}"
    else:
        if not source.exists():
            raise NotFoundError(f"--load_from {args.load_from}: no such file or folder (expected a transformers "
                                "folder with config.json, a .pth weight, or the tokenizer folder of native weights)")
        if source.is_file():
            path = source
            m = _WEIGHT_NAME.fullmatch(path.stem)
            args.weight = m["prefix"] if m else path.stem  # e.g. pretrain: no chat template
        else:
            path = find_weight(resolve_path(args.save_dir), args.weight, sizes["hidden_size"], sizes["use_moe"],
                               family_flag)
        model = load_native(path, **sizes, rope_scaling=args.inference_rope_scaling, model_family=family_flag)
        description = f"native weights {path}"
    family = family_of(model)
    tokenizer_dir = tokenizer_folder(family, source, args.tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_dir)
    for note in load_notes(model, family, path, tokenizer_dir):
        print(f"note: {note}", file=sys.stderr)
    if args.lora_weight not in (None, "", "None", "none"):
        description += f" + LoRA {add_lora(model, args.lora_weight, resolve_path(args.save_dir))}"
    total = sum(p.numel() for p in model.parameters())
    print(f"MiniMind模型参数: {total / 1e6:.2f} M(illion) ({description}{f'; {family}' if family else ''})",
          file=sys.stderr, flush=True)
    return model.float().eval().to(args.device), tokenizer, description


def load_notes(model, family, path, tokenizer_dir) -> list:
    """What load_model tells the user about a weight not trained here (no .json next to a native weight) and about
    a tokenizer of the other family."""
    notes, shipped = [], {d.resolve(): f for f, d in FAMILY_TOKENIZER_DIR.items()}
    if path is not None and not path.with_suffix(".json").exists():
        c = model.config
        if family == "minimind3":   # e.g. the original's published full_sft_768.pth: its shapes are its config
            notes.append(f"{path.name} has no .json config: read as minimind-3 from its tensor shapes "
                         f"(hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads / "
                         f"{c.num_key_value_heads} kv of {c.head_dim}"
                         + (f", {c.num_experts} experts" if c.use_moe else "")
                         + ("" if c.tie_word_embeddings else ", untied lm_head") + f"); tokenizer {tokenizer_dir}")
        elif tokenizer_dir.resolve() == TOKENIZER_DIR.resolve():
            # a MiniMind2 weight not trained here (e.g. a published .pth): its token ids are the original tokenizer's
            notes.append(f"{path.name} has no .json config, so it was not trained with this repository; if it is a "
                         "published MiniMind weight, pass --tokenizer_path (or --load_from) the original tokenizer "
                         "folder, e.g. ../MiniMind2 (model/ here is a different tokenizer)")
    other = shipped.get(tokenizer_dir.resolve())
    if family and other and other != family:
        notes.append(f"the tokenizer in {tokenizer_dir} is {other}'s, the model a {family} one: its token ids will "
                     f"not match (drop --tokenizer_path to use {FAMILY_TOKENIZER_DIR[family]})")
    return notes
