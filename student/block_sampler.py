"""A block student's sampler: the completion block by block, several tokens per forward (threshold decoding).

Each forward feeds the current block against a `cache.KVCache` of the clean blocks before it (the prompt's whole blocks
and the finished ones) and predicts all its masked positions at once; every position whose top probability
exceeds ``threshold`` is revealed, and at least the most confident one (``per_forward``: instead, that many of
the most confident). The tokens are drawn from the student's distribution at ``temperature`` (0: the most
probable). A finished block is committed, its clean keys and values written to the cache, by the next block's
first forward, which carries it in front of the new block: every forward does work, so the forwards a row needs
are the forwards in which it still has masked positions (its first one also prefills the prompt).

Each row draws from its own generator, and only in the forwards where it has masked positions, so a row's sample
does not depend on the rows it was batched with. ``use_cache=False`` computes every forward over the whole row in
the training layout instead (`Student.hidden`): the same draws, the reference the cache is tested against.
"""

from __future__ import annotations

import torch

from .cache import KVCache
from .denoise import choose


def reveal_mask(conf: torch.Tensor, masked: torch.Tensor, threshold: float, per_forward: int | None) -> torch.Tensor:
    """(R, S) bool: the positions a forward reveals, among ``masked`` (R, S), by confidence ``conf`` (R, S).

    Every masked position with conf > threshold, and at least the most confident (threshold 1: that one alone);
    with ``per_forward`` n, the n most confident instead. Rows without a masked position reveal nothing."""
    score = conf.masked_fill(~masked, -1.0)  # (R, S)
    if per_forward is not None:
        n = masked.sum(1, keepdim=True).clamp(max=per_forward)  # (R, 1)
        rank = score.argsort(dim=1, descending=True).argsort(dim=1)
        return (rank < n) & masked
    best = torch.zeros_like(masked).scatter_(1, score.argmax(1, keepdim=True), True)
    return ((score > threshold) | best) & masked


@torch.no_grad()
def block_generate(
    model,
    prompt: torch.Tensor,
    length: int,
    *,
    threshold: float = 0.9,
    per_forward: int | None = None,
    temperature: float = 1.0,
    seeds: list[int] | None = None,
    stop_ids: tuple[int, ...] = (),
    use_cache: bool = True,
    cache: KVCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Complete each row of ``prompt`` (B, P) (one length) with ``length`` tokens, whole blocks at a time.

    Returns the rows (B, P + length) and the forwards each row needed (B,) long. A row whose finished blocks hold
    one of ``stop_ids`` stops there (its later positions stay masked); once every row has, sampling ends.
    ``cache``: an empty cache for the B rows (default: `KVCache.for_model`, sized for the completion).
    """
    c = model.config
    bs, mask_id = c.block_size, c.mask_id
    B, P = prompt.shape
    dev = prompt.device
    end = -(-(P + length) // bs) * bs  # whole blocks
    x = torch.cat([prompt.long(), torch.full((B, end - P), mask_id, dtype=torch.long, device=dev)], dim=1)
    generators = [torch.Generator(device=dev).manual_seed(int(s)) for s in (seeds if seeds is not None else range(B))]
    forwards = torch.zeros(B, dtype=torch.long)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    kv = (cache or KVCache.for_model(model, B, end)) if use_cache else None
    last_clean = None
    stops = torch.tensor(stop_ids, dtype=torch.long, device=dev)
    for lo in range(P // bs * bs, end, bs):
        hi = lo + bs
        while True:
            masked = (x[:, lo:hi] == mask_id) & alive[:, None]  # (B, bs)
            active = masked.any(1)  # (B,)
            if not bool(active.any()):
                break
            if kv is not None:
                commit = lo - kv.length  # the finished blocks not yet in the cache, carried in front of this one
                h, last_clean = model.cached_hidden(x[:, kv.length : hi], kv, commit=commit, last_clean=last_clean)
            else:
                h = model.hidden(x, context=x)[:, lo:hi]  # (B, bs, H): blocks before lo are all revealed
            forwards += active.cpu()
            rows = active.nonzero()[:, 0]  # (R,)
            probs = torch.softmax(model.logits(h[rows]).float(), -1)  # (R, bs, V)
            pred, _ = choose(probs, temperature, [generators[r] for r in rows.tolist()])  # (R, bs)
            show = reveal_mask(probs.max(-1).values, masked[rows], threshold, per_forward)  # (R, bs)
            x[rows, lo:hi] = torch.where(show, pred, x[rows, lo:hi])
        if stop_ids:
            alive &= ~torch.isin(x[:, P:hi], stops).any(1)
            if not bool(alive.any()):
                break
    return x[:, : P + length], forwards
