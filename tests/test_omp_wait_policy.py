"""The memctl command sets OMP_WAIT_POLICY=PASSIVE before torch is imported, unless the
user set it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Records OMP_WAIT_POLICY at the moment torch is first imported, then runs `memctl models`
# (which imports torch) as `python -m memctl` does.
PROBE = """
import os, runpy, sys

class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "seen" not in globals():
            globals()["seen"] = os.environ.get("OMP_WAIT_POLICY", "<unset>")
            print("policy when torch was imported:", seen, file=sys.stderr)
        return None

sys.meta_path.insert(0, Probe())
sys.argv = ["memctl", "models"]
runpy.run_module("memctl", run_name="__main__")
"""


@pytest.mark.parametrize("user", [None, "ACTIVE"], ids=["unset", "user_set"])
def test_memctl_sets_passive_wait_policy_before_torch(user):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = "1"
    if user is not None:
        env["OMP_WAIT_POLICY"] = user
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    expected = user or "PASSIVE"
    assert f"policy when torch was imported: {expected}\n" in done.stderr
