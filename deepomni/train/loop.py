"""The training job: ``train_func(config)`` run by Ray Train's ``TorchTrainer`` on every worker, and
:func:`fit`, the driver side that builds the dataset and the trainer.

Per worker: build/load the model -> stage (trainable parameters, routing mode) -> expert parallelism ->
engine (DeepSpeed ZeRO-2, or the expert-parallel engine; ``deepomni.train.engine``) -> steps over this
worker's Ray Data shard. Ray-specific lines are in the "Ray" sections only.

Checkpoints (every ``checkpoint_every`` steps and at the end), one Ray Train checkpoint dir holding:

    model/          deepomni.checkpoint format (full weights, expert shards gathered), rank 0
    ds/ | optim_rank<r>.pt   optimizer state (DeepSpeed ZeRO partitions | per-rank torch AdamW)
    train_state.json  {"step": ...}

A re-run with the same ``run_name`` and ``storage_path`` resumes from the latest one (Ray Train v2 restores
its checkpoint manager from storage); so does a restarted worker group after a failure (``max_failures``).
The finished model is written to ``<storage_path>/<run_name>/final`` (config.json, model.safetensors,
experts.json when the stage has an assignment): the ``init`` of the next stage.

A worker killed while it writes a checkpoint leaves the previous one what a resume or the next stage finds:
each worker writes into a private temporary directory, which Ray Train copies to a new
``checkpoint_<time>`` directory and enters in its run snapshot (``get_checkpoint`` of a resume) only after
every worker's copy is complete; ``final`` (and every ``model/``) is written by ``save_model`` into a hidden
sibling, fsynced and renamed into place (``deepomni.atomic``). Optimizer state loads with
``weights_only=True`` (``deepomni.train.engine.load_plain``).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import load_model, save_model
from ..config import ModelConfig, load_preset
from ..model.channels import IGNORE, CodecSpecial, TextSpecial, VocabLayout
from ..model.modality import ExpertAssignment, moe_layers, param_groups, set_routing_mode
from ..model.model import DeepOmniModel
from ..data.tokenized import row_tensors
from .config import TrainConfig
from .metrics import TrainMetrics
from .profile import SPEECH, TEXT, modality_positions
from .stages import Stage, get_stage, set_trainable

COLUMNS = ["task", "input_modality", "length", "num_channels", "tokens", "labels", "audio_positions",
           "mel", "mel_bins", "mel_frames"]


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
    mels, frames, speech_rows, n_tokens = [], [], [], 0
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
            speech_rows.append(b)
        n_tokens += n
    return {"tokens": tokens, "labels": labels, "mels": mels, "frames": frames, "masks": masks,
            "speech_rows": speech_rows, "n_tokens": n_tokens}


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
    projected = model.encode_speech(mel_SMT, batch["frames"])
    audio = [projected[0].new_zeros(0, model.cfg.hidden_size) for _ in range(batch["tokens"].shape[0])]
    for b, a in zip(batch["speech_rows"], projected):
        audio[b] = a
    return audio


def expert_counts(model: DeepOmniModel, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per modality: routed (token, expert) pairs of the last forward per MoE layer (in layer order) and
    expert, ``[layers, experts]``; modalities without positions in the batch are left out."""
    out = {}
    for mod, mask_BL in masks.items():
        mask_T = mask_BL.reshape(-1)
        if not mask_T.any():
            continue
        out[mod] = torch.stack([
            torch.bincount(moe.last_routing.experts_TK[mask_T].reshape(-1), minlength=moe.num_experts)
            for _, moe in sorted(moe_layers(model).items())])
    return out


def expert_load(model: DeepOmniModel, masks: dict[str, torch.Tensor],
                counts: dict[str, torch.Tensor] | None = None) -> dict[str, list[list[float]]]:
    """Per modality and MoE layer: fraction of the routed (token, expert) pairs that went to each expert."""
    counts = expert_counts(model, masks) if counts is None else counts
    return {mod: [(c_E.float() / c_E.sum()).tolist() for c_E in c_LE] for mod, c_LE in counts.items()}


