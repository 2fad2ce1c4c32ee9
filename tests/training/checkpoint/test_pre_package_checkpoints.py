"""Checkpoints written before the checkpoint code became one package
(data/pre_package/, made by commit 79a4618's code: see make.py there) still
load: a resume from each format continues exactly where the run that wrote
it went on."""

import json
import os
import shutil

import pytest

from tests.training.pretrain_runner import run_pretrain_sequence

DATA = os.path.join(os.path.dirname(__file__), "data", "pre_package")
FORMATS = ("torch", "torch_dist")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """{format: (recorded losses of iterations 3-4, the resumed run's (iteration, loss))}."""
    work = tmp_path_factory.mktemp("pre_package")
    argvs, recorded = [], {}
    for fmt in FORMATS:
        root = shutil.copytree(os.path.join(DATA, fmt), os.path.join(work, fmt))
        with open(os.path.join(root, "losses.json")) as f:
            saved = json.load(f)
        recorded[fmt] = saved["losses_after_resume"]
        argvs.append(saved["argv"] + ["--load", root])
    runs = run_pretrain_sequence(argvs)
    return {fmt: (recorded[fmt], [(it, loss) for it, loss, _ in run]) for fmt, run in zip(FORMATS, runs)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_pre_package_checkpoint_resumes(resumed, fmt):
    recorded, run = resumed[fmt]
    assert [it for it, _ in run] == [3, 4]  # it started from the saved iteration 2
    # Weights, Adam moments, LR schedule and data position restored: the losses of the writer's own
    # continuation (relative 1e-5: bitwise on the machine that wrote them; a CPU with other vector
    # instructions may round a matmul differently).
    assert [loss for _, loss in run] == pytest.approx(recorded, rel=1e-5)
