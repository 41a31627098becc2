"""What a deployment call that failed because its replica died (or stalled) becomes (docs/serving.md "Faults").

A replica process that dies (SIGKILL, out of memory, a node lost) fails the calls it was serving: Ray raises
``ActorDiedError`` / ``ActorUnavailableError`` (both ``RayActorError``; in Serve's high-throughput mode the
gRPC channel's ``UNAVAILABLE`` is raised as ``ActorUnavailableError``), Serve ``ReplicaUnavailableError`` or
``DeploymentUnavailableError``. A replica that stops answering without dying fails nothing by itself, so
every wait on another deployment is bounded: the ingress waits at most ``stall_timeout_s`` for the next
piece of a Backbone stream (the Backbone sends a keepalive every ``KEEPALIVE_S`` while an answer waits for
rows or audio); the ingress waits ``START_TIMEOUT_S`` for the encoder and for a stream's first piece (which
may wait for a replica that Serve is starting), the Backbone as long for a Vocoder call, or only
``VOCODER_LOSS_WAIT_S`` once it has seen a Vocoder replica die (the calls then wait for its replacement).

Each such failure ends the answer with the rejection reason ``unavailable`` (503, ``Retry-After``) in its
surface's format, counted in ``deepomni_rejected_requests{reason="unavailable"}``; the server stays up and
Serve replaces the replica (its controller notices a dead one within ``health_check_period_s``,
``config.yaml``).
"""

from __future__ import annotations

import asyncio

from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from .protocol import Rejection, reject

KEEPALIVE_S = 1.0  # a Backbone stream sends something at least this often while its answer is alive
# The first answer of a call may wait for a replica: Serve holds a call while the deployment has none (one
# being replaced) or every replica is full, and a queue under overload may hold it for seconds. So a new
# answer waits this long for its encoder result or its first Backbone chunk (then stall_timeout_s between
# chunks): one that arrives while a replica is being replaced is answered by the new one.
START_TIMEOUT_S = 30.0
# After a Vocoder replica died, a Backbone's next calls wait at most this long (Serve holds them until the
# replacement is up, many seconds): the answers waiting for audio end with an error instead
VOCODER_LOSS_WAIT_S = 3.0
# Retry-After of an `unavailable` answer: Serve notices a dead replica within health_check_period_s (1 s,
# config.yaml) and starts another, which loads the model (a few seconds for the tiny preset on a CPU)
RETRY_AFTER_S = 3

# what a call to a replica that died (or went away) raises
REPLICA_GONE: tuple[type[BaseException], ...] = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
try:  # the gRPC transport's own error, where a code path does not translate it (high-throughput mode)
    import grpc

    REPLICA_GONE += (grpc.aio.AioRpcError,)
except ImportError:  # pragma: no cover - Serve's gRPC mode needs grpc; without it this error cannot happen
    pass


def cause_of(e: BaseException) -> str | None:
    """``replica_died`` (the call's replica went away), ``stalled`` (a bounded wait ran out), ``None``
    (anything else: the caller's own error handling applies)."""
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return "stalled"
    if isinstance(e, REPLICA_GONE):
        return "replica_died"
    return None


def unavailable(deployment: str, cause: str, detail: BaseException | str | None = None) -> Rejection:
    """The ``unavailable`` refusal of an answer that lost ``deployment``."""
    what = {"replica_died": "a replica of the {} deployment went away mid-answer",
            "stalled": "the {} deployment stopped answering"}.get(cause, "the {} deployment failed").format(deployment)
    if isinstance(detail, BaseException):
        what += f" ({type(detail).__name__})"
    elif detail:
        what += f" ({detail})"
    return reject("unavailable", f"{what}; the server replaces it: try again in {RETRY_AFTER_S} s", RETRY_AFTER_S)
