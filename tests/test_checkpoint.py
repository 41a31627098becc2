import pytest
import torch

from deepomni.checkpoint import load_model, save_model
from deepomni.model.modality import ExpertAssignment


def test_roundtrip_with_assignment(tmp_path, tiny_model):
    a = ExpertAssignment(tiny_model.cfg.n_routed_experts, {l: [0, 1, 2, 3, 4] for l in range(1, 4)})
    save_model(tiny_model, tmp_path / "ck", a)
    model, b = load_model(tmp_path / "ck")
    assert b == a
    tok = torch.randint(0, 50, (1, 6, tiny_model.layout.num_channels))
    torch.testing.assert_close(model(tok).logits[0], tiny_model(tok).logits[0])


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(tmp_path)
