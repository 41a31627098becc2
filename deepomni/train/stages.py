"""The training stages as data (docs/paper.md "Training stages"), one row of the paper's table per :class:`Stage`.

| stage            | data (tasks)                    | trainable                                             | router      |
|------------------|---------------------------------|-------------------------------------------------------|-------------|
| text_pretrain    | text_qa, text-input spoken_qa   | all but the speech input (the base LLM; foundations)  | all experts |
| s1_align         | asr, spoken_qa                  | projector, codec embedding rows (+ untied head's)     | unchanged   |
| s2_speech_experts| spoken_qa, tts (speech answers) | speech experts, router, codec embedding rows          | speech only |
| s2_text_experts  | text_qa                         | text experts, router                                  | text only   |
| s3_joint         | all tasks                       | all routed experts, router, codec embedding rows      | all experts |
| *_paper (S2, S3) | as S2.1 / S2.2 / S3             | the paper's: S2 all but speech input and MoE-layer attention; S3 all but speech input | as S2 / S3 |
| full_finetune    | all tasks                       | all but the speech encoder (baseline "PureMoE")       | all experts |
| speech_finetune  | asr, tts, spoken_qa             | all but the speech encoder (native speech fine-tune)  | all experts |
| moextend         | spoken_qa, tts                  | N added experts, their router rows, codec embedding rows | all (extend) |
| lora             | all tasks                       | low-rank adapters on attention and experts, codec rows | all experts |
| dpo              | preference pairs (speech out)   | as S3: routed experts, router, codec embedding rows   | all experts |

``text_only`` stages (text_pretrain) read only text-input rows and see the text channel alone: codec inputs
are replaced by the codec PAD token and codec labels ignored, so the base LLM learns text, not speech.
The recipe itself, in order, is data too (:data:`RECIPE`, :data:`BASELINES`): ``deepomni pipeline``,
``manifests/generate.py`` and the docs read it from here.

**Where we depart from the paper** (S2.1, S2.2, S3): the paper also trains the shared experts, the dense
layers, the norms and the embeddings in S2 ("shared experts belong to both and train in every stage"), and
everything but the speech input in S3. At the tiny preset those shared parts hold most of the text (seed 0,
40 held-out items, measured 2026-11-27; docs/train.md): trained in S2.1 on speech answers they took the
aligned model's text QA from 0.35 to 0.00, while the speech experts, router and codec rows alone kept
0.30; and the paper's S3 took the S2.2 model from 0.55 to 0.33, where routed experts, router and codec
rows alone ended at 0.50 with the same codec accuracy (0.14). So after S1 nothing the text side reads
trains except the routed experts (masked to the stage's modality in S2) and the router.

**S1 reads spoken questions too** (the paper: ASR pairs only). With the projector started from the text
embedding of the characters heard (``speech_encoder.positions="ctc"``), the small base answers 31 of 57
spoken questions before any training; 300 steps on ASR alone took that to 3 of 57 (ASR WER 0.856 -> 0.828),
with spoken questions mixed in to 23 (ASR 0.811): aligning speech to transcription alone teaches the
projector a transcription mode, not text (measured 2026-12-07, docs/paper.md "Speech at the rate of text").

**Baselines of the paper's comparison** (each from the aligned model, as many steps as the recipe's S2.1 + S2.2
+ S3): *MoExtend* adds ``TrainConfig.new_experts`` experts to every MoE layer, copies of existing ones with
new router rows (:mod:`deepomni.model.extend`), and trains only those (routing mode ``"extend"``: the router
sees every expert) on the speech tasks; *LoRA* trains low-rank adapters (peft) on the attention projections
and the stacked experts of every layer, merged into the weights for every checkpoint
(:mod:`deepomni.model.lora`). The *preference stage* (``dpo``) follows the recipe: DPO per codec channel on
pairs of a preferred and a rejected spoken answer sampled from the recipe's model
(:mod:`deepomni.train.preference`).

Learning rates are the paper's (S1 2e-5, S2.1 1e-4, S2.2 2e-5, S3 5e-5); tiny models need larger ones,
set per stage by the training preset (``deepomni/presets/train/tiny.json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import RoutingMode
from ..data.schema import ASR, SPEECH_OUT_TASKS, SPEECH_TASKS, SPOKEN_QA, TASKS, TEXT_QA, TTS


@dataclass(frozen=True)
class Stage:
    name: str
    tasks: tuple[str, ...]  # tokenized rows whose ``task`` is one of these
    trainable: Callable[[str, "object"], bool]  # (parameter name, ModelConfig) -> requires_grad
    mode: RoutingMode  # which experts route and learn (deepomni.model.modality.set_routing_mode)
    lr: float  # paper default; overridden by TrainConfig.lr / the preset's per-stage lr
    steps: int  # default number of optimizer steps
    text_only: bool = False  # text-input rows only, codec channels blanked (see module doc)
    needs_assignment: bool = False  # routing mode needs experts.json
    # embedding table: only the codec blocks train. Not the text specials either: the base already uses
    # them (turn markers, EOT), and training them on ASR alone took the tiny base's held-out text QA from
    # 0.35 to 0.00 with every other text weight frozen (measured, runs/demo_full, 2026-11-27)
    codec_rows_only: bool = False
    # a stage that first gives the base its speech input: with speech_encoder.positions="ctc" a fresh run
    # (not a resume) starts the projector from the base's text embedding of the characters the encoder
    # hears (DeepOmniModel.init_projector_from_text), as every model trained from the base must, to compare
    projector_from_text: bool = False
    # MoExtend: a fresh run (not a resume) first adds TrainConfig.new_experts experts to every MoE layer of its
    # init model; they become the assignment's speech experts (deepomni.model.extend)
    extend: bool = False
    lora: bool = False  # train low-rank adapters (TrainConfig.lora_rank / lora_alpha), merged in every checkpoint
    preference: bool = False  # rows are preference pairs (TrainConfig.pairs); the loss is DPO on the codec channels


# ------------------------------------------------------------------------------ trainable predicates
def _speech_input(name: str) -> bool:
    return name.startswith("speech.")


def all_but_speech_input(name: str, cfg) -> bool:
    return not _speech_input(name)


def projector_and_embeddings(name: str, cfg) -> bool:
    return name.startswith("speech.projector.") or name.startswith("embed.")


def routed_experts_and_router(name: str, cfg) -> bool:
    """S2.2: the routed experts (only the mode's train: the gradient mask) and the router."""
    return ".mlp.experts." in name or ".mlp.gate." in name


def experts_router_and_embeddings(name: str, cfg) -> bool:
    """S2.1 and S3: as S2.2, plus the embedding table (``codec_rows_only``: its codec rows)."""
    return routed_experts_and_router(name, cfg) or name.startswith("embed.")


def adapters_and_embeddings(name: str, cfg) -> bool:
    """LoRA: the adapters' weights (peft names them ``lora_A`` / ``lora_B``) and the embedding table
    (``codec_rows_only``: its codec rows)."""
    return ".lora_" in name or name.startswith("embed.")


def all_but_encoder(name: str, cfg) -> bool:
    return not name.startswith("speech.encoder.")


def paper_s2(name: str, cfg) -> bool:
    """The paper's (and its release's) S2.1 / S2.2: everything but the speech input and the attention of
    the MoE layers: routed experts (the mode's, by the gradient mask), router, shared experts, the dense
    layers (attention included), the norms outside attention, the whole embedding table."""
    if _speech_input(name):
        return False
    if ".self_attn." in name:
        return int(name.split(".")[1]) < cfg.first_k_dense_replace  # layers.<i>.self_attn.*
    return True


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("text_pretrain", (TEXT_QA, SPOKEN_QA), all_but_speech_input, "all", 1e-4, 1000, text_only=True),
    Stage("s1_align", (ASR, SPOKEN_QA), projector_and_embeddings, "all", 2e-5, 1000, codec_rows_only=True,
          projector_from_text=True),
    Stage("s2_speech_experts", (SPOKEN_QA, TTS), experts_router_and_embeddings, "speech", 1e-4, 1000,
          needs_assignment=True, codec_rows_only=True),
    Stage("s2_text_experts", (TEXT_QA,), routed_experts_and_router, "text", 2e-5, 1000, needs_assignment=True),
    Stage("s3_joint", TASKS, experts_router_and_embeddings, "all", 5e-5, 1000, codec_rows_only=True),
    # the paper's trainable sets (the "paper_stages" baseline: the same steps and rates as ours)
    Stage("s2_speech_experts_paper", (SPOKEN_QA, TTS), paper_s2, "speech", 1e-4, 1000, needs_assignment=True),
    Stage("s2_text_experts_paper", (TEXT_QA,), paper_s2, "text", 2e-5, 1000, needs_assignment=True),
    Stage("s3_joint_paper", TASKS, all_but_speech_input, "all", 5e-5, 1000),
    Stage("full_finetune", TASKS, all_but_encoder, "all", 5e-5, 1000, projector_from_text=True),
    Stage("speech_finetune", SPEECH_TASKS, all_but_encoder, "all", 5e-5, 1000, projector_from_text=True),
    Stage("moextend", (SPOKEN_QA, TTS), experts_router_and_embeddings, "extend", 1e-4, 1000, needs_assignment=True,
          codec_rows_only=True, extend=True),
    Stage("lora", TASKS, adapters_and_embeddings, "all", 1e-4, 1000, codec_rows_only=True, lora=True),
    Stage("dpo", SPEECH_OUT_TASKS, experts_router_and_embeddings, "all", 1e-5, 200, codec_rows_only=True,
          preference=True),
]}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    return STAGES[name]


