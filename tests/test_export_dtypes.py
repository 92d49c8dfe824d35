"""Every export dtype generates: scripts/convert_model.py --to minimind in float16 (the default), bfloat16 and
float32, each folder loaded by transformers (trust_remote_code, the folder's own model_minimind.py, in a fresh
process) in the dtype it was saved in and in float32, then generate().

The weights are rounded so that fp16 and bf16 both hold them exactly: every float32 load must then give the
native model's logits and greedy tokens, whatever dtype the folder was written in.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from model.model_minimind import MiniMindForCausalLM
from model.loading import load_native
from model.weights import save_weights
from scripts.convert_model import main
from tests.conftest import tiny_config, tokenizer_dir

PROMPT = torch.randint(3, 6400, (2, 12), generator=torch.Generator().manual_seed(0))
NEW_TOKENS = 8
EXPORTS = [("dense", "float16"), ("dense", "bfloat16"), ("dense", "float32"), ("moe", "float16")]

PROBE = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    prompt, new_tokens = torch.tensor(json.loads(sys.argv[1])), int(sys.argv[2])
    results = {}
    for folder in sys.argv[3:]:
        for load in ("auto", "float32"):
            try:
                dtype = "auto" if load == "auto" else torch.float32
                model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
                with torch.no_grad():
                    logits = model(prompt).logits.float()
                    gen = model.generate(prompt[:1], max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
                results[f"{folder}/{load}"] = {"dtype": str(model.dtype), "logits": logits, "gen": gen,
                                                "class": type(model).__module__}
            except Exception as err:
                results[f"{folder}/{load}"] = {"error": f"{type(err).__name__}: {err}"}
    torch.save(results, "result.pt")
""")


def representable_model(use_moe: bool) -> MiniMindForCausalLM:
    """A random tiny model whose weights fp16 and bf16 both store exactly (bf16 mantissa, fp16 normal range)."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(use_moe=use_moe))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
            p.masked_fill_(p.abs() < 2 ** -14, 0.0)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(kind, dtype): folder} and {kind: native fp32 model}, plus the probe's results from one fresh process."""
    root = tmp_path_factory.mktemp("export_dtypes")
    natives, folders = {}, {}
    for kind in ("dense", "moe"):
        model = representable_model(use_moe=kind == "moe")
        weight = root / f"full_sft_64{'_moe' if kind == 'moe' else ''}.pth"
        save_weights(model, weight, model.config)              # as the trainers save: fp16 .pth + .json
        natives[kind] = load_native(weight)
    iso = root / "iso"
    iso.mkdir()
    for kind, dtype in EXPORTS:
        weight = root / f"full_sft_64{'_moe' if kind == 'moe' else ''}.pth"
        folder = main(["--torch_path", str(weight), "--dtype", dtype, "--out", str(root / f"{kind}_{dtype}"),
                       "--tokenizer_path", str(tokenizer_dir())])
        assert json.loads((folder / "config.json").read_text())["dtype"] == dtype
        folders[kind, dtype] = f"{kind}_{dtype}"
        shutil.copytree(folder, iso / folders[kind, dtype])   # outside the repo: only the folder's own code
    (iso / "probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(root / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-I", "probe.py", json.dumps(PROMPT.tolist()), str(NEW_TOKENS),
                          *folders.values()], cwd=iso, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return folders, natives, torch.load(iso / "result.pt", weights_only=False)


@pytest.mark.parametrize("kind,dtype", EXPORTS)
def test_export_generates_in_its_own_dtype_and_in_float32(exported, kind, dtype):
    folders, natives, results = exported
    native = natives[kind].eval()
    with torch.no_grad():
        ref_logits = native(PROMPT).logits
        ref_gen = native.generate(PROMPT[:1], max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    saved, fp32 = results[f"{folders[kind, dtype]}/auto"], results[f"{folders[kind, dtype]}/float32"]
    for name, res in (("saved dtype", saved), ("float32", fp32)):
        assert "error" not in res, f"{name}: {res.get('error')}"
        assert res["class"].startswith("transformers_modules.") and res["gen"].shape == (1, 12 + NEW_TOKENS)
    assert saved["dtype"] == f"torch.{dtype}" and fp32["dtype"] == "torch.float32"
    # float32: exactly the native model (the weights survive every export dtype unchanged)
    assert (fp32["logits"] - ref_logits).abs().max().item() <= 1e-5
    assert torch.equal(fp32["gen"], ref_gen)
    # the saved half dtype: the same model up to its rounding of activations
    scale = ref_logits.abs().max().item()
    assert (saved["logits"] - ref_logits).abs().max().item() <= 0.05 * scale
