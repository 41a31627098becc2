"""The training job: ``train_func(config)`` run by Ray Train's ``TorchTrainer`` on every worker, and
:func:`fit`, the driver side that builds the dataset and the trainer.

Per worker: build/load the model (MoExtend stages add experts first, LoRA stages inject adapters) -> stage
(trainable parameters, routing mode) -> expert parallelism -> engine (DeepSpeed ZeRO-2, or the
expert-parallel engine; ``deepomni.train.engine``) -> steps over this worker's Ray Data shard (a preference
stage's rows are pairs, its loss DPO: :mod:`deepomni.train.preference`). Ray-specific lines are in the "Ray"
sections only.

Checkpoints (every ``checkpoint_every`` steps and at the end), one Ray Train checkpoint dir holding:

    model/          deepomni.checkpoint format (full weights, expert shards gathered; LoRA merged), rank 0
    lora.safetensors  LoRA stages: the unmerged weights and adapters, what a resume loads back
    ds/ | optim_rank<r>.pt   optimizer state (DeepSpeed ZeRO partitions | per-rank torch AdamW)
    train_state.json  {"step", "stage", "world_size", "batch_size", "data": [per rank {"epoch", "rows"}]}

A re-run with the same ``run_name`` and ``storage_path`` resumes from the latest one (Ray Train v2 restores
its checkpoint manager from storage); so does a restarted worker group after a failure (``max_failures``).
The data stream resumes where the checkpoint's step left it (:class:`DataStream`): each rank skips the rows
of the current epoch it had consumed, so with the same number of workers the batches after the resumed step
are those an uninterrupted run sees (the dataset is read with ``preserve_order``, so that every epoch and
every restart deals the same rows to the same rank in the same order).
The finished model is written to ``<storage_path>/<run_name>/final`` (config.json, model.safetensors,
experts.json when the stage has an assignment): the ``init`` of the next stage.

A worker killed while it writes a checkpoint leaves the previous one what a resume or the next stage finds:
each worker writes into a private temporary directory, which Ray Train copies to a new
``checkpoint_<time>`` directory and enters in its run snapshot (``get_checkpoint`` of a resume) only after
every worker's copy is complete; ``final`` (and every ``model/``) is written by ``save_model`` into a hidden
sibling, fsynced and renamed into place (``deepomni.atomic``). Optimizer state loads with
``weights_only=True`` (``deepomni.train.engine.load_plain``). ``tests/test_train_faults.py`` SIGKILLs rank 0
half way through that copy (``inject_fault`` ``where="checkpoint"``, ``mode="hold"``;
:mod:`deepomni.train.fault_injection`):
the half-copied directory is never registered and the run resumes from the one before.

Longer than 450 lines because the worker side and the driver side share the formats written here (data
position, train state, progress file) and read best together; fault injection
(:mod:`deepomni.train.fault_injection`) and the step's metrics (:mod:`deepomni.train.metrics`) live apart.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import load_model, save_model
from ..config import ModelConfig, load_preset
from ..data import tokenized
from ..data.tokenized import prepared_tokenizer, row_segments, row_tensors
from ..model.channels import IGNORE, CodecSpecial, TextSpecial, VocabLayout
from ..model.modality import ExpertAssignment, moe_layers, param_groups, set_routing_mode
from ..model.model import DeepOmniModel
from ..model.routing_stats import ExpertCounter
from .config import TrainConfig
from .fault_injection import FaultInjector
from .metrics import ROUTING_GROUPS, TrainMetrics, expert_load, modality_counts, routed_outside_mode, token_groups
from .profile import SPEECH, TEXT, modality_positions
from .stages import Stage, get_stage, set_trainable

COLUMNS = ["id", "task", "input_modality", "length", "num_channels", "tokens", "labels", "audio_positions",
           "audio_segments", "mel", "mel_bins", "mel_frames"]
TRAIN_STATE = "train_state.json"
LORA_STATE = "lora.safetensors"  # LoRA stages: the unmerged state (base weights + adapters) beside model/
logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- data
class DataStream:
    """This worker's batches of rows, epoch after epoch, and its position in them: ``epoch`` and ``rows``
    (rows of that epoch handed out so far, the current batch's included).

    Started at a checkpoint's position (``epoch``, ``skip``), the first pass drops the first ``skip`` rows
    and counts as epoch ``epoch``: every pass over the shard yields the same rows in the same order
    (``preserve_order``; a restarted worker group gets a fresh split whose first pass is that same order),
    so the batches that follow are the ones the interrupted stream would have yielded next. A ``skip``
    past the end of the epoch (a different number of workers) ends there."""

    def __init__(self, shard, batch_size: int, rank: int = 0, epoch: int = 0, skip: int = 0):
        self.shard, self.batch_size, self.rank = shard, batch_size, rank
        self.epoch, self.rows, self._skip = epoch, 0, skip
        self._it = self._batches()

    def position(self) -> dict:
        return {"epoch": self.epoch, "rows": self.rows}

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        return next(self._it)

    def _batches(self):
        while True:
            seen = 0
            for table in self.shard.iter_batches(batch_size=self.batch_size, batch_format="pyarrow"):
                n = table.num_rows
                seen += n
                if self._skip >= n:  # rows the checkpointed stream had already consumed
                    self._skip -= n
                    self.rows += n
                    continue
                if self._skip:
                    table = table.slice(self._skip)
                    self.rows += self._skip
                    self._skip = 0
                self.rows += table.num_rows
                yield table.to_pylist()
            if seen == 0:
                raise RuntimeError(f"rank {self.rank}: empty data shard")
            self.epoch, self.rows, self._skip = self.epoch + 1, 0, 0


def resume_position(state: dict | None, rank: int, world: int) -> tuple[int, int]:
    """``(epoch, rows to skip)`` for this rank from a checkpoint's train state. Exact when the checkpoint was
    written by as many workers (the same split); with another number of workers every rank skips the same
    fraction of its epoch instead. A checkpoint without a data position (older ones): a fresh pass."""
    data = (state or {}).get("data")
    if not data:
        return 0, 0
    if len(data) == world:
        return int(data[rank]["epoch"]), int(data[rank]["rows"])
    logger.warning("checkpoint written by %d workers, resumed on %d: the data position is approximate "
                   "(every rank skips the same fraction of its epoch)", len(data), world)
    return int(data[0]["epoch"]), round(int(data[0]["rows"]) * len(data) / world)


def gather_positions(position: dict, world: int) -> list[dict]:
    """Every rank's data position, in rank order (a collective when ``world > 1``)."""
    if world == 1 or not dist.is_initialized():
        return [position]
    out: list = [None] * world
    dist.all_gather_object(out, position)
    return out


# ------------------------------------------------------------------------------------------- batch
def collate(rows: list[dict], layout: VocabLayout, text_only: bool = False) -> dict:
    """Right-padded ``tokens_BLC`` / ``labels_BLC``, the question mels, and per-modality position masks.

    Padding: text PAD / codec PAD tokens, IGNORE labels (causal attention: padding at the end never
    affects real positions). ``text_only``: codec inputs -> codec PAD, codec labels -> IGNORE."""
    parts = [row_tensors(r) for r in rows]
    B, L, C = len(rows), max(t.shape[0] for t, _, _ in parts), parts[0][0].shape[1]
    pad = torch.tensor([layout.text(TextSpecial.PAD)] + [layout.codec(CodecSpecial.PAD)] * (C - 1))
    tokens = pad.repeat(B, L, 1)
    labels = torch.full((B, L, C), IGNORE, dtype=torch.long)
    masks = {SPEECH: torch.zeros(B, L, dtype=torch.bool), TEXT: torch.zeros(B, L, dtype=torch.bool)}
    mels, frames, segments, speech_rows, n_tokens = [], [], [], [], 0
    for b, (row, (t, lab, mel)) in enumerate(zip(rows, parts)):
        n = t.shape[0]
        if text_only:
            t, lab = t.clone(), lab.clone()
            t[:, 1:], lab[:, 1:] = layout.codec(CodecSpecial.PAD), IGNORE
        tokens[b, :n], labels[b, :n] = t, lab
        mod = (TEXT, torch.ones(n, dtype=torch.bool)) if text_only else modality_positions(row, t, layout)
        if mod is not None:  # text-only stages: every position is text data
            masks[mod[0]][b, :n] = mod[1]
        if mel is not None and int(row.get("audio_positions") or 0) > 0:
            mels.append(mel)
            frames.append(int(row["mel_frames"]))
            segments.append(row_segments(row))
            speech_rows.append(b)
        n_tokens += n
    return {"tokens": tokens, "labels": labels, "mels": mels, "frames": frames, "segments": segments,
            "masks": masks, "speech_rows": speech_rows, "n_tokens": n_tokens}


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors (tokens, labels, question mels, position masks) on the training device."""
    if device.type == "cpu":
        return batch
    return {**batch, "tokens": batch["tokens"].to(device), "labels": batch["labels"].to(device),
            "mels": [m.to(device) for m in batch["mels"]],
            "masks": {k: m.to(device) for k, m in batch["masks"].items()}}


def speech_inputs(model: DeepOmniModel, batch: dict) -> list[torch.Tensor] | None:
    """Projected speech per row, ``[0, D]`` for text-input rows (encoder frozen under no_grad, projector
    with grad)."""
    if not batch["mels"]:
        return None
    T = max(m.shape[1] for m in batch["mels"])
    mel_SMT = torch.stack([torch.nn.functional.pad(m, (0, T - m.shape[1])) for m in batch["mels"]])
    projected = model.encode_speech(mel_SMT, batch["frames"], batch.get("segments"))
    audio = [projected[0].new_zeros(0, model.cfg.hidden_size) for _ in range(batch["tokens"].shape[0])]
    for b, a in zip(batch["speech_rows"], projected):
        audio[b] = a
    return audio


def pair_batch(rows: list[dict], layout: VocabLayout) -> dict:
    """A DPO batch from preference pair rows (:mod:`deepomni.train.preference`): the chosen answers, then the
    rejected ones, collated as one batch of 2B rows."""
    from .preference import split_pair

    chosen, rejected = zip(*(split_pair(r) for r in rows))
    return collate(list(chosen) + list(rejected), layout)


# ------------------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, stage: Stage, resume_dir: Path | None
                ) -> tuple[DeepOmniModel, ExpertAssignment | None, "Lora | None"]:
    """The stage's model, routed and with its trainable parameters set: from a resumed checkpoint, the init
    checkpoint or a fresh one of the preset; with experts added (MoExtend stages, fresh runs) or LoRA
    adapters injected (LoRA stages; a resume loads the adapters back). Returns ``(model, assignment, lora)``."""
    torch.manual_seed(cfg.seed)
    src = resume_dir / "model" if resume_dir is not None else (Path(cfg.init) if cfg.init else None)
    if src is not None:
        model, assignment = load_model(src)
    else:
        model_cfg = load_preset(cfg.preset)
        if cfg.speech_encoder:
            from ..model.speech import speech_encoder_config

            # the architecture from the directory; the weights travel in this run's checkpoints from now on
            model_cfg = model_cfg.replace(speech_encoder=speech_encoder_config(
                cfg.speech_encoder, model_cfg.speech_encoder.downsample, model_cfg.speech_encoder.window,
                model_cfg.speech_encoder.positions))
        model, assignment = DeepOmniModel(model_cfg).init_weights(seed=cfg.seed), None
    if cfg.assignment:
        assignment = ExpertAssignment.load(cfg.assignment)
    if stage.extend and resume_dir is None:  # MoExtend: the added experts are the speech experts
        from ..model.extend import extend_experts
        from .profile import num_speech_experts

        model, assignment = extend_experts(model, num_speech_experts(cfg.new_experts, model.cfg.n_routed_experts),
                                           seed=cfg.seed)
    if stage.needs_assignment and assignment is None:
        raise ValueError(f"stage {stage.name} needs an expert assignment (experts.json in init, or --assignment)")
    if stage.projector_from_text and resume_dir is None and model.cfg.speech_encoder.positions == "ctc":
        from ..text import load_tokenizer

        model.init_projector_from_text(load_tokenizer(prepared_tokenizer(cfg.data), model.cfg.text_vocab_size))
    set_routing_mode(model, stage.mode, assignment)  # mode "all" routes to every expert, whatever the assignment
    lora = None
    if stage.lora:
        from ..model.lora import apply_lora

        lora = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        if resume_dir is not None and (resume_dir / LORA_STATE).is_file():  # base weights and adapters, unmerged
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(resume_dir / LORA_STATE)))
    set_trainable(model, stage)
    return model.train(), assignment, lora


def full_state_dict(model: DeepOmniModel, ep_group) -> dict[str, torch.Tensor]:
    """The state dict with expert shards gathered over the ep group (a collective: every rank calls it)."""
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if ep_group is not None and (k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj")):
            parts = [torch.empty_like(v) for _ in range(dist.get_world_size(ep_group))]
            dist.all_gather(parts, v.contiguous(), group=ep_group)
            v = torch.cat(parts)
        state[k] = v.cpu().contiguous()
    return state


def save_full_model(cfg: ModelConfig, state: dict, directory: Path, assignment) -> None:
    with torch.device("meta"):
        shell = DeepOmniModel(cfg)
    shell.load_state_dict(state, assign=True)
    save_model(shell, directory, assignment)


# -------------------------------------------------------------------------------------- progress
PROGRESS_FILE = "progress.json"  # rank 0 -> driver, on the shared storage path


def write_progress(path: Path, step: int, max_steps: int, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "max_steps": max_steps, "loss": metrics.get("loss"),
                               "tokens_per_s": metrics.get("tokens_per_s_run"),
                               "pid": os.getpid()}))  # rank 0's Ray Train worker process
    tmp.replace(path)


def _follow_progress(path: Path, desc: str, done) -> None:
    """Driver side: a progress bar fed by the file rank 0 updates, until ``done()``."""
    from tqdm import tqdm

    bar = None
    while not done():
        time.sleep(0.5)
        try:
            p = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if bar is None:
            bar = tqdm(total=p["max_steps"], desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)
        bar.n = p["step"]
        bar.set_postfix(loss=f"{p['loss']:.3f}" if p.get("loss") is not None else "-",
                        tok_s=f"{p['tokens_per_s']:.0f}" if p.get("tokens_per_s") else "-", refresh=False)
        bar.refresh()
    if bar is not None:
        bar.close()


# -------------------------------------------------------------------------------------- train_func
def log_placement(run_dir: Path, rank: int, step: int) -> None:
    """Where this worker runs, appended to ``placement_rank<rank>.jsonl`` at each (re)start: Ray's node id,
    the node's address and labels, the process, the step it starts from."""
    import ray

    rt = ray.get_runtime_context()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / f"placement_rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"rank": rank, "node_id": rt.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                            "labels": rt.get_node_labels(), "pid": os.getpid(), "start_step": step,
                            "time": time.time()}) + "\n")


