"""Speech input: a frozen Whisper encoder and the projector into the backbone's hidden size.

Log-mel ``[B, mel, frames]`` (100 Hz) -> Whisper encoder (conv stride 2: one frame per 20 ms) ->
keep the frames the audio really covers -> backbone positions, by ``SpeechEncoderConfig.positions``:

- ``"frames"``: stack ``downsample`` neighbours -> 2-layer MLP (:class:`Projector`) -> one position per
  ``20 ms * downsample``;
- ``"ctc"``: the encoder's own CTC head (frozen, pretrained with it) cuts the frames into greedy CTC
  segments, one per character heard (:func:`ctc_segments`); each segment is the mean of its frames and of
  its character posteriors -> :class:`CharProjector` -> one position per character, at the rate of the
  text the backbone was trained to read.

The projected positions go, in order, to the positions whose text channel holds the AUDIO placeholder
(between BOA and EOA) — see :func:`audio_scatter`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SpeechEncoderConfig

MEL_FRAMES_PER_ENCODER_FRAME = 2  # Whisper's second conv has stride 2

# CTC output alphabet of the encoders ``deepomni foundations build`` pretrains (ctc_vocab.json): index 0 is
# the blank, then exactly the characters ``deepomni.data.content.transcript`` keeps
CTC_BLANK = "<blank>"
CTC_VOCAB: tuple[str, ...] = (CTC_BLANK, " ", "'", *"abcdefghijklmnopqrstuvwxyz", *"0123456789")
CTC_HEAD_FILE, CTC_VOCAB_FILE = "ctc_head.safetensors", "ctc_vocab.json"


def whisper_config(cfg: SpeechEncoderConfig):
    from transformers import WhisperConfig

    return WhisperConfig(
        num_mel_bins=cfg.num_mel_bins,
        d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers,
        encoder_attention_heads=cfg.encoder_attention_heads,
        encoder_ffn_dim=cfg.encoder_ffn_dim,
        max_source_positions=cfg.max_source_positions,
        decoder_layers=1,
        decoder_attention_heads=cfg.encoder_attention_heads,
        decoder_ffn_dim=cfg.encoder_ffn_dim,
    )


def encode_frames(encoder: nn.Module, mel_BMT: torch.Tensor, frames_B: list[int] | None = None) -> torch.Tensor:
    """transformers' ``WhisperEncoder.forward`` without its fixed-length check: the same modules on any
    even number of mel frames up to the window -> ``[B, frames / 2, d_model]``.

    ``frames_B``: the encoder frames each utterance covers, in a batch padded to the longest. Each is then
    encoded exactly as if it were alone at its own length: its mel beyond its frames reads as the convs'
    zero padding, the first conv's output there is zeroed for the second, and attention masks the padded
    keys (the padded query rows are computed and dropped)."""
    B, T = mel_BMT.shape[0], math.ceil(mel_BMT.shape[-1] / MEL_FRAMES_PER_ENCODER_FRAME)
    mask_B11T = None
    if frames_B is None:
        x_BET = F.gelu(encoder.conv2(F.gelu(encoder.conv1(mel_BMT))))
    else:
        frames_B1 = torch.tensor(frames_B, device=mel_BMT.device)[:, None]
        keep_B1M = (torch.arange(mel_BMT.shape[-1], device=mel_BMT.device) < frames_B1 * MEL_FRAMES_PER_ENCODER_FRAME)[:, None]
        x_BEM = F.gelu(encoder.conv1(mel_BMT * keep_B1M)) * keep_B1M
        x_BET = F.gelu(encoder.conv2(x_BEM))
        pad_BT = torch.arange(T, device=mel_BMT.device) >= frames_B1
        mask_B11T = torch.zeros(B, 1, 1, T, dtype=x_BET.dtype, device=x_BET.device).masked_fill(
            pad_BT[:, None, None, :], torch.finfo(x_BET.dtype).min)
    h_BTE = x_BET.transpose(1, 2) + encoder.embed_positions.weight[:T]
    h_BTE = F.dropout(h_BTE, p=encoder.dropout, training=encoder.training)
    for layer in encoder.layers:
        h_BTE = layer(h_BTE, mask_B11T)
    return encoder.layer_norm(h_BTE)


def length_buckets(frames_B: list[int], max_waste: float = 0.25) -> list[list[int]]:
    """Indices of utterances to encode together: longest first, an utterance joins the current batch while
    padding everyone to that batch's longest costs at most ``1 + max_waste`` times their own frames."""
    order = sorted(range(len(frames_B)), key=lambda i: -frames_B[i])
    buckets: list[list[int]] = []
    for i in order:
        b = buckets[-1] if buckets else None
        if b and (len(b) + 1) * frames_B[b[0]] <= (1 + max_waste) * (sum(frames_B[j] for j in b) + frames_B[i]):
            b.append(i)
        else:
            buckets.append([i])
    return buckets


