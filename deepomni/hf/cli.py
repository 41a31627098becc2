"""``deepomni export-hf --checkpoint DIR --out DIR``: a DeepOmni checkpoint to a transformers model directory
(weights, config, tokenizer, generation config; ``deepomni.hf.export``), and optionally the held-out
text QA items as an lm-evaluation-harness task beside it (``deepomni.hf.lm_eval``)."""

from __future__ import annotations

import argparse

DTYPES = ("float32", "bfloat16", "float16")


def cmd_export_hf(args: argparse.Namespace) -> int:
    import torch

    from .export import export_checkpoint, recorded_tokenizer

    tokenizer = args.tokenizer or recorded_tokenizer(args.checkpoint) or "bytes"
    out = export_checkpoint(args.checkpoint, args.out, tokenizer,
                            dtype=getattr(torch, args.dtype) if args.dtype else None,
                            expert_layout=args.expert_layout, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"[export-hf] wrote {out} (tokenizer {tokenizer}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    if args.lm_eval_data:
        from .lm_eval import write_text_qa_task

        yaml_path = write_text_qa_task(args.lm_eval_data, args.lm_eval_tasks or out / "lm_eval_tasks", tokenizer,
                                       split=args.lm_eval_split, max_items=args.lm_eval_items)
        print(f"[export-hf] lm-evaluation-harness task {yaml_path.stem} in {yaml_path.parent} (docs/hf.md)")
    return 0


def add_export_hf_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export-hf`` on ``subparsers``; it sets ``fn`` to :func:`cmd_export_hf`."""
    p = subparsers.add_parser(
        "export-hf", help="export a checkpoint as a transformers model directory (docs/hf.md)",
        description="Write the text channel of a DeepOmni checkpoint as a DeepseekV2ForCausalLM directory with "
                    "its tokenizer and generation_config.json: transformers' Auto classes and "
                    "lm-evaluation-harness (--model hf) load it offline.")
    p.add_argument("--checkpoint", required=True, help="DeepOmni checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--out", required=True, help="output directory (created; old shards in it are replaced)")
    p.add_argument("--tokenizer", help="bytes or hf:<dir>, the tokenizer the model was trained with "
                                       "(default: the one saved in the checkpoint directory, else bytes)")
    p.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: the checkpoint's; the router stays fp32)")
    p.add_argument("--expert-layout", choices=("per_expert", "stacked"), default="per_expert",
                   help="routed experts one tensor per expert (the hub layout) or stacked")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (GiB)")
    p.add_argument("--lm-eval-data", help="a prepared data directory: also write its held-out text QA items as an "
                                          "lm-evaluation-harness task")
    p.add_argument("--lm-eval-tasks", help="where the task goes (default: <out>/lm_eval_tasks)")
    p.add_argument("--lm-eval-split", default="test", help="split of --lm-eval-data")
    p.add_argument("--lm-eval-items", type=int, help="at most this many items")
    p.set_defaults(fn=cmd_export_hf)
    return p


__all__ = ["add_export_hf_command", "cmd_export_hf"]