def routed_outside_mode(model: DeepOmniModel) -> float:
    """Fraction of this step's routed pairs on experts the routing mode forbids (0 when the mask holds)."""
    bad = total = 0
    for moe in moe_layers(model).values():
        if moe.routing_mask_E is None:
            continue
        chosen = moe.last_routing.experts_TK.reshape(-1)
        bad += int((~moe.routing_mask_E[chosen]).sum())
        total += chosen.numel()
    return bad / total if total else 0.0


# ------------------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, stage: Stage, resume_dir: Path | None) -> tuple[DeepOmniModel, ExpertAssignment | None]:
    torch.manual_seed(cfg.seed)
    src = resume_dir / "model" if resume_dir is not None else (Path(cfg.init) if cfg.init else None)
    if src is not None:
        model, assignment = load_model(src)
    else:
        model_cfg = load_preset(cfg.preset)
        if cfg.speech_encoder:
            from ..model.speech import speech_encoder_config

            # the architecture from the directory; the weights travel in this run's checkpoints from now on
            model_cfg = model_cfg.replace(speech_encoder=speech_encoder_config(cfg.speech_encoder,
                                                                              model_cfg.speech_encoder.downsample))
        model, assignment = DeepOmniModel(model_cfg).init_weights(seed=cfg.seed), None
    if cfg.assignment:
        assignment = ExpertAssignment.load(cfg.assignment)
    if stage.needs_assignment and assignment is None:
        raise ValueError(f"stage {stage.name} needs an expert assignment (experts.json in init, or --assignment)")
    set_routing_mode(model, stage.mode, assignment)  # mode "all" routes to every expert, whatever the assignment
    set_trainable(model, stage)
    return model.train(), assignment


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
                               "tokens_per_s": metrics.get("tokens_per_s_run")}))
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

    model, assignment = build_model(cfg, stage, resume_dir)
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
    if resume_ctx is not None:
        resume_ctx.__exit__(None, None, None)

    shard = ray.train.get_dataset_shard("train")  # Ray: this worker's rows
    layout = model.layout
    fail_marker = Path(cfg.storage_path) / cfg.run_name / ".failed_once"
    progress_file = Path(cfg.storage_path) / cfg.run_name / PROGRESS_FILE

    def batches():
        while True:
            n = 0
            for table in shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow"):
                n += 1
                yield table.to_pylist()
            if n == 0:
                raise RuntimeError(f"rank {rank}: empty data shard for stage {stage.name}")

    def save_checkpoint(metrics: dict) -> None:
        state = full_state_dict(model, ep_group)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            engine.save(d, step)  # every rank: its optimizer partition
            if rank == 0:
                save_full_model(model.cfg, state, d / "model", assignment)
                (d / "train_state.json").write_text(json.dumps({"step": step, "stage": stage.name}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))  # Ray

    it = batches()
    metrics: dict = {"step": step, "start_step": step}
    start_step, run_tokens, run_time = step, 0, 0.0
    prom = TrainMetrics(cfg.run_name, stage.name, rank, layout.num_codec_channels)  # Ray: Prometheus metrics
    layer_ids = sorted(moe_layers(model))
    prom.started(step)
    while step < max_steps:
        if cfg.fail_at_step is not None and step == cfg.fail_at_step and rank == 0 and not fail_marker.exists():
            fail_marker.parent.mkdir(parents=True, exist_ok=True)
            fail_marker.touch()
            raise RuntimeError(f"injected failure at step {step} (fail_at_step)")
        t_wait = time.perf_counter()
        rows = next(it)
        t0 = time.perf_counter()  # tokens/s counts collate + forward + backward + step, not the data wait
        batch = to_device(collate(rows, layout, stage.text_only), device)
        out = engine.forward(batch["tokens"], audio=speech_inputs(model, batch), labels_BLC=batch["labels"])
        engine.backward(out.loss)
        engine.step()
        step += 1
        dt = time.perf_counter() - t0
        run_tokens, run_time = run_tokens + batch["n_tokens"], run_time + dt
        counts = expert_counts(model, batch["masks"])
        metrics = {"step": step, "start_step": start_step, "loss": out.loss.item(),
                   "aux_loss": out.aux_loss.item(), "channel_losses": out.channel_losses.tolist(),
                   "lr": engine.lr, "tokens_per_s": batch["n_tokens"] / dt, "step_time_s": dt,
                   "data_wait_s": t0 - t_wait,
                   "tokens_per_s_run": run_tokens / run_time,  # this worker, since (re)start
                   "routed_outside_mode": routed_outside_mode(model),
                   "expert_load": expert_load(model, batch["masks"], counts), "rank": rank}
        prom.step(metrics, batch["n_tokens"], counts, layer_ids)
        if rank == 0 and (step % cfg.log_every == 0 or step == max_steps):
            write_progress(progress_file, step, max_steps, metrics)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < max_steps:
            save_checkpoint(metrics)
        elif step % cfg.log_every == 0 and step < max_steps:
            ray.train.report(metrics)  # Ray
    prom.close()
    if step > start_step:  # final checkpoint (skipped when resuming an already finished run)
        save_checkpoint(metrics)
    state = full_state_dict(model, ep_group)
    if rank == 0:
        save_full_model(model.cfg, state, Path(cfg.storage_path) / cfg.run_name / "final", assignment)


