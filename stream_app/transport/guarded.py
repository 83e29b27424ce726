"""The offset guard (stream_app/transport/offsets.py) wired into Faust's consumer: every
batch passes `in_order`, commits are held at holes and rewinds, and seeks go through one
place (docs/design.md, "Contiguous offsets", "Poison is isolated"). These reach into
Faust's private consumer bookkeeping, each named where it is used."""
from __future__ import annotations

import logging

import faust
from faust.types import TP

from stream_app import metrics
from stream_app.transport.offsets import OffsetGuard

log = logging.getLogger(__name__)


async def in_order(app: faust.App, guard: OffsetGuard, batch: list[faust.EventT]) -> list[faust.EventT]:
    """The events of `batch` that continue their partition without a hole (see offsets.py);
    for a hole, seek back so the missing messages are read again, in order."""
    if guard.generation != app.consumer_generation_id:
        guard.new_generation(app.consumer_generation_id, committed_offsets(app, batch[0].message.topic))
    kept = []
    for event in batch:
        message = event.message
        ok, seek_to = guard.admit(message.partition, message.offset)
        if seek_to is not None:
            metrics.OFFSET_HOLES.labels(str(message.partition)).inc()
            log.warning("partition %s: offsets %s..%s never reached the agent; reading them again",
                        message.partition, seek_to, message.offset - 1)
            unmark_acked(app, message.tp, seek_to, message.offset)
            await seek(app, message.tp, seek_to)
        if ok:
            kept.append(event)
    return kept


def committed_offsets(app: faust.App, topic: str) -> dict[int, int]:
    """Committed offsets of `topic`'s assigned partitions, as Faust's post-rebalance seek
    found them (Consumer._committed_offset, Faust's own record; partitions never
    committed are absent)."""
    assigned = app.consumer.assignment()
    return {tp.partition: offset for tp, offset in app.consumer._committed_offset.items()
            if tp.topic == topic and tp in assigned and offset}


def hold_commits_at_holes(app: faust.App, guard: OffsetGuard) -> None:
    """Never commit a partition past an open hole. Faust acks messages it skips and the
    ones the guard drops, so its next commit could pass the hole, and a crash before the
    re-read would lose it (`bench chaos` lost 9-11 users that way). Installed once, when
    the agent starts, on Faust's own offset filter (Consumer._filter_committable_offsets,
    a private hook)."""
    consumer = app.consumer
    if getattr(consumer, "_streamrec_holds", False):
        return
    committable = consumer._filter_committable_offsets

    def clamped(tps):
        offsets = committable(tps)
        for tp in list(offsets):
            hold = guard.held.get(tp.partition)
            if hold is not None and offsets[tp] > hold[0]:
                committed = consumer._committed_offset.get(tp)
                if committed is not None and committed >= hold[0]:
                    del offsets[tp]
                else:
                    offsets[tp] = hold[0]
        return offsets

    consumer._filter_committable_offsets = clamped
    consumer._streamrec_holds = True


def unmark_acked(app: faust.App, tp: TP, start: int, end: int) -> None:
    """Faust's fetch loop records a jump in delivered offsets as a "gap" that counts as
    acked, so it would commit past the hole and a crash before the re-read would lose
    it (seen in `bench chaos`: 11 users). Remove [start, end) from that record: nothing
    past `start` is committed until the re-read acks it. Consumer._gap is Faust's own."""
    gap = getattr(app.consumer, "_gap", {}).get(tp)
    if gap:
        gap.chop(start, end)


async def seek(app: faust.App, tp: TP, offset: int) -> None:
    try:
        await app.consumer.seek(tp, offset)
    except Exception as exc:  # revoked meanwhile: its new owner starts from the committed offset
        log.warning("seek %s to %s failed: %s", tp, offset, exc)