def set_trainable(model, stage: Stage) -> tuple[int, int]:
    """Set ``requires_grad`` per the stage; returns (trainable, total) parameter counts."""
    n_train = n_all = 0
    model.embed.trainable_rows = model.embed.codec_rows() if stage.codec_rows_only else None
    for name, p in model.named_parameters():
        p.requires_grad_(bool(stage.trainable(name, model.cfg)))
        n_all += p.numel()
        n_train += p.numel() if p.requires_grad else 0
    return n_train, n_all


# ------------------------------------------------------------------------------------------ the recipe
@dataclass(frozen=True)
class Step:
    """One step of the recipe: train a stage, or (``stage=None``) profile modality load and assign experts,
    or (``stage=None, pairs=True``) sample and judge the preference pairs of a DPO stage.

    ``run`` names the output: ``runs/<run>/final`` for training, ``profile/<run>/experts.json`` for
    profiling, ``pairs/<run>/pairs.parquet`` for preference pairs (``preference`` of a training step names
    the pairs step it trains on). ``init`` is the run whose final model the step starts from (``None``: a
    fresh model of the preset). ``assignment`` is the profiling step whose experts route and freeze a stage. ``steps_of``
    makes a baseline compute-matched: it trains as many optimizer steps as those runs together."""

    run: str
    stage: str | None = None
    init: str | None = None
    assignment: str | None = None
    random_assignment: bool = False  # profiling step: draw the speech experts at random (the ablation)
    score: str = "paper"  # profiling step: the score experts are ranked by (deepomni.model.modality.SCORES)
    steps_of: tuple[str, ...] = ()
    pairs: bool = False  # a step that builds preference pairs from ``init`` (deepomni.train.preference)
    preference: str | None = None  # the pairs step whose pairs a DPO stage trains on

    @property
    def is_profile(self) -> bool:
        return self.stage is None and not self.pairs


