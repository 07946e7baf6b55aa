"""Importing the engine does not import Triton.

A ``@triton.jit`` kernel is compiled or interpreted according to ``TRITON_INTERPRET`` as it is
*defined*, at import. The CPU tests switch the interpreter on in their conftest; a kernel module
imported earlier (by a test module of another directory collected first, through
``import tandem.engine``) is defined for the GPU and later fails under the interpreter with
"Cannot call @triton.jit'd outside of the scope of a kernel", depending on which files one
xdist worker ran before. Kernels load when first used; this keeps it so.
"""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODULES = ["tandem.engine", "tandem.engine.lora", "tandem.engine.quantization"]


def test_importing_the_engine_does_not_import_triton():
    code = ("import importlib, sys\n"
            f"for m in {MODULES!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.')))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing {MODULES} imported triton ({out.stdout.strip()[:120]}...)"
