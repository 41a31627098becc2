"""Incremental, batch-parallel decoding of a spoken answer (docs/paper.md "Inference").

Two copies of the prompt decode side by side in one batch:
    item 0 (speech item) samples the K codec channels (top-k), under the delay pattern;
    item 1 (text item)   has PAD on its codec channels, like text-only data, and picks the text greedily.
The text token chosen on item 1 is fed to *both* items. When the text ends (EOT), item 1 is dropped
from the batch and its cache rows with it; item 0 goes on with PAD on the text channel until every codec
channel has ended. Frames are yielded as soon as the last (most delayed) channel has produced them, so a
caller can vocode while decoding goes on (streaming).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..config import configclass
from .attention import KVCache
from .channels import CodecSpecial, TextSpecial
from .model import DeepOmniModel


@configclass()
class GenerationConfig:
    max_steps: int = 512  # decoding steps after the prompt (text and delayed codec share the steps)
    top_k: int = 20  # codec tokens: sample among the k most likely codes
    temperature: float = 1.0  # codec sampling temperature
    speech: bool = True  # False: text item only (text answer)
    seed: int | None = None


@dataclass
class Event:
    kind: str  # "text" (a text token id) | "frame" (codes of one complete codec frame, [K]) | "end"
    #            | "prefill" (continuous batching: the prompt was prefilled; its size and the cached part)
    step: int  # decoding step (0 = first token after the prompt)
    text_id: int | None = None
    frame_K: torch.Tensor | None = None
    prompt_tokens: int | None = None  # "prefill": prompt positions
    cached_tokens: int | None = None  # "prefill": of which read from a kept conversation prefix (not run)


@dataclass
class Generation:
    text_ids: list[int] = field(default_factory=list)
    frames: list[torch.Tensor] = field(default_factory=list)
    steps: int = 0

    @property
    def codes_KF(self) -> torch.Tensor:
        return torch.stack(self.frames, dim=1) if self.frames else torch.zeros(0, 0, dtype=torch.long)


def _sample_top_k(logits_V: torch.Tensor, k: int, temperature: float, gen: torch.Generator | None) -> int:
    k = min(k, int(torch.isfinite(logits_V).sum()))
    vals, idx = torch.topk(logits_V.float() / max(temperature, 1e-5), k)
    probs = torch.softmax(vals, dim=-1)
    return int(idx[torch.multinomial(probs.cpu(), 1, generator=gen).item()])


class AnswerDecoder:
    """One answer's decoding state: picks the next tokens from a step's logits and emits events.

    It owns no cache and runs no model, so the same logic serves :func:`stream` (one answer, a plain
    :class:`KVCache`) and continuous batching (many answers sharing a batch, see ``deepomni.serve.engine``).
    Protocol: :meth:`advance` with the logits rows of this answer's items (speech item first, then the text
    item while it lives); afterwards :attr:`finished`, or :attr:`next_tokens_N1C` to feed for the kept
    items, :attr:`dropped_text` telling whether the text item's row left the batch on this step."""

    def __init__(self, layout, cfg: GenerationConfig | None = None):
        self.cfg = cfg = cfg or GenerationConfig()
        self.lay = lay = layout
        self.K = K = lay.num_codec_channels
        self.speech = cfg.speech and K > 0
        self.gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        self.n_items = 2 if self.speech else 1  # rows this answer occupies in the batch
        self.step = 0
        self.text_done = False
        self.finished = False
        self.dropped_text = False
        self.codec_end: list[int | None] = [None] * K  # step at which channel i emitted EOS
        self.pending: list[list[int]] = [[] for _ in range(K)]  # per channel codes not yet in a full frame
        self.next_tokens_N1C: torch.Tensor | None = None

    def prompt_tokens(self, prompt_LC: torch.Tensor) -> torch.Tensor:
        """The prompt as the ``[n_items, L, C]`` batch this answer starts with."""
        return prompt_LC.unsqueeze(0).expand(self.n_items, -1, -1)

    def advance(self, logits: list[torch.Tensor], rows: list[int]) -> list[Event]:
        """Consume the last position of ``logits[c][rows]`` (``rows``: speech item, then text item)."""
        if self.finished:
            raise RuntimeError("advance() on a finished answer")
        lay, K, cfg, step = self.lay, self.K, self.cfg, self.step
        text_pad, eot = lay.text(TextSpecial.PAD), lay.text(TextSpecial.EOT)
        c_pad, c_eos = lay.codec(CodecSpecial.PAD), lay.codec(CodecSpecial.EOS)
        events: list[Event] = []
        next_C = torch.full((lay.num_channels,), c_pad, dtype=torch.long)
        # ---- text channel: greedy on the text item
        if not self.text_done:
            t = int(logits[0][rows[-1], -1].argmax())
            next_C[0] = t
            if t == eot:
                self.text_done = True
            else:
                events.append(Event("text", step, text_id=t))
        else:
            next_C[0] = text_pad
        # ---- codec channels: sampled on the speech item, respecting the delay pattern
        if self.speech:
            end, pending = self.codec_end, self.pending
            for i in range(K):
                if step < i + 1 or end[i] is not None:
                    continue  # before channel i starts, or after it ended: PAD
                if i > 0 and end[i - 1] is not None and step == end[i - 1] + 1:
                    code = c_eos  # channel i ends one step after channel i-1 (same number of frames)
                else:
                    lg = logits[1 + i][rows[0], -1].clone()
                    lg[lay.codebook_size :] = float("-inf")
                    if i == 0:
                        lg[c_eos] = logits[1][rows[0], -1, c_eos]  # only the first channel decides when speech ends
                    code = _sample_top_k(lg, cfg.top_k, cfg.temperature, self.gen)
                next_C[1 + i] = code
                if code == c_eos:
                    end[i] = step
                else:
                    pending[i].append(code)
            while all(pending[i] for i in range(K)):
                events.append(Event("frame", step, frame_K=torch.tensor([pending[i].pop(0) for i in range(K)])))
        self.step = step + 1
        done = self.text_done and (not self.speech or self.codec_end[K - 1] is not None)
        if done or self.step >= cfg.max_steps:
            self.finished, self.next_tokens_N1C = True, None
            events.append(Event("end", self.step))
            return events
        # ---- the next step: the speech item gets the text token and its codes; the text item the text only
        tokens = next_C.view(1, 1, -1).repeat(self.n_items, 1, 1)
        if self.n_items == 2:
            tokens[1, 0, 1:] = c_pad
        self.dropped_text = self.text_done and self.n_items == 2
        if self.dropped_text:  # the text item has served its purpose: it leaves the batch
            self.n_items, tokens = 1, tokens[:1]
        self.next_tokens_N1C = tokens
        return events