def _staged(prefix: str, profile: str, stages: str = "") -> tuple[Step, ...]:
    """S2.1 -> S2.2 -> S3 from the aligned model, routed by ``profile``'s assignment (``stages``: the suffix
    of another set of those stages, "_paper")."""
    return (Step(f"{prefix}s2_speech_experts", f"s2_speech_experts{stages}", "s1_align", profile),
            Step(f"{prefix}s2_text_experts", f"s2_text_experts{stages}", f"{prefix}s2_speech_experts", profile),
            Step(f"{prefix}s3_joint", f"s3_joint{stages}", f"{prefix}s2_text_experts", profile))


# docs/paper.md "Training stages": base LLM -> S1 alignment -> profile the *aligned* model (only after S1 do speech
# positions carry trained inputs) -> S2.1 speech experts -> S2.2 text experts -> S3 joint
RECIPE: tuple[Step, ...] = (
    Step("base", "text_pretrain"),
    Step("s1_align", "s1_align", init="base"),
    Step("profile", init="s1_align"),
    *_staged("", "profile"),
)
_RECIPE_TRAINING = tuple(s.run for s in RECIPE if s.stage and s.run != "base")  # S1 .. S3: the recipe's compute
_AFTER_ALIGNMENT = tuple(r for r in _RECIPE_TRAINING if r != "s1_align")  # S2.1 .. S3

