"""Preference (DPO) data and loss on speech (deepomni/train/preference.py)."""

import json
import math

import numpy as np
import pytest
import torch

from deepomni.checkpoint import load_model, save_model
from deepomni.data.tokenized import row_tensors
from deepomni.model.channels import IGNORE
from deepomni.model.generate import Generation
from deepomni.model.model import DeepOmniModel
from deepomni.text import load_tokenizer
from deepomni.train import evaluate as ev
from deepomni.train import preference as pf
from deepomni.train.loop import collate, speech_inputs
from deepomni.data.tokenized import read_rows
from tests.helpers.train import write_tiny_corpus

TOK = load_tokenizer("bytes")
TRAIN_STEPS = 80


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_cfg):
    """The tiny tokenized corpus (train split) with a built-in codec recorded as ``deepomni data prepare`` does."""
    from deepomni.codec.builtin import fit_builtin_codec

    root = write_tiny_corpus(tmp_path_factory.mktemp("corpus"), tiny_cfg, "train")
    wav = (0.1 * np.random.default_rng(0).standard_normal(16000 * 3)).astype(np.float32)
    fit_builtin_codec([wav], num_channels=tiny_cfg.num_codec_channels, codebook_size=tiny_cfg.codebook_size,
                      seed=0, kmeans_iters=2, progress=False).save(root / "codec")
    (root / "prepare_summary.json").write_text(json.dumps({"codec": f"builtin:{root / 'codec'}"}))
    return root


