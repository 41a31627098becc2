"""Modality load profiling and expert assignment (deepomni/train/profile.py, jobs/profile_load.py)."""

import json
from pathlib import Path

import pytest
import torch

from deepomni.checkpoint import load_model
from deepomni.data.tokenized import row_tensors
from deepomni.model.channels import VocabLayout
from deepomni.model.modality import ExpertAssignment, moe_layers
from deepomni.model.model import DeepOmniModel
from deepomni.model.moe import Routing
from deepomni.data.tokenized import read_rows
from deepomni.train.profile import (SPEECH, TEXT, LoadTable, assign, modality_positions, num_speech_experts,
                                    profile_load, random_assignment)
from tests.helpers.train import write_tiny_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_cfg):
    root = tmp_path_factory.mktemp("corpus")
    write_tiny_corpus(root, tiny_cfg, "train")
    return write_tiny_corpus(root, tiny_cfg, "test")


# ------------------------------------------------------------------------------------------ counting
def test_rho_on_hand_made_routing():
    t = LoadTable([1, 2], num_experts=4, top_k=2)
    experts = {1: torch.tensor([[0, 1], [0, 2], [3, 1]]), 2: torch.tensor([[2, 3], [2, 3], [2, 3]])}

    def counts(mask_T):
        return torch.stack([torch.bincount(experts[l][mask_T].reshape(-1), minlength=4) for l in (1, 2)])

    t.add(SPEECH, counts(torch.tensor([True, True, False])), tokens=2, sequences=1)  # third token not counted
    t.add(TEXT, counts(torch.tensor([False, False, True])), tokens=1, sequences=1)
    assert t.tokens == {SPEECH: 2, TEXT: 1} and t.sequences == {SPEECH: 1, TEXT: 1}
    # speech, layer 1: experts 0,1,0,2 over k*tokens = 4 choices
    torch.testing.assert_close(t.rho(SPEECH), torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(t.rho(TEXT), torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64))
    again = LoadTable.from_json(json.loads(json.dumps(t.to_json())))
    assert torch.equal(again.counts[SPEECH], t.counts[SPEECH]) and again.tokens == t.tokens


def test_positions_speech_and_text(corpus, tiny_cfg):
    layout = VocabLayout.from_config(tiny_cfg)
    for row in read_rows(corpus, "test"):
        tokens, _, _ = row_tensors(row)
        modality, mask = modality_positions(row, tokens, layout)
        if row["task"] == "text_qa":
            assert modality == TEXT and mask.all()
            continue
        assert modality == SPEECH
        expected = row["audio_positions"]  # AUDIO placeholders
        if row["answer_frames"]:
            # delayed codes + EOS cover response steps 1 .. F+K; the inputs drop the sequence's last position,
            # which is step F+K when the speech outlasts the text (answer bytes + EOT)
            F, K = row["answer_frames"], tiny_cfg.num_codec_channels
            expected += F + K - (F + K + 1 >= len(row["answer_text"].encode()) + 1)
        assert int(mask.sum()) == expected, row["id"]


def test_profile_counts_forced_routing(corpus, tiny_cfg):
    """Force every token of layer l onto experts l..l+3 (a hook replacing the router's output): rho is 1/k
    there and 0 elsewhere, for both modalities, over exactly the counted positions."""
    model = DeepOmniModel(tiny_cfg).init_weights(0).eval()
    k = tiny_cfg.num_experts_per_tok
    for l, moe in moe_layers(model).items():
        forced = torch.arange(l, l + k)

        def hook(_mod, _inp, r, forced=forced):
            T = r.experts_TK.shape[0]
            return Routing(torch.full((T, k), 1.0 / k), forced.expand(T, k).clone(), r.scores_TE)

        moe.gate.register_forward_hook(hook)
    rows = read_rows(corpus, "test")
    table = profile_load(model, rows)
    layout = VocabLayout.from_config(tiny_cfg)
    expected = {SPEECH: 0, TEXT: 0}
    for row in rows:
        m, mask = modality_positions(row, row_tensors(row)[0], layout)
        expected[m] += int(mask.sum())
    assert table.tokens == expected
    for m in (SPEECH, TEXT):
        rho = table.rho(m)
        for i, l in enumerate(table.layer_ids):
            want = torch.zeros(tiny_cfg.n_routed_experts, dtype=torch.float64)
            want[l : l + k] = 1.0 / k
            torch.testing.assert_close(rho[i], want)


