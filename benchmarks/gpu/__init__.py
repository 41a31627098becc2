"""The GPU run's parts (``python -m benchmarks.gpu_check`` is the entry point; its docstring has the device
command): ``common`` (sizes, timing, the error metric and tolerances the CUDA tests share), ``checks`` (runs
``tests/test_cuda_*.py``: pytest in this process, else a small direct runner), ``moe_layer``, ``serving`` and
``training`` (one timed section each). Nothing here may import Ray or DeepSpeed: the device image has neither.
"""
