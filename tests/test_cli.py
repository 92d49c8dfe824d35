"""model/cli.py: one-line errors, and flags that must be spelled out in every command."""
from model.cli import one_line
from tests.conftest import ROOT


def test_one_line_keeps_the_file_and_line_of_a_dataloader_worker_error():
    err = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                     '  File "x.py", line 3, in f\n    raise ValueError(msg)\nValueError: data.jsonl:7: bad JSON: x\n')
    assert one_line(err) == "data.jsonl:7: bad JSON: x"
    assert one_line(OSError(28, "No space left on device", "out/w.pth")) == "out/w.pth: No space left on device"


def test_no_command_accepts_abbreviated_flags():
    """One behaviour everywhere: `--max_step` is an error, not a silent `--max_steps` (argparse allow_abbrev=False)."""
    import re
    offenders = []
    for path in ROOT.glob("**/*.py"):
        if ".git" in path.parts or "tests" in path.parts:
            continue
        for call in re.findall(r"ArgumentParser\((?:[^()]|\([^()]*\))*\)", path.read_text(encoding="utf-8")):
            if "allow_abbrev=False" not in call:
                offenders.append(f"{path.relative_to(ROOT)}: {call[:60]}")
    assert not offenders, offenders


def test_cli_freezes_the_collector_only_when_a_script_ends(tmp_path):
    """A script's `cli(main)` (main defined in the file run as __main__) ends with gc.freeze(): the exit skips the
    collector's last passes over torch/transformers (about a second a run) while atexit handlers and file closing still
    happen; a caller in another module (tests, code running a script in-process) keeps its collector."""
    import gc
    import subprocess
    import sys

    from model.cli import cli
    before = gc.get_freeze_count()
    cli(lambda: None)
    assert gc.get_freeze_count() == before
    script = tmp_path / "script.py"
    script.write_text(f"import atexit, gc, sys; sys.path.insert(0, {str(ROOT)!r}); from model.cli import cli\n"
                      "def main():\n    atexit.register(lambda: print('atexit ran', flush=True))\n"
                      "cli(main); print('frozen', gc.get_freeze_count() > 0, flush=True)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["frozen", "True", "atexit", "ran"], done.stderr
    done = subprocess.run([sys.executable, "-c", script.read_text()], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["frozen", "False", "atexit", "ran"], done.stderr     # not a script file
