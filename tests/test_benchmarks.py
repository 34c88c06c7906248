"""The benchmark scripts that run without a GPU still run: a lent GPU's few minutes should not
be spent on a script broken by a renamed config key."""

import re
import subprocess
import sys

import pytest

from chest_mnist.synthetic import write_synthetic
from tests.conftest import ROOT


@pytest.mark.slow
def test_step_host_time_times_the_steps_and_the_epoch_ends_around_free_replays(tmp_path):
    npz = write_synthetic(tmp_path / "d.npz", n_train=128 * 61, n_val=2500, n_test=64, seed=0)
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/step_host_time.py",
            str(npz),
            "--steps",
            "61",
            "--epochs",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"per step .*: median ([\d.]+) ms .* over (\d+) steps", done.stdout)
    assert found, done.stdout[-2000:]
    assert int(found[2]) == 30  # in each of the 3 epochs, the gaps between steps 51 to 61
    assert 0 < float(found[1]) < 100  # a free replay: the host's milliseconds, not a real step's
    # between epochs: validation of 2,500 images in 3 batches of 1,024, its stand-in forward free
    found = re.search(r"between epochs .*: median ([\d.]+) s .* over (\d+) epoch ends", done.stdout)
    assert found, done.stdout[-2000:]
    assert int(found[2]) == 2
    assert 0 < float(found[1]) < 10