@torch.no_grad()
def stream(
    model: DeepOmniModel,
    prompt_LC: torch.Tensor,
    audio: torch.Tensor | None = None,
    cfg: GenerationConfig | None = None,
) -> Iterator[Event]:
    """Decode an answer to ``prompt_LC`` (one prompt; ``audio`` = its projected speech ``[n, D]``)."""
    dec = AnswerDecoder(model.layout, cfg)
    device = model.embed.weight.device
    cache = KVCache(len(model.layers))
    tokens = dec.prompt_tokens(prompt_LC.to(device))
    logits = model(tokens, audio=None if audio is None else [audio] * dec.n_items, cache=cache).logits
    while True:
        yield from dec.advance(logits, list(range(dec.n_items)))
        if dec.finished:
            return
        if dec.dropped_text:
            cache.select([0])
        logits = model(dec.next_tokens_N1C.to(device), cache=cache, channels=None if dec.speech else [0]).logits


def generate(model: DeepOmniModel, prompt_LC: torch.Tensor, audio: torch.Tensor | None = None,
             cfg: GenerationConfig | None = None) -> Generation:
    """Run :func:`stream` to the end and collect the text ids and codec frames."""
    result = Generation()
    for ev in stream(model, prompt_LC, audio, cfg):
        if ev.kind == "end":
            result.steps = ev.step
        elif ev.kind == "text":
            result.text_ids.append(ev.text_id)
        elif ev.kind == "frame":
            result.frames.append(ev.frame_K)
    return result