def speech_rows(corpus):
    return pf.speech_out_rows(read_rows(corpus, "train"), 64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_cfg, corpus):
    """A tiny model whose text channel is overfitted on the speech-out rows (their text-only view, as the
    text item decodes): its greedy text is the reference answer, while its codec channels stay untrained,
    so sampled speech differs from seed to seed and build_pairs has distinct samples to judge."""
    rows = speech_rows(corpus)
    torch.manual_seed(0)
    model = DeepOmniModel(tiny_cfg).init_weights(0).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = collate(rows, model.layout, text_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster than contended ones
    try:
        for _ in range(TRAIN_STEPS):
            loss = model(batch["tokens"], audio=speech_inputs(model, batch), labels_BLC=batch["labels"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return save_model(model.eval(), tmp_path_factory.mktemp("ckpt"))


class StubJudge:
    """Hears what ``heard`` says for a waveform (looked up by its bytes), else ``default``."""

    def __init__(self, heard: dict | None = None, default: str = "c a t"):
        self.heard, self.default, self.calls = heard or {}, default, 0

    def transcribe(self, wav, sample_rate):
        assert wav.ndim == 1 and len(wav) > 0 and sample_rate == 16000
        self.calls += 1
        return self.heard.get(np.asarray(wav).tobytes(), self.default)


# --------------------------------------------------------------------------------------------- loss
def test_sequence_logps_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)]
    labels = torch.full((2, 3, 3), IGNORE)
    labels[0, 0, 0], labels[0, 2, 0], labels[1, 1, 0] = 4, 1, 0  # text channel
    labels[0, 1, 1], labels[1, 0, 1], labels[1, 2, 1] = 3, 2, 2  # codec 0; codec 1 has no label
    got = pf.sequence_logps(logits, labels)
    assert got.shape == (2, 3)
    want = torch.zeros(2, 3)
    for b in range(2):
        for c in range(3):
            for t in range(3):
                y = int(labels[b, t, c])
                if y != IGNORE:
                    z = logits[c][b, t]
                    want[b, c] += z[y] - torch.log(torch.exp(z).sum())
    torch.testing.assert_close(got, want)
    assert torch.equal(got[:, 2], torch.zeros(2))


def test_dpo_loss_per_channel():
    B, K = 3, 4
    g = torch.Generator().manual_seed(1)
    ref_c, ref_r = -torch.rand(B, K, generator=g) * 50, -torch.rand(B, K, generator=g) * 50
    # policy == reference: every channel contributes log 2, margins 0
    loss, stats = pf.dpo_loss(ref_c.clone(), ref_r.clone(), ref_c, ref_r)
    assert loss.item() == pytest.approx(K * math.log(2), rel=1e-6)
    assert stats["dpo_loss"] == pytest.approx(K * math.log(2), rel=1e-6)
    assert stats["reward_margin"] == 0 and stats["reward_accuracy"] == 0
    # the more the policy prefers the chosen answer (relative to the reference), the lower the loss
    losses = [pf.dpo_loss(ref_c + d, ref_r - d, ref_c, ref_r)[0].item() for d in (-2.0, 0.0, 1.0, 5.0)]
    assert all(a > b for a, b in zip(losses, losses[1:]))
    loss5, st5 = pf.dpo_loss(ref_c + 5, ref_r - 5, ref_c, ref_r)
    assert st5["reward_margin"] == pytest.approx(0.1 * 10) and st5["reward_accuracy"] == 1.0
    assert loss5.item() == pytest.approx(K * -math.log(1 / (1 + math.exp(-1.0))), rel=1e-5)
    # per channel, summed: one channel preferring the rejected answer counts on its own
    pc = ref_c.clone()
    pc[:, 2] -= 10
    loss_mixed, st = pf.dpo_loss(pc, ref_r.clone(), ref_c, ref_r)
    assert loss_mixed.item() == pytest.approx((K - 1) * math.log(2) + -math.log(1 / (1 + math.exp(1.0))), rel=1e-5)
    assert st["reward_accuracy"] == 0.0 and st["reward_margin"] == pytest.approx(-1.0 / K)
    # gradient: raise the chosen log-prob, lower the rejected one; the reference is a constant
    policy_c, policy_r = ref_c.clone().requires_grad_(), ref_r.clone().requires_grad_()
    pf.dpo_loss(policy_c, policy_r, ref_c, ref_r)[0].backward()
    assert (policy_c.grad < 0).all() and (policy_r.grad > 0).all()
    torch.testing.assert_close(policy_c.grad, torch.full((B, K), -0.1 * 0.5 / B))


# -------------------------------------------------------------------------------------------- pairs
def test_reference_answer_rebuilds_the_stored_row(corpus, tiny_cfg):
    """pair_row mirrors the data pipeline: the reference answer (its text ids, its codes read back from the
    labels) rebuilt gives the row's stored tokens and labels exactly, for spoken and typed questions."""
    layout = DeepOmniModel(tiny_cfg).layout
    rows = [r for r in read_rows(corpus, "train") if r["task"] in ("tts", "spoken_qa")]
    assert sorted(r["input_modality"] for r in rows) == ["speech", "text", "text"]
    for row in rows:
        ref = Generation(text_ids=TOK.encode(row["answer_text"]), frames=list(ev.reference_codes(row).T))
        shifted = (ev.reference_codes(row) + 1) % tiny_cfg.codebook_size
        other = Generation(text_ids=TOK.encode(row["answer_text"]), frames=list(shifted.T)[:3])
        pair = pf.pair_row(row, layout, TOK, ref, other, chosen_wer=0.0)
        assert pair["tokens"] == row["tokens"] and pair["labels"] == row["labels"], row["id"]
        assert pair["length"] == row["length"] and pair["answer_frames"] == row["answer_frames"]
        assert pair["rejected_answer_frames"] == 3
        assert pair["rejected_length"] * layout.num_channels == len(pair["rejected_tokens"]) == len(pair["rejected_labels"])
        assert pair["chosen_wer"] == 0.0 and pair["mel"] == row["mel"] and pair["id"] == row["id"]
        chosen, rejected = pf.split_pair(pair)
        assert chosen["tokens"] == row["tokens"] and not any(k.startswith("rejected_") for k in chosen)
        assert rejected["length"] == pair["rejected_length"] and rejected["answer_frames"] == 3
        _, labels_LC, _ = row_tensors(rejected)
        assert int((labels_LC[:, 1:] != IGNORE).sum()) == tiny_cfg.num_codec_channels * (3 + 1)  # codes + EOS


def test_build_pairs(tmp_path, corpus, checkpoint, tiny_cfg):
    """Two items x 3 samples. The judge hears the "c a t" item's samples (those with speech) as "c a t",
    "c a", "dog" (WER 0, 1/3, 1): a pair; and every "Read this." sample alike: no gap, no pair."""
    cfg = pf.PreferenceConfig(samples=3, margin=4)
    model, _ = load_model(checkpoint)
    codec = ev.data_codec(corpus)
    heard, with_speech = {}, []
    for i, row in enumerate(speech_rows(corpus)):  # the same seeded samples build_pairs draws
        gens = [g for g in pf.sample_answers(model, TOK, row, cfg, i) if g.frames]
        with_speech.append(len(gens))
        words = ["c a t", "c a", "dog"] if row["answer_text"] == "c a t" else ["read this"] * 3
        heard.update({codec.decode(g.codes_KF).tobytes(): w for g, w in zip(gens, words)})
    assert with_speech[0] >= 2 and with_speech[1] >= 2, with_speech  # the test's premise (seeded: [3, 2])
    judge = StubJudge(heard, default="never heard")
    summary = pf.build_pairs(checkpoint, corpus, tmp_path / "pref", cfg, judge=judge, progress=False)
    assert summary["items"] == 2 and summary["samples"] == 6
    # every sample with speech counts (the overfitted model's text is the reference answer), and only those
    assert summary["matched"] == sum(with_speech) == judge.calls
    assert (summary["pairs"], summary["skipped_no_match"], summary["skipped_no_gap"]) == (1, 0, 1)
    rejected_wer = 1.0 if with_speech[0] == 3 else 1 / 3
    assert summary["mean_chosen_wer"] == 0.0 and summary["mean_rejected_wer"] == pytest.approx(rejected_wer)
    assert summary["config"]["samples"] == 3 and summary["wall_seconds"] > 0
    assert json.loads((tmp_path / "pref" / "summary.json").read_text()) == summary
    assert sorted(p.name for p in (tmp_path / "pref").iterdir()) == ["pairs.parquet", "summary.json"]

    pairs = pf.read_pairs(tmp_path / "pref")
    assert len(pairs) == 1
    pair = pairs[0]
    assert pair["task"] == "spoken_qa" and pair["input_modality"] == "speech" and pair["answer_text"] == "c a t"
    assert pair["chosen_wer"] <= pair["rejected_wer"] - cfg.min_gap
    assert pair["chosen_heard"] == "c a t" and pair["rejected_heard"] == ("dog" if with_speech[0] == 3 else "c a")
    assert pair["tokens"] != pair["rejected_tokens"]  # two different spoken answers
    # the stored reference log-probs are the model's, recomputed on the read-back rows
    chosen, rejected = pf.split_pair(pair)
    assert len(pair["ref_chosen_logps"]) == tiny_cfg.num_codec_channels
    with torch.no_grad():
        for r, stored in ((chosen, pair["ref_chosen_logps"]), (rejected, pair["ref_rejected_logps"])):
            tokens_LC, labels_LC, mel_MT = row_tensors(r)
            out = model(tokens_LC.unsqueeze(0), audio=ev.speech_input(model, r, mel_MT))
            logps = pf.sequence_logps(out.logits, labels_LC.unsqueeze(0))[0, 1:]
            torch.testing.assert_close(logps, torch.tensor(stored), rtol=1e-5, atol=1e-4)
            assert (logps < 0).all()

    # no pair possible: a clear error, and nothing written
    with pytest.raises(ValueError, match=r"no preference pair.*'items': 2, .*'pairs': 0"):
        pf.build_pairs(checkpoint, corpus, tmp_path / "none", pf.PreferenceConfig(samples=2, min_gap=2.0, margin=4),
                       judge=StubJudge(), progress=False)
    assert not (tmp_path / "none" / "pairs.parquet").exists()


def test_split_pair_collates_chosen_then_rejected(corpus, tiny_cfg):
    """chosen_rows + rejected_rows collate into 2B rows, chosen first; at policy == reference the
    preference loss is K log 2 + the text cross-entropy, and it trains."""
    model = DeepOmniModel(tiny_cfg).init_weights(0).eval()
    layout, K = model.layout, tiny_cfg.num_codec_channels
    pairs = []
    for row in speech_rows(corpus):
        codes = ev.reference_codes(row)
        ref = Generation(text_ids=TOK.encode(row["answer_text"]), frames=list(codes.T))
        worse = Generation(text_ids=TOK.encode(row["answer_text"]), frames=list(((codes + 7) % 200).T)[:4])
        pair = pf.pair_row(row, layout, TOK, ref, worse)
        chosen, rejected = pf.split_pair(pair)
        pair["ref_chosen_logps"], pair["ref_rejected_logps"] = (pf.reference_logps(model, chosen),
                                                                pf.reference_logps(model, rejected))
        pairs.append(pair)
    B = len(pairs)
    split = [pf.split_pair(p) for p in pairs]
    batch = collate([c for c, _ in split] + [r for _, r in split], layout)
    assert batch["tokens"].shape[0] == 2 * B
    for b, p in enumerate(pairs):
        L = p["length"]
        assert batch["tokens"][b, :L].reshape(-1).tolist() == p["tokens"]
        assert batch["tokens"][B + b, : p["rejected_length"]].reshape(-1).tolist() == p["rejected_tokens"]
    assert batch["speech_rows"] == [0, B]  # the spoken question on both copies of the spoken_qa item

    ref_c, ref_r = pf.reference_tensors(pairs)
    assert ref_c.shape == (B, K)
    out = model(batch["tokens"], audio=speech_inputs(model, batch))
    loss, stats = pf.preference_loss(out.logits, batch["labels"], ref_c, ref_r)
    assert stats["dpo_loss"] == pytest.approx(K * math.log(2), abs=1e-3)  # padding changes no log-prob
    assert abs(stats["reward_margin"]) < 1e-3
    text_lab = batch["labels"][:B, :, 0]
    text = torch.nn.functional.cross_entropy(out.logits[0][:B].reshape(-1, out.logits[0].shape[-1]),
                                             text_lab.reshape(-1), ignore_index=IGNORE)
    assert stats["text_loss"] == pytest.approx(text.item(), rel=1e-5)
    assert loss.item() == pytest.approx(stats["dpo_loss"] + stats["text_loss"], rel=1e-5)
    loss.backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