def speech_encoder_config(path: str, downsample: int = 1, window: str = "full",
                          positions: str = "frames") -> SpeechEncoderConfig:
    """A local Whisper directory's encoder architecture as our config (``path`` set), so a model config
    carries the shape of the encoder it loads (``d_model`` sizes the projector, the window sizes LogMel)."""
    from pathlib import Path

    from transformers import WhisperConfig

    hf = WhisperConfig.from_pretrained(path)
    return SpeechEncoderConfig(path=str(Path(path)), num_mel_bins=hf.num_mel_bins, d_model=hf.d_model,
                               encoder_layers=hf.encoder_layers,
                               encoder_attention_heads=hf.encoder_attention_heads,
                               encoder_ffn_dim=hf.encoder_ffn_dim,
                               max_source_positions=hf.max_source_positions, downsample=downsample, window=window,
                               positions=positions)


def build_whisper_encoder(cfg: SpeechEncoderConfig) -> nn.Module:
    """transformers' WhisperEncoder: loaded from ``cfg.path`` (a local WhisperModel / Whisper encoder
    directory) or built from the config with random weights. Always frozen and in eval mode. With
    ``positions="ctc"`` it carries its CTC head as ``ctc_head`` (a Linear over :data:`CTC_VOCAB`, read from
    the directory's ctc_head.safetensors), so the head is part of the frozen encoder everywhere."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    enc = WhisperEncoder(WhisperConfig.from_pretrained(cfg.path) if cfg.path else whisper_config(cfg))
    if cfg.positions == "ctc":
        enc.ctc_head = nn.Linear(enc.config.d_model, len(CTC_VOCAB))
    if cfg.path and not enc.conv1.weight.is_meta:  # on the meta device the loader assigns them (deepomni.weights)
        enc.load_state_dict(encoder_weights(cfg), strict=True)
    enc.requires_grad_(False)
    return enc.eval()


def encoder_weights(cfg: SpeechEncoderConfig) -> dict[str, torch.Tensor]:
    """The tensors of the encoder directory ``cfg.path`` under the names of :func:`build_whisper_encoder`'s
    module: the Whisper encoder's, and its CTC head's as ``ctc_head.*`` with ``positions="ctc"``."""
    state = _encoder_state_dict(cfg.path)
    if cfg.positions == "ctc":
        state |= {f"ctc_head.{k}": v for k, v in ctc_head_state_dict(cfg.path).items()}
    return state


def ctc_head_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The CTC head of a directory ``deepomni foundations build`` (or ``train_encoder``) wrote, checked
    against :data:`CTC_VOCAB`."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    d = Path(path)
    if not (d / CTC_HEAD_FILE).is_file() or not (d / CTC_VOCAB_FILE).is_file():
        raise FileNotFoundError(f"speech_encoder.positions='ctc' needs the encoder's CTC head: {d} has no "
                                f"{CTC_HEAD_FILE} + {CTC_VOCAB_FILE} (a plain Whisper checkpoint has none: use "
                                f"positions='frames')")
    vocab = tuple(json.loads((d / CTC_VOCAB_FILE).read_text())["tokens"])
    if vocab != CTC_VOCAB:
        raise ValueError(f"{d / CTC_VOCAB_FILE}: CTC vocabulary {vocab[:5]}... is not {CTC_VOCAB[:5]}...")
    return {k: v.float() for k, v in load_file(str(d / CTC_HEAD_FILE)).items()}


def ctc_segments(scores_TV: torch.Tensor, blank: int = 0) -> list[tuple[int, int]]:
    """Greedy CTC segmentation of per-frame symbol scores (logits or posteriors): ``[start, end)`` frame
    runs whose best symbol is the same non-blank one, in order (one per character greedy CTC decoding would
    emit). Silence (no such run) gives one segment over every frame, so an utterance always fills at least
    one position."""
    best_T = scores_TV.argmax(-1)
    if best_T.numel() == 0:
        raise ValueError("no encoder frames to segment")
    change_T = torch.ones_like(best_T, dtype=torch.bool)
    change_T[1:] = best_T[1:] != best_T[:-1]
    starts = change_T.nonzero().flatten().tolist()
    ends = starts[1:] + [best_T.numel()]
    segs = [(s, e) for s, e in zip(starts, ends) if int(best_T[s]) != blank]
    return segs or [(0, best_T.numel())]


def pool_segments(x_TX: torch.Tensor, segments: list[tuple[int, int]]) -> torch.Tensor:
    """``[len(segments), X]``: the mean of ``x`` over each ``[start, end)`` run."""
    return torch.stack([x_TX[s:e].mean(0) for s, e in segments])


def _encoder_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Encoder tensors of a local Whisper checkpoint (``model.encoder.*`` of WhisperForConditionalGeneration,
    ``encoder.*`` of WhisperModel, or a bare encoder)."""
    from pathlib import Path

    from safetensors.torch import load_file

    files = sorted(Path(path).glob("model*.safetensors"))  # model.safetensors or its shards (HF layout)
    if not files:
        raise FileNotFoundError(f"no model*.safetensors files in Whisper directory {path!r}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            for prefix in ("model.encoder.", "encoder.", ""):
                if k.startswith(prefix) and not k.startswith(("decoder.", "model.decoder.", "proj_out")):
                    out[k[len(prefix) :]] = v
                    break
    return out


class Projector(nn.Module):
    def __init__(self, encoder_dim: int, hidden_size: int, downsample: int = 1):
        super().__init__()
        self.downsample = downsample
        self.linear1 = nn.Linear(encoder_dim * downsample, hidden_size)
        self.linear2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, frames_SE: torch.Tensor) -> torch.Tensor:
        S, E = frames_SE.shape
        pad = (-S) % self.downsample
        if pad:
            frames_SE = F.pad(frames_SE, (0, 0, 0, pad))
        x = frames_SE.reshape(-1, E * self.downsample)
        return self.linear2(F.gelu(self.linear1(x)))


