"""Each script's PEP 723 header (what `uv run <script>` installs) names every third-party distribution the
script needs at run time, extras included, and requirements.txt covers the union of the headers.

"Needs at run time" is measured, not listed by hand: each script does a short run in a fresh process,
and every module it imported is traced back to the distribution that installed it. That distribution must
be named in the header or be a dependency (extras and markers applied) of one that is.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent

# A short run of each script that reaches its environment(s), network, update, checkpoint and evaluation.
SHORT_RUNS = {
    "ppo_continuous.py": [
        "--env-id", "HalfCheetah-v4", "--total-timesteps", "64", "--num-steps", "64", "--num-minibatches", "2",
        "--update-epochs", "1", "--eval-episodes", "1",
    ],
    "ppo_atari.py": [
        "--total-timesteps", "128", "--num-envs", "4", "--num-steps", "32", "--num-minibatches", "2",
        "--update-epochs", "1", "--eval-episodes", "1", "--env-backend", "gymnasium",
    ],
    "ppo_llm_toy.py": [
        "--sft-steps", "20", "--sft-corpus-size", "200", "--rm-num-pairs", "100", "--total-episodes", "64",
        "--num-prompts", "16", "--samples-per-prompt", "4", "--eval-prompts", "16", "--num-sample-texts", "1",
    ],
}  # fmt: skip

# Runs the script's main() under the given argv, with some top-level modules made unimportable, then prints
# which distribution installed the file of each imported module.
TRACE = """
import importlib.metadata as md, json, runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
sys.argv = [{script!r}, *{flags!r}]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    assert not e.code, f"the short run failed with exit code {{e.code}}"
owner = {{}}
for d in md.distributions():
    name = d.metadata["Name"]  # parsed once per distribution, not once per file (that took ~10 s)
    owner.update({{str(d.locate_file(f)): name for f in d.files or [] if f.suffix in (".py", ".so")}})
used = {{}}
for name, module in list(sys.modules.items()):
    if getattr(module, "__file__", None) in owner:
        used.setdefault(owner[module.__file__], []).append(name)
print("DISTRIBUTIONS " + json.dumps(used))
"""


def short_run(script: str, tmp_path: Path, blocked: list[str]) -> dict[str, list[str]]:
    tmp_path.mkdir()
    flags = [*SHORT_RUNS[script], "--runs-dir", str(tmp_path), "--no-cuda"]
    code = TRACE.format(script=str(REPO / script), flags=flags, blocked=blocked)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, f"{script} without {blocked}:\n{result.stderr[-3000:]}"
    line = next(line for line in result.stdout.splitlines() if line.startswith("DISTRIBUTIONS "))
    return {canonicalize_name(d): modules for d, modules in json.loads(line.removeprefix("DISTRIBUTIONS ")).items()}


def header_requirements(script: str) -> list[Requirement]:
    text = (REPO / script).read_text()
    block = re.search(r"^# /// script$(.*?)^# ///$", text, re.S | re.M)
    assert block, f"{script} has no PEP 723 header"
    dependencies = re.search(r"^# dependencies = \[$(.*?)^# \]$", block.group(1), re.S | re.M)
    return [Requirement(r) for r in re.findall(r'"([^"]+)"', dependencies.group(1))]


def closure(requirements: list[Requirement]) -> set[str]:
    """The distributions that installing `requirements` brings in (extras and environment markers applied)."""
    import importlib.metadata as md

    extras_of: dict[str, set[str]] = {}
    stack = list(requirements)
    while stack:
        requirement = stack.pop()
        name, extras = canonicalize_name(requirement.name), set(requirement.extras)
        if name in extras_of and extras <= extras_of[name]:
            continue
        extras_of[name] = extras_of.get(name, set()) | extras
        try:
            dependencies = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in dependencies:
            dependency = Requirement(line)
            markers = dependency.marker
            if markers is None or any(markers.evaluate({"extra": e}) for e in extras_of[name] | {""}):
                stack.append(dependency)
    return set(extras_of)


@pytest.mark.parametrize("script", list(SHORT_RUNS))
def test_the_header_names_every_distribution_the_script_needs(script, tmp_path):
    used = short_run(script, tmp_path / "traced", blocked=[])
    brought_in = closure(header_requirements(script))
    assert {"torch", "numpy", "tyro"} <= set(used) <= brought_in | set(used)  # the trace sees real imports
    # A distribution outside the header may only have been imported because it happened to be installed
    # (torch imports tqdm when it is there, say): the same run must then succeed with it unimportable.
    extra = {dist: modules for dist, modules in used.items() if dist not in brought_in}
    blocked = sorted({module.split(".")[0] for modules in extra.values() for module in modules})
    short_run(script, tmp_path / "blocked", blocked)


def test_requirements_txt_covers_every_header():
    listed = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            listed[canonicalize_name(requirement.name)] = set(requirement.extras)
    for script in SHORT_RUNS:
        for requirement in header_requirements(script):
            name = canonicalize_name(requirement.name)
            assert name in listed, f"requirements.txt lacks {requirement} ({script})"
            assert set(requirement.extras) <= listed[name], f"requirements.txt lacks the extras of {requirement}"
