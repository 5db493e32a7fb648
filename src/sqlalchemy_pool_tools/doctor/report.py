"""Render diagnoses for people (aligned text, readable at 3 a.m.) and for machines (JSON)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import TextIO

from sqlalchemy_pool_tools.doctor.verdict import (
    CRITICAL,
    HEALTHY,
    INFO,
    OK,
    WARNING,
    Diagnosis,
    Finding,
)

_COLOURS = {CRITICAL: "\033[1;31m", WARNING: "\033[33m", INFO: "\033[36m", OK: "\033[32m"}
_RESET = "\033[0m"
_INDENT = "  "


def exit_code(diagnoses: Sequence[Diagnosis]) -> int:
    """0 when every pool is healthy, else 1 (problems found or not enough data to tell).

    Configuration advice never changes the exit code: it is advice, not an incident.
    """
    return 0 if diagnoses and all(d.healthy for d in diagnoses) else 1


def finding_to_dict(finding: Finding) -> dict[str, object]:
    return {
        "kind": finding.kind,
        "severity": finding.severity,
        "title": finding.title,
        "evidence": [{"label": label, "value": value} for label, value in finding.evidence],
        "culprits": list(finding.culprits),
        "next_steps": list(finding.next_steps),
    }


def to_dict(diagnosis: Diagnosis) -> dict[str, object]:
    """One pool's diagnosis as plain JSON-able data (figures keep their raw numbers)."""
    return {
        "pool": diagnosis.pool,
        "verdict": diagnosis.verdict,
        "severity": diagnosis.severity,
        "healthy": diagnosis.healthy,
        "findings": [finding_to_dict(f) for f in diagnosis.findings],
        "config": [finding_to_dict(f) for f in diagnosis.config],
        "figures": diagnosis.figures.to_dict(),
    }


def _json_safe(value: object) -> object:
    """Strict JSON has no NaN/Infinity: unknown becomes null, infinite a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def render_json(diagnoses: Sequence[Diagnosis], source: str | None = None) -> str:
    doc = {
        "source": source,
        "healthy": exit_code(diagnoses) == 0,
        "exit_code": exit_code(diagnoses),
        "pools": [to_dict(d) for d in diagnoses],
    }
    return json.dumps(_json_safe(doc), indent=2, allow_nan=False, default=str)


def use_colour(stream: TextIO) -> bool:
    """Colour only for a terminal, and never when NO_COLOR is set (no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


class _Writer:
    def __init__(self, colour: bool, width: int) -> None:
        self.colour = colour
        self.width = max(60, width)
        self.lines: list[str] = []

    def tag(self, severity: str) -> str:
        text = f"[{severity.upper()}]"
        if self.colour and severity in _COLOURS:
            return f"{_COLOURS[severity]}{text}{_RESET}"
        return text

    def wrap(self, text: str, indent: str, hanging: str | None = None) -> None:
        self.lines.extend(
            textwrap.wrap(
                text,
                width=self.width,
                initial_indent=indent,
                subsequent_indent=hanging if hanging is not None else indent,
                break_on_hyphens=False,
            )
            or [indent]
        )

    def table(self, rows: Sequence[tuple[str, str]], indent: str) -> None:
        if not rows:
            return
        pad = max(len(label) for label, _ in rows)
        for label, value in rows:
            self.wrap(f"{label.ljust(pad)}  {value}", indent, indent + " " * (pad + 2))


def _finding(w: _Writer, finding: Finding, indent: str) -> None:
    plain_tag = f"[{finding.severity.upper()}]"
    # Wrap the plain text, then colour the tag, so escape codes never count towards the width.
    wrapped = textwrap.wrap(
        f"{plain_tag} {finding.kind}: {finding.title}",
        width=w.width,
        initial_indent=indent,
        subsequent_indent=indent + "    ",
        break_on_hyphens=False,
    )
    wrapped[0] = wrapped[0].replace(plain_tag, w.tag(finding.severity), 1)
    w.lines.extend(wrapped)
    inner = indent + _INDENT
    if finding.evidence:
        w.lines.append(f"{inner}Evidence:")
        w.table(finding.evidence, inner + _INDENT)
    if finding.culprits:
        w.lines.append(f"{inner}Culprits:")
        for culprit in finding.culprits:
            w.wrap(culprit, inner + _INDENT + "- ", inner + _INDENT + "  ")
    if finding.next_steps:
        w.lines.append(f"{inner}Next steps:")
        for n, step in enumerate(finding.next_steps, 1):
            w.wrap(step, f"{inner}{_INDENT}{n}. ", inner + _INDENT + "   ")


def render_text(
    diagnoses: Sequence[Diagnosis],
    *,
    source: str | None = None,
    colour: bool = False,
    width: int | None = None,
) -> str:
    """The report: per pool the verdict line first, then findings, configuration advice."""
    if width is None:
        width = min(shutil.get_terminal_size((100, 24)).columns, 120)
    w = _Writer(colour, width)
    if source:
        w.wrap(f"sqlalchemy-pool doctor - {source}", "")
    for diagnosis in diagnoses:
        fig = diagnosis.figures
        instances = f", {fig.instances:.0f} instance(s)" if fig.instances else ""
        verdict = diagnosis.verdict.replace("_", " ").upper()
        severity = OK if diagnosis.verdict == HEALTHY else diagnosis.severity
        w.lines.append("")
        w.lines.append(f"Pool {diagnosis.pool!r}{instances}: {w.tag(severity)} {verdict}")
        for finding in diagnosis.findings:
            w.lines.append("")
            _finding(w, finding, _INDENT)
        if diagnosis.config:
            w.lines.append("")
            w.lines.append(f"{_INDENT}Configuration:")
            for finding in diagnosis.config:
                _finding(w, finding, _INDENT * 2)
    code = exit_code(diagnoses)
    problems = sum(not d.healthy for d in diagnoses)
    w.lines.append("")
    w.lines.append(
        f"{len(diagnoses)} pool(s), {problems} not healthy (exit {code})."
        if diagnoses
        else "No pools."
    )
    return "\n".join(w.lines) + "\n"


def print_report(
    diagnoses: Sequence[Diagnosis], *, source: str | None = None, as_json: bool = False
) -> None:
    out = sys.stdout
    if as_json:
        out.write(render_json(diagnoses, source) + "\n")
    else:
        out.write(render_text(diagnoses, source=source, colour=use_colour(out)))
