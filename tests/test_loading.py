"""model/loading.py: finding a weight by stage/size/MoE (one file used when no size was typed, several listed with
their flags, `_0` never in a name), configs from the .json or the file name, strict native loading, transformers
folders, LoRA names (the original's name without _moe too), cwd-then-root paths, the typed-flag mechanism, and
integrity: 4 KiB of random bytes in the middle of a weight or LoRA file, which torch.load accepts silently, are
an error naming the file and the damaged record."""
import argparse
import random
import shutil

import pytest
import torch

from model.cli import Typed, add_model_args, typed_sizes, was_typed
from model.loading import (ROOT, add_lora, find_weight, load_model, load_native, load_transformers, load_weights,
                           native_config, resolve_path)
from model.model_lora import apply_lora, save_lora
from model.model_minimind import MiniMindForCausalLM
from model.weights import LoadError, NotFoundError, read_state_dict, save_weights, verify_checkpoint, weight_path
from tests.conftest import tiny_config, tokenizer_dir

IDS = torch.randint(3, 6400, (1, 12), generator=torch.Generator().manual_seed(0))


def save(directory, name="full_sft", seed=0, json_config=True, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(**overrides)
    return save_weights(MiniMindForCausalLM(cfg), weight_path(directory, name, cfg), cfg if json_config else None)


def corrupt(path, seed=0):
    """Overwrite 4 KiB in the middle of the file's largest record with random bytes; assert torch.load still
    accepts the file, i.e. only the tensor data is wrong and nothing but a checksum can see it."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - 2048)
        f.write(random.Random(seed).randbytes(4096))
    torch.load(path, map_location="cpu", weights_only=True)   # silently wrong values without the check


def parse(argv):
    return add_model_args(argparse.ArgumentParser(allow_abbrev=False)).parse_args(list(map(str, argv)))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


# ---- integrity ----
def test_corrupted_weight_file_is_an_error_naming_file_and_record(tmp_path):
    path = save(tmp_path)
    verify_checkpoint(path)
    corrupt(path)
    for load in (lambda: load_native(path), lambda: load_weights(MiniMindForCausalLM(tiny_config()), path),
                 lambda: read_state_dict(path), lambda: verify_checkpoint(path)):
        with pytest.raises(LoadError, match=rf"^{path} is corrupted \(CRC mismatch in record \S+/data/\d+\); "
                                            "restore it or retrain$"):
            load()


def test_corrupted_lora_file_is_an_error(tmp_path):
    weight = save(tmp_path / "out")
    model = load_native(weight)
    apply_lora(model, rank=32)
    lora = tmp_path / "out" / "lora" / "lora_identity_64.pth"
    lora.parent.mkdir()
    save_lora(model, lora)
    add_lora(load_native(weight), "lora_identity", tmp_path / "out")   # intact: loads
    corrupt(lora)
    with pytest.raises(LoadError, match=r"lora_identity_64\.pth is corrupted \(CRC mismatch in record"):
        add_lora(load_native(weight), "lora_identity", tmp_path / "out")


def test_truncated_and_garbage_files_are_one_line_errors(tmp_path):
    path = save(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(LoadError, match=r"full_sft_64\.pth is corrupted \(damaged or truncated zip archive"):
        load_native(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(LoadError, match=r"full_sft_64\.pth: not a readable weight file") as err:
        load_native(path)
    assert "\n" not in str(err.value)


def test_legacy_format_without_checksums_still_loads(tmp_path):
    path = save(tmp_path)
    state = torch.load(path, weights_only=True)
    torch.save(state, path, _use_new_zipfile_serialization=False)
    verify_checkpoint(path)
    assert torch.equal(load_native(path).lm_head.weight, state["lm_head.weight"].float())


def test_verify_cost_is_one_streamed_read(tmp_path, monkeypatch):
    """verify_checkpoint reads each record once, in chunks of at most 1 MiB (no whole-file copy in memory)."""
    import zipfile
    path = save(tmp_path)
    reads = []
    real_read = zipfile.ZipExtFile.read
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda self, n=-1: reads.append(n) or real_read(self, n))
    verify_checkpoint(path)
    assert reads and all(0 < n <= 1 << 20 for n in reads)


# ---- finding weights ----
def test_find_weight_rules(tmp_path):
    a = save(tmp_path)                                           # full_sft_64.pth
    assert find_weight(tmp_path, "full_sft") == a                # the only one, no size typed
    assert find_weight(tmp_path, "full_sft", hidden_size=64) == a
    with pytest.raises(NotFoundError, match=r"full_sft_128\.pth not found: it is written by trainer/train_full_sft"
                                            r"\.py.*full_sft_64\.pth exists: add --hidden_size 64 --num_hidden_layers 2"):
        find_weight(tmp_path, "full_sft", hidden_size=128)       # a typed size is never replaced
    moe = save(tmp_path, use_moe=True)                           # full_sft_64_moe.pth
    assert find_weight(tmp_path, "full_sft", use_moe=1) == moe
    assert find_weight(tmp_path, "full_sft", use_moe=0) == a
    with pytest.raises(LoadError) as err:
        find_weight(tmp_path, "full_sft")
    message = str(err.value)
    assert message == (f"full_sft_512.pth not found and {tmp_path} has several full_sft weights: full_sft_64.pth "
                       "(--hidden_size 64 --num_hidden_layers 2), full_sft_64_moe.pth (--hidden_size 64 "
                       "--num_hidden_layers 2 --use_moe 1); pick one with its flags")
    save(tmp_path, name="full_sft_dist")                         # another prefix is not a full_sft size
    assert find_weight(tmp_path, "full_sft_dist") == tmp_path / "full_sft_dist_64.pth"
    with pytest.raises(NotFoundError, match=r"dpo_512\.pth not found: it is written by trainer/train_dpo\.py"):
        find_weight(tmp_path / "nowhere", "dpo")


def test_no_size_zero_in_any_message(tmp_path):
    save(tmp_path)
    save(tmp_path, hidden_size=128)
    for call in (lambda: find_weight(tmp_path, "full_sft"), lambda: find_weight(tmp_path, "pretrain")):
        with pytest.raises(LoadError) as err:
            call()
        assert "_0" not in str(err.value) and "_512.pth" in str(err.value)


def test_config_from_json_or_name_and_contradictions(tmp_path):
    path = save(tmp_path, num_attention_heads=8)
    assert native_config(path).num_attention_heads == 8          # the .json, not the defaults
    assert native_config(path, rope_scaling=True).rope_scaling["factor"] == 16
    with pytest.raises(LoadError, match=r"--num_hidden_layers 8 contradicts .*full_sft_64\.json"):
        native_config(path, num_hidden_layers=8)
    bare = save(tmp_path / "bare", json_config=False, use_moe=True)
    cfg = native_config(bare, num_hidden_layers=2)                # sizes from the name full_sft_64_moe
    assert (cfg.hidden_size, cfg.use_moe, cfg.num_hidden_layers) == (64, True, 2)
    renamed = tmp_path / "bare" / "mystery.pth"                   # no size in the name: the original's defaults
    shutil.copy(bare, renamed)
    with pytest.raises(LoadError, match=r"mystery\.pth does not fit this model: The file holds a MoE model, the "
                                        "config a dense one"):
        load_native(renamed, hidden_size=64, num_hidden_layers=2)


def test_transformers_folders_minimind_and_llama_load_like_native(tmp_path):
    from scripts.convert_model import main as convert
    path = save(tmp_path)
    native = load_native(path)
    for target in ("minimind", "llama"):
        folder = convert(["--torch_path", str(path), "--to", target, "--dtype", "float32", "--out",
                          str(tmp_path / target), "--tokenizer_path", str(tokenizer_dir())])
        assert torch.allclose(logits(load_transformers(folder)), logits(native), atol=1e-5), target
    yarn = load_transformers(tmp_path / "minimind", rope_scaling=True)
    assert torch.equal(yarn.model.freqs_cos, load_native(path, rope_scaling=True).model.freqs_cos)


def test_lora_by_name_legacy_name_and_path(tmp_path):
    out = tmp_path / "out"
    weight = save(out, use_moe=True)
    model = load_native(weight)
    apply_lora(model, rank=4)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora.B" in name:
            p.data.normal_(0, 0.5)
    legacy = out / "lora" / "lora_identity_64.pth"               # the original's name: no _moe
    legacy.parent.mkdir()
    save_lora(model, legacy)
    merged = load_native(weight)
    assert add_lora(merged, "lora_identity", out) == legacy
    assert not torch.allclose(logits(merged), logits(load_native(weight)))
    by_path = load_native(weight)
    add_lora(by_path, str(legacy))
    assert torch.equal(logits(by_path), logits(merged))
    with pytest.raises(NotFoundError, match=r"lora/nope_64_moe\.pth not found: it is written by trainer/train_lora"):
        add_lora(load_native(weight), "nope", out)
    with pytest.raises(LoadError, match="not a LoRA file"):
        add_lora(load_native(weight), str(weight))


# ---- flags and paths ----
def test_typed_flags_and_sizes():
    args = parse([])
    assert (args.hidden_size, args.num_hidden_layers, args.use_moe) == (512, 8, 0) and not was_typed(args, "hidden_size")
    assert typed_sizes(args) == {"hidden_size": None, "num_hidden_layers": None, "use_moe": None}
    args = parse(["--hidden_size", 512, "--use_moe", 0])
    assert typed_sizes(args) == {"hidden_size": 512, "num_hidden_layers": None, "use_moe": 0}
    assert not was_typed(parse([]), "hidden_size")                # the typed set is never shared between parses
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--dtype", default="bfloat16", action=Typed)   # the same mechanism for any value flag
    assert was_typed(p.parse_args(["--dtype", "float16"]), "dtype") and not was_typed(p.parse_args([]), "dtype")
    with pytest.raises(SystemExit):
        parse(["--hidden", "64"])                                  # no abbreviations


def test_resolve_path_cwd_first_then_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("model") == ROOT / "model"               # not in the cwd: the repo root
    (tmp_path / "model").mkdir()
    assert resolve_path("model") == tmp_path / "model"           # in the cwd: the cwd wins
    assert resolve_path(tmp_path / "x") == tmp_path / "x"


def test_load_model_native_description_and_one_line_errors(tmp_path):
    weight = save(tmp_path / "out")
    model, tokenizer, description = load_model(parse(["--save_dir", tmp_path / "out"]))
    assert description == f"native weights {weight}" and tokenizer.eos_token == "<|im_end|>"
    assert torch.equal(logits(model), logits(load_native(weight)))
    for argv, pattern in [(["--load_from", tmp_path / "missing"], "no such file or folder"),
                          (["--save_dir", tmp_path / "out", "--hidden_size", 128], r"full_sft_128\.pth not found"),
                          (["--save_dir", tmp_path / "out", "--lora_weight", "x"], r"lora/x_64\.pth not found")]:
        with pytest.raises(LoadError, match=pattern) as err:
            load_model(parse(argv))
        assert "\n" not in str(err.value)


def test_bench_loading_table_at_toy_size(capsys):
    from bench import bench_loading
    rows = bench_loading.main(["--sizes_mb", "2", "--models", "none", "--repeats", "1"])
    assert [r["file"] for r in rows] == ["2 MiB of random fp16"] and abs(rows[0]["mb"] - 2) < 0.01
    assert all(r["load_ms"] > 0 and r["verify_ms"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| 2 MiB of random fp16 | 2.0 |" in out and "CPU:" in out and "GiB/s" in out


@pytest.mark.parametrize("entry, argv, message", [
    ("scripts.serve_openai_api", ["--max_batch", "0"], "--max_batch must be >= 1"),
    ("scripts.serve_openai_api", ["--prefix_cache", "-1"], "--prefix_cache must be >= 0"),
    ("scripts.serve_openai_api", ["--save_dir", "{tmp}", "--device", "cpu"], "weight file {tmp}/full_sft_512.pth not found"),
    ("eval_llm", ["--save_dir", "{tmp}", "--device", "cpu", "--prompt", "hi"], "weight file {tmp}/full_sft_512.pth not found"),
    ("scripts.inspect_data", ["--data_path", "x.jsonl", "--kind", "pretrain", "--tokenizer_path", "{tmp}"],
     "no tokenizer.json in {tmp}"),
])
def test_bad_flags_and_missing_weights_end_with_one_line_and_exit_code_2(entry, argv, message, tmp_path, capsys):
    """Bad input is exit code 2 everywhere, one `error:` line: the server, the chat and inspect_data run their
    main() through model/cli.py's cli as the trainers, eval_demo and convert_model do."""
    import importlib
    import runpy
    import sys
    module = importlib.import_module(entry)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    old = sys.argv
    sys.argv = [module.__file__, *argv]
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(module.__file__, run_name="__main__")
    finally:
        sys.argv = old
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: " + message.replace("{tmp}", str(tmp_path))), err


def test_load_weights_errors_name_the_file_and_stage(tmp_path):
    from model.model_minimind import MiniMindForCausalLM
    model = MiniMindForCausalLM(tiny_config())
    with pytest.raises(FileNotFoundError, match=r"full_sft_64\.pth.*train_full_sft\.py"):
        load_weights(model, tmp_path / "full_sft_64.pth")
    other = MiniMindForCausalLM(tiny_config(hidden_size=128))
    path = save_weights(other, tmp_path / "pretrain_64.pth")
    with pytest.raises(ValueError, match=r"pretrain_64\.pth.*hidden_size"):
        load_weights(model, path)
    (tmp_path / "junk_64.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk_64.pth"):
        load_weights(model, tmp_path / "junk_64.pth")
