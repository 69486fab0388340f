"""A busy machine gets passive OpenMP threads, set before torch starts; an idle one and an explicit setting do not."""

import os
import subprocess
import sys

import pytest

CODE = """
import os, sys
os.getloadavg = lambda: ({load}, 0.0, 0.0)
{pre}
from ar2mdm.shared.cpus import passive_threads_when_busy
print(passive_threads_when_busy("x"), os.environ.get("OMP_WAIT_POLICY"))
"""


@pytest.mark.parametrize(
    "load, pre, env, expected",
    [
        (3.0, "", {}, "True PASSIVE"),  # busy: passive threads
        (0.2, "", {}, "False None"),  # idle: OpenMP's default
        (3.0, "", {"OMP_WAIT_POLICY": "ACTIVE"}, "False ACTIVE"),  # the user's setting wins
        (3.0, "import torch", {}, "False None"),  # too late once torch is imported: nothing pretends otherwise
    ],
)
def test_passive_threads_only_when_the_load_shows_other_work(load, pre, env, expected):
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", CODE.format(load=load, pre=pre)],
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == expected
