"""Modality load profiling and expert assignment (docs/paper.md "Adaptive modality expert assignment").

    1. run the aligned model (eval, no grad, routing mode "all") over speech data and over text data;
       per MoE layer l and expert j count how often j is among a token's top-k:
           rho_m[l, j] = count_m[l, j] / (k * tokens_m),   m in {A (speech), T (text)}
    2. per layer, speech experts = the n_A experts with the largest rho_A * (1 - rho_T)
       (:func:`deepomni.model.modality.assign_from_load`); text experts = the rest
    3. save the assignment (``experts.json``), the load table and a heatmap

Which positions count as which modality (our choice; the paper says only "speech data" / "text data"):

    speech tokens  positions of speech-task sequences (asr, tts, spoken_qa) that carry speech:
                   the AUDIO placeholders (projected question speech) and the response positions where
                   any codec channel holds a code or EOS (the spoken answer, delay pattern included)
    text tokens    every position of text_qa sequences (text only, the backbone's own domain)

The instruction, chat markers and text answer of a speech-task sequence count for neither: they are
text, but not text *data*, and the text answer of a speech item shares its positions with speech codes
only partly. Rows are run one sequence at a time (no padding to mask out).

Data is read with pyarrow from the tokenized shards (:func:`deepomni.data.tokenized.iter_rows`);
at the tiny preset an in-process loop is fast enough, and :func:`profile_load` takes any iterable of rows,
so a Ray Data iterator (``ds.iter_rows()``) can feed it unchanged.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.schema import SPEECH, SPEECH_TASKS, TEXT, TEXT_QA
from ..data.tokenized import iter_rows, row_segments, row_tensors
from ..model.channels import CodecSpecial, TextSpecial, VocabLayout
from ..model.modality import ExpertAssignment, assign_from_load, moe_layers, set_routing_mode
from ..model.model import DeepOmniModel
from ..model.routing_stats import ExpertCounter
from .config import ProfileConfig


# ------------------------------------------------------------------------------------------ data
def speech_input(model: DeepOmniModel, row: dict, mel_MT: torch.Tensor | None) -> list[torch.Tensor] | None:
    """The projected question speech of one row as ``forward(audio=...)`` wants it, or None for text input."""
    if mel_MT is None or int(row.get("audio_positions") or 0) == 0:
        return None
    device = model.embed.weight.device
    audio = model.encode_speech(mel_MT.unsqueeze(0).to(device), [int(row["mel_frames"])], [row_segments(row)])
    return audio


def modality_positions(row: dict, tokens_LC: torch.Tensor, layout: VocabLayout) -> tuple[str, torch.Tensor] | None:
    """``(modality, mask_L)``: which positions of this row count, and for which modality (module doc)."""
    if row["task"] == TEXT_QA:
        return TEXT, torch.ones(tokens_LC.shape[0], dtype=torch.bool)
    if row["task"] not in SPEECH_TASKS:
        return None
    mask = tokens_LC[:, 0] == layout.text(TextSpecial.AUDIO)
    if tokens_LC.shape[1] > 1:
        mask |= (tokens_LC[:, 1:] != layout.codec(CodecSpecial.PAD)).any(dim=1)
    return SPEECH, mask


# ------------------------------------------------------------------------------------------ load
@dataclass
class LoadTable:
    """Top-k counts per modality, MoE layer and expert, and the tokens they were counted over."""

    layer_ids: list[int]
    num_experts: int
    top_k: int
    counts: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> [layers, E] int64
    tokens: dict[str, int] = field(default_factory=dict)
    sequences: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        for m in (SPEECH, TEXT):
            self.counts.setdefault(m, torch.zeros(len(self.layer_ids), self.num_experts, dtype=torch.long))
            self.tokens.setdefault(m, 0)
            self.sequences.setdefault(m, 0)

    def add(self, modality: str, counts_LE: torch.Tensor, tokens: int, sequences: int) -> None:
        """Add top-k counts ``[layers, E]`` (layers in ``layer_ids`` order) measured over ``tokens``
        positions of ``sequences`` sequences."""
        self.counts[modality] += counts_LE.to(self.counts[modality].device)
        self.tokens[modality] += tokens
        self.sequences[modality] += sequences

    def rho(self, modality: str) -> torch.Tensor:
        """``count / (k * tokens)`` as ``[layers, E]`` (each row sums to 1); zeros when no tokens were seen."""
        n = self.tokens[modality]
        return self.counts[modality].double() / (self.top_k * n) if n else torch.zeros(self.counts[modality].shape, dtype=torch.float64)

    def to_json(self) -> dict:
        rA, rT = self.rho(SPEECH), self.rho(TEXT)
        return {
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "tokens": dict(self.tokens),
            "sequences": dict(self.sequences),
            "layers": {
                str(l): {"rho_speech": rA[i].tolist(), "rho_text": rT[i].tolist(),
                         "count_speech": self.counts[SPEECH][i].tolist(), "count_text": self.counts[TEXT][i].tolist()}
                for i, l in enumerate(self.layer_ids)
            },
        }

    @classmethod
    def from_json(cls, d: dict) -> "LoadTable":
        layer_ids = sorted(int(l) for l in d["layers"])
        t = cls(layer_ids, int(d["num_experts"]), int(d["top_k"]), tokens=dict(d["tokens"]),
                sequences=dict(d.get("sequences", {})))
        for m in (SPEECH, TEXT):
            t.counts[m] = torch.tensor([d["layers"][str(l)][f"count_{m}"] for l in layer_ids], dtype=torch.long)
        return t


@torch.no_grad()
def profile_load(model: DeepOmniModel, rows: Iterable[dict]) -> LoadTable:
    """Run ``model`` over ``rows`` (tokenized rows) with every expert allowed and count modality load."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers: nothing to profile")
    first = next(iter(layers.values()))
    table = LoadTable(sorted(layers), first.num_experts, first.gate.top_k)
    was_training = model.training
    model.eval()
    set_routing_mode(model, "all")
    device = model.embed.weight.device
    counter = ExpertCounter(model, (SPEECH, TEXT))  # MoE layers in model order = sorted layer ids
    seen = {m: [0, 0] for m in (SPEECH, TEXT)}  # modality -> [tokens, sequences]
    try:
        for row in rows:
            tokens_LC, _, mel_MT = row_tensors(row)
            which = modality_positions(row, tokens_LC, model.layout)
            if which is None or not which[1].any():
                continue
            modality, mask_L = which
            group_1L = torch.where(mask_L, counter.groups.index(modality), -1).unsqueeze(0)  # -1: not counted
            with counter.count(group_1L):
                model(tokens_LC.unsqueeze(0).to(device), audio=speech_input(model, row, mel_MT))
            seen[modality][0] += int(mask_L.sum())
            seen[modality][1] += 1
        counts = counter.take()
    finally:
        counter.close()
        model.train(was_training)
    for m, (tokens, sequences) in seen.items():
        table.add(m, counts[m], tokens, sequences)
    return table


