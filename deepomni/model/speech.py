"""Speech input: a frozen Whisper encoder and the projector into the backbone's hidden size.

Log-mel ``[B, mel, frames]`` (100 Hz) -> Whisper encoder (conv stride 2: one frame per 20 ms) ->
keep the frames the audio really covers -> stack ``downsample`` neighbours -> 2-layer MLP -> one
position per ``20 ms * downsample``. The projected frames go, in order, to the positions whose text
channel holds the AUDIO placeholder (between BOA and EOA) — see :func:`audio_scatter`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SpeechEncoderConfig

MEL_FRAMES_PER_ENCODER_FRAME = 2  # Whisper's second conv has stride 2


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


def encode_frames(encoder: nn.Module, mel_BMT: torch.Tensor) -> torch.Tensor:
    """transformers' ``WhisperEncoder.forward`` without its fixed-length check: the same modules on any
    even number of mel frames up to the window -> ``[B, frames / 2, d_model]``."""
    T = math.ceil(mel_BMT.shape[-1] / MEL_FRAMES_PER_ENCODER_FRAME)
    x_BET = F.gelu(encoder.conv2(F.gelu(encoder.conv1(mel_BMT))))
    h_BTE = x_BET.transpose(1, 2) + encoder.embed_positions.weight[:T]
    h_BTE = F.dropout(h_BTE, p=encoder.dropout, training=encoder.training)
    for layer in encoder.layers:
        h_BTE = layer(h_BTE, None)
    return encoder.layer_norm(h_BTE)


def speech_encoder_config(path: str, downsample: int = 1, window: str = "full") -> SpeechEncoderConfig:
    """A local Whisper directory's encoder architecture as our config (``path`` set), so a model config
    carries the shape of the encoder it loads (``d_model`` sizes the projector, the window sizes LogMel)."""
    from pathlib import Path

    from transformers import WhisperConfig

    hf = WhisperConfig.from_pretrained(path)
    return SpeechEncoderConfig(path=str(Path(path)), num_mel_bins=hf.num_mel_bins, d_model=hf.d_model,
                               encoder_layers=hf.encoder_layers,
                               encoder_attention_heads=hf.encoder_attention_heads,
                               encoder_ffn_dim=hf.encoder_ffn_dim,
                               max_source_positions=hf.max_source_positions, downsample=downsample, window=window)


def build_whisper_encoder(cfg: SpeechEncoderConfig) -> nn.Module:
    """transformers' WhisperEncoder: loaded from ``cfg.path`` (a local WhisperModel / Whisper encoder
    directory) or built from the config with random weights. Always frozen and in eval mode."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if cfg.path:
        hf_cfg = WhisperConfig.from_pretrained(cfg.path)
        enc = WhisperEncoder(hf_cfg)
        enc.load_state_dict(_encoder_state_dict(cfg.path), strict=True)
    else:
        enc = WhisperEncoder(whisper_config(cfg))
    enc.requires_grad_(False)
    return enc.eval()


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


def num_audio_positions(num_mel_frames: int, downsample: int) -> int:
    """Backbone positions produced for an utterance of ``num_mel_frames`` log-mel frames (100 Hz)."""
    return math.ceil(math.ceil(num_mel_frames / MEL_FRAMES_PER_ENCODER_FRAME) / downsample)


class SpeechInput(nn.Module):
    """Frozen encoder + trainable projector."""

    def __init__(self, cfg: SpeechEncoderConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_whisper_encoder(cfg)
        self.projector = Projector(self.encoder.config.d_model, hidden_size, cfg.downsample)

    @property
    def input_frames(self) -> int:
        """Mel frames the Whisper encoder expects (inputs are padded to this)."""
        return self.encoder.config.max_source_positions * MEL_FRAMES_PER_ENCODER_FRAME

    def forward(self, mel_BMT: torch.Tensor, num_mel_frames_B: list[int]) -> list[torch.Tensor]:
        """Projected speech, one ``[positions_i, D]`` tensor per utterance (the encoder reads the full
        window or each utterance's own frames: ``SpeechEncoderConfig.window``)."""
        mel_BMT = mel_BMT.to(self.projector.linear1.weight.dtype)
        frames_B = [math.ceil(n / MEL_FRAMES_PER_ENCODER_FRAME) for n in num_mel_frames_B]
        with torch.no_grad():
            self.encoder.eval()
            if self.cfg.window == "utterance":
                enc = []
                for b, frames in enumerate(frames_B):
                    mel_1MT = mel_BMT[b : b + 1, :, : frames * MEL_FRAMES_PER_ENCODER_FRAME]
                    mel_1MT = F.pad(mel_1MT, (0, frames * MEL_FRAMES_PER_ENCODER_FRAME - mel_1MT.shape[-1]))
                    enc.append(encode_frames(self.encoder, mel_1MT)[0])
            else:
                if mel_BMT.shape[-1] < self.input_frames:
                    mel_BMT = F.pad(mel_BMT, (0, self.input_frames - mel_BMT.shape[-1]))
                enc_BSE = self.encoder(mel_BMT).last_hidden_state
                enc = [enc_BSE[b, :frames] for b, frames in enumerate(frames_B)]
        return [self.projector(e) for e in enc]


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
