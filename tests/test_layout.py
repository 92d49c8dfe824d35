"""The import direction of STYLE section 2: serving (eval_llm.py, scripts/) never loads the training library,
and model/model_minimind.py imports nothing from this project (convert_model.py copies it into exported
transformers folders, where it runs alone under trust_remote_code)."""
import ast
import json
import subprocess
import sys

from tests.conftest import ROOT

SERVING = [ROOT / "eval_llm.py", *sorted((ROOT / "scripts").glob("*.py"))]
# the project's top-level import names: its packages (model, dataset, trainer, ...) and root scripts (eval_llm)
PROJECT = {p.name for p in ROOT.iterdir() if p.is_dir() and any(p.glob("*.py"))} | {p.stem for p in ROOT.glob("*.py")}


def imported(path) -> list:
    """Every module an import statement of `path` names, at any depth (imports inside functions too);
    a relative import keeps its leading dots."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


def test_serving_never_imports_the_training_library():
    for path in SERVING:   # no import statement anywhere in a serving file, run or not, names trainer
        assert not [m for m in imported(path) if m.split(".")[0] == "trainer"], path
    # and at run time, in one fresh process: importing every entry point loads no trainer module through
    # model/ or dataset/. web_demo.py draws its page on import (a streamlit app), so its own project imports
    # stand in for it.
    modules = ["eval_llm"] + [f"scripts.{p.stem}" for p in SERVING[1:] if p.stem != "web_demo"]
    modules += [m for m in imported(ROOT / "scripts" / "web_demo.py") if m.split(".")[0] in PROJECT]
    probe = ("import importlib, json, sys\n"
             "for name in sys.argv[1:]:\n"
             "    importlib.import_module(name)\n"
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'trainer')))\n")
    res = subprocess.run([sys.executable, "-c", probe, *modules], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [], modules


def test_model_file_imports_nothing_from_this_project():
    names = imported(ROOT / "model" / "model_minimind.py")
    assert names and not [m for m in names if m.startswith(".") or m.split(".")[0] in PROJECT], names
