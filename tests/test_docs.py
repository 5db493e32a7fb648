"""The README documents every option and every metric/span name the code defines."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.instrumentation.sqlalchemy_pool import semconv
from opentelemetry.instrumentation.sqlalchemy_pool.config import OPTIONS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_option_is_documented():
    for option in OPTIONS:
        assert f"`{option.name}`" in README, option.name
        assert option.env in README, option.env


def test_every_metric_and_span_name_is_documented():
    names = [
        value
        for key, value in vars(semconv).items()
        if key.isupper() and isinstance(value, str) and value.count(".") >= 2
        and not key.startswith(("CODE_", "HTTP_", "DB_SYSTEM", "ERROR_"))
    ]  # fmt: skip
    assert len(names) > 30
    missing = []
    for name in names:
        last = name.rsplit(".", 1)[-1]
        if name not in README and f".{last}`" not in README and f"`{last}`" not in README:
            missing.append(name)
    assert not missing, missing


def test_readme_has_exactly_the_two_commands_first():
    head = README.split("## A real demo run")[0]
    assert "pip install -e '.[tools]' && sqlalchemy-pool demo" in head
    assert "bash scripts/test.sh" in head
    assert (Path(__file__).resolve().parents[1] / "scripts" / "test.sh").exists()
