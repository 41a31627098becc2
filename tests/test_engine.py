"""Continuous batching (deepomni.serve.engine): sessions that join, leave and are cancelled between steps
decode exactly what they decode alone; queueing when rows run out; expert load by modality; bad prompts."""

from __future__ import annotations

import pytest
import torch

from deepomni.config import load_preset
from deepomni.model.channels import CodecSpecial, TextSpecial
from deepomni.model.generate import GenerationConfig, generate
from deepomni.model.model import DeepOmniModel
from deepomni.model.prompt import Turn, conversation, fitting_starts, prompt_length, user_turn
from deepomni.serve.engine import BatchEngine, Overloaded, Request


@pytest.fixture(scope="module")
def model():
    """Tiny random model whose text ends (EOT) and speech ends (EOS) at state-dependent steps (thresholds
    about 1.2 sigma above the mean of the hidden features they read), so that
    sessions leave the batch, and text items leave before their speech items, at different times."""
    m = DeepOmniModel(load_preset("tiny"), with_speech_input=True).init_weights(seed=0).eval()
    lay = m.layout
    eot, eos = lay.text(TextSpecial.EOT), lay.codec(CodecSpecial.EOS)
    plain = m.embed.logits

    def logits(h, channels=None):
        out = plain(h, channels)
        chans = list(range(lay.num_channels)) if channels is None else channels
        out[chans.index(0)][..., eot] += 1e3 * (h[..., 0] > 1.6)
        if 1 in chans:
            out[chans.index(1)][..., eos] += 1e3 * (h[..., 1] > 2.6)
        return out

    m.embed.logits = logits
    return m


def _prompts(m, n):
    return [user_turn(m.layout, list(range(10 + i, 30 + 3 * i))) for i in range(n)]


def _run(engine, requests, join_every=2, cancel=None, together=False):
    """Submit one request every ``join_every`` steps (``together``: all before the first step); collect each
    session's events by request index."""
    out, sid_of, step, pending = {}, {}, 0, list(range(len(requests)))
    while pending or not engine.idle:
        while pending and (together or step % join_every == 0):
            i = pending.pop(0)
            sid_of[engine.submit(requests[i])] = i
            if not together:
                break
        if cancel and step == cancel[1]:
            engine.cancel(next(s for s, i in sid_of.items() if i == cancel[0]))
        for sid, ev in engine.step():
            o = out.setdefault(sid_of[sid], {"text": [], "frames": [], "end": None})
            if ev.kind == "text":
                o["text"].append(ev.text_id)
            elif ev.kind == "frame":
                o["frames"].append(ev.frame_K.tolist())
            elif ev.kind == "prefill":
                assert not o["text"] and not o["frames"], "prefill after the answer began"
            else:
                assert o["end"] is None, "events after end"
                o["end"] = ev.step
        step += 1
    return out


def test_batched_sessions_decode_as_alone(model):
    prompts = _prompts(model, 6)
    gens = [GenerationConfig(max_steps=40, speech=i % 3 != 1, seed=i) for i in range(6)]
    alone = [generate(model, p, None, g) for p, g in zip(prompts, gens)]
    # the patched model makes answers end at different steps, some text before speech
    assert len({a.steps for a in alone}) > 2
    assert any(g.speech and len(a.text_ids) + 1 < a.steps for a, g in zip(alone, gens))
    engine = BatchEngine(model, max_rows=5)  # fewer rows than sessions want: some wait in the queue
    out = _run(engine, [Request(p, None, g) for p, g in zip(prompts, gens)])
    for i, a in enumerate(alone):
        assert out[i]["text"] == a.text_ids, i
        assert out[i]["frames"] == [f.tolist() for f in a.frames], i
        assert out[i]["end"] == a.steps, i
    assert engine.stats() == {"active_sessions": 0, "queued": 0, "rows": 0, "kept_contexts": 0,
                              "prefix_hits": 0, "prefix_misses": 6}


