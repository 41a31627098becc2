"""Incremental, batch-parallel decoding of a spoken answer (PAPER.md "Inference").

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

from .attention import KVCache
from .channels import CodecSpecial, TextSpecial
from .model import DeepOmniModel


@dataclass
class GenerationConfig:
    max_steps: int = 512  # decoding steps after the prompt (text and delayed codec share the steps)
    top_k: int = 20  # codec tokens: sample among the k most likely codes
    temperature: float = 1.0  # codec sampling temperature
    speech: bool = True  # False: text item only (text answer)
    seed: int | None = None


@dataclass
class Event:
    kind: str  # "text" (a text token id) | "frame" (codes of one complete codec frame, [K]) | "end"
    step: int  # decoding step (0 = first token after the prompt)
    text_id: int | None = None
    frame_K: torch.Tensor | None = None


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


@torch.no_grad()
def stream(
    model: DeepOmniModel,
    prompt_LC: torch.Tensor,
    audio: torch.Tensor | None = None,
    cfg: GenerationConfig | None = None,
) -> Iterator[Event]:
    """Decode an answer to ``prompt_LC`` (one prompt; ``audio`` = its projected speech ``[n, D]``)."""
    cfg = cfg or GenerationConfig()
    lay = model.layout
    K = lay.num_codec_channels
    speech = cfg.speech and K > 0
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    device = model.embed.weight.device
    text_pad, eot = lay.text(TextSpecial.PAD), lay.text(TextSpecial.EOT)
    c_pad, c_eos = lay.codec(CodecSpecial.PAD), lay.codec(CodecSpecial.EOS)

    n_items = 2 if speech else 1
    tokens = prompt_LC.to(device).unsqueeze(0).expand(n_items, -1, -1)
    cache = KVCache(len(model.layers))
    out = model(tokens, audio=None if audio is None else [audio] * n_items, cache=cache)
    logits = out.logits

    text_item = n_items - 1  # row of the text item while it is alive
    text_done = False
    codec_end: list[int | None] = [None] * K  # step at which channel i emitted EOS
    pending: list[list[int]] = [[] for _ in range(K)]  # per channel codes not yet part of a full frame
    step = 0
    for step in range(cfg.max_steps):
        next_C = torch.full((lay.num_channels,), c_pad, dtype=torch.long)
        # ---- text channel: greedy on the text item
        if not text_done:
            t = int(logits[0][text_item, -1].argmax())
            next_C[0] = t
            if t == eot:
                text_done = True
            else:
                yield Event("text", step, text_id=t)
        else:
            next_C[0] = text_pad
        # ---- codec channels: sampled on the speech item, respecting the delay pattern
        if speech:
            for i in range(K):
                if step < i + 1 or codec_end[i] is not None:
                    continue  # before channel i starts, or after it ended: PAD
                if i > 0 and codec_end[i - 1] is not None and step == codec_end[i - 1] + 1:
                    code = c_eos  # channel i ends one step after channel i-1 (same number of frames)
                else:
                    lg = logits[1 + i][0, -1].clone()
                    lg[lay.codebook_size :] = float("-inf")
                    if i == 0:
                        lg[c_eos] = logits[1][0, -1, c_eos]  # only the first channel decides when speech ends
                    code = _sample_top_k(lg, cfg.top_k, cfg.temperature, gen)
                next_C[1 + i] = code
                if code == c_eos:
                    codec_end[i] = step
                else:
                    pending[i].append(code)
            while all(pending[i] for i in range(K)):
                yield Event("frame", step, frame_K=torch.tensor([pending[i].pop(0) for i in range(K)]))
        finished = text_done and (not speech or codec_end[K - 1] is not None)
        if finished:
            break
        # ---- feed the step: the speech item gets the text token and its codes; the text item the text only
        step_tokens = next_C.view(1, 1, -1).repeat(n_items, 1, 1)
        if n_items == 2:
            step_tokens[1, 0, 1:] = c_pad
        step_tokens = step_tokens.to(device)
        if text_done and n_items == 2:  # the text item has served its purpose: drop it from the batch
            n_items, step_tokens = 1, step_tokens[:1]
            cache.select([0])
            text_item = 0
        logits = model(step_tokens, cache=cache, channels=None if speech else [0]).logits
    yield Event("end", step + 1)


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
