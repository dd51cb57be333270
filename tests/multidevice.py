"""The 8-host-device harness of the multi-device test modules: import it before jax.

Importing this module asks XLA for 8 host CPU devices (XLA_FLAGS is read when jax starts). When another test module
already started jax with fewer devices (a whole-suite run), the module's tests cannot run in this process: `multi`
skips their in-process copies, saying so, and the module's `test_suite_in_subprocess` (made by
`suite_in_subprocess(__file__)`) runs the whole file again in a fresh process with 8 devices.

Run these files with `--capture=sys` (or `-s`) to see XLA's own last line if one aborts: pytest's default fd capture
swallows it.
"""

import os

FLAG = "--xla_force_host_platform_device_count=8"
# XLA:CPU runs a multi-device program with one thread per device; a collective (all-reduce / all-gather /
# all-to-all / reduce-scatter / collective-permute: the only users of these flags, per the symbols of jaxlib 0.10.2)
# makes those threads meet at a rendezvous, and one that has waited `..._terminate_timeout_seconds` (default 40)
# LOG(FATAL)s: "Termination timeout for `all to all RendezvousKey{...}` ... exceeded", then SIGABRT (exit 134,
# "Fatal Python error: Aborted"). Under pytest's default fd capture that line is lost with the process; only
# faulthandler's Python stack survives, and with async dispatch it shows where the main thread was (often a later
# eager op), not the program that died. With 8 devices on 2 loaded cores give the rendezvous minutes. The names are
# the XLA_FLAGS names (`..._warn_stuck_timeout_seconds` is the flag of the proto field `..._warn_stuck_seconds`;
# XLA aborts at start on an unknown flag).
PATIENCE = ("--xla_cpu_collective_call_terminate_timeout_seconds=1800 "
            "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600 --xla_cpu_collective_timeout_seconds=1800")
if FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {FLAG} {PATIENCE}").strip()

import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
import xla_env  # noqa: E402

IN_PROCESS = jax.device_count() >= 8
multi = pytest.mark.skipif(not IN_PROCESS, reason="jax started with < 8 devices in this process: "
                                                   "test_suite_in_subprocess runs this test with 8")


def suite_in_subprocess(test_file: str):
    """A test that runs `test_file` in a subprocess with 8 host devices; skipped when this process has them."""

    @pytest.mark.skipif(IN_PROCESS, reason="8 devices in this process: the tests ran in-process")
    def test_suite_in_subprocess():
        env = dict(os.environ, XLA_FLAGS=xla_env.flags(FLAG, PATIENCE), JAX_PLATFORMS="cpu")
        # --capture=sys: XLA's own stderr (a LOG(FATAL) line before an abort) reaches r.stderr instead of dying
        # in pytest's fd capture file.
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--capture=sys",
                            test_file],
                           env=env, capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(test_file))))
        # XLA's E / F log lines (e.g. "F1201 10:00:00.0 ... rendezvous.cc:...] Termination timeout ...") first: a
        # faulthandler stack after them can push them out of the tail.
        xla = [ln for ln in r.stderr.splitlines() if ln[:1] in "EF" and ln[1:5].isdigit()]
        assert r.returncode == 0, "\n".join(xla[-20:]) + "\n" + r.stdout[-6000:] + r.stderr[-3000:]

    return test_suite_in_subprocess
