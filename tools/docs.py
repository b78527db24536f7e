"""Keep the documents in step with the three scripts: the side-by-side view and the quoted line numbers.

    python tools/docs.py                          # regenerate docs/side_by_side.html from the scripts
    python tools/docs.py --function ppo_loss      # the aligned versions of one function, in the terminal
    python tools/docs.py --function train --unified --scripts ppo_continuous.py ppo_atari.py   # as a diff
    python tools/docs.py --update-line-numbers    # point every [`name`](file.py#L123) link at where name is now
    python tools/docs.py --check                  # exit 1 if the page or a line number is stale (the tests do this)

The side-by-side view parses each script with `ast` (its top-level functions and classes and their line
ranges), aligns the versions of each shared name line by line with `difflib`, and writes one static page
(inline CSS, no script, no network). The output depends on the scripts' text only, so the tests regenerate it
and compare. A line-number link is written [`name`](../script.py#L123): `name` is a function or class
(`ppo_loss`, `Run.log`, `Args.anneal_lr`: the line that defines it) or any other text (a banner such as
`# NETWORK`: a line that contains it).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import html
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("ppo_continuous.py", "ppo_atari.py", "ppo_llm_toy.py")
HTML_PATH = REPO / "docs" / "side_by_side.html"
REGENERATE = "python tools/docs.py"
UPDATE_LINES = "python tools/docs.py --update-line-numbers"

# A link with a line number: [`name`](path.py#L123), or [some words `name`](path.py#L123). The link text ends
# with the name in backticks, so that it says what it points at.
LINE_LINK = re.compile(r"\[([^\]`]*)`([^`]+)`\]\(([^)#\s]+\.py)#L(\d+)\)")
ANY_LINE_LINK = re.compile(r"\[([^\]]*)\]\(([^)#\s]+\.py)#L(\d+)\)")


# PARSING: the top-level definitions of a script, and every definition's line


def top_level(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (first line, last line), 1-based, of each top-level function and class (decorators included)."""
    tree = ast.parse(path.read_text())
    spans = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            spans[node.name] = (first, node.end_lineno)
    return spans


def definitions(path: Path) -> dict[str, int]:
    """Qualified name -> the line of its `def` / `class` / field: `train`, `Run.log`, `Args.anneal_lr`, `SCRIPT_NAME`."""
    return _definitions(str(path), path.read_text())


