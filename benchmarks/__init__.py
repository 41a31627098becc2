"""Benchmarks: scripts that measure, print and save figures (``benchmarks/results/``); not tests, not in CI.

Run each as a module from the repository root: ``python -m benchmarks.<name> --help``.

    harness          what they share: machine facts, saving results, the Serve app started/stopped, timing
    moe_layer        one MoE layer, ours vs transformers' DeepseekV2Moe (forward + backward)
    decode           our continuous-batching engine vs transformers' generate
    serve_latency    time to first audio, Serve vs in-process
    serve_memory     replica and checkpoint-loading memory at a mid size
    serve_faults     a replica of each deployment SIGKILLed mid-answer
    soak             many clients on every endpoint for a while
    surfaces         async clients of every surface of the app (soak, serve_faults)
    data_pipeline    `deepomni data prepare` throughput
    codec_quality    the built-in codec's round trip per RVQ level
    train_throughput Ray Train throughput at expert-parallel size 1 and 2
    recipe_table     the paper's comparison over seeds (hours)
    assignment       what load-based expert assignment picks, against chance
    gpu_check        the device machine's run: CUDA checks (tests marked cuda) and timings at full size
"""
