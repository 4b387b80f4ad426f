"""The generator's request router: a job goes to the replica the dispatcher chose for it.

The dispatcher knows which generator replicas are free and which LoRA set each has fused (serving/dispatcher.py),
so it names the replica in the call (`run(..., replica=TAG)`) and this router sends the call there and nowhere
else, waiting while that replica still looks busy. Serve's default router could not be told so. It routes by a
multiplexed model id, but it gives up on the matching replica as soon as that replica looks busy, which a replica
that has just returned does for a moment, and it hands whichever replica it found to the oldest pending call.
Either way, a job could land on the other replica, which then switched its LoRA set: 7 calls of 69 did, in ten
rounds of six jobs over two replicas on the CPU.

A call that names no replica (the dispatcher has not met a free one yet: a fresh or an autoscaled replica), or
names one that is gone, may go to any replica: Serve probes them and takes the least loaded.
"""
from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


class ChosenReplica(RequestRouter):
    """Without FIFOMixin, Serve gives the replica found for a call to that call, not to the oldest one waiting."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        tag = pending_request.kwargs.get("replica") if pending_request is not None else None
        named = [r for r in candidate_replicas if r.replica_id.unique_id == tag]
        return [named or candidate_replicas]
