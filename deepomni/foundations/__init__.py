"""Pretrained foundations: the speech encoder and base LLM a run starts from, built here and shipped.

A real DeepTalk run downloads a pretrained Whisper and a pretrained DeepSeek-V2(-Lite). Nothing can be
downloaded here, so ``deepomni foundations build`` (:mod:`.build`) makes small stand-ins from the built-in
corpus, the way those were made (hours of speech in hundreds of voices for the encoder; the world plus
reading, copying and spelling for the LLM), and the project ships one set of them under
``deepomni/foundations/<name>/`` (:mod:`.files`: layout, sha256 manifest). ``deepomni pipeline`` (``make
demo``) starts from the shipped set; a user points at their own exactly as with Whisper and DeepSeek
(``--speech-encoder`` / ``speech_encoder.path``, ``--init``, ``deepomni pipeline --foundations DIR``).
"""

from .files import DEFAULT, base_dir, encoder_dir, locate, manifest, verify

__all__ = ["DEFAULT", "base_dir", "encoder_dir", "locate", "manifest", "verify"]
