"""README's two set-up commands stay true: CI runs exactly the README's test command."""
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