@functools.lru_cache(maxsize=16)
def _definitions(path: str, text: str) -> dict[str, int]:
    found: dict[str, int] = {}

    def visit(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.setdefault(prefix + node.name, node.lineno)
                visit(node.body, prefix + node.name + ".")
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                found.setdefault(prefix + node.target.id, node.lineno)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        found.setdefault(prefix + target.id, node.lineno)

    visit(ast.parse(text).body, "")
    return found


# ALIGNMENT: the versions of one name, row by row


def pair_lines(a: list[str], b: list[str], i0: int = 0, j0: int = 0) -> list[tuple[int | None, int | None]]:
    """Pairs (i, j) of a replaced block, in order: the most similar two lines first, then the same on each
    side of them (as difflib.Differ does); lines with no similar partner are paired in order."""
    best, where = 0.74, None
    for i, line_a in enumerate(a):
        matcher = difflib.SequenceMatcher(None, b=line_a, autojunk=False)
        for j, line_b in enumerate(b):
            matcher.set_seq1(line_b)
            if matcher.real_quick_ratio() > best and matcher.quick_ratio() > best and matcher.ratio() > best:
                best, where = matcher.ratio(), (i, j)
    if where is None:
        n = max(len(a), len(b))
        return [(i0 + k if k < len(a) else None, j0 + k if k < len(b) else None) for k in range(n)]
    i, j = where
    left = pair_lines(a[:i], b[:j], i0, j0)
    right = pair_lines(a[i + 1 :], b[j + 1 :], i0 + i + 1, j0 + j + 1)
    return left + [(i0 + i, j0 + j)] + right


def align(versions: list[list[str]]) -> list[list[int | None]]:
    """Rows of line indices (None: no line in that column), aligning every version with the first one.

    Lines difflib finds equal share a row; in a replaced block similar lines are paired (pair_lines); what one
    version has in addition gets rows of its own, where it stands in that version.
    """
    base = versions[0]
    partner: list[list[int | None]] = []  # per other version: the line paired with each base line
    before: list[list[list[int]]] = []  # per other version: its unpaired lines before each base line (and at the end)
    for other in versions[1:]:
        pairs: list[tuple[int | None, int | None]] = []
        matcher = difflib.SequenceMatcher(None, base, other, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag == "equal":
                pairs += [(i1 + k, j1 + k) for k in range(i2 - i1)]
            elif tag == "replace":
                pairs += pair_lines(base[i1:i2], other[j1:j2], i1, j1)
            else:
                pairs += [(i, None) for i in range(i1, i2)] + [(None, j) for j in range(j1, j2)]
        partner_of: list[int | None] = [None] * len(base)
        extra: list[list[int]] = [[] for _ in range(len(base) + 1)]
        pending: list[int] = []
        for i, j in pairs:
            if i is None:
                pending.append(j)
                continue
            extra[i], pending, partner_of[i] = pending, [], j
        extra[len(base)] = pending
        partner.append(partner_of)
        before.append(extra)
    rows: list[list[int | None]] = []
    for i in range(len(base) + 1):
        for k in range(max(len(extra[i]) for extra in before) if before else 0):
            rows.append([None] + [extra[i][k] if k < len(extra[i]) else None for extra in before])
        if i < len(base):
            rows.append([i] + [pairs[i] for pairs in partner])
    return rows


def shared_names(spans: dict[str, dict[str, tuple[int, int]]]) -> tuple[list[str], dict[str, list[str]]]:
    """The names that two or more scripts define (in the order of the first script that has them), and per
    script the names that only it defines."""
    order: list[str] = []
    for script in SCRIPTS:
        order += [name for name in spans[script] if name not in order]
    shared = [name for name in order if sum(name in spans[s] for s in SCRIPTS) >= 2]
    only = {s: [name for name in spans[s] if all(name not in spans[o] for o in SCRIPTS if o != s)] for s in SCRIPTS}
    return shared, only


def load(repo: Path = REPO):
    texts = {s: (repo / s).read_text().splitlines() for s in SCRIPTS}
    spans = {s: top_level(repo / s) for s in SCRIPTS}
    return texts, spans


def versions_of(name: str, scripts, texts, spans) -> tuple[list[str], list[list[str]], list[int]]:
    present = [s for s in scripts if name in spans[s]]
    lines = [texts[s][spans[s][name][0] - 1 : spans[s][name][1]] for s in present]
    return present, lines, [spans[s][name][0] for s in present]


def differing_lines(rows, lines) -> list[int]:
    """Per column after the first: how many of its rows differ from the first column's line."""
    counts = [0] * (len(lines) - 1)
    for row in rows:
        base = None if row[0] is None else lines[0][row[0]]
        for c in range(1, len(lines)):
            text = None if row[c] is None else lines[c][row[c]]
            if text != base and not (text is None and base is None):
                counts[c - 1] += 1
    return counts


# THE PAGE

CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 16px 40px; color: #1f2328; }
h1 { font-size: 22px; margin: 16px 0 4px; } h2 { font-size: 17px; margin: 28px 0 6px; }
p, li { max-width: 70em; } code { font: 12px/1.4 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
table.index { border-collapse: collapse; } .index td, .index th { padding: 2px 10px; text-align: left;
  border-bottom: 1px solid #d8dee4; font-size: 13px; } .index th { background: #f6f8fa; }
table.code { border-collapse: collapse; table-layout: fixed; width: 100%; }
.code th { position: sticky; top: 0; background: #f6f8fa; border-bottom: 1px solid #d0d7de; text-align: left;
  font: 600 12px/1.6 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; padding: 2px 6px; }
.code td { font: 11.5px/1.35 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; vertical-align: top;
  white-space: pre-wrap; overflow-wrap: anywhere; padding: 0 6px 0 3.6em; text-indent: -3.6em;
  border-left: 1px solid #d8dee4; }
.code td::before { content: attr(data-n); display: inline-block;
  width: 3.2em; margin-right: .4em; color: #8c959f; text-align: right; text-indent: 0; }
td.d { background: #fff1c2; } td.e { background: #f6f8fa; } mark { background: #fbd06b; color: inherit; }
.same { color: #57606a; } .note { color: #57606a; font-size: 13px; }
"""


def cell(text: str | None, number: int | None, cls: str, base: str | None, mark_changes: bool) -> str:
    if text is None:
        return '<td class="e"></td>'
    if mark_changes and base is not None and text != base:
        parts = []
        matcher = difflib.SequenceMatcher(None, base, text, autojunk=False)
        for tag, _, _, j1, j2 in matcher.get_opcodes():
            piece = html.escape(text[j1:j2], quote=False)
            parts.append(piece if tag == "equal" or not piece else f"<mark>{piece}</mark>")
        body = "".join(parts)
    else:
        body = html.escape(text, quote=False)
    return f'<td{cls} data-n="{number}">{body}</td>'


def section(name: str, texts, spans) -> tuple[str, str]:
    """The table of one shared name, and its row in the index."""
    present, lines, starts = versions_of(name, SCRIPTS, texts, spans)
    rows = align(lines)
    counts = differing_lines(rows, lines)
    width = f"{100 / len(present):.4f}%"
    head = "".join(f'<th style="width:{width}">{s} lines {spans[s][name][0]}-{spans[s][name][1]}</th>' for s in present)
    body = []
    for row in rows:
        base = None if row[0] is None else lines[0][row[0]]
        texts_in_row = [None if r is None else lines[c][r] for c, r in enumerate(row)]
        differs = any(t != base for t in texts_in_row)
        cells = []
        for c, r in enumerate(row):
            text = texts_in_row[c]
            # The first column is highlighted where any version differs; the others where they differ from it.
            cls = ' class="d"' if text is not None and (text != base if c else differs) else ""
            cells.append(cell(text, None if r is None else starts[c] + r, cls, base, c > 0))
        body.append("<tr>" + "".join(cells) + "</tr>")
    vs = ", ".join(f"{present[c + 1]}: {n}" for c, n in enumerate(counts))
    status = "identical" if not any(counts) else f"rows that differ from {present[0]}: {vs}"
    anchor = f"f-{name}"
    table = (
        f'<h2 id="{anchor}">{html.escape(name)}</h2>\n<p class="note">{status}</p>\n'
        f'<table class="code"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(body) + "\n</tbody></table>"
    )
    sizes = [f"{spans[s][name][1] - spans[s][name][0] + 1}" if s in present else "-" for s in SCRIPTS]
    index_row = (
        f'<tr><td><a href="#{anchor}"><code>{html.escape(name)}</code></a></td>'
        + "".join(f"<td>{n}</td>" for n in sizes)
        + f'<td class="{"same" if not any(counts) else ""}">{status}</td></tr>'
    )
    return table, index_row


def render(repo: Path = REPO) -> str:
    texts, spans = load(repo)
    shared, only = shared_names(spans)
    sections, index = zip(*(section(name, texts, spans) for name in shared), strict=True)
    only_items = "".join(
        f"<li><code>{s}</code>: "
        + ", ".join(f"<code>{html.escape(n)}</code> ({spans[s][n][0]}-{spans[s][n][1]})" for n in only[s])
        + "</li>"
        for s in SCRIPTS
    )
    heads = "".join(f"<th>{s}, lines</th>" for s in SCRIPTS)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>The three PPO scripts, side by side</title>
<!-- Generated by `{REGENERATE}` from the three scripts; do not edit (the tests compare it). -->
<style>{CSS}</style></head>
<body>
<h1>The three PPO scripts, side by side</h1>
<p>Each function and class that two or three scripts define, aligned line by line (difflib, against the first
script that has it). A line of the first column is highlighted where another version differs from it; a line of
another column where it differs from the first, with the characters that differ marked. Grey: no line there. Numbers
are the scripts' line numbers. In a terminal: <code>python tools/docs.py
--function ppo_loss</code>. Regenerate this page with <code>{REGENERATE}</code>.</p>
<h2>Shared names</h2>
<table class="index"><thead><tr><th>name</th>{heads}<th>how the versions differ</th></tr></thead>
<tbody>
{chr(10).join(index)}
</tbody></table>
<h2>What only one script has</h2>
<ul>{only_items}</ul>
{chr(10).join(sections)}
</body></html>
"""


# THE TERMINAL FORM


def print_function(name: str, scripts: list[str], unified: bool, out=None) -> int:
    out = out or sys.stdout
    texts, spans = load()
    present, lines, starts = versions_of(name, scripts, texts, spans)
    if not present:
        known = sorted({n for s in scripts for n in spans[s]})
        hint = difflib.get_close_matches(name, known, n=3)
        print(
            f"error: no script of {', '.join(scripts)} defines {name}" + (f" (did you mean {hint}?)" if hint else ""),
            file=out,
        )
        return 2
    color = out.isatty() and os.environ.get("NO_COLOR") is None
    paint = (lambda code, s: f"\033[{code}m{s}\033[0m") if color else (lambda code, s: s)
    if unified:
        for c in range(1, len(present)):
            a, b = present[0], present[c]
            diff = difflib.unified_diff(
                lines[0], lines[c], f"{a}:{name}", f"{b}:{name}", n=3, lineterm="", fromfiledate="", tofiledate=""
            )
            for line in diff:
                style = {"+": "32", "-": "31", "@": "36"}.get(line[:1]) if not line.startswith(("+++", "---")) else "1"
                print(paint(style, line) if style else line, file=out)
        return 0
    columns = shutil.get_terminal_size((200, 40)).columns
    width = max(20, (columns - 3 * (len(present) - 1)) // len(present) - 6)
    print(" | ".join(f"{s}:{spans[s][name][0]}-{spans[s][name][1]}".ljust(width + 5) for s in present), file=out)
    for row in align(lines):
        base = None if row[0] is None else lines[0][row[0]]
        differs = any((None if r is None else lines[c][r]) != base for c, r in enumerate(row))
        cells = []
        for c, r in enumerate(row):
            text = "" if r is None else lines[c][r]
            text = text if len(text) <= width else text[: width - 1] + "~"
            number = "" if r is None else str(starts[c] + r)
            piece = f"{number:>4} {text.ljust(width)}"
            cells.append(paint("33", piece) if differs and r is not None else piece)
        print((" ! " if differs else " | ").join(cells), file=out)
    return 0


# LINE NUMBERS IN README.md AND docs/*.md


def documents(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def text_at(line: str, text: str) -> bool:
    """Whether a line holds a plain-text anchor: a comment banner (`# NETWORK`) starts the line, other text is in it."""
    return line.startswith(text) if text.startswith("#") else text in line


def resolve(name: str, path: Path, old: int | None = None) -> int | None:
    """The line that `name` points at in `path`: its definition, or else the line containing it that is
    nearest to `old` (the first one without `old`)."""
    found = definitions(path)
    if name.rstrip("()") in found:
        return found[name.rstrip("()")]
    lines = path.read_text().splitlines()
    hits = [i + 1 for i, line in enumerate(lines) if text_at(line, name)]
    if not hits:
        return None
    return min(hits, key=lambda i: abs(i - old)) if old is not None else hits[0]


def line_link_problems(repo: Path = REPO) -> list[str]:
    """One message per line-number link that does not point at what it names (or is not checkable)."""
    problems = []
    for doc in documents(repo):
        for number, text in enumerate(doc.read_text().splitlines(), 1):
            for match in ANY_LINE_LINK.finditer(text):
                where = f"{doc.relative_to(repo)}:{number}"
                named = LINE_LINK.fullmatch(match.group(0))
                if named is None:
                    problems.append(f"{where}: {match.group(0)} does not name what it points at ([... `name`](...))")
                    continue
                name, target, line = named.group(2), (doc.parent / named.group(3)).resolve(), int(named.group(4))
                if not target.is_file():
                    problems.append(f"{where}: {named.group(3)} does not exist")
                    continue
                lines = target.read_text().splitlines()
                found = definitions(target).get(name.rstrip("()"))
                ok = line == found if found is not None else 0 < line <= len(lines) and text_at(lines[line - 1], name)
                if not ok:
                    problems.append(f"{where}: line {line} of {target.name} is not `{name}`")
    return problems


def update_line_numbers(repo: Path = REPO) -> list[str]:
    """Rewrite every [`name`](file.py#Lnnn) to where name is now; returns what changed (or cannot be found)."""
    changes = []
    for doc in documents(repo):
        original = doc.read_text()

        def fix(match: re.Match, doc=doc) -> str:
            prefix, name, path = match.group(1), match.group(2), match.group(3)
            target, old = (doc.parent / path).resolve(), int(match.group(4))
            lines = target.read_text().splitlines() if target.is_file() else []
            found = definitions(target).get(name.rstrip("()")) if lines else None
            if found is None and lines and 0 < old <= len(lines) and text_at(lines[old - 1], name):
                return match.group(0)  # a plain-text anchor that is still where it was
            new = found if found is not None else (resolve(name, target, old) if lines else None)
            if new is None:
                changes.append(f"{doc.relative_to(repo)}: `{name}` not found in {path}: fix by hand")
                return match.group(0)
            if new != old:
                changes.append(f"{doc.relative_to(repo)}: `{name}` {path} L{old} -> L{new}")
            return f"[{prefix}`{name}`]({path}#L{new})"

        updated = LINE_LINK.sub(fix, original)
        if updated != original:
            doc.write_text(updated)
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--function", help="print the aligned versions of this function or class and exit")
    parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS, help="with --function")
    parser.add_argument("--unified", action="store_true", help="with --function: unified diffs against the first")
    parser.add_argument("--update-line-numbers", action="store_true", help="rewrite the line links in the docs")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page or a line link is stale")
    args = parser.parse_args(argv)
    if args.function:
        return print_function(args.function, args.scripts, args.unified)
    if args.update_line_numbers:
        for change in update_line_numbers():
            print(change)
        problems = line_link_problems()
        print("\n".join(problems) if problems else "every line link points at what it names")
        return 1 if problems else 0
    page = render()
    if args.check:
        problems = line_link_problems()
        if HTML_PATH.read_text() != page:
            problems.append(f"{HTML_PATH.relative_to(REPO)} is stale: run {REGENERATE}")
        print("\n".join(problems) if problems else "docs up to date")
        return 1 if problems else 0
    HTML_PATH.parent.mkdir(exist_ok=True)
    HTML_PATH.write_text(page)
    print(f"wrote {HTML_PATH.relative_to(REPO)} ({len(page.encode()) // 1024} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
