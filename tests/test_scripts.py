"""scripts/test.sh's SQLAlchemy 2.0 stage works when the caller's python is a virtualenv.

It used to build its venv with ``--system-site-packages`` from the *base* interpreter, which
does not see what the user installed in their virtualenv (``ModuleNotFoundError``). Here the
caller is a fresh virtualenv holding a package the base interpreter does not have, and the
layered venv installs its own version of a module the caller also has (as it installs its own
SQLAlchemy 2.0 in scripts/test.sh): its own must win, everything else must come through.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: object, **kwargs: object) -> str:
    done = subprocess.run(
        [str(a) for a in args], check=True, capture_output=True, text=True, timeout=300, **kwargs
    )
    return done.stdout.strip()


def make_wheel(directory: Path, module: str, source: str) -> Path:
    """A minimal pure-Python wheel with one module (installs offline, no build backend)."""
    dist_info = "shadowing-1.0.dist-info"
    files = {
        f"{module}.py": source,
        f"{dist_info}/METADATA": "Metadata-Version: 2.1\nName: shadowing\nVersion: 1.0\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = directory / "shadowing-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


def test_layered_venv_sees_the_callers_virtualenv_and_its_own_packages_first(tmp_path):
    user_venv = tmp_path / "user-venv"
    run(sys.executable, "-m", "venv", "--without-pip", user_venv)
    user_python = user_venv / "bin" / "python"
    purelib = 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
    user_site = Path(run(user_python, "-c", purelib))
    # Only the user's virtualenv has these two modules; it also sees what this interpreter has
    # (as a user's `pip install -e '.[test]'` would have put there).
    (user_site / "only_in_user_venv.py").write_text("MARK = 42\n")
    (user_site / "shadowed.py").write_text("WHO = 'user venv'\n")
    parents = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (user_site / "this_interpreter.pth").write_text(
        "\n".join([*parents, sysconfig.get_paths()["purelib"]]) + "\n"
    )
    assert run(user_python, "-c", "import shadowed; print(shadowed.WHO)") == "user venv"

    layered = tmp_path / "layered"
    wheel = make_wheel(tmp_path, "shadowed", "WHO = 'layered venv'\n")
    run(
        "bash", ROOT / "scripts" / "layered-venv.sh", layered, "--no-index", "--no-deps", wheel,
        env={**os.environ, "PYTHON": str(user_python)},
    )  # fmt: skip
    probe = (
        "import only_in_user_venv, shadowed, sqlalchemy, pytest, fastapi;"
        "import opentelemetry.instrumentation.sqlalchemy_pool as m;"
        "print(only_in_user_venv.MARK, shadowed.WHO, m.__file__, sep='|')"
    )
    out = run(layered / "bin" / "python", "-c", probe).split("|")
    instrumentor = ROOT / "src" / "opentelemetry" / "instrumentation" / "sqlalchemy_pool"
    assert out == ["42", "layered venv", str(instrumentor / "__init__.py")]
