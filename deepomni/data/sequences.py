"""Training sequences: one raw item -> channel tokens ``[L, C]`` and labels ``[L, C]`` (docs/paper.md "Tokens
and channels"). Shared by the preprocessing pipeline and the trainer; decoding uses the same prompt
(:func:`deepomni.model.prompt.user_turn`).

    prompt   : BOS SYSTEM <task instruction> USER <question text | BOA AUDIO*n EOA> ASSISTANT
    response : text channel   answer ids, EOT, then PAD (label IGNORE) while the speech goes on
               codec channel i PAD for i+1 steps (IGNORE), the answer's codes, EOS, PAD (IGNORE)

Loss masks per task (which channels carry labels in the response; the prompt is never a target):

    asr        speech -> text                   text channel only
    text_qa    text   -> text                   text channel only
    tts        text   -> text + speech          text channel and every codec channel
    spoken_qa  speech | text -> text + speech   text channel and every codec channel

``labels[t]`` is the target of position ``t`` (the token at ``t + 1``), so ``model(tokens, labels_BLC=labels)``
trains next-token prediction directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.channels import IGNORE, CodecSpecial, TextSpecial, VocabLayout, delay_codes
from ..model.prompt import user_turn
from .schema import SPEECH_OUT_TASKS, TASKS

# the instruction on the SYSTEM slot tells the model which task it is doing
INSTRUCTIONS = {
    "asr": "Transcribe the speech.",
    "tts": "Read the text aloud.",
    "spoken_qa": "Answer the question, in text and speech.",
    "text_qa": "Answer the question.",
}


@dataclass
class Sequence:
    tokens_LC: torch.Tensor  # int64 channel-local ids
    labels_LC: torch.Tensor  # int64, IGNORE where nothing is learned
    audio_positions: int  # AUDIO placeholders in the prompt (0 for text input)
    prompt_length: int


def build_sequence(
    layout: VocabLayout,
    task: str,
    answer_ids: list[int],
    instruction_ids: list[int],
    question_ids: list[int] | None = None,
    audio_positions: int | None = None,
    answer_codes_KF: torch.Tensor | None = None,
) -> Sequence:
    """One training sequence. Give the question as ``question_ids`` (text input) or as ``audio_positions``
    (speech input: the number of projected speech frames); ``answer_codes_KF`` for speech-out tasks."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    K = layout.num_codec_channels
    speech_out = task in SPEECH_OUT_TASKS and K > 0
    if speech_out:
        if answer_codes_KF is None:
            raise ValueError(f"task {task!r} needs the answer's codec codes")
        if answer_codes_KF.dim() != 2 or answer_codes_KF.shape[0] != K:
            raise ValueError(f"answer codes must be [K={K}, frames], got {tuple(answer_codes_KF.shape)}")
        if (answer_codes_KF < 0).any() or (answer_codes_KF >= layout.codebook_size).any():
            raise ValueError(f"answer codes must lie in [0, {layout.codebook_size})")

    prompt = user_turn(layout, text_ids=question_ids, audio_positions=audio_positions, system_ids=instruction_ids)
    text = list(answer_ids) + [layout.text(TextSpecial.EOT)]
    c_pad, t_pad = layout.codec(CodecSpecial.PAD), layout.text(TextSpecial.PAD)
    if speech_out:
        delayed_KR = delay_codes(answer_codes_KF.long(), pad=c_pad, eos=layout.codec(CodecSpecial.EOS))
        R = max(len(text), delayed_KR.shape[1])
    else:
        R = len(text)
    resp = torch.full((R, layout.num_channels), c_pad, dtype=torch.long)
    resp[:, 0] = t_pad
    resp[: len(text), 0] = torch.tensor(text)
    target = torch.zeros(R, layout.num_channels, dtype=torch.bool)
    target[: len(text), 0] = True
    if speech_out:
        Fr = answer_codes_KF.shape[1]
        resp[: delayed_KR.shape[1], 1:] = delayed_KR.T
        for i in range(K):  # codes and the EOS of channel i: steps i+1 .. i+1+F
            target[i + 1 : i + 2 + Fr, 1 + i] = True

    full = torch.cat([prompt, resp])
    is_target = torch.cat([torch.zeros_like(prompt, dtype=torch.bool), target])
    labels = torch.where(is_target[1:], full[1:], torch.full_like(full[1:], IGNORE))
    return Sequence(full[:-1], labels, audio_positions or 0, prompt.shape[0])