# ------------------------------------------------------------------------------------------ driver
# below this many bytes of tokenized Parquet the driver reads the stage's rows itself: Ray Data's read
# tasks would start worker processes that cost more than the read (tens of seconds a stage on 2 cores)
DRIVER_READ_BYTES = 256 * 1024**2


def read_dataset(cfg: TrainConfig, stage: Stage):
    """The stage's rows as a Ray Dataset: tokenized rows of ``cfg.split`` whose task the stage trains on
    (text-input rows only for text-only stages), the first ``max_items`` of them if set."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import ray.data

    d = Path(cfg.data) / "tokenized" / f"split={cfg.split}" / "status=ok"
    files = sorted(str(f) for f in d.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no tokenized shards under {d} (run `deepomni data prepare` first)")
    keep = pc.field("task").isin(list(stage.tasks))
    if stage.text_only:
        keep = keep & (pc.field("input_modality") == "text")
    if sum(Path(f).stat().st_size for f in files) <= DRIVER_READ_BYTES:
        table = pads.dataset(files, format="parquet").to_table(columns=COLUMNS, filter=keep)
        ds = ray.data.from_arrow(table if cfg.max_items is None else table.slice(0, cfg.max_items))
    else:
        ds = ray.data.read_parquet(files, columns=COLUMNS, filter=keep)
        if cfg.max_items is not None:
            ds = ds.limit(cfg.max_items)
    if ds.count() == 0:
        raise ValueError(f"no rows of tasks {stage.tasks} under {d} for stage {stage.name}")
    return ds


def fit(cfg: TrainConfig, dataset=None, progress: bool = True):
    """Run the stage on Ray Train; returns the ``ray.train.Result``. ``dataset`` replaces the stage's
    rows (tests); ``progress`` shows a bar (steps, loss, tokens/s) fed by rank 0."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg.validate()
    cfg.storage_path = str(Path(cfg.storage_path).resolve())  # workers write <storage>/<run>/final
    stage = get_stage(cfg.stage)
    ds = dataset if dataset is not None else read_dataset(cfg, stage)
    trainer = TorchTrainer(
        train_func,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="gloo" if not cfg.use_gpu else "nccl"),
        run_config=RunConfig(name=cfg.run_name, storage_path=cfg.storage_path,
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
        datasets={"train": ds},
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
