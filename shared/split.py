"""The one rule by which both stages split work among consumers (ranks, DataLoader workers), as datatrove does.

With at least as many files as consumers, consumer c reads ``files[c::n]`` alone and keeps every record of
them: no consumer reads another's bytes. With fewer files (or files that cannot be split, a dataset), every
consumer reads every file and keeps records ``[c::n]``. Either way each record goes to exactly one consumer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Share:
    files: list  # the files this consumer reads, in order
    consumer: int
    consumers: int
    by_record: bool  # every consumer reads these files: keep records [consumer::consumers]

    def keeps(self, j: int) -> bool:
        """Whether the j-th record read (counted over ``files`` in order) is this consumer's."""
        return not self.by_record or j % self.consumers == self.consumer


def share_of(files: list, consumer: int, consumers: int, by_file: bool = True) -> Share:
    """Consumer ``consumer``'s share of ``files``; ``by_file`` False: the files cannot be split (a dataset)."""
    if by_file and consumers > 1 and len(files) >= consumers:
        return Share(list(files[consumer::consumers]), consumer, consumers, False)
    return Share(list(files), consumer, consumers, consumers > 1)
