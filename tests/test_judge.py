"""The ASR judge (pocketsphinx + jiwer): it hears espeak-ng speech, not silence or noise; WER arithmetic."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soxr

from deepomni.train.judge import Judge, normalize, spoken_form, wer

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

SENTENCE = "I would like a cup of coffee please."  # common words: the plain model measured WER 0.0 on it
# measured 0.0; a bound of 2 errors in 8 words leaves room for another espeak-ng build, and silence or
# noise score 1.0
MAX_WER = 0.25


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge()


@pytest.fixture(scope="module")
def sentence_wav() -> np.ndarray:
    from deepomni.data.espeak import Voice, speak

    return speak(SENTENCE, Voice("en-us", 160, 50))


@needs_espeak
def test_recognises_espeak_sentence(judge, sentence_wav):
    assert wer([SENTENCE], [judge.transcribe(sentence_wav, 16000)]) <= MAX_WER
    # int16 PCM at 44.1 kHz goes through the same resampling and scaling
    pcm = np.round(soxr.resample(sentence_wav, 16000, 44100) * 32767).astype(np.int16)
    assert wer([SENTENCE], [judge.transcribe(pcm, 44100)]) <= MAX_WER


@needs_espeak
def test_silence_and_noise_are_not_the_sentence(judge, sentence_wav):
    assert judge.transcribe(np.zeros_like(sentence_wav), 16000) == ""
    noise = 0.1 * np.random.default_rng(0).standard_normal(len(sentence_wav)).astype(np.float32)
    assert wer([SENTENCE], [judge.transcribe(noise, 16000)]) >= 0.75


@needs_espeak
def test_domain_judge_knows_invented_names():
    from deepomni.data.espeak import Voice, speak

    texts = ["Tobi Droostman lives in Munby.", "Gavi Gamley is a baker.", "Where does Tobi Droostman live?"]
    judge = Judge(vocabulary_texts=texts)
    wav = speak("Tobi Droostman lives in Munby.", Voice("en-us", 160, 50))
    assert judge.transcribe(wav, 16000) == "tobi droostman lives in munby"  # names from espeak-ng phonemes
    assert judge.unpronounceable == []
    assert "munby" in judge.vocabulary


def test_wer_arithmetic_and_normalisation():
    assert wer(["the cat sat on mats"], ["the cat sat in mats"]) == pytest.approx(0.2)
    assert wer(["The cat, sat!"], ["the  cat sat"]) == 0.0  # case, punctuation, spaces
    assert wer(["a b", "c d e f"], ["a x", "c d e f"]) == pytest.approx(1 / 6)  # corpus WER, not a mean
    assert wer(["a b"], [""]) == 1.0
    assert normalize("Don't say 'no', Bob!") == "don't say no bob"
    assert spoken_form("C, A, T. 12 cats") == "c a t twelve cats"


@pytest.mark.parametrize("refs", [[], [""], ["a b", " . "]])
def test_wer_refuses_empty_references(refs):
    with pytest.raises(ValueError, match="non-empty references"):
        wer(refs, ["x"] * len(refs))


def test_wer_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
