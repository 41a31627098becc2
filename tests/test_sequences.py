"""Sequence building: chat template, channel packing with the delay pattern, loss masks per task."""

import pytest
import torch

from deepomni.data.sequences import INSTRUCTIONS, build_sequence
from deepomni.model.channels import IGNORE, CodecSpecial, TextSpecial, VocabLayout
from tests.helpers.codes import undo_delay
from deepomni.text import ByteTokenizer, load_tokenizer

LAY = VocabLayout(text_vocab_size=512, codebook_size=16, num_codec_channels=3)
TOK = ByteTokenizer()


def _seq(task, codes=None, **kw):
    return build_sequence(LAY, task, TOK.encode("ok"), TOK.encode(INSTRUCTIONS[task]), answer_codes_KF=codes, **kw)


def test_asr_learns_text_only_and_prompt_is_masked():
    s = _seq("asr", audio_positions=5)
    L = s.tokens_LC.shape[0]
    assert s.tokens_LC.shape == s.labels_LC.shape == (L, 4)
    assert (s.tokens_LC[:, 0] == LAY.text(TextSpecial.AUDIO)).sum() == 5 and s.audio_positions == 5
    assert (s.labels_LC[: s.prompt_length - 1] == IGNORE).all()  # prompt never a target
    assert (s.labels_LC[:, 1:] == IGNORE).all()  # no codec target for asr
    assert s.labels_LC[s.prompt_length - 1:, 0].tolist() == TOK.encode("ok") + [LAY.text(TextSpecial.EOT)]


def test_labels_are_next_tokens():
    codes = torch.randint(0, 16, (3, 6))
    s = _seq("spoken_qa", codes, question_ids=TOK.encode("hi?"))
    m = s.labels_LC[:-1] != IGNORE
    assert m.any()
    assert torch.equal(s.labels_LC[:-1][m], s.tokens_LC[1:][m])


def test_speech_answer_follows_the_delay_pattern_of_decoding():
    K, Fr = 3, 6
    codes = torch.randint(0, 16, (K, Fr))
    s = _seq("spoken_qa", codes, audio_positions=4)
    P = s.prompt_length
    # response step r sits at position P + r of the full sequence, i.e. labels row P - 1 + r
    resp_labels = s.labels_LC[P - 1:]
    for i in range(K):
        steps = (resp_labels[:, 1 + i] != IGNORE).nonzero().flatten().tolist()
        assert steps == list(range(i + 1, i + 2 + Fr))  # generate.py: channel i starts at step i + 1
        assert resp_labels[steps[-1], 1 + i] == LAY.codec(CodecSpecial.EOS)
    full_codec = torch.cat([s.tokens_LC[P:, 1:], s.labels_LC[-1:, 1:]]).T  # response rows, all channels
    torch.testing.assert_close(undo_delay(full_codec[:, : Fr + K + 1]), codes)
    # the text channel pads (ignored) after EOT while the speech goes on
    text_labels = resp_labels[:, 0]
    n_text = len(TOK.encode("ok")) + 1
    assert (text_labels[n_text:] == IGNORE).all()
    assert (s.tokens_LC[P + n_text:, 0] == LAY.text(TextSpecial.PAD)).all()


def test_tts_and_errors():
    codes = torch.randint(0, 16, (3, 2))
    s = _seq("tts", codes, question_ids=TOK.encode("ok"))
    assert (s.labels_LC[:, 1:] != IGNORE).sum() == 3 * (2 + 1)  # codes + EOS on every channel
    with pytest.raises(ValueError, match="needs the answer's codec codes"):
        _seq("tts", None, question_ids=[1])
    with pytest.raises(ValueError, match="lie in"):
        _seq("tts", codes + 16, question_ids=[1])
    with pytest.raises(ValueError, match="K=3"):
        _seq("tts", codes[:2], question_ids=[1])
    with pytest.raises(ValueError, match="unknown task"):
        build_sequence(LAY, "vqa", [1], [1], question_ids=[1])
    with pytest.raises(ValueError, match="either text_ids or audio_positions"):
        _seq("asr")


def test_tokenizers(tmp_path):
    assert TOK.decode(TOK.encode("héllo")) == "héllo"
    with pytest.raises(ValueError, match="text vocabulary"):
        load_tokenizer("bytes", text_vocab_size=100)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(f"hf:{tmp_path}/none")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer("sentencepiece")
    # a local transformers tokenizer directory, made here
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(["what is two plus two", "four", "say apple twice"] * 5,
                          trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=t).save_pretrained(tmp_path / "tok")
    hf = load_tokenizer(f"hf:{tmp_path}/tok", text_vocab_size=512)
    assert hf.decode(hf.encode("two plus two")).replace(" ", "") == "twoplustwo"
