"""Continuous batching of batch-parallel spoken answers (docs/paper.md "Inference"), independent of Ray Serve.

Every live session holds one or two rows of one shared :class:`~deepomni.model.attention.SlotKVCache`
(speech item, and the text item until its EOT). :meth:`BatchEngine.step`:

1. drops cancelled sessions, then admits queued ones while rows are free (their rows are reserved in the
   cache, after the live rows);
2. prefills every admitted session's next chunk of prompt (at most ``prefill_chunk`` positions a row) in
   ONE forward over all of them, right-padded to the longest chunk (each row writes and reads its own
   positions only); a session whose prompt is done picks its first tokens and goes live. A long prompt thus
   takes several steps while the others go on decoding, and sessions arriving together are prefilled
   together, not one after another;
3. runs ONE decoding step over every live row at once (rows of different sessions have different lengths;
   each attends only to its own keys), then lets each session's
   :class:`~deepomni.model.generate.AnswerDecoder` pick its next tokens and emit its events.

A session joins or leaves between two steps; leaving rows are compacted away. The per-session logic is the
same object :func:`deepomni.model.generate.stream` uses, so a session decodes the same tokens whether it
runs alone or in a batch (up to floating-point differences of batched matmuls).

**Conversation memory** (:class:`~deepomni.serve.prefix_cache.PrefixCache`): a request with ``keep=True``
leaves, when its answer ends, the cache of its text item (the prompt plus the answer's text, exactly what
:func:`deepomni.model.prompt.conversation` writes for an earlier answer) in an LRU store; a later prompt
that starts with a stored prefix (same tokens, same speech frames) copies that cache and prefills only
the rest. Every surface that holds a conversation sends its whole history as the prompt; the turns
already run cost nothing again.

The engine also counts which experts the tokens it runs were routed to, per modality: prompt positions
holding speech (the ``AUDIO`` placeholders) and decoding rows of speech items count as ``speech``; text
prompt positions and text items as ``text`` (:meth:`take_expert_load`, the replica's), and per session
(:meth:`expert_load_of`, each answer's: the prompt positions it ran and its decoding rows; a kept prefix
is not run). The MoE layers count them (:mod:`deepomni.model.routing_stats`) while the engine's forwards
run: each session holds a slot while it holds rows, and its tokens are labelled with the group
``2 * slot + modality``, so counting per session costs the step nothing more than counting per modality
(one ``scatter_add_`` a layer into a ``[2 * max_rows, E]`` counter instead of ``[2, E]``). The counts move
to the tallies (a host copy) only when a session leaves and when the replica's are taken.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from ..data.schema import SPEECH, TEXT
from ..model.attention import KVCache, SlotKVCache
from ..model.channels import CodecSpecial, TextSpecial
from ..model.generate import AnswerDecoder, Event, GenerationConfig
from ..model.modality import moe_layers
from ..model.model import DeepOmniModel
from ..model.prepack import Prepacked, prepacked
from ..model.prepack import available as prepack_available
from ..model.prompt import channel_tokens
from ..model.routing_stats import ExpertCounter
from .prefix_cache import DEFAULT_PREFIX_ENTRIES, PrefixCache


DEFAULT_MAX_LEN = 4096  # positions per row: a spoken turn of ~60 s in + ~2 min of 25 Hz speech out
# prompt positions a row prefills per step: longer prompts take several steps, so they do not stall the
# decoding of the others (a step costs about the padded chunk times the rows being prefilled)
DEFAULT_PREFILL_CHUNK = 256
LOAD_GROUPS = (TEXT, SPEECH)  # token groups of the expert load: group index = 1 for speech tokens


class Overloaded(Exception):
    """:meth:`BatchEngine.submit` when ``max_queued`` sessions already wait for rows: the session is refused
    at once instead of joining a queue that would only grow. ``steps_to_free``: decoding steps until the
    first live session ends (at most its ``max_steps``), so the caller can say when to try again."""

    def __init__(self, waiting: int, max_queued: int, steps_to_free: int):
        super().__init__(f"{waiting} sessions already wait for rows (max_queued={max_queued})")
        self.waiting, self.max_queued, self.steps_to_free = waiting, max_queued, steps_to_free


@dataclass
class Request:
    prompt_LC: torch.Tensor  # LongTensor [L, C]: the prompt (see deepomni.model.prompt.conversation)
    audio_ND: torch.Tensor | None = None  # projected speech for the prompt's AUDIO positions, in order
    gen: GenerationConfig = field(default_factory=GenerationConfig)
    keep: bool = False  # keep prompt + answer text cached for a next turn (conversation memory)


@dataclass
class _Session:
    sid: int
    request: Request
    decoder: AnswerDecoder | None = None
    cancelled: bool = False
    text_ids: list[int] = field(default_factory=list)  # the answer's text so far
    prefilled: int = 0  # prompt positions in the cache (while prefilling)
    audio_used: int = 0  # speech frames of those positions
    cached: int = 0  # of which copied from a kept conversation prefix (not run)
    slot: int = -1  # its counting slot while it holds rows (token group 2 * slot + modality): -1 none
    load_LME: torch.Tensor | None = None  # its routed pairs taken so far [moe layers, modality, E]


class BatchEngine:
    """Sessions in, events out; one :meth:`step` = admissions + one batched decoding step.

    ``max_rows`` bounds the batch (a speech answer takes 2 rows while its text lives, then 1); ``max_len``
    bounds prompt + answer positions per row (default: ``DEFAULT_MAX_LEN``, at most the model's
    ``max_position_embeddings``; the cache is preallocated, ``max_rows x max_len`` latents). Sessions
    beyond the free rows wait in a queue, first come first served; with ``max_queued`` set, a session that
    would wait while that many already do is refused (:class:`Overloaded`). ``prepack`` (off by default)
    runs a CPU model's decoding matmuls on weights reordered once for oneDNN (:mod:`deepomni.model.prepack`:
    a step 8-20% shorter alone, but slower next to other threads' torch work; as much memory again as the
    weights); a :class:`~deepomni.model.prepack.Prepacked` given here is used as it is (engines of one
    model share it). Not thread-safe: call it from one thread (a Serve replica runs :meth:`step` in a
    worker thread and submits between steps)."""

    def __init__(self, model: DeepOmniModel, max_rows: int = 32, max_len: int | None = None,
                 prefix_entries: int = DEFAULT_PREFIX_ENTRIES, max_queued: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, prepack: bool | Prepacked = False):
        if max_rows < 2:
            raise ValueError("max_rows must be at least 2 (one speech answer takes 2 rows)")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        if max_queued is not None and max_queued < 0:
            raise ValueError(f"max_queued must be >= 0 (or None: no limit), got {max_queued}")
        self.max_queued = max_queued
        self.model = model.eval()
        self.max_len = min(max_len or DEFAULT_MAX_LEN, model.cfg.max_position_embeddings)
        self.cache = SlotKVCache.for_model(model, max_rows, self.max_len)
        self.device = model.embed.weight.device
        self._ids = itertools.count()
        self._queue: deque[_Session] = deque()
        self._live: list[_Session] = []  # in row order: each owns decoder.n_items consecutive rows
        self._prefilling: list[_Session] = []  # admitted, prompt not done: their rows follow the live rows
        self._sessions: dict[int, _Session] = {}
        self.moe_layer_ids = sorted(moe_layers(model))  # model layer index of each row of the load tables
        # expert load per (session slot, modality): a session takes a slot when admitted (at most max_rows
        # sessions hold rows) and gives it back when it leaves, its counts then taken (_release)
        self._load = ExpertCounter(model, [f"{m}@{slot}" for slot in range(max_rows) for m in LOAD_GROUPS])
        self._free_slots = list(range(max_rows - 1, -1, -1))  # popped from the end: slot 0 first
        self._load_LME = torch.zeros(len(self.moe_layer_ids), len(LOAD_GROUPS), model.cfg.n_routed_experts,
                                     dtype=torch.long)  # the replica's, since take_expert_load: layers x modality x E
        self._ended_load: dict[int, dict[str, torch.Tensor]] = {}  # sessions that ended at the last step
        self._audio_id = model.layout.text(TextSpecial.AUDIO)
        self._no_audio_ND = torch.zeros(0, model.cfg.hidden_size, dtype=model.embed.weight.dtype)
        self.prefixes = PrefixCache(prefix_entries)
        if isinstance(prepack, Prepacked):
            self.prepacked: Prepacked | None = prepack
        else:  # only where it can work (CPU, oneDNN); a GPU ignores it
            self.prepacked = Prepacked() if prepack and self.device.type == "cpu" and prepack_available() else None

    # ------------------------------------------------------------------------------------------- API
    def submit(self, request: Request) -> int:
        """Queue a session; returns its id. Raises ``ValueError`` for a prompt that cannot fit, and
        :class:`Overloaded` when it would wait for rows behind ``max_queued`` waiting sessions."""
        L, C = request.prompt_LC.shape
        if C != self.model.layout.num_channels:
            raise ValueError(f"prompt has {C} channels, the model {self.model.layout.num_channels}")
        if L < 1 or L >= self.max_len:
            raise ValueError(f"prompt of {L} positions does not fit max_len {self.max_len}")
        n_audio = int((request.prompt_LC[:, 0] == self._audio_id).sum())
        n_given = 0 if request.audio_ND is None else request.audio_ND.shape[0]
        if n_audio != n_given:
            raise ValueError(f"prompt has {n_audio} AUDIO positions but {n_given} speech frames were given")
        if self.max_queued is not None:
            waiting = self.waiting(extra=request)
            if waiting > self.max_queued:  # counting this one: it would wait behind max_queued others
                raise Overloaded(waiting - 1, self.max_queued, self._steps_to_free())
        sess = _Session(next(self._ids), request)
        self._sessions[sess.sid] = sess
        self._queue.append(sess)
        return sess.sid

    def cancel(self, sid: int) -> None:
        """Forget a session (queued or live); its rows are freed at the next step. Unknown ids are ignored."""
        sess = self._sessions.get(sid)
        if sess is not None:
            sess.cancelled = True

    def _rows_needed(self, request: Request) -> int:
        return 2 if request.gen.speech and self.model.layout.num_codec_channels > 0 else 1  # AnswerDecoder.n_items

    def waiting(self, extra: Request | None = None) -> int:
        """Queued sessions the free rows will not take at the next step (first come first served, as
        :meth:`step` admits them), counting ``extra`` as if it were queued last. Between steps only."""
        free = self.cache.free_rows
        n = 0
        for req in [s.request for s in self._queue if not s.cancelled] + ([extra] if extra is not None else []):
            need = self._rows_needed(req)
            if n == 0 and need <= free:
                free -= need
            else:
                n += 1
        return n

    def _steps_to_free(self) -> int:
        """Decoding steps until the first live session ends at the latest (its steps left), 1 if none."""
        left = [s.decoder.cfg.max_steps - s.decoder.step for s in self._live if not s.cancelled]
        return max(1, min(left, default=1))

    @property
    def idle(self) -> bool:
        return not self._live and not self._queue and not self._prefilling

    def stats(self) -> dict[str, int]:
        return {"active_sessions": len(self._live) + len(self._prefilling), "queued": len(self._queue),
                "rows": self.cache.n,
                "kept_contexts": len(self.prefixes), "prefix_hits": self.prefixes.hits,
                "prefix_misses": self.prefixes.misses}

    def take_expert_load(self) -> dict[str, torch.Tensor]:
        """Routed-token counts ``[moe layers, experts]`` per modality since the last call (then reset)."""
        L, M, E = self._load_LME.shape
        counts_LSME = self._load.take_LGE().view(L, -1, M, E)
        for s in self._live + self._prefilling:  # what their slots counted is theirs too
            mine_LME = counts_LSME[:, s.slot].clone()
            s.load_LME = mine_LME if s.load_LME is None else s.load_LME + mine_LME
        load_LME, self._load_LME = self._load_LME + counts_LSME.sum(1), torch.zeros_like(self._load_LME)
        return {m: load_LME[:, i] for i, m in enumerate(LOAD_GROUPS)}

    def expert_load_of(self, sid: int) -> dict[str, torch.Tensor] | None:
        """The routed-token counts ``[moe layers, experts]`` per modality of a session that ended at the last
        :meth:`step` (its prompt positions run and its decoding rows); None for any other session."""
        return self._ended_load.get(sid)

    @torch.no_grad()
    def step(self) -> list[tuple[int, Event]]:
        """Admit what fits, then decode one step for every live session. Returns ``(session id, event)``
        pairs in order; a session's ``"end"`` event is its last."""
        events: list[tuple[int, Event]] = []
        self._ended_load.clear()
        self._drop_cancelled()
        self._admit()
        holding = self._live + self._prefilling  # the sessions with rows (and slots) this step
        with prepacked(self.prepacked):
            if self._prefilling:
                self._prefill(events)
            if self._live:
                self._decode(events)
        ended = {sid for sid, ev in events if ev.kind == "end"}
        if ended:
            self._release([s for s in holding if s.sid in ended], keep_load=True)
        return events

    # ------------------------------------------------------------------------------------ internals
    def _drop_cancelled(self) -> None:
        if any(s.cancelled for s in self._queue):
            self._queue = deque(s for s in self._queue if not s.cancelled)
        if any(s.cancelled for s in self._live + self._prefilling):
            self._release([s for s in self._live + self._prefilling if s.cancelled], keep_load=False)
            self._compact(self._rows(), [s for s in self._live if not s.cancelled], dropped_text=set(),
                          prefilling=[s for s in self._prefilling if not s.cancelled])
        self._sessions = {k: s for k, s in self._sessions.items() if not s.cancelled}

    def _rows(self) -> dict[int, list[int]]:
        """Each session's rows (live sessions first, then the ones prefilling; each holds consecutive rows)."""
        rows, r = {}, 0
        for s in self._live + self._prefilling:
            rows[s.sid] = list(range(r, r + s.decoder.n_items))
            r += s.decoder.n_items
        return rows

    def _compact(self, rows: dict[int, list[int]], keep: list[_Session], dropped_text: set[int],
                 prefilling: list[_Session] | None = None) -> None:
        """Keep the rows of ``keep`` (the live sessions, ``rows``: every session's rows before this step's
        changes), without the text row of sessions in ``dropped_text``, then those of ``prefilling``; they
        become rows ``0..n-1`` in that order."""
        prefilling = self._prefilling if prefilling is None else prefilling
        kept: list[int] = []
        for s in keep:
            kept.extend(rows[s.sid][:1] if s.sid in dropped_text else rows[s.sid])
        for s in prefilling:
            kept.extend(rows[s.sid])
        self.cache.keep(kept)
        self._live, self._prefilling = keep, prefilling

    def _admit(self) -> None:
        """Queued sessions take rows while they fit, first come first served: a kept conversation prefix is
        copied into them, the rest of the prompt is prefilled by :meth:`_prefill`."""
        while self._queue:
            sess = self._queue[0]
            dec = AnswerDecoder(self.model.layout, self._clamped(sess.request))
            if dec.n_items > self.cache.free_rows:
                return
            self._queue.popleft()
            req = sess.request
            prefix = self.prefixes.lookup(req.prompt_LC, req.audio_ND)
            if prefix is None:
                self.cache.reserve(dec.n_items)
            else:
                self.cache.append(prefix.cache.repeated(dec.n_items))
                sess.prefilled = sess.cached = prefix.tokens_LC.shape[0]
                sess.audio_used = 0 if prefix.audio_ND is None else prefix.audio_ND.shape[0]
            sess.decoder = dec
            sess.slot = self._free_slots.pop()  # never short: a session holding a slot holds one of max_rows rows
            self._prefilling.append(sess)

    def _prefill(self, events: list[tuple[int, Event]]) -> None:
        """One forward over every prefilling session's next chunk (right-padded to the longest); sessions
        whose prompt is done take their first tokens from its last position and go live."""
        rows, lay = self._rows(), self.model.layout
        chunks, audio, lasts, new_lens = [], [], [], []
        for s in self._prefilling:
            req, dec = s.request, s.decoder
            part_LC = req.prompt_LC[s.prefilled : s.prefilled + self.prefill_chunk]
            n_audio = int((part_LC[:, 0] == self._audio_id).sum())
            frames = None if req.audio_ND is None else req.audio_ND[s.audio_used : s.audio_used + n_audio]
            chunks.append(dec.prompt_tokens(part_LC.to(self.device)))
            audio += [frames if frames is not None else self._no_audio_ND] * dec.n_items
            lasts += [part_LC.shape[0] - 1] * dec.n_items
            new_lens += [s.prefilled + part_LC.shape[0]] * dec.n_items
            s.prefilled, s.audio_used = s.prefilled + part_LC.shape[0], s.audio_used + n_audio
        L = max(c.shape[1] for c in chunks)
        pad_C = torch.tensor([lay.text(TextSpecial.PAD)] + [lay.codec(CodecSpecial.PAD)] * lay.num_codec_channels,
                             device=self.device)
        tokens = torch.cat([torch.cat([c, pad_C.expand(c.shape[0], L - c.shape[1], -1)], dim=1) for c in chunks])
        last_B = torch.tensor(lasts)
        slot_B = torch.tensor([s.slot for s in self._prefilling for _ in range(s.decoder.n_items)])
        # AUDIO positions: speech (1), the rest text (0), in the row's session slot; padding: not counted
        group_BL = (tokens[..., 0] == self._audio_id).long() + len(LOAD_GROUPS) * slot_B.to(self.device)[:, None]
        group_BL[torch.arange(L)[None, :] > last_B[:, None]] = -1
        first = sum(s.decoder.n_items for s in self._live)  # the prefilling rows follow the live ones
        has_audio = any(a.shape[0] for a in audio)
        with self.cache.window(first, self.cache.n, ragged=True), self._load.count(group_BL):
            logits = self.model(tokens, audio=[a.to(self.device) for a in audio] if has_audio else None,
                                cache=self.cache, logits_at_B=last_B).logits
        self.cache.set_lengths(list(range(first, self.cache.n)), new_lens)
        done, still, dropped = [], [], set()
        for s in self._prefilling:
            if s.prefilled < s.request.prompt_LC.shape[0]:
                still.append(s)
                continue
            events.append((s.sid, Event("prefill", 0, prompt_tokens=s.request.prompt_LC.shape[0],
                                        cached_tokens=s.cached)))
            logit_rows = [r - first for r in rows[s.sid]]  # this forward's batch holds the rows from `first` on
            for ev in self._advance(s, s.decoder, logits, logit_rows):
                events.append((s.sid, ev))
            dec = s.decoder
            if dec.finished:
                if s.request.keep:  # the text item (the last) read the prompt only
                    self._keep(s, self.cache.row(rows[s.sid][-1]))
                self._sessions.pop(s.sid, None)
                continue
            done.append(s)
            if dec.dropped_text:
                dropped.add(s.sid)
        if len(still) != len(self._prefilling):  # a session went live or ended
            self._compact(rows, self._live + done, dropped, prefilling=still)

    def _clamped(self, req: Request) -> GenerationConfig:
        room = self.max_len - req.prompt_LC.shape[0]  # the answer stops where the row's cache ends
        return req.gen if req.gen.max_steps <= room else dataclasses.replace(req.gen, max_steps=room)

    def _decode(self, events: list[tuple[int, Event]]) -> None:
        rows = self._rows()
        tokens = torch.cat([s.decoder.next_tokens_N1C for s in self._live]).to(self.device)
        with self.cache.window(0, tokens.shape[0]), self._load.count(self._decode_groups(rows)):
            logits = self.model(tokens, cache=self.cache).logits
        keep, dropped = [], set()
        for s in self._live:
            r = rows[s.sid]
            had_text_row = not s.decoder.speech or len(r) == 2
            for ev in self._advance(s, s.decoder, logits, r):
                events.append((s.sid, ev))
            if s.request.keep and had_text_row and (s.decoder.finished or s.decoder.dropped_text):
                self._keep(s, self.cache.row(r[-1]))  # the text item leaves: what it read is the next turn's prefix
            if s.decoder.finished:
                self._sessions.pop(s.sid, None)
                continue
            keep.append(s)
            if s.decoder.dropped_text:
                dropped.add(s.sid)
        if len(keep) != len(self._live) or dropped:
            self._compact(rows, keep, dropped)

    @staticmethod
    def _advance(sess: _Session, dec: AnswerDecoder, logits, rows: list[int]) -> list[Event]:
        evs = dec.advance(logits, rows)
        sess.text_ids += [ev.text_id for ev in evs if ev.kind == "text"]
        return evs

    def _keep(self, sess: _Session, cache: KVCache) -> None:
        """Store a session's text-item cache: its prompt and the answer text it has read (an answer cut by
        ``max_steps`` has read all but its last token)."""
        req = sess.request
        read = cache.length - req.prompt_LC.shape[0]
        tokens = torch.cat([req.prompt_LC.cpu(), channel_tokens(self.model.layout, sess.text_ids[:read])])
        self.prefixes.put(tokens, req.audio_ND, cache)

    # ---------------------------------------------------------------------------------- expert load
    def _decode_groups(self, rows: dict[int, list[int]]) -> torch.Tensor:
        """Load group of every decoding row, in its session's slot: the speech item of a speech session is
        speech (1), the text item of any session text (0)."""
        M, text, speech = len(LOAD_GROUPS), LOAD_GROUPS.index(TEXT), LOAD_GROUPS.index(SPEECH)
        groups = []
        for s in self._live:
            if s.decoder.speech:  # its speech item first (r[0]); a text item (r[1]) stays text
                groups += [M * s.slot + speech] + [M * s.slot + text] * (len(rows[s.sid]) - 1)
            else:
                groups.append(M * s.slot + text)
        return torch.tensor(groups, dtype=torch.long)

    def _release(self, leaving: list[_Session], keep_load: bool) -> None:
        """Take the counts of ``leaving``'s slots (to the replica's tally, and with ``keep_load`` to
        :meth:`expert_load_of`), then free the slots."""
        M = len(LOAD_GROUPS)
        counts_LGE = self._load.take_LGE([s.slot * M + m for s in leaving for m in range(M)])
        counts_LSME = counts_LGE.view(self._load_LME.shape[0], len(leaving), M, self._load_LME.shape[2])
        self._load_LME += counts_LSME.sum(1)
        for i, s in enumerate(leaving):
            if keep_load:
                load_LME = counts_LSME[:, i] if s.load_LME is None else s.load_LME + counts_LSME[:, i]
                self._ended_load[s.sid] = {m: load_LME[:, j] for j, m in enumerate(LOAD_GROUPS)}
            self._free_slots.append(s.slot)
            s.slot = -1
