"""Suite-wide setup that must run before any test module imports triton."""

from __future__ import annotations

import os
import shutil

# Triton decides at import/decoration time whether to interpret kernels on the
# CPU. Without a GPU driver, run them in the interpreter; a GPU machine keeps
# compiled kernels unless the caller sets TRITON_INTERPRET itself.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from chat_server import chat_server  # noqa: F401  (the fixture, for every test module)
