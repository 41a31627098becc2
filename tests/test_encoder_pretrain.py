"""Speech encoder pretraining (CTC on the espeak corpus): the loss falls, the output directory is a local
Whisper encoder that ``build_whisper_encoder`` loads unchanged, the config round-trips, decoding/metrics."""

import dataclasses
import json
import shutil

import pytest
import torch

from deepomni.config import SpeechEncoderConfig
from deepomni.model.speech import build_whisper_encoder, encode_frames, speech_encoder_config
from deepomni.train.encoder import (VOCAB, CTCEncoder, EncoderPretrainConfig, ctc_greedy_decode, encode_text,
                                    error_rates, evaluate, load_utterances, train_ctc)

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

# a tiny encoder that still learns something in a few seconds on 2 cores
TINY = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, max_source_positions=400,
            steps=40, batch_size=4, lr=3e-3, warmup_steps=5, time_masks=0, freq_masks=0, threads=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from deepomni.data.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("enc-corpus")
    synthesize(SynthConfig(sizes={"train": 12, "validation": 0, "test": 4}), out, progress=False)
    return out


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """The CLI's run: (config, output dir, summary)."""
    out = tmp_path_factory.mktemp("enc-out")
    args = ["--data", str(corpus), "--out", str(out), "--quiet"]
    for k, v in TINY.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    from deepomni.cli import main

    assert main(["train-encoder", *args]) == 0
    summary = json.loads((out / "pretrain.json").read_text())
    return EncoderPretrainConfig(**TINY), out, summary


def test_ctc_loss_falls(corpus):
    cfg = EncoderPretrainConfig(**TINY)
    utts, _ = load_utterances(corpus, "train", cfg)
    assert len(utts) >= 8  # question and answer audio of 12 items
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        untrained, _ = train_ctc(dataclasses.replace(cfg, steps=0), utts, progress=False)
        trained, losses = train_ctc(cfg, utts, progress=False)
    finally:
        torch.set_num_threads(threads)
    before, after = evaluate(untrained, utts)["loss"], evaluate(trained, utts)["loss"]
    assert len(losses) == cfg.steps
    assert after < 0.8 * before, (before, after)  # same utterances, full window, no augmentation


def test_output_dir_is_a_loadable_whisper_encoder(corpus, run):
    cfg, out, summary = run
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "ctc_head.safetensors",
                                                "ctc_vocab.json", "pretrain.json"}
    enc = build_whisper_encoder(SpeechEncoderConfig(path=str(out)))
    assert not any(p.requires_grad for p in enc.parameters())
    # the run is deterministic from the seed: retraining gives the module whose outputs the directory holds
    utts, _ = load_utterances(corpus, "train", cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model, _ = train_ctc(cfg, utts, progress=False)
    finally:
        torch.set_num_threads(threads)
    mel_BMT = utts.mel(slice(0, 3))
    with torch.no_grad():
        torch.testing.assert_close(enc(mel_BMT).last_hidden_state, model.encoder(mel_BMT).last_hidden_state)
        # the cut training window runs the same modules: on the full window it is the stock forward
        torch.testing.assert_close(encode_frames(model.encoder, mel_BMT), model.encoder(mel_BMT).last_hidden_state)
    assert json.loads((out / "ctc_vocab.json").read_text())["tokens"] == list(VOCAB)
    saved = json.loads((out / "pretrain.json").read_text())
    assert saved["eval"]["utterances"] > 0 and 0 <= saved["eval"]["cer"] and saved["eval"]["wer"] >= 0
    assert saved["data"]["train_utterances"] == len(utts) and saved["data"]["longest_seconds"] <= 8
    assert summary["loss"]["last"] < summary["loss"]["first"]


def test_speech_encoder_config_round_trips(run):
    cfg, out, _ = run
    sc = speech_encoder_config(str(out), downsample=2)
    want = cfg.speech_encoder()
    assert sc.path == str(out) and sc.downsample == 2
    for f in ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
              "max_source_positions"):
        assert getattr(sc, f) == getattr(want, f), f
    assert build_whisper_encoder(sc).config.d_model == cfg.d_model


def test_text_decoding_and_error_rates():
    ids = encode_text("Kero's 2 cats!")
    assert "".join(VOCAB[i] for i in ids) == "kero's 2 cats"
    # frames: k k <blank> e <blank> e -> "kee" (repeats merge, a blank separates a doubled letter)
    k, e = VOCAB.index("k"), VOCAB.index("e")
    logits_BTV = torch.full((1, 6, len(VOCAB)), -5.0)
    for t, i in enumerate([k, k, 0, e, 0, e]):
        logits_BTV[0, t, i] = 5.0
    assert ctc_greedy_decode(logits_BTV, [6]) == ["kee"]
    assert ctc_greedy_decode(logits_BTV, [3]) == ["k"]
    r = error_rates(["a cat sat", "hello"], ["a cat sit", "hello"])
    assert r["wer"] == pytest.approx(1 / 4) and r["cer"] == pytest.approx(1 / 14)


def test_unknown_config_field_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        EncoderPretrainConfig.from_dict({"d_modle": 8})
    assert CTCEncoder(EncoderPretrainConfig(**TINY)).head.out_features == len(VOCAB)
