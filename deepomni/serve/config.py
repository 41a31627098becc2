"""The serving app's settings: :class:`AppConfig` (presets in ``deepomni/presets/serve/``).

The Ray Serve app (``serve_apps/``) reads them from its builder's ``args`` (``serve_apps/config.yaml``,
``serve run ... key=value``, ``deepomni serve``): see :meth:`AppConfig.from_args`. Replicas and autoscaling
are not here: they live in ``serve_apps/config.yaml`` only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ModelConfig, configclass, load_preset, parse_config, read_config_source

if TYPE_CHECKING:
    import torch


@configclass("serve")
class AppConfig:
    """The Serve app's settings: what it serves (checkpoint or random preset, codec, tokenizer, device) and its
    limits (rows, queue, steps, body size, context, stall timeout)."""

    checkpoint: str | None = None  # deepomni.checkpoint directory; None: random weights of `preset`
    preset: str = "tiny"  # model preset when there is no checkpoint
    codec: str | None = None  # "builtin:<dir>" | "snac:<dir>"; None: the cached default built-in codec
    tokenizer: str = "bytes"  # "bytes" | "hf:<dir>" (the tokenizer the checkpoint was trained with)
    device: str = "auto"  # "cpu" | "cuda" | "auto" (cuda when available)
    # the weights' dtype in every replica: "auto" is bfloat16 on a GPU, float32 on the CPU (whose bf16 matmuls
    # are slower); the checkpoint's tensors are cast one at a time as they are read (deepomni.checkpoint)
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    torch_threads: int = 1  # intra-op threads per CPU replica (several replicas share few cores)
    encoder_threads: int = 2  # the SpeechEncoder's (bursty, on the way to the first audio: 25 -> 13 ms a turn)
    seed: int = 0  # random init when there is no checkpoint
    max_rows: int = 32  # BatchEngine rows per Backbone replica (a speech answer takes 2, then 1)
    # sessions that may wait for rows per Backbone replica; one more is refused at once (503 overloaded,
    # Retry-After). None: max_rows (with Backbone's max_ongoing_requests 64 in config.yaml: 32 rows' worth
    # of answers + 32 waiting); 0: refuse whatever cannot start at once
    max_queued: int | None = None
    max_steps: int = 256  # default decoding steps per answer
    # prompt positions a row prefills per engine step: new sessions are prefilled together in one forward,
    # a longer prompt over several steps between the others' decoding steps (deepomni.serve.engine)
    prefill_chunk: int = 256
    # CPU replicas: decode on weights reordered once for oneDNN (deepomni.model.prepack: a step 8-20% shorter
    # in a process of its own, but slower beside other threads' torch work; as much memory again as the
    # weights; docs/serving.md "Performance"); ignored on a GPU
    prepack_weights: bool = False
    max_steps_limit: int = 1024  # the most a request may ask for
    max_body_bytes: int = 8 * 1024 * 1024  # request body / one WebSocket turn's audio
    # conversation memory: prompt positions a conversation may fill (the oldest turns go first beyond it;
    # the answer's max_steps must fit too), and conversations whose context a Backbone replica keeps cached
    max_context: int = 2048
    kept_contexts: int = 64
    # faults (docs/serving.md "Faults"): the longest the ingress waits for the next piece of a Backbone stream
    # (which sends a keepalive every second while an answer waits): beyond it the answer ends with an
    # `unavailable` error instead of hanging (a Backbone that died fails its streams at once)
    stall_timeout_s: float = 10.0
    # the API key every endpoint but /healthz, / and /static/* asks for (docs/serving.md "Authentication");
    # None: the environment's DEEPOMNI_API_KEY, read by each Ingress replica; neither: no key. Several keys
    # (rotation): comma-separated. Kept out of repr(): a config that is printed does not show it.
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> "AppConfig":
        """From the builder's ``args`` (YAML values, or strings from ``serve run ... key=value``): ``config``
        names a serve preset (``deepomni/presets/serve``) or a file, the other keys override it; an empty
        value means the preset's or the field's default (None where the field may be None)."""
        args = dict(args or {})
        d = read_config_source(args.pop("config", None) or None, cls.preset_kind)
        defaults = {f.name: f.default for f in fields(cls)}
        for k, v in args.items():
            if (v is None or v == "") and k in defaults:
                if defaults[k] is None:
                    d[k] = None
                continue  # unknown keys go on, to be refused by name
            d[k] = v
        return parse_config(cls, d)

    def __post_init__(self) -> None:
        if self.checkpoint and not (Path(self.checkpoint) / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {self.checkpoint!r} is not a DeepOmni checkpoint directory "
                                    f"(no config.json)")
        if not 1 <= self.max_steps <= self.max_steps_limit:
            raise ValueError(f"max_steps must be in [1, max_steps_limit={self.max_steps_limit}], got {self.max_steps}")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.max_queued is not None and self.max_queued < 0:
            raise ValueError(f"max_queued must be >= 0 (or null: max_rows), got {self.max_queued}")

    def queue_limit(self) -> int:
        """Sessions that may wait for rows in one Backbone replica (``max_queued``, default ``max_rows``)."""
        return self.max_rows if self.max_queued is None else self.max_queued

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def setup_torch(self, threads: int | None = None) -> None:
        import torch

        if self.torch_device().type == "cpu":
            torch.set_num_threads(threads or self.torch_threads)

    def model_config(self) -> ModelConfig:
        if self.checkpoint:
            return ModelConfig.from_dict(json.loads((Path(self.checkpoint) / "config.json").read_text()))
        return load_preset(self.preset)
