"""Run the vLLM plugin's CPU tests against another vLLM's Python sources, e.g. vLLM 0.24 (the GPU kit's version).

vLLM 0.28 selects its CPU platform with ``VLLM_TARGET_DEVICE=cpu`` (tests/conftest.py sets it);
0.24 has no such switch, so this runner installs the CPU platform before pytest imports anything.
The sources need no install (and no CUDA libraries): only the Python files of the wheel.

    pip download --no-deps vllm==0.24.0 -d /tmp/w
    mkdir /tmp/vllm024 && unzip -q /tmp/w/vllm-0.24.0-*.whl -x '*.so' -d /tmp/vllm024
    PYTHONPATH=/tmp/vllm024 .venv/bin/python scripts/vllm_cpu_tests.py -k "not fresh_vllm_process"

(``fresh_vllm_process`` starts a new interpreter, where the platform cannot be installed first.)
Arguments are passed to pytest after the vLLM plugin tests, which always run (narrow them with ``-k``).
"""

from __future__ import annotations

import sys

from vllm import platforms
from vllm.platforms.cpu import CpuPlatform

platforms.current_platform = CpuPlatform()

import pytest  # noqa: E402
import vllm  # noqa: E402

TESTS = ["tests/test_vllm_config.py", "tests/test_vllm_layers.py", "tests/test_vllm_scripts.py", "tests/test_shard.py"]

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] in ("-h", "--help"):
        print("usage: [PYTHONPATH=VLLM_SOURCES] python scripts/vllm_cpu_tests.py [PYTEST_ARGS ...]\n\n" + __doc__)
        sys.exit(0)
    print(f"vLLM {vllm.__version__} from {vllm.__file__}", flush=True)
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *TESTS, *args]))