# ------------------------------------------------------------------------------------- assignment
def num_speech_experts(spec: str | int, num_experts: int) -> int:
    """``"20%"`` (of the routed experts, rounded, at least 1) or a count; must leave text experts."""
    if isinstance(spec, str) and spec.strip().endswith("%"):
        n = max(1, round(float(spec.strip()[:-1]) / 100 * num_experts))
    else:
        n = int(spec)
    if not 0 < n < num_experts:
        raise ValueError(f"n_speech={spec!r} gives {n} speech experts; need 1..{num_experts - 1} of {num_experts}")
    return n


def assign(table: LoadTable, n_speech: int, score: str = "paper") -> ExpertAssignment:
    """The paper's rule on a measured load (top ``n_speech`` of ``rho_A * (1 - rho_T)`` per layer; ``score``:
    another of :data:`deepomni.model.modality.SCORES`)."""
    return assign_from_load(table.rho(SPEECH), table.rho(TEXT), n_speech, table.layer_ids, score)


def random_assignment(layer_ids: list[int], num_experts: int, n_speech: int, seed: int) -> ExpertAssignment:
    """The ablation: ``n_speech`` speech experts per layer drawn uniformly, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return ExpertAssignment(num_experts, {l: sorted(torch.randperm(num_experts, generator=gen)[:n_speech].tolist())
                                          for l in sorted(layer_ids)})


# ------------------------------------------------------------------------------------------ output
def write_csv(table: LoadTable, assignment: ExpertAssignment, path: str | Path) -> None:
    rA, rT = table.rho(SPEECH), table.rho(TEXT)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "expert", "rho_speech", "rho_text", "score", "count_speech", "count_text", "speech_expert"])
        for i, l in enumerate(table.layer_ids):
            chosen = set(assignment.speech[l])
            for j in range(table.num_experts):
                a, t = float(rA[i, j]), float(rT[i, j])
                w.writerow([l, j, f"{a:.6f}", f"{t:.6f}", f"{a * (1 - t):.6f}", int(table.counts[SPEECH][i, j]),
                            int(table.counts[TEXT][i, j]), int(j in chosen)])


def plot_heatmap(table: LoadTable, assignment: ExpertAssignment, path: str | Path, title: str = "") -> None:
    """Layers x experts heatmaps of rho_speech and rho_text side by side (one colour scale); the chosen
    speech experts are outlined in both panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rA, rT = table.rho(SPEECH).numpy(), table.rho(TEXT).numpy()
    L, E = rA.shape
    vmax = max(float(rA.max()), float(rT.max()), 1e-9)
    width = min(3 + 2 * max(E * 0.17, 3.5), 40)
    fig, axes = plt.subplots(1, 2, figsize=(width, 1.6 + 0.45 * L), sharey=True, constrained_layout=True)
    for ax, rho, name, m in ((axes[0], rA, "speech", SPEECH), (axes[1], rT, "text", TEXT)):
        im = ax.imshow(rho, cmap="viridis", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(f"rho_{name}  ({table.tokens[m]} tokens, {table.sequences[m]} seqs)", fontsize=10)
        ax.set_xlabel("routed expert")
        ax.set_xticks(range(0, E, max(1, E // 16)))
        for i, l in enumerate(table.layer_ids):
            for j in assignment.speech[l]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    axes[0].set_yticks(range(L), [f"layer {l}" for l in table.layer_ids])
    fig.colorbar(im, ax=list(axes), shrink=0.9, label=f"share of top-{table.top_k} choices (uniform = {1 / E:.3f})")
    fig.suptitle(title or "modality load per MoE layer; red boxes: speech experts", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: str | Path, table: LoadTable, assignment: ExpertAssignment, meta: dict) -> dict[str, Path]:
    """``experts.json`` (the artifact the model loads), ``load.json`` / ``load.csv`` and ``load.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"experts": out / "experts.json", "load_json": out / "load.json", "load_csv": out / "load.csv",
             "heatmap": out / "load.png"}
    paths["load_json"].write_text(json.dumps({**meta, "load": table.to_json(), "assignment": assignment.to_json()}, indent=1))
    write_csv(table, assignment, paths["load_csv"])
    method = meta.get("method", "load")
    plot_heatmap(table, assignment, paths["heatmap"],
                 f"modality load ({method} assignment, {len(next(iter(assignment.speech.values())))} speech experts "
                 f"of {table.num_experts} per layer, red boxes)")
    assignment.save(paths["experts"])  # last, atomically: the recipe takes an existing experts.json as "done"
    return paths


def mean_overlap(table: LoadTable) -> float:
    """Mean over layers of sum_j min(rho_A, rho_T): 1 = identical load, 0 = disjoint experts."""
    if not table.layer_ids:
        return math.nan
    return float(torch.minimum(table.rho(SPEECH), table.rho(TEXT)).sum(dim=1).mean())



# ------------------------------------------------------------------------------------------- job
def run(checkpoint: str | Path, data: str | Path, out: str | Path, cfg: ProfileConfig | None = None) -> dict:
    """Profile ``checkpoint`` on ``data``'s ``cfg.split`` and write the assignment and load table to ``out``.
    With ``cfg.random`` the load is still measured and written (to compare), but the experts are drawn."""
    from ..checkpoint import load_model

    cfg = cfg or ProfileConfig()
    split, max_items, random, seed, score = cfg.split, cfg.max_items, cfg.random, cfg.seed, cfg.score
    model, _ = load_model(checkpoint)
    counted = {"rows": 0}

    def rows():
        for r in iter_rows(data, split, max_items):
            counted["rows"] += 1
            yield r

    table = profile_load(model, rows())
    for m in (SPEECH, TEXT):
        if table.tokens[m] == 0:
            raise ValueError(f"no {m} tokens in {data} split={split} (max_items={max_items}): cannot measure its load")
    n = num_speech_experts(cfg.n_speech, table.num_experts)
    assignment = random_assignment(table.layer_ids, table.num_experts, n, seed) if random else assign(table, n, score)
    meta = {"checkpoint": str(checkpoint), "data": str(data), "split": split, "rows": counted["rows"],
            "n_speech": n, "method": "random" if random else "load", "seed": seed if random else None,
            "score": None if random else score,
            "load_overlap": mean_overlap(table)}
    paths = write_outputs(out, table, assignment, meta)
    return {**meta, "tokens": dict(table.tokens), "outputs": {k: str(v) for k, v in paths.items()}}
