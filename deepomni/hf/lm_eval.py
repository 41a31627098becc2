"""Our held-out text QA items as a local lm-evaluation-harness task (``docs/hf.md``).

:func:`write_lm_eval_task` writes ``<name>.jsonl`` (one ``{"prompt", "answer"}`` per item) and
``<name>.yaml`` (``dataset_path: json`` over that file, ``output_type: generate_until``, exact match) in a
folder to pass as ``--include_path``. Each prompt is our prompt grammar written with the exported
tokenizer's special-token names (``deepomni.model.hf.tokenizer``), so the harness, which encodes the
prompt without adding special tokens, feeds the exported model exactly the ids
:func:`deepomni.train.evaluate.build_prompt` gives ours for the typed question.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..model.hf.tokenizer import BOS, EOS

TASK = "deepomni_text_qa"


def text_prompt(question: str, instruction: str | None = None) -> str:
    """``<|bos|>[<|system|>instruction]<|user|>question<|assistant|>``: :func:`~deepomni.model.prompt.user_turn`
    as text."""
    system = f"<|system|>{instruction}" if instruction else ""
    return f"{BOS}{system}<|user|>{question}<|assistant|>"


def task_yaml(name: str, data_file: Path, max_gen_toks: int) -> str:
    """The task config: a JSON-lines dataset, greedy generation until ``<|eot|>``, exact match as our
    ``text_qa_accuracy`` scores it (case, punctuation and surrounding whitespace ignored)."""
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [EOS], "do_sample": False, "max_gen_toks": max_gen_toks},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": True,
                         "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
        "metadata": {"version": 1.0},
    }
    import yaml

    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def write_lm_eval_task(items: Iterable[Mapping[str, str]], out_dir: str | os.PathLike, name: str = TASK,
                       max_gen_toks: int = 64) -> Path:
    """Write ``items`` (``{"prompt", "answer"}``) as the task ``name`` under ``out_dir``; returns the YAML path.
    The data file path in the YAML is absolute (``datasets`` resolves it from the working directory)."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / f"{name}.jsonl"
    n = 0
    with data_file.open("w") as f:
        for item in items:
            f.write(json.dumps({"prompt": item["prompt"], "answer": item["answer"]}, ensure_ascii=False) + "\n")
            n += 1
    if n == 0:
        raise ValueError(f"no items for the lm-evaluation-harness task {name!r}")
    yaml_path = out / f"{name}.yaml"
    yaml_path.write_text(task_yaml(name, data_file, max_gen_toks))
    return yaml_path


def text_qa_items(rows: Iterable[Mapping[str, str]]) -> Iterable[dict[str, str]]:
    """The ``text_qa`` rows of our data as task items, prompted as our evaluation prompts them."""
    from ..data.sequences import INSTRUCTIONS

    for row in rows:
        if row["task"] == "text_qa":
            yield {"prompt": text_prompt(row["question_text"], INSTRUCTIONS["text_qa"]), "answer": row["answer_text"]}


def write_text_qa_task(data: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: str = "bytes",
                       split: str = "test", max_items: int | None = None, name: str = TASK) -> Path:
    """:func:`write_lm_eval_task` of the ``text_qa`` items of a prepared data directory's ``split``.
    ``tokenizer`` only bounds the answers' length (``max_gen_toks``: 1.5 x the longest, as our evaluation)."""
    import itertools
    import math

    from ..text import load_tokenizer
    from ..data.tokenized import iter_rows

    rows = iter_rows(data, split, columns=["task", "question_text", "answer_text"])
    items = list(itertools.islice(text_qa_items(rows), max_items))
    tok = load_tokenizer(tokenizer)
    longest = max((len(tok.encode(i["answer"])) for i in items), default=0)
    return write_lm_eval_task(items, out_dir, name, max_gen_toks=math.ceil(1.5 * (longest + 1)) + 8)


__all__ = ["TASK", "task_yaml", "text_prompt", "text_qa_items", "write_lm_eval_task", "write_text_qa_task"]
