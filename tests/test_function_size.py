"""Functions a reader can hold: no function body over 60 lines outside tests (issue 28).

A body is counted from its first statement (the docstring included) to its last line, as the
project's before-stop hook counts it, so the two agree: the decorators and the signature (a Typer
command's `Annotated` option declarations included) do not count. Benchmarks count like everything
else. This replaces the old module-size bound, which made modules split to fit a line count while
nothing bounded a function.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_BODY_LINES = 60
FOLDERS = ("platform", "clients", "strategies", "simulations")


def body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement (the docstring, where there is one) to the function's last line."""
    return fn.end_lineno - fn.body[0].lineno + 1


def long_functions(limit: int = MAX_BODY_LINES) -> list[str]:
    offenders = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and body_lines(node) > limit:
                    rel = path.relative_to(ROOT)
                    offenders.append(f"{rel}:{node.lineno} {node.name}: {body_lines(node)} lines")
    return offenders


def test_body_lines_counts_from_the_first_statement_docstring_included():
    source = '@decorator\ndef f(\n    a: int,\n    b: int,\n) -> int:\n    """Doc.\n\n    More doc.\n    """\n    x = a\n    return x + b\n'
    (fn,) = ast.parse(source).body
    assert body_lines(fn) == 6


def test_no_function_body_over_60_lines():
    offenders = long_functions()
    assert offenders == [], "split these functions (tests aside, no body over 60 lines):\n" + "\n".join(offenders)
