"""Kept conversation prefixes for the serving engine (:class:`PrefixCache`): a later turn that starts with a
kept prefix copies its cache and prefills only the rest (``deepomni.serve.engine``, docs/serving.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.attention import KVCache

DEFAULT_PREFIX_ENTRIES = 64  # conversations whose context is kept (LRU)


@dataclass(eq=False)  # compared by identity (the store removes and moves entries)
class _Prefix:
    tokens_LC: torch.Tensor  # on the CPU
    audio_ND: torch.Tensor | None  # the speech of its AUDIO positions (CPU), None if it has none
    cache: KVCache  # one row, on the model's device


class PrefixCache:
    """Caches of conversation prefixes, least recently used dropped first (``max_entries``).

    :meth:`lookup` finds the longest stored prefix of a prompt (tokens equal, and the speech frames of its
    AUDIO positions equal), shorter than the prompt (the last position must run to give logits).
    :meth:`put` drops stored prefixes the new one extends (a conversation keeps its newest state)."""

    def __init__(self, max_entries: int = DEFAULT_PREFIX_ENTRIES):
        self.max_entries = max_entries
        self._entries: list[_Prefix] = []  # least recently used first
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _extends(tokens_LC: torch.Tensor, audio_ND: torch.Tensor | None, e: _Prefix, strict: bool) -> bool:
        n = e.tokens_LC.shape[0]
        if n > tokens_LC.shape[0] or (strict and n == tokens_LC.shape[0]):
            return False
        if not torch.equal(tokens_LC[:n], e.tokens_LC):
            return False
        if e.audio_ND is None:
            return True
        return audio_ND is not None and audio_ND.shape[0] >= e.audio_ND.shape[0] and torch.equal(
            audio_ND[: e.audio_ND.shape[0]], e.audio_ND)

    def lookup(self, prompt_LC: torch.Tensor, audio_ND: torch.Tensor | None) -> _Prefix | None:
        prompt_LC = prompt_LC.cpu()
        audio_ND = None if audio_ND is None else audio_ND.cpu()
        best = None
        for e in self._entries:
            if (best is None or e.tokens_LC.shape[0] > best.tokens_LC.shape[0]) and self._extends(
                    prompt_LC, audio_ND, e, strict=True):
                best = e
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.remove(best)
        self._entries.append(best)
        return best

    def peek(self, prompt_LC: torch.Tensor, audio_ND: torch.Tensor | None) -> int:
        """Length of the longest kept prefix of a prompt (0: none), changing nothing; safe to call from
        another thread than the one stepping the engine (it reads a snapshot of the entries)."""
        prompt_LC = prompt_LC.cpu()
        audio_ND = None if audio_ND is None else audio_ND.cpu()
        return max((e.tokens_LC.shape[0] for e in list(self._entries)
                    if self._extends(prompt_LC, audio_ND, e, strict=True)), default=0)

    def put(self, tokens_LC: torch.Tensor, audio_ND: torch.Tensor | None, cache: KVCache) -> None:
        if self.max_entries <= 0:
            return
        new = _Prefix(tokens_LC.cpu(), None if audio_ND is None or not audio_ND.shape[0] else audio_ND.cpu(), cache)
        self._entries = [e for e in self._entries if not self._extends(new.tokens_LC, new.audio_ND, e, strict=False)]
        self._entries.append(new)
        del self._entries[: max(0, len(self._entries) - self.max_entries)]
