"""Fixtures of the GPU-path tests that run on the CPU."""

import importlib.util
import sys

import pytest

from tests.launch import REPO


@pytest.fixture(scope="module")
def gpu_check():
    """tools/gpu_check.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
