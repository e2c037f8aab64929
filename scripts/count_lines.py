"""Line counts of the package at a git revision: all lines, and code only (no blank, comment or docstring lines).

Usage: ``python scripts/count_lines.py [REV ...]`` (default HEAD). Prints, per revision, the whole package
(``promptopt/**/*.py``) and the modules that replaced the three run pipelines of 073c40e (issue 11): cli, run
(runs + tune_run before), search, report, plots, progress, predict, artifacts, space and
strategies/{__init__, registry, base, baselines, forward, retrieval, tuning}.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize

PIPELINE = re.compile(r"promptopt/(cli|runs|tune_run|run|search|report|plots|progress|predict|artifacts|space|"
                      r"strategies/(__init__|registry|base|baselines|forward|retrieval|tuning))\.py$")


def counts(source: str) -> tuple[int, int]:
    """(all lines, code lines) of one Python file."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    code = {line for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type not in skip
            for line in range(tok.start[0], tok.end[0] + 1) if line not in docstrings}
    return len(source.splitlines()), len(code)


def main(revs: list[str]) -> None:
    for rev in revs or ["HEAD"]:
        files = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "promptopt"], check=True,
                               capture_output=True, text=True).stdout.split()
        package, pipeline = [0, 0], [0, 0]
        for path in (f for f in files if f.endswith(".py")):
            lines, code = counts(subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True,
                                                text=True).stdout)
            for total in (package, pipeline) if PIPELINE.search(path) else (package,):
                total[0], total[1] = total[0] + lines, total[1] + code
        print(f"{rev}: package {package[0]} lines ({package[1]} code); pipeline modules {pipeline[0]} lines "
              f"({pipeline[1]} code)")


if __name__ == "__main__":
    main(sys.argv[1:])