# the paper's comparisons, each from the same base (or the same aligned model)
BASELINES: dict[str, tuple[Step, ...]] = {
    # the contribution's ablation: the same stages with speech experts drawn at random
    "random_assignment": (Step("profile_random", init="s1_align", random_assignment=True),
                          *_staged("random_", "profile_random")),
    # the paper's score weighs the text load little at small shares (modality.SCORES): the same stages with
    # the speech experts ranked by rho_A - rho_T
    "difference_assignment": (Step("profile_difference", init="s1_align", score="difference"),
                              *_staged("difference_", "profile_difference")),
    # our departure measured: the same assignment, steps and rates, with the paper's trainable sets in S2/S3
    "paper_stages": _staged("paper_", "profile", "_paper"),
    # "PureMoE": every parameter, every task, as many steps as the recipe after the base
    "full_finetune": (Step("full_finetune", "full_finetune", init="base", steps_of=_RECIPE_TRAINING),),
    # the native case: every parameter on the speech tasks only, same steps
    "speech_finetune": (Step("speech_finetune", "speech_finetune", init="base", steps_of=_RECIPE_TRAINING),),
    # adding experts for speech instead of splitting the existing ones: from the aligned model, as many steps
    # as the recipe after S1
    "moextend": (Step("moextend", "moextend", init="s1_align", steps_of=_AFTER_ALIGNMENT),),
    # a low-rank adapter instead of the staged experts: the same start, data and steps
    "lora": (Step("lora", "lora", init="s1_align", steps_of=_AFTER_ALIGNMENT),),
    # the preference stage after the recipe: pairs sampled from the recipe's model, then DPO on them
    "dpo": (Step("dpo_pairs", init="s3_joint", pairs=True),
            Step("dpo", "dpo", init="s3_joint", preference="dpo_pairs")),
}

# the models the evaluation table compares: name -> the run that holds it
# (s1_align: the aligned model, whose ASR says what S1 taught; deeptalk_before_s3: the recipe after S2.2, to
# show what the joint stage S3 costs or gives)
MODELS: dict[str, str] = {"base": "base", "s1_align": "s1_align", "deeptalk": "s3_joint",
                          "deeptalk_before_s3": "s2_text_experts",
                          "deeptalk_dpo": "dpo",
                          "random_assignment": "random_s3_joint", "difference_assignment": "difference_s3_joint",
                          "paper_stages": "paper_s3_joint",
                          "moextend": "moextend", "lora": "lora", "full_finetune": "full_finetune",
                          "speech_finetune": "speech_finetune"}


def all_steps(baselines: tuple[str, ...] | None = None) -> tuple[Step, ...]:
    """The recipe, then the chosen baselines (all by default), in an order where every step comes after
    the steps it reads."""
    names = tuple(BASELINES) if baselines is None else baselines
    unknown = set(names) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baseline(s) {sorted(unknown)}; expected some of {list(BASELINES)}")
    return RECIPE + tuple(s for n in names for s in BASELINES[n])
