"""Fixtures for the doctor tests (test doubles live in doctor_fakes.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .doctor_fakes import FakePoolApp


@pytest.fixture
def fake_app() -> Iterator[FakePoolApp]:
    app = FakePoolApp()
    try:
        yield app
    finally:
        app.close()
