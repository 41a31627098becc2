"""DeepOmni checkpoints as Hugging Face model directories, and evaluation through lm-evaluation-harness
(docs/hf.md): the application-level half of the HF bridge, above the model (``deepomni.model.hf`` holds
the weight and config mapping and the tokenizer; this package reads checkpoints and prepared data).

    export    export_checkpoint / export_hf_model: weights + config + tokenizer + generation_config.json
    lm_eval   our held-out text QA items as a local lm-evaluation-harness task
    cli       ``deepomni export-hf``

``from deepomni.hf.export import export_checkpoint``. Nothing is imported here, so ``deepomni --help``
(which reads ``cli``) does not pull in torch.
"""