class CharProjector(nn.Module):
    """Projector of ``positions="ctc"``: a CTC segment (mean frame ``[E]``, mean character posterior
    ``[V]``) -> ``posterior @ char_table + MLP(frame)``.

    ``char_table`` holds, per CTC symbol, the speech feature under which an AUDIO position embeds as the
    backbone embeds that character typed (:meth:`init_from_text`; the channel embedding mixes the feature
    with the AUDIO token's row, ``deepomni.model.channels``); the MLP, zero at that start, learns what
    letters alone do not carry. So alignment starts where a cascade ends, reading the encoder's soft
    transcript, and the encoder deployment needs no backbone weights to serve it."""

    def __init__(self, encoder_dim: int, hidden_size: int, vocab_size: int = len(CTC_VOCAB)):
        super().__init__()
        self.char_table = nn.Parameter(torch.zeros(vocab_size, hidden_size))
        self.linear1 = nn.Linear(encoder_dim, hidden_size)
        self.linear2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, frames_SE: torch.Tensor, posteriors_SV: torch.Tensor) -> torch.Tensor:
        chars_SV = posteriors_SV[:, 1:] / posteriors_SV[:, 1:].sum(-1, keepdim=True).clamp_min(1e-6)  # no blank
        return chars_SV.to(self.char_table.dtype) @ self.char_table[1:] + self.linear2(F.gelu(self.linear1(frames_SE)))

    @torch.no_grad()
    def init_from_text(self, char_rows_VD: torch.Tensor, audio_row_D: torch.Tensor, num_codec_channels: int) -> None:
        """Start from the backbone's text embedding: ``char_rows_VD[v]`` is its input row for CTC symbol
        ``v`` (the blank's is unused), ``audio_row_D`` the AUDIO placeholder's. An AUDIO position embeds as
        ``(e_AUDIO + K * feature) / (K + 1)``; the feature ``((K + 1) * e_char - e_AUDIO) / K`` makes that
        ``e_char``. The MLP's output layer is zeroed."""
        K = num_codec_channels
        if K < 1:
            raise ValueError("speech features enter through the codec channels: a model without them (K=0) "
                             "cannot read speech")
        self.char_table.copy_(((K + 1) * char_rows_VD - audio_row_D) / K)
        nn.init.zeros_(self.linear2.weight)
        nn.init.zeros_(self.linear2.bias)


def num_audio_positions(num_mel_frames: int, downsample: int) -> int:
    """Backbone positions produced for an utterance of ``num_mel_frames`` log-mel frames (100 Hz)."""
    return math.ceil(math.ceil(num_mel_frames / MEL_FRAMES_PER_ENCODER_FRAME) / downsample)


