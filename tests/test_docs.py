"""The README documents every option and every metric/span name the code defines."""

from __future__ import annotations

import ast
from pathlib import Path

from opentelemetry.instrumentation.sqlalchemy_pool import semconv
from opentelemetry.instrumentation.sqlalchemy_pool.config import OPTIONS, Option

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def option_row(option: Option) -> str:
    default = option.shown_default
    if not default:
        value = option.default
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        default = f"`{value}`"
    return f"| `{option.name}` | `{option.env}` | {default} | {option.doc} |"


def test_readme_option_table_is_config_py():
    """The README's option table, row for row, is what config.OPTIONS says (name, environment
    variable, default, Option.doc); on failure the message is the table to paste."""
    expected = [
        "| kwarg | environment variable | default | meaning |",
        "|---|---|---|---|",
        *(option_row(option) for option in OPTIONS),
    ]
    lines = README.splitlines()
    start = lines.index(expected[0])
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    assert lines[start : start + len(expected)] == expected, "\n" + "\n".join(expected)
    # After them only the arguments that have no environment variable (engines, providers).
    rest = lines[start + len(expected) : end]
    assert [row.split(" | ")[1] for row in rest] == ["—", "—"], rest


def test_every_metric_and_span_name_is_documented():
    names = [
        value
        for key, value in vars(semconv).items()
        if key.isupper() and isinstance(value, str) and value.count(".") >= 2
        and not key.startswith(("CODE_", "HTTP_", "ERROR_"))
    ]  # fmt: skip
    assert len(names) > 30
    missing = []
    for name in names:
        last = name.rsplit(".", 1)[-1]
        if name not in README and f".{last}`" not in README and f"`{last}`" not in README:
            missing.append(name)
    assert not missing, missing


def test_every_semconv_constant_is_used():
    """A name defined in semconv.py and used nowhere in src/ is a promise nobody keeps (as the
    outlived_response span event was, while the collector's tail sampling keyed on it)."""
    src = Path(__file__).resolve().parents[1] / "src"
    used: set[str] = set()
    for path in src.rglob("*.py"):
        if path.name == "semconv.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.Name):
                used.add(node.id)
            elif isinstance(node, ast.alias):
                used.add(node.asname or node.name)
    constants = [name for name in vars(semconv) if name.isupper()]
    assert len(constants) > 60
    assert [name for name in constants if name not in used] == []


def test_readme_has_exactly_the_two_commands_first():
    head = README.split("## A real demo run")[0]
    assert "pip install -e '.[tools]' && sqlalchemy-pool demo" in head
    assert "bash scripts/test.sh" in head
    assert (Path(__file__).resolve().parents[1] / "scripts" / "test.sh").exists()
