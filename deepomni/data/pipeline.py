"""The preprocessing pipeline on Ray Data: raw items -> tokenized sequences.

    read_parquet(raw/)                                    raw items, audio as encoded bytes
      -> map_batches(FeatureStage, actor pool)            spoken questions: decode, 16 kHz, log-mel
      -> map_batches(CodecStage, actor pool)              spoken answers: codec codes [K, frames]
      -> map_batches(build_batch)                         chat template, channel packing, delay, loss masks
      -> ShardSink(tokenized/, split=.../status=ok|rejected)  in the input's row order (shard_sink.py)

Actors hold the expensive state (the feature extractor, the codec weights) and are reused across batches.
A row whose audio is bad is not dropped silently and does not stop the run: it carries its error to the
end and is written under ``status=rejected`` with the reason. Runs on whatever Ray the process is connected
to: the embedded local one when no address is set, a cluster under ``ray job submit``.

Faults: a stage actor that dies (killed, OOM, lost node) is restarted by Ray and the batches it had not
finished are run again on it (``DataConfig.actor_max_restarts`` / ``actor_task_retries``, Ray Data's
``max_restarts`` / ``max_task_retries``). The output is written to a staging directory, checked to hold
every input id exactly once, and only then moved to ``tokenized/``; see docs/data.md.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import torch

from ..config import DataConfig, ModelConfig, load_preset, parse_config
from ..model.channels import VocabLayout
from ..ray_env import init_ray
from ..model.speech import num_audio_positions
from .metrics import StageMetrics
from .schema import RAW_SCHEMA
from .sequences import INSTRUCTIONS, SPEECH_OUT_TASKS, build_sequence
from .tokenized import TOKENIZED_SCHEMA

FEATURE_FIELDS = [("mel", pa.list_(pa.float16())), ("mel_bins", pa.int32()), ("mel_frames", pa.int32()),
                  ("audio_positions", pa.int32()), ("audio_segments", pa.list_(pa.int32())), ("error", pa.string())]
CODEC_FIELDS = [("answer_codes", pa.list_(pa.int32())), ("answer_frames", pa.int32())]
FEATURED_SCHEMA = pa.schema(list(RAW_SCHEMA) + [pa.field(n, t) for n, t in FEATURE_FIELDS])
CODED_SCHEMA = pa.schema(list(FEATURED_SCHEMA) + [pa.field(n, t) for n, t in CODEC_FIELDS])

# Opt-in debugging of the stage actors (the fault-injection test, tests/test_data_faults.py): with
# DEEPOMNI_DATA_TRACE_DIR set in the driver, every stage actor appends `<event> <stage> <pid> <first id> <rows>
# <unix time>` lines (events: start, begin, end) to <dir>/trace.log, and sleeps DEEPOMNI_DATA_BATCH_DELAY_S
# after each `begin`. Unset (the default), nothing is written and nothing waits.
TRACE_DIR_ENV, BATCH_DELAY_ENV = "DEEPOMNI_DATA_TRACE_DIR", "DEEPOMNI_DATA_BATCH_DELAY_S"


def _trace_from_env() -> dict | None:
    trace_dir = os.environ.get(TRACE_DIR_ENV)
    if not trace_dir:
        return None
    return {"dir": trace_dir, "delay_s": float(os.environ.get(BATCH_DELAY_ENV) or 0.0)}


class _StageTrace:
    def __init__(self, stage: str, spec: dict | None):
        self.stage, self.spec = stage, spec
        self._log("start", None)

    def _log(self, event: str, batch: pa.Table | None) -> None:
        if not self.spec:
            return
        first = batch.column("id")[0].as_py() if batch is not None and batch.num_rows else "-"
        rows = batch.num_rows if batch is not None else 0
        line = f"{event} {self.stage} {os.getpid()} {first} {rows} {time.time():.6f}\n"
        with open(Path(self.spec["dir"]) / "trace.log", "a") as f:  # one short append: whole lines
            f.write(line)

    def begin(self, batch: pa.Table) -> None:
        self._log("begin", batch)
        if self.spec and self.spec["delay_s"] > 0:
            time.sleep(self.spec["delay_s"])

    def end(self, batch: pa.Table) -> None:
        self._log("end", batch)


class FeatureStage:
    """Spoken questions -> log-mel (``LogMel``), and the number of AUDIO positions they will fill (with
    ``speech_encoder.positions="ctc"`` the frozen encoder's CTC segments, kept as ``audio_segments``, so the
    trainer fills exactly the positions these prompts hold)."""

    def __init__(self, model_cfg: dict, data_cfg: dict, trace: dict | None = None):
        from ..audio import LogMel

        self.model_cfg = ModelConfig.from_dict(model_cfg)
        self.data_cfg = parse_config(DataConfig, data_cfg)
        self.logmel = LogMel.from_config(self.model_cfg.speech_encoder)
        self.speech = None
        if self.model_cfg.speech_encoder.positions == "ctc":
            from ..model.speech import SpeechInput

            self.speech = SpeechInput(self.model_cfg.speech_encoder, self.model_cfg.hidden_size)
        self.max_seconds = min(self.data_cfg.max_audio_seconds or self.logmel.max_seconds, self.logmel.max_seconds)
        self.metrics = StageMetrics("feature")
        self.trace = _StageTrace("feature", trace)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..audio import load_audio

        self.trace.begin(batch)
        rows = batch.to_pylist()
        wavs, idx = [], []
        for i, r in enumerate(rows):
            r.update(mel=[], mel_bins=0, mel_frames=0, audio_positions=0, audio_segments=[], error=None)
            if r["input_modality"] != "speech":
                continue
            try:
                if r["question_audio"] is None:
                    raise ValueError("speech input without question_audio")
                wavs.append(load_audio(r["question_audio"], 16000, self.max_seconds))
                idx.append(i)
            except ValueError as e:  # AudioError is a ValueError: keep the row, say why
                r["error"] = f"question_audio: {e}"
        self.metrics.batch(len(rows), sum(r["error"] is not None for r in rows), "question_audio",
                           sum(len(w) for w in wavs) / 16000)
        if wavs:
            mel_BMT, frames = self.logmel(wavs)
            mel_BMT = mel_BMT.half()  # as stored: the segments are cut on what the trainer will read
            segments = self.speech.segments(mel_BMT.float(), frames) if self.speech is not None else None
            for b, i in enumerate(idx):
                n = frames[b]
                m = mel_BMT[b, :, :n].numpy()
                rows[i].update(mel=m.reshape(-1), mel_bins=m.shape[0], mel_frames=n)
                if segments is None:
                    rows[i]["audio_positions"] = num_audio_positions(n, self.model_cfg.speech_encoder.downsample)
                else:
                    rows[i].update(audio_positions=len(segments[b]),
                                   audio_segments=[f for seg in segments[b] for f in seg])
        out = pa.Table.from_pylist(rows, schema=FEATURED_SCHEMA)
        self.trace.end(out)
        return out


class CodecStage:
    """Spoken answers -> codec codes ``[K, frames]`` (stored flat, channel-major)."""

    def __init__(self, codec_spec: str, max_seconds: float | None, trace: dict | None = None):
        from ..codec import load_codec

        self.codec = load_codec(codec_spec)
        self.max_seconds = max_seconds
        self.metrics = StageMetrics("codec")
        self.trace = _StageTrace("codec", trace)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..audio import load_audio

        self.trace.begin(batch)
        rows = batch.to_pylist()
        rejected, samples = 0, 0
        for r in rows:
            r.update(answer_codes=[], answer_frames=0)
            if r["task"] not in SPEECH_OUT_TASKS or r["error"]:
                continue
            try:
                if r["answer_audio"] is None:
                    raise ValueError(f"task {r['task']} without answer_audio")
                wav = load_audio(r["answer_audio"], self.codec.sample_rate, self.max_seconds)
                samples += len(wav)
                codes = self.codec.encode(wav)
                r.update(answer_codes=codes.reshape(-1).tolist(), answer_frames=int(codes.shape[1]))
            except ValueError as e:
                r["error"] = f"answer_audio: {e}"
                rejected += 1
        self.metrics.batch(len(rows), rejected, "answer_audio", samples / self.codec.sample_rate)
        out = pa.Table.from_pylist(rows, schema=CODED_SCHEMA)
        self.trace.end(out)
        return out


class SequenceStage:
    """Chat template + channel packing (:func:`deepomni.data.sequences.build_sequence`)."""

    def __init__(self, model_cfg: dict, tokenizer: str, trace: dict | None = None):
        from ..text import load_tokenizer

        cfg = ModelConfig.from_dict(model_cfg)
        self.layout = VocabLayout.from_config(cfg)
        self.tok = load_tokenizer(tokenizer, cfg.text_vocab_size)
        self.instructions = {t: self.tok.encode(s) for t, s in INSTRUCTIONS.items()}
        self.metrics = StageMetrics("sequence")
        self.trace = _StageTrace("sequence", trace)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.trace.begin(batch)
        out, rejected = [], 0
        K = self.layout.num_codec_channels
        for r in batch.to_pylist():
            row = {k: r[k] for k in ("id", "split", "task", "input_modality", "question_text", "answer_text",
                                     "audio_positions", "audio_segments", "mel", "mel_bins", "mel_frames",
                                     "answer_frames", "error")}
            row.update(length=0, num_channels=self.layout.num_channels, tokens=[], labels=[])
            if not r["error"]:
                try:
                    speech_in = r["input_modality"] == "speech"
                    codes = None
                    if r["answer_frames"]:
                        codes = torch.tensor(r["answer_codes"], dtype=torch.long).view(K, -1)
                    seq = build_sequence(
                        self.layout, r["task"], self.tok.encode(r["answer_text"] or ""), self.instructions[r["task"]],
                        question_ids=None if speech_in else self.tok.encode(r["question_text"] or ""),
                        audio_positions=r["audio_positions"] if speech_in else None,
                        answer_codes_KF=codes,
                    )
                    row.update(length=seq.tokens_LC.shape[0], tokens=seq.tokens_LC.reshape(-1).tolist(),
                               labels=seq.labels_LC.reshape(-1).tolist())
                except ValueError as e:
                    row["error"] = f"sequence: {e}"
                    rejected += 1
            row["status"] = "rejected" if row["error"] else "ok"
            out.append(row)
        self.metrics.batch(len(out), rejected, "sequence")
        table = pa.Table.from_pylist(out, schema=TOKENIZED_SCHEMA.append(pa.field("status", pa.string())))
        self.trace.end(table)
        return table


# ------------------------------------------------------------------------------------------- driver
@dataclass
class PrepareSummary:
    items: int
    rejected: int
    per_split_task: dict
    audio_seconds: float
    wall_seconds: float
    codec: str
    out: str

    @property
    def items_per_second(self) -> float:
        return self.items / self.wall_seconds

    @property
    def audio_seconds_per_second(self) -> float:
        return self.audio_seconds / self.wall_seconds


def resolve_codec(raw_dir: Path, out_dir: Path, data_cfg: DataConfig, model_cfg: ModelConfig) -> str:
    """The codec spec the workers load; ``builtin`` fits one on the train split's spoken answers first."""
    from ..codec import load_codec

    spec = data_cfg.codec
    if spec == "builtin":
        from ..audio import load_audio
        from ..codec.builtin import fit_builtin_codec, mel_frames_for
        from .schema import read_raw

        table = read_raw(raw_dir / "train") if (raw_dir / "train").exists() else read_raw(raw_dir)
        audio = [a for a in table.column("answer_audio").to_pylist() if a is not None][: data_cfg.codec_fit_items]
        if not audio:
            raise ValueError(f"no spoken answers under {raw_dir} to fit the built-in codec on")
        wavs = []
        for a in audio:
            try:
                wavs.append(load_audio(a, 16000))
            except ValueError:  # bad audio: its row is rejected by CodecStage with the reason
                continue
        if not wavs:
            raise ValueError(f"none of the spoken answers under {raw_dir} decodes: cannot fit the built-in codec")
        codec = fit_builtin_codec(wavs, sample_rate=16000, num_channels=model_cfg.num_codec_channels,
                                  codebook_size=model_cfg.codebook_size, seed=data_cfg.seed,
                                  mel_frames_per_code=mel_frames_for(data_cfg.codec_frame_ms))
        codec.save(out_dir / "codec")
        spec = f"builtin:{out_dir / 'codec'}"
    codec = load_codec(spec)
    if codec.num_channels != model_cfg.num_codec_channels or codec.codebook_size > model_cfg.codebook_size:
        raise ValueError(
            f"codec {spec!r} has {codec.num_channels} channels x {codec.codebook_size} codes; the model expects "
            f"{model_cfg.num_codec_channels} x {model_cfg.codebook_size}"
        )
    return spec