class SpeechInput(nn.Module):
    """Frozen encoder (and, with ``positions="ctc"``, its CTC head) + trainable projector."""

    def __init__(self, cfg: SpeechEncoderConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_whisper_encoder(cfg)
        E = self.encoder.config.d_model
        self.projector = (CharProjector(E, hidden_size) if cfg.positions == "ctc"
                          else Projector(E, hidden_size, cfg.downsample))

    @property
    def input_frames(self) -> int:
        """Mel frames the Whisper encoder expects (inputs are padded to this)."""
        return self.encoder.config.max_source_positions * MEL_FRAMES_PER_ENCODER_FRAME

    @torch.no_grad()
    def encode(self, mel_BMT: torch.Tensor, num_mel_frames_B: list[int]) -> list[torch.Tensor]:
        """The frozen encoder's frames the audio covers, one ``[frames_i, E]`` tensor per utterance (it reads
        the full window or each utterance's own frames: ``SpeechEncoderConfig.window``)."""
        mel_BMT = mel_BMT.to(self.projector.linear1.weight.dtype)
        frames_B = [math.ceil(n / MEL_FRAMES_PER_ENCODER_FRAME) for n in num_mel_frames_B]
        self.encoder.eval()
        if self.cfg.window == "utterance":  # batches of similar lengths, each padded only to its longest
            enc: list[torch.Tensor] = [None] * len(frames_B)  # type: ignore[list-item]
            for idx in length_buckets(frames_B):
                n = frames_B[idx[0]] * MEL_FRAMES_PER_ENCODER_FRAME
                mel_bMT = mel_BMT[idx, :, :n]
                mel_bMT = F.pad(mel_bMT, (0, n - mel_bMT.shape[-1]))
                lens = [frames_B[i] for i in idx]
                out_bTE = encode_frames(self.encoder, mel_bMT, lens if len(set(lens)) > 1 else None)
                for j, i in enumerate(idx):
                    enc[i] = out_bTE[j, : frames_B[i]]
            return enc
        if mel_BMT.shape[-1] < self.input_frames:
            mel_BMT = F.pad(mel_BMT, (0, self.input_frames - mel_BMT.shape[-1]))
        enc_BSE = self.encoder(mel_BMT).last_hidden_state
        return [enc_BSE[b, :frames] for b, frames in enumerate(frames_B)]

    @torch.no_grad()
    def segments(self, mel_BMT: torch.Tensor, num_mel_frames_B: list[int]) -> list[list[tuple[int, int]]]:
        """``positions="ctc"``: each utterance's CTC segments (:func:`ctc_segments`), one per position it
        will fill. Data preparation stores them, so training reads the count its prompts were built with."""
        if self.cfg.positions != "ctc":
            raise ValueError("segments exist only with speech_encoder.positions='ctc'")
        return [ctc_segments(self.encoder.ctc_head(e)) for e in self.encode(mel_BMT, num_mel_frames_B)]

    def forward(self, mel_BMT: torch.Tensor, num_mel_frames_B: list[int],
                segments_B: list[list[tuple[int, int]] | None] | None = None) -> list[torch.Tensor]:
        """Projected speech, one ``[positions_i, D]`` tensor per utterance. ``segments_B`` (``positions=
        "ctc"``): the stored segments of each utterance (None: cut them now)."""
        enc = self.encode(mel_BMT, num_mel_frames_B)
        if self.cfg.positions != "ctc":
            return [self.projector(e) for e in enc]
        out = []
        for b, e_TE in enumerate(enc):
            with torch.no_grad():
                post_TV = self.encoder.ctc_head(e_TE).softmax(-1)
            segs = segments_B[b] if segments_B is not None and segments_B[b] is not None else ctc_segments(post_TV)
            if segs[-1][1] > e_TE.shape[0]:
                raise ValueError(f"utterance {b}: segments reach frame {segs[-1][1]} but it has {e_TE.shape[0]}")
            out.append(self.projector(pool_segments(e_TE, segs), pool_segments(post_TV, segs)))
        return out


def audio_scatter(
    audio: list[torch.Tensor], placeholder_mask_BL: torch.Tensor, hidden_size: int
) -> torch.Tensor:
    """Place each utterance's projected frames at its placeholder positions -> ``audio_BLD``."""
    B, L = placeholder_mask_BL.shape
    if len(audio) != B:
        raise ValueError(f"got {len(audio)} utterances for a batch of {B} sequences")
    dtype = audio[0].dtype if audio else torch.float32
    out = torch.zeros(B, L, hidden_size, dtype=dtype, device=placeholder_mask_BL.device)
    for b, a in enumerate(audio):
        n = int(placeholder_mask_BL[b].sum())
        if n != a.shape[0]:
            raise ValueError(
                f"sequence {b} has {n} audio placeholder positions but its speech gives {a.shape[0]} frames"
            )
        out[b, placeholder_mask_BL[b]] = a
    return out
