"""Held-out evaluation (deepomni/train/evaluate.py, jobs/evaluate.py)."""

import json

import numpy as np
import pytest
import torch

from deepomni.data.tokenized import row_tensors
from deepomni.model.channels import TextSpecial
from deepomni.model.generate import Generation
from deepomni.model.model import DeepOmniModel
from deepomni.text import load_tokenizer
from deepomni.train import evaluate as ev
from deepomni.data.tokenized import read_rows
from tests.helpers.train import ANSWER_FRAMES, write_tiny_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_cfg):
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"), tiny_cfg, "test")


# ------------------------------------------------------------------------------------------- metrics
def test_exact_match_and_word_edits():
    assert ev.exact_match("Twelve.", "twelve") and not ev.exact_match("twelve two", "twelve")
    assert ev.exact_match("  Mira Kolb lives in Tarnwick. ", "mira kolb lives in tarnwick")
    assert ev.word_edits("the cat sat", "the cat sat") == (0, 3)
    assert ev.word_edits("the cat sat", "the bat sat") == (1, 3)  # substitution
    assert ev.word_edits("the cat sat", "the sat") == (1, 3)  # deletion
    assert ev.word_edits("the cat sat", "the cat sat down") == (1, 3)  # insertion
    assert ev.word_edits("a b", "") == (2, 2)
    assert ev.word_edits("The Cat.", "the cat") == (0, 2)  # normalised first
    with pytest.raises(ValueError, match="no words"):
        ev.word_edits("", "x y")


def test_relative_drop():
    assert ev.relative_drop(0.5, 1.0) == -1.0
    assert ev.relative_drop(0.8, 0.6) == pytest.approx(0.25)
    assert ev.relative_drop(0.0, 0.5) is None and ev.relative_drop(None, 0.5) is None


# -------------------------------------------------------------------------------------------- prompts
def test_prompt_is_the_training_prompt(corpus, tiny_cfg):
    model = DeepOmniModel(tiny_cfg).init_weights(0).eval()
    tok = load_tokenizer("bytes")
    assistant = model.layout.text(TextSpecial.ASSISTANT)
    for row in read_rows(corpus, "test"):
        tokens, _, _ = row_tensors(row)
        end = int((tokens[:, 0] == assistant).nonzero()[0]) + 1
        prompt, audio = ev.build_prompt(model, tok, row)
        assert torch.equal(prompt, tokens[:end]), row["id"]
        assert (audio is None) == (row["input_modality"] == "text")
        if audio is not None:
            assert audio[0].shape == (row["audio_positions"], tiny_cfg.hidden_size)


def test_top_k_one_decodes_speech_greedily(corpus, tiny_cfg):
    """EvalConfig.top_k reaches the codec sampler: top_k=1 (the release's greedy decoding) gives the same
    speech under every sampling seed, top_k=20 does not."""
    model = DeepOmniModel(tiny_cfg).init_weights(0).eval()
    tok = load_tokenizer("bytes")
    row = next(r for r in read_rows(corpus, "test") if r["task"] == "tts")

    def codes(top_k: int, seed: int) -> torch.Tensor:
        return ev.answer_item(model, tok, row, True, ev.EvalConfig(top_k=top_k, seed=seed)).codes_KF

    assert codes(1, 0).numel() > 0 and torch.equal(codes(1, 0), codes(1, 1))
    assert not torch.equal(codes(20, 0), codes(20, 1))


# -------------------------------------------------------------------------------------------- the job
def test_job_on_random_checkpoint(tmp_path, corpus, checkpoint, tiny_cfg):
    from deepomni.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--base", str(checkpoint), "--data", str(corpus),
                 "--out", str(out), "--split", "test", "--margin", "2"]) == 0
    result = json.loads((out / "eval.json").read_text())
    m = result["metrics"]
    assert set(ev.METRICS) | {"items", "base_text_qa_accuracy", "text_drop"} <= set(m)
    # spoken_qa: only the speech-input row; no codec recorded with this corpus, so no speech is judged
    assert m["items"] == {"text_qa_accuracy": 2, "spoken_qa_accuracy": 1, "spoken_qa_typed_accuracy": 1,
                          "asr_wer": 1, "tts_consistency_wer": 0, "judge_floor_wer": 0, "codec_accuracy": 2,
                          "text_qa_token_accuracy": 2}
    # the checkpoint is its own base: no drop (None when the base scores 0, the relative drop is undefined)
    assert m["text_token_drop"] == (None if m["base_text_qa_token_accuracy"] == 0 else 0.0)
    for k in ev.METRICS:
        if k in ("tts_consistency_wer", "judge_floor_wer"):
            assert m[k] is None
        else:
            assert m[k] is not None and (m[k] >= 0 if k in ev.LOWER_IS_BETTER else 0 <= m[k] <= 1), k
    # teacher-forced codec labels: K channels x (frames + EOS) per speech-out item
    assert m["codec_tokens"] == 2 * tiny_cfg.num_codec_channels * (ANSWER_FRAMES + 1)
    md = (out / "eval.md").read_text()
    for k in (*ev.METRICS, "text_drop"):
        assert f"| {k}" in md
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 5
    for r in items:  # decoding is bounded by the reference answer's length (text only here)
        bound = ev.step_bound({"answer_text": r["reference"], "answer_frames": 0}, load_tokenizer("bytes"),
                              tiny_cfg.num_codec_channels, False, 2)
        assert r["steps"] <= bound + 1