# ---------------------------------------------------------------------------------------- assignment
def test_assignment_rule_on_hand_made_load():
    t = LoadTable([1], num_experts=4, top_k=1)
    # rho_A = [.4, .3, .2, .1], rho_T = [.7, .0, .1, .2] -> score = [.12, .30, .18, .08]
    t.counts[SPEECH] = torch.tensor([[4, 3, 2, 1]])
    t.counts[TEXT] = torch.tensor([[7, 0, 1, 2]])
    t.tokens = {SPEECH: 10, TEXT: 10}
    assert assign(t, 1).speech == {1: [1]}
    a = assign(t, 2)
    assert a.speech == {1: [1, 2]} and a.text(1) == [0, 3]


def test_n_speech_spec():
    assert num_speech_experts("20%", 64) == 13 and num_speech_experts("20", 64) == 20
    assert num_speech_experts("1%", 16) == 1 and num_speech_experts(3, 16) == 3
    for bad in ("0", "16", "100%"):
        with pytest.raises(ValueError):
            num_speech_experts(bad, 16)


def test_random_assignment_is_seeded_and_sized():
    a, b = random_assignment([1, 2, 3], 16, 5, seed=7), random_assignment([1, 2, 3], 16, 5, seed=7)
    assert a == b and random_assignment([1, 2, 3], 16, 5, seed=8) != a
    assert sorted(a.speech) == [1, 2, 3]
    for l, ids in a.speech.items():
        assert len(ids) == len(set(ids)) == 5 and all(0 <= e < 16 for e in ids) and len(a.text(l)) == 11
    a.validate([1, 2, 3])


# ------------------------------------------------------------------------------------------- the job
@pytest.mark.parametrize("extra", [[], ["--random", "--seed", "3"]])
def test_job_end_to_end(tmp_path, corpus, checkpoint, tiny_cfg, extra):
    from deepomni.cli import main

    out = tmp_path / "prof"
    assert main(["profile", "--checkpoint", str(checkpoint), "--data", str(corpus), "--out", str(out), "--n-speech", "25%",
                 "--split", "test", *extra]) == 0
    a = ExpertAssignment.load(out / "experts.json")
    model, _ = load_model(checkpoint)
    a.validate(sorted(moe_layers(model)))
    assert all(len(v) == 4 for v in a.speech.values())
    load = json.loads((out / "load.json").read_text())
    assert load["method"] == ("random" if extra else "load") and load["n_speech"] == 4
    assert load["load"]["tokens"][SPEECH] > 0 and load["load"]["tokens"][TEXT] > 0
    for v in load["load"]["layers"].values():
        assert sum(v["rho_speech"]) == pytest.approx(1.0) and sum(v["rho_text"]) == pytest.approx(1.0)
    lines = (out / "load.csv").read_text().splitlines()
    assert len(lines) == 1 + len(a.speech) * tiny_cfg.n_routed_experts
    png = (out / "load.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    if not extra:  # the rule applied to the written table gives the written assignment
        assert assign(LoadTable.from_json(load["load"]), 4) == a
    # the checkpoint loads with the assignment placed beside it
    (Path(checkpoint) / "experts.json").write_bytes((out / "experts.json").read_bytes())
    try:
        assert load_model(checkpoint)[1] == a
    finally:
        (Path(checkpoint) / "experts.json").unlink()
