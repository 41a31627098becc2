import pytest
import torch

from deepomni.config import load_preset
from deepomni.model.model import DeepOmniModel


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return DeepOmniModel(tiny_cfg).init_weights(seed=0).eval()
