"""Process-wide set-up (`undo_cli.runtime`): what the libraries may print on stderr."""

import subprocess
import sys

# Run in a fresh interpreter: the test process has configured logging already.
SNIPPET = """
import importlib.util, logging
from undo_cli.runtime import quiet_libraries
quiet_libraries()
if importlib.util.find_spec("bitsandbytes"):
    import bitsandbytes  # logs the offline-kernel warnings on CPUs with AVX512-BF16
logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: offline")
logging.getLogger("kernels._internals.hf_hub").warning(
    "Skipping publisher trust check for 'kernels-community/x'")
logging.getLogger("bitsandbytes.cextension").warning("another bitsandbytes warning")
"""


def test_the_offline_kernel_warnings_are_silenced_and_nothing_else():
    ran = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True,
                         timeout=120, check=True)
    assert "kernels-community" not in ran.stderr
    assert "another bitsandbytes warning" in ran.stderr  # the other loggers still speak
