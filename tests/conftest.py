import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepomni.config import load_preset
from deepomni.model.model import DeepOmniModel

EXE = Path(sys.executable).parent / "deepomni"


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return DeepOmniModel(tiny_cfg).init_weights(seed=0).eval()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A 24-item built-in corpus, synthesized and prepared once (``deepomni data synth`` + ``prepare``)."""
    d = tmp_path_factory.mktemp("train_corpus")
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    subprocess.run([str(EXE), "data", "synth", "--out", str(d), "--train", "24", "--validation", "4",
                    "--test", "4"], check=True, env=env, capture_output=True)
    subprocess.run([str(EXE), "data", "prepare", "--out", str(d)], check=True, env=env, capture_output=True)
    return d


@pytest.fixture(scope="module")
def ray_local():
    """Embedded Ray for the module (``deepomni.ray_env.init_ray``), shut down after it."""
    import ray

    from deepomni.ray_env import init_ray

    init_ray()
    yield
    ray.shutdown()
