"""The documents say what the code does: README.md and docs/*.md are checked against the scripts.

Every line-number link points at what it names, every relative link and image resolves, every flag of a quoted
command exists in that script's --help, the side-by-side page is what the scripts generate today, the
README's two commands are what CI runs, and its number of tests is the suite's; each flag's help is one line.
A stale line number or page fails with the command that fixes it.
"""

import ast
import functools
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("docs_tool", REPO / "tools" / "docs.py")
docs_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs_tool)

DOCUMENTS = docs_tool.documents(REPO)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
HTML_SRC = re.compile(r"<(?:img|a)\s[^>]*(?:src|href)=\"([^\"]+)\"")


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", prose(path.read_text()), re.M)}


def test_every_code_fence_is_closed_and_names_its_language():
    for doc in DOCUMENTS:
        fences = re.findall(r"^```(\w*)$", doc.read_text(), re.M)
        assert len(fences) % 2 == 0 and all(fences[0::2]) and not any(fences[1::2]), f"{doc.name}: {fences}"


def test_every_line_link_points_at_what_it_names():
    problems = docs_tool.line_link_problems(REPO)
    assert not problems, f"stale line links; run: {docs_tool.UPDATE_LINES}\n" + "\n".join(problems)


def test_no_line_number_is_quoted_without_a_checked_link():
    # "line 496" in prose cannot be kept true by the tool: a line number is quoted as [`name`](file.py#L496).
    for doc in DOCUMENTS:
        bare = re.findall(r"\blines? \d+", prose(doc.read_text()))
        assert not bare, f"{doc.name}: {bare}: write a [`name`](script.py#L...) link instead"


