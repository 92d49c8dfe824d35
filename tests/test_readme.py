"""README's two set-up commands stay true: CI runs exactly the README's test command. The commands in README and
in docs/*.md name real scripts and flags, and their links lead somewhere."""
import re

from tests.conftest import ROOT


def readme_commands():
    block = re.search(r"## Two commands\s+```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    demo, tests = readme_commands()
    assert "bash scripts/run_demo.sh" in demo and "pip install torch==2.13.0" in demo
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci
    assert ci.index("python -m pip install --quiet torch==2.13.0") < ci.index(
        "python -m pip install --quiet -r requirements.txt") < ci.index(tests)


def doc_pages():
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_python_lines():
    """Every `python <file>.py ...` command in the bash blocks of README and docs/*.md (continuation lines joined)."""
    text = "\n".join(page.read_text() for page in doc_pages())
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                part = part.strip().removeprefix("cd trainer ").strip()
                if part.startswith("python ") and ".py" in part.split()[1]:
                    lines.append(part)
    return lines


def test_every_python_command_names_a_real_script_and_real_flags():
    """The flags typed in README and docs/ exist in the script's own --help (so no command fails on a typo)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    lines = []
    for line in readme_python_lines():
        script = line.split()[1]
        path = ROOT / script if (ROOT / script).exists() else ROOT / "trainer" / script
        assert path.is_file(), line
        lines.append((line, path))

    # one process runs every script's --help in turn (runpy, with sys.path[0] the script's folder and not the
    # current one, as `python script --help` has it): torch and transformers, most of the time, are imported
    # once; the project's own modules are forgotten between scripts, so each script must find them itself.
    driver = ("import contextlib, io, json, os, runpy, sys\n"
              "root = os.getcwd() + os.sep\n"
              "out, base = {}, [p for p in sys.path if p not in ('', root[:-1])]\n"
              "for path in sys.argv[1:]:\n"
              "    for name, mod in list(sys.modules.items()):\n"
              "        if (getattr(mod, '__file__', None) or '').startswith(root):\n"
              "            del sys.modules[name]\n"
              "    buf, code = io.StringIO(), None\n"
              "    sys.argv, sys.path[:] = [path, '--help'], [os.path.dirname(path)] + base\n"
              "    with contextlib.redirect_stdout(buf):\n"
              "        try:\n"
              "            runpy.run_path(path, run_name='__main__')\n"
              "        except SystemExit as e:\n"
              "            code = e.code\n"
              "    out[path] = [code, buf.getvalue()]\n"
              "print(json.dumps(out))\n")
    paths = [str(p) for p in dict.fromkeys(path for _, path in lines)]
    res = subprocess.run([sys.executable, "-c", driver, *paths], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    helps = json.loads(res.stdout.strip().splitlines()[-1])
    for path, (code, text) in helps.items():
        assert code in (0, None) and "usage:" in text, (path, code, text[-500:])
    checked = {Path(p): text for p, (_, text) in helps.items()}
    for line, path in lines:
        tokens = line.split()
        script = tokens[1]
        for flag in (t.split("=")[0] for t in tokens[2:] if t.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", checked[path]), f"{flag} not in {script} --help: {line}"
    assert len(checked) >= 15


def test_cpu_quick_start_block_runs_as_written(tmp_path):
    """The "Try the plumbing on CPU" commands, run as written in a copy of the repository."""
    import shutil
    import subprocess
    text = (ROOT / "README.md").read_text()
    block = re.search(r"### Try the plumbing on CPU.*?```bash\n(.*?)```", text, re.S).group(1)
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    copy = tmp_path / "repo"
    for f in files + [str(p.relative_to(ROOT)) for p in (ROOT / "trainer").glob("*.py")]:
        if (ROOT / f).is_file() and not f.startswith("images/"):
            (copy / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, copy / f)
    for line in block.strip().splitlines():
        res = subprocess.run(line, shell=True, cwd=copy, capture_output=True, text=True, timeout=300,
                             env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, (line, res.stderr[-2000:])
    assert (copy / "out" / "full_sft_64.pth").is_file() and res.stdout.strip()


def github_anchor(heading: str) -> str:
    """The id GitHub gives a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_in_readme_and_docs_resolve():
    """Every relative link (file and #anchor) in README and docs/*.md points at a file and heading that exist,
    and README links every docs/ page."""
    readme = (ROOT / "README.md").read_text()
    for page in doc_pages():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: {target}"
            if anchor and file.suffix == ".md":
                body = re.sub(r"```.*?```", "", file.read_text(), flags=re.S)
                anchors = {github_anchor(h) for h in re.findall(r"^#+ (.*)$", body, re.M)}
                assert anchor in anchors, f"{page.name}: {target}"
    for doc in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{doc.name})" in readme, f"README does not link docs/{doc.name}"
