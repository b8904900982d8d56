"""Running a test module's Triton tests on the CPU under ``TRITON_INTERPRET=1``.

The interpreter must be switched on before triton is imported, and other test modules import it
normally, so such a module re-runs itself in a subprocess with the variable set: in the parent it
holds one test that calls :func:`rerun_interpreted`; in the child (``INTERPRETED``) the kernel tests.
"""

from __future__ import annotations

import os
import subprocess
import sys

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def rerun_interpreted(path: str, timeout: int) -> None:
    """Run the test module at ``path`` under the interpreter; fail with the tail of its output if it fails."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