def train_func(config: dict) -> None:
    import ray.train  # Ray: the worker's context
    import ray.train.torch

    cfg = TrainConfig.from_dict(config)
    stage = get_stage(cfg.stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    max_steps = cfg.max_steps or stage.steps
    lr = cfg.lr if cfg.lr is not None else stage.lr

    # Ray: resume from the latest checkpoint of this run, if any
    ckpt = ray.train.get_checkpoint()
    resume_ctx = ckpt.as_directory() if ckpt is not None else None
    resume_dir = Path(resume_ctx.__enter__()) if resume_ctx is not None else None

    model, assignment, lora = build_model(cfg, stage, resume_dir)
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")  # Ray: this worker's GPU
    model = model.to(device)
    ep_group = edp_group = None
    from .engine import DeepSpeedEngine, ExpertParallelEngine, expert_parallel_groups
    if cfg.ep_size > 1:
        from ..parallel.expert_parallel import apply_expert_parallel

        ep_group, edp_group = expert_parallel_groups(cfg.ep_size)
        apply_expert_parallel(model, ep_group)
        engine = ExpertParallelEngine(model, param_groups(model, cfg.weight_decay), cfg, max_steps, lr,
                                      ep_group, edp_group)
    else:
        engine = DeepSpeedEngine(model, param_groups(model, cfg.weight_decay), cfg, max_steps, lr)
    step = engine.load(resume_dir) if resume_dir is not None else 0
    train_state = None
    if resume_dir is not None and (resume_dir / TRAIN_STATE).is_file():
        train_state = json.loads((resume_dir / TRAIN_STATE).read_text())
    if resume_ctx is not None:
        resume_ctx.__exit__(None, None, None)

    shard = ray.train.get_dataset_shard("train")  # Ray: this worker's rows
    layout = model.layout
    run_dir = Path(cfg.storage_path) / cfg.run_name
    log_placement(run_dir, rank, step)
    faults = FaultInjector(cfg, rank, run_dir)
    progress_file = run_dir / PROGRESS_FILE
    epoch, skip = resume_position(train_state, rank, world)
    it = DataStream(shard, cfg.batch_size, rank, epoch, skip)
    sample_log = None
    if cfg.sample_log:  # one JSON line a step, appended: a restarted worker adds to what the killed one wrote
        run_dir.mkdir(parents=True, exist_ok=True)
        sample_log = open(run_dir / f"samples_rank{rank}.jsonl", "a")

    def model_state() -> dict[str, torch.Tensor]:  # what checkpoints hold: a LoRA model with its adapters merged
        return lora.merged_state_dict() if lora is not None else full_state_dict(model, ep_group)

    def save_checkpoint(metrics: dict) -> None:
        state = model_state()
        positions = gather_positions(it.position(), world)  # a collective: every rank
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            engine.save(d, step)  # every rank: its optimizer partition
            if rank == 0:
                save_full_model(model.cfg, state, d / "model", assignment)
                if lora is not None:
                    from safetensors.torch import save_file

                    save_file(lora.state_dict(), str(d / LORA_STATE))
                (d / TRAIN_STATE).write_text(json.dumps({"step": step, "stage": stage.name, "world_size": world,
                                                         "batch_size": cfg.batch_size, "data": positions}))
            upload = None
            if faults.due("checkpoint", step):
                upload = faults.upload_then_fail(ray.train.get_context().get_storage().experiment_fs_path, step)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),  # Ray
                             checkpoint_upload_fn=upload)

    metrics: dict = {"step": step, "start_step": step}
    start_step, run_tokens, run_time = step, 0, 0.0
    prom = TrainMetrics(cfg.run_name, stage.name, rank, layout.num_codec_channels)  # Ray: Prometheus metrics
    layer_ids = sorted(moe_layers(model))
    counter = ExpertCounter(model, ROUTING_GROUPS)  # routed pairs per modality of the position, layer, expert
    prom.started(step)
    while step < max_steps:
        if faults.due("step", step):
            faults.fail(step)
        t_wait = time.perf_counter()
        rows = next(it)
        batch_epoch = it.epoch  # the pass this batch came from (a pass may have ended inside next())
        t0 = time.perf_counter()  # tokens/s counts collate + forward + backward + step, not the data wait
        batch = to_device(pair_batch(rows, layout) if stage.preference else collate(rows, layout, stage.text_only),
                          device)
        with counter.count(token_groups(batch["masks"])):
            out = engine.forward(batch["tokens"], audio=speech_inputs(model, batch),
                                 labels_BLC=None if stage.preference else batch["labels"])
        dpo_stats = {}
        if stage.preference:  # DPO per codec channel + the text channel's CE (out.channel_losses: the text's only)
            from .preference import preference_loss, reference_tensors

            loss, dpo_stats = preference_loss(out.logits, batch["labels"], *reference_tensors(rows), cfg.dpo_beta)
            out.loss = loss + out.aux_loss
            out.channel_losses = torch.tensor([dpo_stats["text_loss"]] + [float("nan")] * layout.num_codec_channels)
        engine.backward(out.loss)
        engine.step()
        step += 1
        dt = time.perf_counter() - t0
        run_tokens, run_time = run_tokens + batch["n_tokens"], run_time + dt
        routed = counter.take()
        counts = modality_counts(routed)
        metrics = {"step": step, "start_step": start_step, "loss": out.loss.item(),
                   "aux_loss": out.aux_loss.item(), "channel_losses": out.channel_losses.tolist(),
                   "lr": engine.lr, "tokens_per_s": batch["n_tokens"] / dt, "step_time_s": dt,
                   "data_wait_s": t0 - t_wait,
                   "tokens_per_s_run": run_tokens / run_time,  # this worker, since (re)start
                   "routed_outside_mode": routed_outside_mode(routed, [m.routing_mask_E for m in counter.layers]),
                   "expert_load": expert_load(counts), "rank": rank, **dpo_stats}
        prom.step(metrics, batch["n_tokens"], counts, layer_ids)
        if sample_log is not None:
            sample_log.write(json.dumps({"step": step, "epoch": batch_epoch, "ids": [r.get("id") for r in rows],
                                         "loss": metrics["loss"], "time": time.time()}) + "\n")
            sample_log.flush()
        if rank == 0 and (step % cfg.log_every == 0 or step == max_steps):
            write_progress(progress_file, step, max_steps, metrics)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < max_steps:
            save_checkpoint(metrics)
        elif step % cfg.log_every == 0 and step < max_steps:
            ray.train.report(metrics)  # Ray
    prom.close()
    counter.close()
    if sample_log is not None:
        sample_log.close()
    if step > start_step:  # final checkpoint (skipped when resuming an already finished run)
        save_checkpoint(metrics)
    state = model_state()
    if rank == 0:
        save_full_model(model.cfg, state, Path(cfg.storage_path) / cfg.run_name / "final", assignment)


