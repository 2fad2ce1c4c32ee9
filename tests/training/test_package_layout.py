"""Our driver extends the `megatron` namespace without shadowing the pip megatron-core."""

import os
import sysconfig

import megatron.core
import megatron.training

from tests.distributed.launcher import ROOT


def test_megatron_core_comes_from_site_packages():
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    assert os.path.realpath(megatron.core.__file__).startswith(site)
    assert not os.path.realpath(megatron.core.__file__).startswith(os.path.realpath(ROOT))


def test_megatron_training_comes_from_this_repo():
    assert os.path.realpath(megatron.training.__file__).startswith(os.path.realpath(ROOT))


def test_repo_has_no_megatron_init():
    assert not os.path.exists(os.path.join(ROOT, "megatron", "__init__.py")), \
        "megatron/__init__.py would shadow the pip megatron-core"


def test_megatron_core_is_the_pinned_version():
    from megatron.core.package_info import __version__

    from megatron.training.cpu_backend import PINNED_MEGATRON_CORE

    assert __version__ == PINNED_MEGATRON_CORE
    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert f"megatron-core=={PINNED_MEGATRON_CORE}" in setup