def test_arrivals_together_prefill_together_in_chunks_and_decode_as_alone(model):
    """Sessions submitted at once (text and spoken prompts of different lengths) are prefilled in shared,
    right-padded forwards of at most ``prefill_chunk`` positions a row, interleaved with the live sessions'
    decoding steps, and still decode exactly what they decode alone."""
    D = model.cfg.hidden_size
    g = torch.Generator().manual_seed(5)
    prompts = [user_turn(model.layout, list(range(10, 24))), user_turn(model.layout, audio_positions=9),
               user_turn(model.layout, list(range(40, 77))), user_turn(model.layout, audio_positions=4)]
    audio = [None, torch.randn(9, D, generator=g), None, torch.randn(4, D, generator=g)]
    gens = [GenerationConfig(max_steps=25, speech=i != 2, seed=i) for i in range(4)]
    alone = [generate(model, p, a, c) for p, a, c in zip(prompts, audio, gens)]
    late = Request(user_turn(model.layout, list(range(60, 70))), None, GenerationConfig(max_steps=12, seed=9))
    late_alone = generate(model, late.prompt_LC, None, late.gen)
    engine = BatchEngine(model, max_rows=12, prefill_chunk=8)
    forwards = []
    hook = model.register_forward_hook(lambda m, args, kw, out: forwards.append(tuple(args[0].shape[:2])),
                                       with_kwargs=True)
    try:
        out = _run(engine, [Request(p, a, c) for p, a, c in zip(prompts, audio, gens)], together=True)
        late_out = _run(engine, [late])  # alone in the engine: one chunk, then decoding
    finally:
        hook.remove()
    for i, a in enumerate(alone):
        assert out[i]["text"] == a.text_ids, i
        assert out[i]["frames"] == [f.tolist() for f in a.frames], i
        assert out[i]["end"] == a.steps, i
    assert late_out[0]["text"] == late_alone.text_ids and late_out[0]["end"] == late_alone.steps
    # the first forward prefills every arrival's first chunk at once: 2 + 2 + 1 + 2 rows, 8 positions
    assert forwards[0] == (7, 8)
    # the longest prompt (5 chunks) is still prefilling while the short ones decode: one prefill forward a
    # step, as many as the longest prompt's chunks (then the late arrival's alone)
    chunks = -(-max(p.shape[0] for p in prompts) // 8)
    assert sum(1 for b, l in forwards if l > 1) == chunks + -(-late.prompt_LC.shape[0] // 8)
    assert sum(1 for b, l in forwards[: 2 * chunks] if l == 1) >= chunks - 2  # decode steps between chunks
    assert engine.idle and engine.cache.n == 0


def test_cancel_frees_rows_and_leaves_others_alone(model):
    prompts = _prompts(model, 3)
    gens = [GenerationConfig(max_steps=30, speech=True, seed=i) for i in range(3)]
    alone = [generate(model, p, None, g) for p, g in zip(prompts, gens)]
    engine = BatchEngine(model, max_rows=6)
    out = _run(engine, [Request(p, None, g) for p, g in zip(prompts, gens)], join_every=1, cancel=(1, 2))
    assert out[1]["end"] is None  # cancelled: no end event, no further events
    for i in (0, 2):
        assert out[i]["text"] == alone[i].text_ids and out[i]["end"] == alone[i].steps
    assert engine.idle and engine.cache.n == 0


def test_queue_when_rows_run_out(model):
    prompts = _prompts(model, 3)
    engine = BatchEngine(model, max_rows=2)
    for p in prompts:
        engine.submit(Request(p, None, GenerationConfig(max_steps=5, speech=True, seed=0)))
    engine.step()
    assert engine.stats()["queued"] >= 2 and engine.cache.n <= 2


def test_a_bounded_queue_refuses_at_once(model):
    """max_queued: sessions that fit the free rows never count as waiting (even submitted before the step
    that admits them); the one beyond max_queued waiters is refused with an estimate of when a row frees."""
    p = user_turn(model.layout, list(range(10, 30)))

    def req(speech: bool, n: int = 40) -> Request:
        return Request(p, None, GenerationConfig(max_steps=n, speech=speech, seed=0))

    with pytest.raises(ValueError, match="max_queued"):
        BatchEngine(model, max_rows=2, max_queued=-1)
    engine = BatchEngine(model, max_rows=3, max_queued=1)
    a, b = engine.submit(req(True)), engine.submit(req(False))  # 2 rows + 1 row: both start at the next step
    assert engine.waiting() == 0
    c = engine.submit(req(False))  # waits: the one place in the queue
    assert engine.waiting() == 1
    with pytest.raises(Overloaded) as e:
        engine.submit(req(False))
    assert (e.value.waiting, e.value.max_queued, e.value.steps_to_free) == (1, 1, 1)  # nothing live yet
    engine.step()
    assert engine.stats()["active_sessions"] == 2 and engine.stats()["queued"] == 1
    with pytest.raises(Overloaded) as e:
        engine.submit(req(False))
    assert 1 <= e.value.steps_to_free <= 39  # until a or b has decoded its last step
    engine.cancel(c)  # a waiter that gives up frees its place
    d = engine.submit(req(False))
    ended = set()
    while not engine.idle:
        assert engine.waiting() <= 1  # (a cancelled waiter stays in the queue until the next step drops it)
        ended |= {sid for sid, ev in engine.step() if ev.kind == "end"}
    assert ended == {a, b, d}
    # max_queued=0: whatever cannot start at once is refused
    engine = BatchEngine(model, max_rows=2, max_queued=0)
    engine.submit(req(False))
    with pytest.raises(Overloaded):
        engine.submit(req(True))  # 2 rows, 1 free
    engine.submit(req(False))


def test_expert_load_by_modality(model):
    lay = model.layout
    n_audio = 7
    prompt = user_turn(lay, audio_positions=n_audio)
    audio = torch.randn(n_audio, model.cfg.hidden_size)
    engine = BatchEngine(model, max_rows=4)
    engine.submit(Request(prompt, audio, GenerationConfig(max_steps=6, speech=True, seed=0)))
    n_rows_steps = 0
    while not engine.idle:
        n_rows_steps += engine.cache.n
        engine.step()
    load = engine.take_expert_load()
    k, L = model.cfg.num_experts_per_tok, len(model.moe_layers)
    # prefill: 2 items x prompt positions; each routed token picks k experts in each MoE layer
    total = int(load["text"].sum() + load["speech"].sum())
    assert load["speech"].shape == (L, model.cfg.n_routed_experts)
    assert int(load["speech"].sum()) >= 2 * n_audio * k * L  # the AUDIO positions of both items
    assert total % (k * L) == 0 and total // (k * L) >= 2 * prompt.shape[0]
    assert all(int(t.sum()) == 0 for t in engine.take_expert_load().values())  # reset by take


def test_expert_load_per_session_adds_up_to_the_replicas(model):
    """Each session's routed pairs (``expert_load_of`` at the step it ends) add up to the replica's counts for
    the same steps: sessions of both kinds, prompts in several chunks, more sessions than rows (slots are
    reused), a take of the replica's counts mid-answer; a cancelled session's pairs count for the replica
    only. With an assignment each answer's shares per MoE layer sum to 1."""
    from deepomni.model.modality import ExpertAssignment
    from deepomni.model.modality import expert_share

    lay, k, L = model.layout, model.cfg.num_experts_per_tok, len(model.moe_layers)
    n_audio = [5, 0, 9, 0, 3, 0]
    reqs = [Request(user_turn(lay, audio_positions=n) if n else user_turn(lay, list(range(10, 14 + 4 * i))),
                    torch.randn(n, model.cfg.hidden_size) if n else None,
                    GenerationConfig(max_steps=20 + 3 * i, speech=i % 3 != 1, seed=i)) for i, n in enumerate(n_audio)]
    engine = BatchEngine(model, max_rows=5, prefill_chunk=8)
    ended, taken, step = {}, [], 0
    sids = [engine.submit(r) for r in reqs]
    while not engine.idle:
        for sid, ev in engine.step():
            if ev.kind == "end":
                ended[sid] = engine.expert_load_of(sid)
        step += 1
        if step == 6:
            taken.append(engine.take_expert_load())  # mid-answer: the live sessions keep theirs
    taken.append(engine.take_expert_load())
    assert sorted(ended) == sorted(sids) and engine.expert_load_of(sids[0]) is None  # only for the last step
    for m in ("text", "speech"):
        replica_LE = sum(t[m] for t in taken)
        assert torch.equal(sum(load[m] for load in ended.values()), replica_LE), m
        assert int(replica_LE.sum()) > 0
    for sid, n, r in zip(sids, n_audio, reqs):
        speech_L = ended[sid]["speech"].sum(1)
        assert bool((speech_L == speech_L[0]).all()) and int(speech_L[0]) % k == 0  # whole tokens, every layer
        items = 2 if r.gen.speech else 1  # each item reads the prompt
        assert int(speech_L[0]) >= items * n * k and (r.gen.speech or int(speech_L[0]) == n * k)

    # a cancelled session: its pairs count for the replica, the others' end as theirs
    engine = BatchEngine(model, max_rows=4)
    a, b = engine.submit(reqs[0]), engine.submit(reqs[1])
    ended = {}
    for step in range(200):
        if step == 3:
            engine.cancel(a)
        for sid, ev in engine.step():
            if ev.kind == "end":
                ended[sid] = engine.expert_load_of(sid)
        if engine.idle:
            break
    total = engine.take_expert_load()
    assert list(ended) == [b]
    left_LE = sum(total.values()) - sum(ended[b].values())
    assert int(left_LE.min()) >= 0 and int(left_LE.sum()) > 0 and int(left_LE.sum()) % (k * L) == 0

    # the shares against an assignment: per layer, speech + text = 1, as counted by hand
    E = model.cfg.n_routed_experts
    gen = torch.Generator().manual_seed(0)
    layers = engine.moe_layer_ids
    experts = ExpertAssignment(E, {l: sorted(torch.randperm(E, generator=gen)[:E // 3].tolist()) for l in layers})
    load = {"text": ended[b]["text"], "speech": ended[b]["speech"]}
    share = expert_share(load, layers, k, experts)
    all_LE = load["text"] + load["speech"]
    assert share["layers"] == layers and share["num_experts"] == E and share["routed"] == all_LE.sum(1).tolist()
    assert share["tokens"] == {m: int(c[0].sum()) // k for m, c in load.items()}
    for i, l in enumerate(layers):
        assert share["speech"][i] + share["text"][i] == pytest.approx(1.0, abs=1e-9)
        assert share["speech"][i] == pytest.approx(float(all_LE[i, experts.speech[l]].sum() / all_LE[i].sum()),
                                                   abs=1e-4)
    bare = expert_share(load, layers, k)  # no assignment: routed pairs and experts used only
    assert bare["speech"] is None and bare["text"] is None and 0 < min(bare["experts_used"]) <= E


def test_bad_requests(model):
    engine = BatchEngine(model, max_rows=2, max_len=64)
    lay = model.layout
    with pytest.raises(ValueError, match="channels"):
        engine.submit(Request(torch.zeros(5, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="max_len"):
        engine.submit(Request(user_turn(lay, list(range(100)))))
    with pytest.raises(ValueError, match="AUDIO"):
        engine.submit(Request(user_turn(lay, audio_positions=3), None))
    with pytest.raises(ValueError, match="max_rows"):
        BatchEngine(model, max_rows=1)
    # a prompt near max_len: the answer is cut at the cache's capacity instead of failing mid-decode
    sid = engine.submit(Request(user_turn(lay, list(range(40))), None, GenerationConfig(max_steps=500, speech=True)))
    ends = []
    while not engine.idle:
        ends += [ev for s, ev in engine.step() if s == sid and ev.kind == "end"]
    assert len(ends) == 1 and ends[0].step <= 64


# ------------------------------------------------------------------------------------ conversation memory
def _answer(engine, request):
    """Run one request alone; its text ids and its prefill event."""
    sid, text, pre = engine.submit(request), [], None
    while not engine.idle:
        for s, ev in engine.step():
            assert s == sid
            if ev.kind == "prefill":
                pre = ev
            elif ev.kind == "text":
                text.append(ev.text_id)
    return text, pre


@pytest.mark.parametrize("speech", [False, True])
def test_next_turn_prefills_only_itself_and_answers_as_a_full_prefill(model, speech):
    lay = model.layout
    gen = GenerationConfig(max_steps=30, speech=speech, seed=3)
    q1, q2 = Turn("user", tuple(range(10, 25))), Turn("user", tuple(range(40, 52)))
    engine = BatchEngine(model, max_rows=4)
    p1 = conversation(lay, [q1])
    a1, pre1 = _answer(engine, Request(p1, None, gen, keep=True))
    assert (pre1.prompt_tokens, pre1.cached_tokens) == (p1.shape[0], 0) and a1
    prompt2 = conversation(lay, [q1, Turn("assistant", tuple(a1)), q2])
    a2, pre2 = _answer(engine, Request(prompt2, None, gen, keep=True))
    # the text item read the prompt and the answer, all but a last token cut by max_steps
    read = len(a1) if len(a1) < gen.max_steps else len(a1) - 1
    assert (pre2.prompt_tokens, pre2.cached_tokens) == (prompt2.shape[0], p1.shape[0] + read)
    assert engine.stats()["prefix_hits"] == 1 and engine.stats()["kept_contexts"] == 1  # turn 2 replaced turn 1
    fresh = BatchEngine(model, max_rows=4, prefix_entries=0)
    a2_fresh, pre = _answer(fresh, Request(prompt2, None, gen))
    assert pre.cached_tokens == 0
    assert a2 == a2_fresh  # the cached prefix gives the answer a whole prefill gives


def test_kept_prefix_needs_the_same_speech(model):
    lay = model.layout
    D = model.cfg.hidden_size
    speech_a, speech_b = torch.randn(7, D, generator=torch.Generator().manual_seed(1)), torch.randn(7, D)
    gen = GenerationConfig(max_steps=6, speech=False)
    engine = BatchEngine(model, max_rows=4)
    q1 = Turn("user", audio_positions=7)
    a1, _ = _answer(engine, Request(conversation(lay, [q1]), speech_a, gen, keep=True))
    turns = [q1, Turn("assistant", tuple(a1)), Turn("user", (5, 6, 7))]
    _, other = _answer(engine, Request(conversation(lay, turns), speech_b, gen))
    _, same = _answer(engine, Request(conversation(lay, turns), speech_a, gen))
    assert other.cached_tokens == 0 and same.cached_tokens > 7
    assert engine.prefixes.peek(conversation(lay, turns), speech_a) == same.cached_tokens
    assert engine.prefixes.peek(conversation(lay, turns), speech_b) == 0


def test_prefix_store_is_bounded(model):
    gen = GenerationConfig(max_steps=3, speech=False)
    engine = BatchEngine(model, max_rows=2, prefix_entries=2)
    for i in range(4):
        answer, _ = _answer(engine, Request(user_turn(model.layout, [10 + i, 11, 12]), None, gen, keep=True))
    assert engine.stats()["kept_contexts"] == 2
    q = Turn("user", (13, 11, 12))
    _answer(engine, Request(conversation(model.layout, [q, Turn("assistant", tuple(answer)), q]), None, gen))
    assert engine.stats()["prefix_hits"] == 1  # a hit among several entries (moves it to the back)
    _, pre = _answer(engine, Request(user_turn(model.layout, [10, 11, 12]), None, gen))
    assert pre.cached_tokens == 0  # the oldest was dropped


def test_context_drops_the_oldest_exchanges_first():
    from deepomni.model.channels import VocabLayout

    lay = VocabLayout(300, 64, 2)
    turns = [Turn("user", (1,) * 10), Turn("assistant", (2,) * 10), Turn("user", (3,) * 10),
             Turn("assistant", (4,) * 10), Turn("user", (5,) * 10)]
    sys_ids = (9, 9)
    assert prompt_length(lay, turns, sys_ids) == conversation(lay, turns, sys_ids).shape[0]
    assert fitting_starts(lay, turns, 1000, sys_ids) == [0, 2, 4]
    assert fitting_starts(lay, turns, prompt_length(lay, turns, sys_ids) - 1, sys_ids) == [2, 4]
    assert fitting_starts(lay, turns, prompt_length(lay, turns[4:], sys_ids), sys_ids) == [4]
    assert fitting_starts(lay, turns, prompt_length(lay, turns[4:], sys_ids) - 1, sys_ids) == []
    with pytest.raises(ValueError):
        conversation(lay, turns[:2])  # ends with the assistant
