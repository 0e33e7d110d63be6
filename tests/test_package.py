"""The installed package: stubs match the extension, the wheel has its files,
and importing turnrl pulls in nothing heavy."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import turnrl

ALLOWLIST = Path(__file__).parent / "stubtest_allowlist.txt"


def test_tests_run_against_the_installed_wheel():
    # The source folder must not shadow the wheel: a file missing from the
    # wheel has to fail the suite.
    assert "site-packages" in Path(turnrl.__file__).parts


def test_wheel_ships_stubs_marker_and_kernels():
    root = Path(turnrl.__file__).parent
    assert (root / "_core.pyi").is_file()
    assert (root / "py.typed").is_file()
    assert importlib.util.find_spec("turnrl.kernels") is not None


def test_import_needs_only_numpy():
    code = (
        "import sys, turnrl, turnrl.kernels; "
        "heavy = {'torch', 'triton', 'transformers', 'openai', 'scipy'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_stubs_match_extension():
    pytest.importorskip("mypy")
    done = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "turnrl._core", "--allowlist", str(ALLOWLIST)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_names_the_readme_gives_are_public():
    """A ``turnrl.<module>.<name>`` the README tells users to call is in that
    module's ``__all__`` (what ``from turnrl.<module> import *`` and the
    documentation tools take as its public API), as its siblings are."""
    import importlib
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    missing = []
    for module_name, name in sorted(
        set(re.findall(r"\bturnrl\.([a-z_]+)\.([A-Za-z_][A-Za-z0-9_]*)", readme))
    ):
        module = importlib.import_module(f"turnrl.{module_name}")
        if hasattr(module, "__path__") and importlib.util.find_spec(f"{module.__name__}.{name}"):
            continue  # a module of a subpackage (turnrl.envs.users), not a name
        if name not in getattr(module, "__all__", ()):
            missing.append(f"turnrl.{module_name}.{name}")
    assert not missing, missing
