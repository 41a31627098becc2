"""Fixtures shared by several test files (plain helpers: tests/helpers/)."""

import os
import subprocess
import sys
import time
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
def checkpoint(tmp_path_factory, tiny_cfg):
    """The tiny preset's random weights (seed 0) saved for the module (``save_model``): its directory."""
    from deepomni.checkpoint import save_model

    return save_model(DeepOmniModel(tiny_cfg).init_weights(0), tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def ray_local():
    """Embedded Ray for the module (``deepomni.ray_env.init_ray``), shut down after it."""
    import ray

    from deepomni.ray_env import init_ray

    init_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    """The official ``openai`` client on the module's ``server`` (a base URL)."""
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def cluster():
    """3 Ray nodes (head, n1, n2) on this machine for the module (``cluster/local.sh start --nodes 3``), as a
    :class:`tests.helpers.cluster.Client`; stopped after it, leaving no namespace and no state directory."""
    from benchmarks.harness import free_port
    from tests.helpers.cluster import CAN, Client, local_cluster
    from tests.helpers.net import clean_env

    if not CAN:
        pytest.fail("CI must run the multi-node tests: it runs as root with iproute2 and curl (.ci/run)")
    ports = local_cluster.Ports(gcs=free_port(), dashboard=free_port(), metrics=free_port(), client=free_port(),
                                agent=free_port(), serve=free_port())
    env = clean_env(DEEPOMNI_GCS_PORT=str(ports.gcs), DEEPOMNI_DASHBOARD_PORT=str(ports.dashboard),
                    DEEPOMNI_METRICS_PORT=str(ports.metrics), DEEPOMNI_CLIENT_PORT=str(ports.client),
                    DEEPOMNI_AGENT_PORT=str(ports.agent), DEEPOMNI_SERVE_PORT=str(ports.serve))
    c = Client(env, ports)
    t0 = time.monotonic()
    started = c.local("start", "--nodes", "3")
    print(f"\n[multinode] 3 nodes started in {time.monotonic() - t0:.1f} s")
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield c
    finally:
        state = c.state()
        stopped = c.local("stop")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"deepomni{ports.gcs}-" not in names  # every namespace gone, with every process in it
    if state is not None:
        assert not state.dir.exists()