def check_exactly_once(input_ids: list, output_ids: list, where: Path | str) -> None:
    """Raise unless ``output_ids`` holds every input id exactly as often as the input does."""
    want, got = Counter(input_ids), Counter(output_ids)
    if want == got:
        return
    missing = sorted(map(str, (want - got).elements()))
    extra = sorted(map(str, (got - want).elements()))
    raise RuntimeError(
        f"{where}: {len(output_ids)} rows written for {len(input_ids)} input rows; "
        f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} duplicated or unknown (e.g. {extra[:3]})"
    )


def prepare(raw_dir: str | Path, out_dir: str | Path, data_cfg: DataConfig | None = None) -> PrepareSummary:
    """Run the pipeline on the connected (or an embedded local) Ray and write ``out_dir/tokenized``."""
    import ray

    from .shard_sink import ShardSink

    data_cfg = data_cfg or DataConfig()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.exists():
        raise FileNotFoundError(f"raw data directory {raw_dir} does not exist (run `deepomni data synth` first?)")
    model_cfg = load_preset(data_cfg.preset)
    out_dir.mkdir(parents=True, exist_ok=True)
    init_ray()
    t0 = time.perf_counter()
    codec_spec = resolve_codec(raw_dir, out_dir, data_cfg, model_cfg)

    files = sorted(str(p) for p in raw_dir.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet shards under {raw_dir}")
    pool = lambda n: ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, n))  # noqa: E731
    trace = _trace_from_env()
    stage = dict(batch_size=data_cfg.batch_size, batch_format="pyarrow", num_cpus=data_cfg.actor_num_cpus,
                 fn_constructor_kwargs={"trace": trace} if trace else None,
                 # Ray Data's actor fault tolerance, bounded rather than left to its defaults (unlimited): a dead
                 # actor is restarted and the tasks it had not finished are resubmitted to it
                 max_restarts=data_cfg.actor_max_restarts, max_task_retries=data_cfg.actor_task_retries)
    ds = ray.data.read_parquet(files)
    # the rows leave every stage in the order they came in (the actor pools' tasks end in any order): with
    # ShardSink's writer, the same corpus gives the same shards row for row, so training draws the same batches
    ds.context.execution_options.preserve_order = True
    with warnings.catch_warnings():
        # Ray 2.60's map_batches has no named parameter for max_restarts / max_task_retries: they go through
        # its **ray_remote_args, deprecated (to be removed in Ray 2.64, where this call fails loudly)
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated", category=DeprecationWarning)
        ds = ds.map_batches(FeatureStage, fn_constructor_args=(model_cfg.to_dict(), asdict(data_cfg)),
                            compute=pool(data_cfg.feature_actors), **stage)
        ds = ds.map_batches(CodecStage, fn_constructor_args=(codec_spec, data_cfg.max_audio_seconds),
                            compute=pool(data_cfg.codec_actors), **stage)
        ds = ds.map_batches(SequenceStage, fn_constructor_args=(model_cfg.to_dict(), data_cfg.tokenizer),
                            compute=pool(1), **stage)
    # Written to a staging directory first: a retried write task rewrites its own files (named by the task
    # index), and a run that fails leaves the previous tokenized/ as it was. Moved into place only once every
    # input id is there once.
    tok_dir, staging = out_dir / "tokenized", out_dir / "tokenized.partial"
    try:
        ds.write_datasink(ShardSink(staging, ["split", "status"], min_rows_per_file=data_cfg.rows_per_file))
    except BaseException:  # e.g. an actor past its restarts: tokenized/ stays as it was, no half-written copy
        shutil.rmtree(staging, ignore_errors=True)
        raise
    wall = time.perf_counter() - t0
    tbl = pads.dataset(str(staging), format="parquet", partitioning="hive").to_table(
        columns=["id", "split", "task", "status"])
    check_exactly_once(pads.dataset(files, format="parquet").to_table(columns=["id"]).column("id").to_pylist(),
                       tbl.column("id").to_pylist(), staging)
    if tok_dir.exists():
        old = out_dir / "tokenized.old"
        shutil.rmtree(old, ignore_errors=True)
        tok_dir.rename(old)
        staging.rename(tok_dir)
        shutil.rmtree(old)
    else:
        staging.rename(tok_dir)

    per: dict = {}
    for split, task, status in zip(*(tbl.column(c).to_pylist() for c in ("split", "task", "status"))):
        per.setdefault(f"{split}/{status}", {}).setdefault(task, 0)
        per[f"{split}/{status}"][task] += 1
    raw = pads.dataset(files, format="parquet").to_table(columns=["question_seconds", "answer_seconds"])
    audio_s = float(sum(x or 0 for c in ("question_seconds", "answer_seconds") for x in raw.column(c).to_pylist()))
    status = tbl.column("status").to_pylist()
    summary = PrepareSummary(items=len(status), rejected=status.count("rejected"), per_split_task=per,
                             audio_seconds=audio_s, wall_seconds=wall, codec=codec_spec, out=str(tok_dir))
    (out_dir / "prepare_summary.json").write_text(json.dumps(
        {**asdict(summary), "items_per_second": summary.items_per_second,
         "audio_seconds_per_second": summary.audio_seconds_per_second, "data_config": asdict(data_cfg)}, indent=1))
    return summary
