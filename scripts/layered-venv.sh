#!/usr/bin/env bash
# Usage: PYTHON=python3 bash scripts/layered-venv.sh DIR REQUIREMENT...
# Creates a virtualenv in DIR that sees everything $PYTHON sees -- a user's virtualenv included,
# not only the base interpreter's site-packages -- with this checkout's src/ first and its own
# site-packages (where REQUIREMENT... are installed, e.g. another SQLAlchemy) ahead of the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
dir=$1
shift

"$PYTHON" -m venv --without-pip "$dir"
site_dir=$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# A .pth file's lines are added after the venv's own site-packages: the checkout, then every
# site-packages directory of $PYTHON (its virtualenv's, then the base interpreter's).
{
  echo "$PWD/src"
  "$PYTHON" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))'
} > "$site_dir/_layered_over_parent.pth"
if [ $# -gt 0 ]; then
  # $PYTHON's pip is visible through the .pth and installs into this venv; else bring one.
  "$dir/bin/python" -m pip --version >/dev/null 2>&1 || "$dir/bin/python" -m ensurepip -q
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
fi
