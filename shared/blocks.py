"""Blocks of a row: what both stages agree on when a row of L tokens is cut into blocks of B (docs/design.md §6);
the rules of attention and position live with the student (`ar2mdm.student.blocks`).

A block student attends causally across blocks and bidirectionally inside one; its targets are conditioned on the
clean blocks before a position's block and on that block alone. ``block_size`` None (or L) is one block: the row,
and a full-attention student.
"""

from __future__ import annotations

from ar2mdm.shared.errors import UserError
from ar2mdm.student.blocks import block_of


def check_block_size(block_size: int | None, seq_len: int, where: str = "--block-size") -> None:
    """Refuse a block size the rows cannot be cut into, in one line."""
    if block_size is None:
        return
    if block_size < 1:
        raise UserError(f"{where} {block_size}: a block holds at least one token")
    if seq_len % block_size:
        raise UserError(
            f"{where} {block_size} does not divide the row length {seq_len}: every block must be whole "
            f"(e.g. {', '.join(str(b) for b in divisors(seq_len)[-4:])})"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def normal_block_size(block_size: int | None, seq_len: int) -> int | None:
    """None for one block per row (no block size, or the row length itself), else the block size."""
    return None if block_size is None or block_size >= seq_len else block_size


def num_blocks(seq_len: int, block_size: int | None) -> int:
    """The blocks of a row of whole blocks (one without a block size)."""
    return 1 if block_size is None else seq_len // block_size


def block_end(i: int, seq_len: int, block_size: int | None) -> int:
    """The last position of the block that holds position i (the row's last without blocks)."""
    return seq_len - 1 if block_size is None else min(seq_len, (block_of(i, block_size) + 1) * block_size) - 1


def right_context(i: int, seq_len: int, window: int | None, block_size: int | None) -> int:
    """How many tokens to the right of position i its target is conditioned on: through the end of i's block (the
    row's end without blocks), at most ``window`` (0: none, the teacher's next-token distribution given the left
    context alone). The one rule of topk's rescoring windows, fim's suffixes and mc's full-conditional scores."""
    n = block_end(i, seq_len, block_size) - i
    return n if window is None else min(n, window)


def describe(block_size: int | None) -> str:
    return "full-attention" if block_size is None else f"block-{block_size}"


def check_block_fit(student: int | None, shards: int | None, who: str) -> None:
    """Refuse, in one line, a student of another block size than the shards' targets were built for."""
    if student != shards:
        raise UserError(
            f"{who} is a {describe(student)} student and the shards hold targets for a {describe(shards)} student; "
            f"train it on shards built with {'no --block-size' if student is None else f'--block-size {student}'}"
        )
