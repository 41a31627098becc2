"""An ASR judge of generated speech: pocketsphinx transcribes audio, jiwer scores it against text.

What it is for: the paper's *TTS consistency*, the WER of an ASR system on the speech a model generated
against the text it generated with it. An ASR system errs by itself, more so on codec-decoded speech, so a
judged WER means something only next to the judge's *floor*: its WER on reference audio (espeak-ng reading
the same texts in the assistant voice) after a round trip through the speech codec (encode -> decode). A
model whose speech scores near the floor speaks as clearly as the codec lets it.

The model is pocketsphinx 5's US-English model as its wheel ships it (a PTM acoustic model, CMUdict, a
general-English trigram LM): nothing is downloaded. Two modes:

* ``Judge()``, the default: the plain wheel model, a judge untouched by our corpus. It is weak on
  espeak-ng's formant voice and cannot know the corpus' invented names ("Tobi Droostman", "Munby").
* ``Judge(vocabulary_texts=texts)``: a domain judge. Its dictionary holds only the words of ``texts``
  (CMUdict pronunciations; words CMUdict lacks, the invented names, get espeak-ng's phonemes mapped to
  ARPABET) and its LM is a trigram of ``texts`` built by the wheel's own ``pocketsphinx.lm.ArpaBoLM``.
  Pass the whole corpus (questions and answers of every split), not just the texts being judged. Its
  bias: it hears only domain words, so it turns unclear speech into corpus words more readily than a
  general judge; compare its WERs with its own floor, never with another judge's.

Measured (40 held-out corpus answers: 24 sentences + 16 short answers, 87 s of espeak-ng ``en-us`` at
160 wpm; built-in codec 4 x 256 fitted on 60 train answers)::

                      clean   codec round trip (= floor)   CPU per second of audio
    Judge()           0.70    0.85                          ~0.5 s
    domain judge      0.06    0.07                          ~0.1 s

So the domain judge is the usable one on this corpus; the plain model confuses even common words in
espeak-ng's voice ("very" -> "really") and writes names as strings of English words.

Normalisation before scoring (:func:`normalize`): lower case, punctuation -> space (an apostrophe inside
a word stays: "don't"), spaces collapsed. :func:`spoken_form` also writes numbers as words, as a listener
(and CMUdict) would. Letters need nothing more: CMUdict's name of the letter C (said "see") is ``c``, so
the corpus' spelled answers ("c a t", read by espeak-ng as "C, A, T.") already are their spoken form; the
domain judge writes them so, the plain one hears words ("the ferry the").
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jiwer
import numpy as np

from ..audio import load_audio

if TYPE_CHECKING:
    from pocketsphinx import Decoder

SAMPLE_RATE = 16_000  # the rate of pocketsphinx's en-us acoustic model
# Input conditioning, measured on espeak-ng speech (domain judge, 40 utterances): espeak-ng's pauses are
# digital silence, whose log energies are far below anything the acoustic model was trained on (real
# recordings always have a noise floor): WER 0.37 as is, 0.06 with a Gaussian floor 54 dB below a
# normalised peak (0.14 at 74 dB below, 0.08 at 34 dB). Peak normalisation makes that floor, and so the
# judge, independent of the input's level.
PEAK = 0.5
NOISE = 1e-3  # noise floor std, 54 dB below PEAK; seeded, so a transcript is a function of the audio
PAD_S = 0.25  # noise-floor-only lead-in and tail: the silence model needs some frames to match
SILENCE_PEAK = 1e-3  # quieter input (below -60 dBFS) is silence: "" without decoding

_WORD = re.compile(r"[^\w']+|_")  # anything that is not a letter, digit or apostrophe separates words
_EDGE_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")


# ------------------------------------------------------------------------------------- scoring


def normalize(text: str) -> str:
    """Lower case, punctuation -> spaces (apostrophes inside words kept), spaces collapsed."""
    text = _EDGE_APOSTROPHE.sub(" ", _WORD.sub(" ", text.lower()))
    return " ".join(text.split())


def spoken_form(text: str) -> str:
    """What a listener writes down for ``text``: :func:`normalize` with numbers 0..999 as words
    ("12" -> "twelve"). Letters stay letters ("c a t"): that is how CMUdict names them."""
    from ..data.lexicon import number_to_words

    def say(m: re.Match[str]) -> str:
        n = int(m.group())
        return f" {number_to_words(n)} " if n < 1000 else m.group()

    return normalize(re.sub(r"\d+", say, text))


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER (jiwer: total edits / total reference words) after :func:`normalize` of both sides."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize(r) for r in references]
    empty = [i for i, r in enumerate(refs) if not r]
    if not refs or empty:
        raise ValueError("WER needs non-empty references: "
                         + (f"references {empty[:5]} have no words after normalisation" if refs
                            else "none were given"))
    return float(jiwer.wer(refs, [normalize(h) for h in hypotheses]))


# -------------------------------------------------------------------------------- pronunciations

# espeak-ng IPA (en-us) -> ARPABET, the phone set of pocketsphinx's model. Only needed for words CMUdict
# lacks (the corpus' invented names); stress marks are dropped, as CMUdict's stressless phones have none.
_IPA_ARPABET = {
    "i": "IY", "iː": "IY", "ɪ": "IH", "ᵻ": "IH", "e": "EY", "eɪ": "EY", "ɛ": "EH", "æ": "AE", "a": "AE",
    "ɑ": "AA", "ɑː": "AA", "ɒ": "AA", "ɔ": "AO", "ɔː": "AO", "o": "OW", "oː": "OW", "oʊ": "OW", "ʊ": "UH",
    "u": "UW", "uː": "UW", "ʌ": "AH", "ə": "AH", "ɐ": "AH", "ɜ": "ER", "ɜː": "ER", "ɚ": "ER", "aɪ": "AY",
    "aʊ": "AW", "ɔɪ": "OY", "aɪɚ": "AY ER", "aʊɚ": "AW ER", "əl": "AH L", "n̩": "AH N", "ʊə": "UH R",
    "p": "P", "b": "B", "t": "T", "d": "D", "k": "K", "ɡ": "G", "g": "G", "f": "F", "v": "V", "θ": "TH",
    "ð": "DH", "s": "S", "z": "Z", "ʃ": "SH", "ʒ": "ZH", "h": "HH", "m": "M", "n": "N", "ŋ": "NG",
    "l": "L", "ɹ": "R", "r": "R", "w": "W", "j": "Y", "tʃ": "CH", "dʒ": "JH", "x": "K",
    "ɾ": "T", "ʔ": "T",  # flap and glottal stop: CMUdict writes both as T (butter, button)
    "ɑːɹ": "AA R", "ɔːɹ": "AO R", "oːɹ": "AO R", "ɔɹ": "AO R", "ɪɹ": "IH R", "ɛɹ": "EH R", "ʊɹ": "UH R",
}
_LONGEST_IPA = max(map(len, _IPA_ARPABET))


def _ipa_to_arpabet(ipa_phones: Iterable[str]) -> str | None:
    """espeak-ng's IPA phones -> ARPABET, each phone split greedily into the longest known pieces (espeak-ng
    writes some diphthongs, e.g. "iə" in "Hiri", as one phone); None if a piece is unknown."""
    out = []
    for ph in ipa_phones:
        ph = ph.replace("ˈ", "").replace("ˌ", "")
        i = 0
        while i < len(ph):
            n = next((n for n in range(min(_LONGEST_IPA, len(ph) - i), 0, -1) if ph[i:i + n] in _IPA_ARPABET), 0)
            if n == 0:
                return None
            out.append(_IPA_ARPABET[ph[i:i + n]])
            i += n
    return " ".join(out) or None


def espeak_pronunciations(words: Sequence[str], voice: str = "en-us") -> dict[str, str]:
    """ARPABET pronunciations of ``words`` from espeak-ng's phonemes (one espeak-ng call for all); the
    words whose phonemes do not map are left out."""
    from ..data.espeak import espeak_binary

    if not words:
        return {}
    # one word per sentence, so espeak-ng prints one line of phonemes per word
    text = "".join(f"{w}.\n" for w in words)
    res = subprocess.run([espeak_binary(), "-q", "--ipa", "--sep=_", "-v", voice], input=text.encode(),
                         capture_output=True, check=True)
    lines = [ln.strip() for ln in res.stdout.decode().splitlines() if ln.strip()]
    if len(lines) != len(words):  # espeak-ng merged or split a word: do them one by one
        lines = [subprocess.run([espeak_binary(), "-q", "--ipa", "--sep=_", "-v", voice], input=f"{w}.".encode(),
                                capture_output=True, check=True).stdout.decode().strip() for w in words]
    out = {}
    for w, line in zip(words, lines):
        phones = _ipa_to_arpabet(re.split(r"[_ ]+", line))
        if phones:
            out[w] = phones
    return out


def _read_cmudict(path: str, wanted: set[str]) -> dict[str, list[str]]:
    """CMUdict lines for ``wanted`` words, alternates included (``word(2) ...``)."""
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if head.split("(", 1)[0] in wanted:
                out.setdefault(head.split("(", 1)[0], []).append(line.rstrip("\n"))
    return out


# ---------------------------------------------------------------------------------------- judge


class Judge:
    """Speech -> text with pocketsphinx (see the module docstring for the two modes).

    ``vocabulary_texts``: None for the plain wheel model; else the texts the domain LM and dictionary are
    built from. ``decoder_options``: extra pocketsphinx Config parameters (e.g. ``lw=10.0``).

    The decoder is built on first use and reused. Not thread-safe: one decoder decodes one utterance at
    a time, so give each thread (or Ray actor) its own Judge.
    """

    def __init__(self, vocabulary_texts: Iterable[str] | None = None, **decoder_options: object):
        self.domain_texts: list[str] | None = None
        if vocabulary_texts is not None:
            self.domain_texts = [t for t in (spoken_form(t) for t in vocabulary_texts) if t]
            if not self.domain_texts:
                raise ValueError("vocabulary_texts hold no words")
        self.decoder_options = decoder_options
        self.unpronounceable: list[str] = []  # domain words with no pronunciation: never recognised
        self._decoder: Decoder | None = None

    @property
    def vocabulary(self) -> list[str] | None:
        return None if self.domain_texts is None else sorted({w for t in self.domain_texts for w in t.split()})

    def decoder(self) -> Decoder:
        """The pocketsphinx Decoder, built on first call."""
        if self._decoder is None:
            from pocketsphinx import Decoder

            # FATAL: otherwise pocketsphinx writes its whole configuration and per-utterance statistics
            # to stderr (loglevel is a Config parameter in pocketsphinx 5)
            options: dict[str, object] = {"samprate": SAMPLE_RATE, "loglevel": "FATAL", **self.decoder_options}
            if self.domain_texts is None:
                self._decoder = Decoder(**options)
            else:
                with tempfile.TemporaryDirectory(prefix="deepomni-judge-") as tmp:
                    lm, dic = self._write_domain_model(Path(tmp))
                    self._decoder = Decoder(lm=str(lm), dict=str(dic), **options)  # both read at init
        return self._decoder

    def _write_domain_model(self, directory: Path) -> tuple[Path, Path]:
        from pocketsphinx import get_model_path
        from pocketsphinx.lm import ArpaBoLM

        assert self.domain_texts is not None
        vocab = set(self.vocabulary or ())
        entries = _read_cmudict(get_model_path("en-us/cmudict-en-us.dict"), vocab)
        missing = sorted(vocab - entries.keys())
        espeak = espeak_pronunciations(missing)
        entries.update({w: [f"{w} {p}"] for w, p in espeak.items()})
        self.unpronounceable = sorted(set(missing) - espeak.keys())
        keep = vocab - set(self.unpronounceable)
        # an LM word without a pronunciation is an error for pocketsphinx: drop those words from the texts
        texts = [" ".join(w for w in t.split() if w in keep) for t in self.domain_texts]
        if not any(texts):
            raise ValueError(f"no word of vocabulary_texts has a pronunciation: {self.unpronounceable[:10]}")
        lm = ArpaBoLM(text="\n".join(t for t in texts if t) + "\n", add_start=True)
        lm.compute()
        lm_path, dict_path = directory / "domain.arpa", directory / "domain.dict"
        with open(lm_path, "w") as f:
            lm.write(f)
        dict_path.write_text("".join(line + "\n" for w in sorted(keep) for line in entries[w]))
        return lm_path, dict_path

    # ---------------------------------------------------------------------------------- transcribe
    def transcribe(self, wav: np.ndarray, sample_rate: int) -> str:
        """Audio (float, or integer PCM, at any rate; several channels are averaged) -> the hypothesis,
        lower case, "" for silence. Empty or non-finite audio raises :class:`deepomni.audio.AudioError`."""
        pcm = _prepare(load_audio(np.asarray(wav), SAMPLE_RATE, sample_rate=sample_rate))
        return "" if pcm is None else self._decode(pcm)

    def transcribe_many(self, wavs: Iterable[np.ndarray], sample_rate: int) -> list[str]:
        return [self.transcribe(w, sample_rate) for w in wavs]

    def score(self, references: Sequence[str], wavs: Sequence[np.ndarray], sample_rate: int) -> float:
        """WER of the transcripts of ``wavs`` against the :func:`spoken_form` of ``references``."""
        return wer([spoken_form(r) for r in references], self.transcribe_many(wavs, sample_rate))

    def _decode(self, pcm: bytes) -> str:
        d = self.decoder()
        d.start_utt()
        d.process_raw(pcm, no_search=False, full_utt=True)  # whole utterance: batch CMN over all of it
        d.end_utt()
        hyp = d.hyp()
        # hypstr holds no fillers (<sil>, [noise]) but may hold CMUdict spellings such as "c.": normalize
        return normalize(hyp.hypstr) if hyp is not None else ""


def _prepare(x: np.ndarray) -> bytes | None:
    """float32 16 kHz -> int16 bytes: peak-normalised, padded, with the noise floor; None for silence."""
    peak = float(np.max(np.abs(x)))
    if peak < SILENCE_PEAK:
        return None
    pad = np.zeros(int(PAD_S * SAMPLE_RATE), dtype=np.float32)
    x = np.concatenate([pad, x * (PEAK / peak), pad])
    x += NOISE * np.random.default_rng(0).standard_normal(len(x)).astype(np.float32)
    return (np.clip(x, -1.0, 32767 / 32768) * 32768.0).astype(np.int16).tobytes()