# ------------------------------------------------------------------------------------------ driver
def read_dataset(cfg: TrainConfig, stage: Stage):
    """The stage's rows as a Ray Dataset: tokenized rows of ``cfg.split`` whose task the stage trains on
    (text-input rows only for text-only stages), the first ``max_items`` of them if set; for a preference
    stage the pairs a ``deepomni pairs`` run wrote (a small file)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import ray.data

    if stage.preference:
        path = Path(cfg.pairs) / "pairs.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"no preference pairs at {path} (run `deepomni pairs` first)")
        table = pads.dataset(str(path), format="parquet").to_table()
        return ray.data.from_arrow(table if cfg.max_items is None else table.slice(0, cfg.max_items))
    keep = pc.field("task").isin(list(stage.tasks))
    if stage.text_only:
        keep = keep & (pc.field("input_modality") == "text")
    ds = tokenized.read_dataset(cfg.data, cfg.split, COLUMNS, keep, cfg.max_items)
    if ds.count() == 0:
        raise ValueError(f"no rows of tasks {stage.tasks} under {tokenized.shard_dir(cfg.data, cfg.split)} "
                         f"for stage {stage.name}")
    return ds


def ingest_options():
    """Ray Data options of the workers' shards: Train's defaults (``DataConfig.default_ingest_options``)
    with ``preserve_order``, so that the split (``streaming_split(equal=True)``, which then ignores locality
    hints) deals the same rows to the same rank in the same order every epoch and after every restart: what
    :class:`DataStream` resumes on. Costs little here: the driver-read path has no parallel operators."""
    from ray.train import DataConfig

    import warnings

    with warnings.catch_warnings():  # Ray 2.60's defaults set the deprecated exclude_resources; Train does too
        warnings.simplefilter("ignore", DeprecationWarning)
        opts = DataConfig.default_ingest_options()
    opts.preserve_order = True
    return opts


def fit(cfg: TrainConfig, dataset=None, progress: bool = True):
    """Run the stage on Ray Train; returns the ``ray.train.Result``. ``dataset`` replaces the stage's
    rows (tests); ``progress`` shows a bar (steps, loss, tokens/s) fed by rank 0."""
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg.validate()
    cfg.storage_path = str(Path(cfg.storage_path).resolve())  # workers write <storage>/<run>/final
    stage = get_stage(cfg.stage)
    ds = dataset if dataset is not None else read_dataset(cfg, stage)
    trainer = TorchTrainer(
        train_func,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     placement_strategy=cfg.placement,
                                     label_selector=dict(cfg.worker_labels) or None),
        torch_config=TorchConfig(backend="gloo" if not cfg.use_gpu else "nccl"),
        run_config=RunConfig(name=cfg.run_name, storage_path=cfg.storage_path,
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
        datasets={"train": ds},
        dataset_config=DataConfig(execution_options=ingest_options()),
    )
    if not progress:
        return trainer.fit()
    import threading

    progress_file = Path(cfg.storage_path) / cfg.run_name / PROGRESS_FILE
    progress_file.unlink(missing_ok=True)
    finished = threading.Event()
    follower = threading.Thread(target=_follow_progress, args=(progress_file, stage.name, finished.is_set),
                                daemon=True)
    follower.start()
    try:
        return trainer.fit()
    finally:
        finished.set()
        follower.join(timeout=5)
