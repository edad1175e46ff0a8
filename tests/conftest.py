"""Fixtures shared by the whole suite. The tiny configurations live in tests/support/configs.py,
the helpers by concern in tests/support/ (paths, msda_inputs, models, launch, detectors)."""
import pytest
import torch

from tests.support.detectors import train_tiny_detector
from tests.support.paths import coco128_dir


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """(checkpoint path, {"images": folder, "annotations": json}) of the briefly trained tiny detector."""
    return train_tiny_detector(str(tmp_path_factory.mktemp("tiny_detector")))


@pytest.fixture
def coco128():
    """The real COCO128 subset beside the repository (the test is skipped when it is absent)."""
    return coco128_dir()


@pytest.fixture
def one_thread():
    """Many tiny ops: one torch thread is faster than two and immune to a busy machine's oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
