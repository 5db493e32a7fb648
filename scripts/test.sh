#!/usr/bin/env bash
# The project's test command (README): installs what the tests need, then runs
# ruff and the whole suite on SQLAlchemy 2.1, and the instrumentor suite again on SQLAlchemy 2.0.
# Real components only: embedded PostgreSQL (or DATABASE_URL), Prometheus/promtool, hey,
# valgrind (the benchmarks' instruction counts).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

need_apt=()
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v hey >/dev/null 2>&1 || need_apt+=(hey)  # the load test's second calibrated generator
command -v valgrind >/dev/null 2>&1 || need_apt+=(valgrind)  # benchmark instruction counts
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing system packages: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "== note: ${need_apt[*]} missing and not root; tests needing them will say so" >&2
  fi
fi

echo "== installing the project with its test extras"
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test]" 'sqlalchemy[asyncio]>=2.1,<2.2'

echo "== the project's collector distribution (scripts/build-collector.sh; cached after the first build)"
collector_rc=0
bash scripts/build-collector.sh >/dev/null || collector_rc=$?
if [ "$collector_rc" = 2 ]; then
  echo "== note: no Go toolchain; the real-collector tests will skip" >&2
elif [ "$collector_rc" != 0 ]; then
  exit "$collector_rc"
fi

echo "== ruff"
"$PYTHON" -m ruff check src tests benchmarks
"$PYTHON" -m ruff format --check src tests benchmarks

echo "== pytest (SQLAlchemy $("$PYTHON" -c 'import sqlalchemy; print(sqlalchemy.__version__)'))"
"$PYTHON" -m pytest -q -p no:cacheprovider "$@"

# SQLAlchemy 2.0 in a throw-away venv layered over $PYTHON's packages (a user's virtualenv
# included: scripts/layered-venv.sh), with only SQLAlchemy 2.0 installed in it.
venv=$(mktemp -d /tmp/sqla20-venv.XXXXXX)
trap 'rm -rf "$venv"' EXIT
PYTHON=$PYTHON bash scripts/layered-venv.sh "$venv" 'sqlalchemy[asyncio]>=2.0,<2.1'
echo "== pytest instrumentor suite (SQLAlchemy $("$venv/bin/python" -c 'import sqlalchemy; print(sqlalchemy.__version__)'))"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/instrumentor tests/test_pg_activity.py