def test_every_relative_link_and_image_resolves():
    missing = []
    for doc in DOCUMENTS:
        text = prose(doc.read_text())
        for target in LINK.findall(text) + HTML_SRC.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            if not resolved.exists():
                missing.append(f"{doc.name}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                missing.append(f"{doc.name}: {target} (no such heading)")
            elif anchor and resolved.suffix == ".py" and not re.fullmatch(r"L\d+", anchor):
                missing.append(f"{doc.name}: {target} (a link into a script names a line: #L123)")
    assert not missing, "\n".join(missing)


def quoted_commands(text: str) -> list[str]:
    """The shell commands of ```bash blocks (continuation lines joined) and of inline `python ...` spans."""
    commands = []
    for language, body in FENCE.findall(text):
        if language in ("bash", "sh", "shell", ""):
            commands += body.replace("\\\n", " ").splitlines()
    for line in prose(text).splitlines():
        commands += [c for c in INLINE_CODE.findall(line) if re.match(r"(python|torchrun|uv run) ", c)]
    return [c.split(" #")[0].strip() for c in commands if c.strip() and not c.lstrip().startswith("#")]


@functools.cache
def help_flags(script: str) -> frozenset[str]:
    result = subprocess.run(
        [sys.executable, script, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )  # fmt: skip
    assert result.returncode == 0, f"{script} --help: {result.stderr}"
    return frozenset(re.findall(r"--[a-z0-9][a-z0-9-]*", result.stdout))


def flags_by_script(command: str) -> list[tuple[str, list[str]]]:
    """(script, flags given to it) for each script of this repository that a command runs."""
    tokens = shlex.split(command.replace("<", "_").replace(">", "_"))
    scripts = [i for i, t in enumerate(tokens) if t.endswith(".py") and (REPO / t).is_file()]
    if not scripts:
        return []
    first = scripts[0]
    args = tokens[first + 1 :]
    if "--" in args:  # run_benchmark.py: the flags after a bare -- are the training script's
        split = args.index("--")
        args, passed = args[:split], args[split + 1 :]
        inner = args[args.index("--script") + 1] if "--script" in args else "ppo_continuous.py"
    else:
        passed, inner = [], None
    flags = lambda ts: [t.split("=")[0] for t in ts if t.startswith("--")]  # noqa: E731
    result = [(tokens[first], flags(args))]
    if inner is not None:
        result.append((inner, flags(passed)))
    return result


def test_every_flag_of_a_quoted_command_exists():
    unknown = []
    for doc in DOCUMENTS:
        for command in quoted_commands(doc.read_text()):
            for script, flags in flags_by_script(command):
                known = help_flags(script)
                unknown += [f"{doc.name}: {flag} ({script}) in: {command}" for flag in flags if flag not in known]
    assert not unknown, "\n".join(unknown)


def test_the_side_by_side_page_is_current():
    page = docs_tool.render(REPO)
    committed = docs_tool.HTML_PATH.read_text()
    assert page == committed, f"docs/side_by_side.html is stale: run {docs_tool.REGENERATE}"
    for name in ("Args", "collect_rollout", "compute_gae", "ppo_loss", "update_policy", "train", "main"):
        assert f'<h2 id="f-{name}">' in page  # every shared function has its section
    assert "<script" not in page and "<link" not in page and " src=" not in page  # static, nothing fetched


def test_the_side_by_side_alignment_pairs_equal_lines_and_keeps_the_rest():
    a = ["def f(x):", "    y = x + 1", "    return y"]
    b = ["def f(x):", "    z = 2", "    y = x + 1.0", "    return y"]
    rows = docs_tool.align([a, b])
    assert rows == [[0, 0], [None, 1], [1, 2], [2, 3]]  # the similar line is paired, the new one has its own row
    assert docs_tool.differing_lines(rows, [a, b]) == [2]


def test_the_terminal_form_prints_the_aligned_versions(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the columns fit the terminal: make it wide whatever runs the tests
    assert docs_tool.print_function("compute_gae", ["ppo_continuous.py", "ppo_atari.py"], unified=True) == 0
    assert capsys.readouterr().out == ""  # identical in the two classic scripts: an empty diff
    assert docs_tool.print_function("ppo_loss", list(docs_tool.SCRIPTS), unified=False) == 0
    out = capsys.readouterr().out
    assert "ppo_continuous.py:" in out and "ppo_llm_toy.py:" in out and "masked_mean" in out
    assert docs_tool.print_function("ppo_los", list(docs_tool.SCRIPTS), unified=False) == 2
    assert "did you mean ['ppo_loss']" in capsys.readouterr().out


def test_update_line_numbers_repairs_a_stale_link_and_the_check_catches_it(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "a.py").write_text("import os\n\n\n# SECTION\ndef f():\n    pass\n")
    readme = tmp_path / "README.md"
    readme.write_text("See [`f`](a.py#L2), [the `# SECTION`](a.py#L1) and [`g`](a.py#L1).\n")
    problems = docs_tool.line_link_problems(tmp_path)
    assert len(problems) == 3 and "line 2 of a.py is not `f`" in problems[0]
    changes = docs_tool.update_line_numbers(tmp_path)
    assert readme.read_text() == "See [`f`](a.py#L5), [the `# SECTION`](a.py#L4) and [`g`](a.py#L1).\n"
    assert changes[-1] == "README.md: `g` not found in a.py: fix by hand"
    assert docs_tool.line_link_problems(tmp_path) == ["README.md:1: line 1 of a.py is not `g`"]


def test_the_readme_is_short_and_its_two_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 10_240, "README.md is for a five-minute read: move detail into docs/"
    blocks = [body.strip() for language, body in FENCE.findall(readme) if language == "bash"]
    assert blocks[:2] == ["pip install -r requirements.txt && python ppo_continuous.py", "python -m pytest -q"]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert "python -m pip install -q -r requirements.txt" in ci and "python -m pytest -q" in ci


def test_the_readme_gives_the_number_of_tests_the_suite_has():
    readme = (REPO / "README.md").read_text()
    quoted = int(re.search(r"Run the tests \((\d+),", readme).group(1))
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", "-p", "no:cacheprovider"]
    collected = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    count = int(re.search(r"^(\d+) tests? collected", collected.stdout, re.M).group(1))
    assert quoted == count, f"README.md says {quoted} tests, the suite has {count}: update the number there"


@pytest.mark.parametrize("script", docs_tool.SCRIPTS)
def test_every_flag_help_is_one_line_so_that_help_prints_it_unbroken(script):
    """Each Args field's docstring is its --help text. tyro joins the lines of a field docstring only where a line
    starts with a letter, and a continuation line in the source starts with its indentation, so a docstring over
    two lines shows in --help broken at the source's line break, mid-sentence. Detail goes into a comment."""
    tree = ast.parse((REPO / script).read_text())
    args = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args")
    broken = [
        field.target.id
        for field, doc in zip(args.body, args.body[1:], strict=False)
        if isinstance(field, ast.AnnAssign)
        and isinstance(doc, ast.Expr)
        and isinstance(doc.value, ast.Constant)
        and "\n" in doc.value.value
    ]
    assert not broken, f"{script}: the help of {broken} spans lines; make each one line"


@pytest.mark.parametrize("script", docs_tool.SCRIPTS)
def test_each_script_has_its_guide_and_every_guide_is_linked_from_the_readme(script):
    guide = REPO / "docs" / script.replace(".py", ".md")
    assert guide.is_file()
    readme = (REPO / "README.md").read_text()
    assert (
        f"(docs/{guide.name})" in readme and "(docs/benchmarks.md)" in readme and "(docs/side_by_side.html)" in readme
    )
