"""The 8-host-device harness of the multi-device test modules: import it before jax.

Importing this module asks XLA for 8 host CPU devices (XLA_FLAGS is read when jax starts). When another test module
already started jax with fewer devices (a whole-suite run), the module's tests cannot run in this process: `multi`
skips their in-process copies, saying so, and the module's `test_suite_in_subprocess` (made by
`suite_in_subprocess(__file__)`) runs the whole file again in a fresh process with 8 devices.
"""

import os

FLAG = "--xla_force_host_platform_device_count=8"
# XLA:CPU runs a program over several host devices with one thread per device, which meet at rendezvous (collectives
# and multi-device launches); a thread that has not arrived after `..._terminate_timeout_seconds` aborts the process
# (SIGABRT, "Fatal Python error: Aborted"). With 8 devices on 2 loaded cores a thread can wait that long for a
# core: give them minutes, as a real multi-host run would.
PATIENCE = ("--xla_cpu_collective_call_terminate_timeout_seconds=1800 "
            "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600 --xla_cpu_collective_timeout_seconds=1800")
if FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {FLAG} {PATIENCE}").strip()

import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

IN_PROCESS = jax.device_count() >= 8
multi = pytest.mark.skipif(not IN_PROCESS, reason="jax started with < 8 devices in this process: "
                                                   "test_suite_in_subprocess runs this test with 8")


def suite_in_subprocess(test_file: str):
    """A test that runs `test_file` in a subprocess with 8 host devices; skipped when this process has them."""

    @pytest.mark.skipif(IN_PROCESS, reason="8 devices in this process: the tests ran in-process")
    def test_suite_in_subprocess():
        env = dict(os.environ, XLA_FLAGS=f"{FLAG} {PATIENCE}", JAX_PLATFORMS="cpu")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file],
                           env=env, capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(test_file))))
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]

    return test_suite_in_subprocess
