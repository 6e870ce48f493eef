"""What every record source does to a page of records before the processor sees it.

Expand KPL aggregates (dropping sub-records outside the shard's hash range), drop what is at or
before the checkpoint a source resumed from (sub-records included: a restart resumes inside an
aggregate), stamp the stream and shard, and remember the last position handed out.
"""

from __future__ import annotations

from msgspec.structs import force_setattr

from kinesis_butler.models import ExtendedSequenceNumber, Record
from kinesis_butler.retrieval.kpl import deaggregate

__all__ = ["Delivery"]


class Delivery:
    """Per-source state of :meth:`prepare`."""

    __slots__ = ("hash_range", "last", "shard_id", "skip_through", "stream")

    def __init__(self, stream: str, shard_id: str, hash_range: tuple[int, int] | None) -> None:
        self.stream = stream
        self.shard_id = shard_id
        self.hash_range = hash_range
        self.skip_through: tuple[int, int] | None = None
        self.last: ExtendedSequenceNumber | None = None

    def resume_after(self, position: ExtendedSequenceNumber) -> None:
        """Records at or before ``position`` (a real sequence number) are not delivered again."""
        self.skip_through = (int(position.sequence), position.sub_sequence)

    def prepare(self, records: list[Record]) -> list[Record]:
        if not records:
            return records
        records = deaggregate(records, hash_range=self.hash_range, shard_id=self.shard_id)
        if self.skip_through is not None and records:
            skip = self.skip_through
            start = 0
            while (
                start < len(records)
                and (
                    int(records[start].sequence_number),
                    records[start].sub_sequence_number,
                )
                <= skip
            ):
                start += 1
            if start < len(records):
                self.skip_through = None
            records = records[start:]
        if not records:
            return records
        stream, shard_id = self.stream, self.shard_id
        for record in records:
            force_setattr(record, "shard_id", shard_id)
            force_setattr(record, "stream", stream)
        last = records[-1]
        self.last = ExtendedSequenceNumber(last.sequence_number, last.sub_sequence_number)
        return records