def _oracle(correct_ids: set[str] | None = None):
    """A stand-in for the model's answers: the reference text (for ids in ``correct_ids``, else "wrong"),
    with as many codec frames as the reference speech; typed questions are answered right."""
    tok = load_tokenizer("bytes")

    def answer(model, tok_, row, speech, cfg, typed=False):
        right = typed or correct_ids is None or row["id"] in correct_ids
        text = row["answer_text"] if right else "wrong"
        frames = [torch.zeros(model.layout.num_codec_channels, dtype=torch.long)] * int(row["answer_frames"] or 1) if speech else []
        return Generation(text_ids=tok.encode(text), frames=frames, steps=len(text) + 1)

    return answer


def test_correct_answers_score_one_and_drop_vs_base(monkeypatch, corpus, tiny_cfg):
    model = DeepOmniModel(tiny_cfg).init_weights(0).eval()
    rows = read_rows(corpus, "test")
    monkeypatch.setattr(ev, "answer_item", _oracle())
    metrics, records = ev.evaluate(model, rows)
    assert metrics["text_qa_accuracy"] == 1.0 and metrics["spoken_qa_accuracy"] == 1.0
    assert metrics["spoken_qa_typed_accuracy"] == 1.0 and metrics["asr_wer"] == 0.0
    # a base that answers one of the two text_qa items: 0.5 -> drop (0.5 - 1) / 0.5 = -1
    text_ids = [r["id"] for r in rows if r["task"] == "text_qa"]
    monkeypatch.setattr(ev, "answer_item", _oracle({text_ids[0]}))
    base, _ = ev.evaluate(model, rows, ev.EvalConfig(tasks=("text_qa",)))
    assert base["text_qa_accuracy"] == 0.5
    both = ev.compare(metrics, base)
    assert both["base_text_qa_accuracy"] == 0.5 and both["text_drop"] == -1.0
    # and the other way round: the model at 0.5 against a perfect base drops by half
    assert ev.compare(base, metrics)["text_drop"] == 0.5


def test_speech_answers_are_decoded_and_judged(monkeypatch, corpus, tiny_cfg):
    """TTS consistency: the judge hears the codec-decoded generated speech and is scored against the
    generated text; its floor: the reference codes decoded and heard, against the reference text."""
    model = DeepOmniModel(tiny_cfg).init_weights(0).eval()
    rows = read_rows(corpus, "test")
    decoded = []

    class Codec:
        sample_rate = 16000

        def decode(self, codes_KF):
            decoded.append(codes_KF.clone())
            return np.zeros(160 * codes_KF.shape[1], dtype=np.float32)

    class Judge:  # hears "c a t" whatever it is played
        def transcribe(self, wav, sample_rate):
            return "c a t"

    monkeypatch.setattr(ev, "answer_item", _oracle())
    metrics, records = ev.evaluate(model, rows, ev.EvalConfig(), Codec(), Judge())
    spoken = [r for r in records if "heard" in r]
    assert sorted(r["task"] for r in spoken) == ["spoken_qa", "tts"]  # the speech-out rows
    assert len(decoded) == 4  # generated + reference audio of each
    refs = {r["reference"] for r in spoken}  # "c a t" (spoken_qa) and "Read this." (tts)
    assert metrics["tts_consistency_wer"] == pytest.approx(ev.wer(sorted(refs), ["c a t", "c a t"]))
    assert metrics["judge_floor_wer"] == metrics["tts_consistency_wer"]  # oracle text == reference text
    # the reference codes read back from the labels are the ones the corpus was built with
    row = next(r for r in rows if r["task"] == "tts")
    assert ev.reference_codes(row).shape == (tiny_cfg.num_codec_channels, ANSWER_FRAMES)


def test_teacher_forced_token_accuracy(corpus, tiny_cfg):
    """A stand-in model whose text logits put their maximum on the label (or one off) scores 1 (or 0)."""
    from types import SimpleNamespace

    from deepomni.data.tokenized import row_tensors

    row = next(r for r in read_rows(corpus, "test") if r["task"] == "text_qa")
    _, labels_LC, _ = row_tensors(row)
    lay = DeepOmniModel(tiny_cfg).layout

    class Stub:
        embed = SimpleNamespace(weight=torch.zeros(1))

        def __init__(self, shift):
            self.shift = shift

        def __call__(self, tokens, audio=None):
            L = tokens.shape[1]
            logits = []
            for c in range(lay.num_channels):
                lg = torch.zeros(1, L, lay.channel_size(c))
                lab = labels_LC[:, c].clamp(min=0)
                lg[0, torch.arange(L), (lab + self.shift) % lay.channel_size(c)] = 1.0
                logits.append(lg)
            return SimpleNamespace(logits=logits)

    n_text = int((labels_LC[:, 0] != -100).sum())
    assert ev.teacher_forced_hits(Stub(0), row)["text"] == (n_text, n_text)
    assert ev.teacher_forced_hits(Stub(1), row)["text"] == (0, n_text)
