"""`kdtargets build --states FILE`: teacher targets on the states a student visited while it sampled.

The rows are the file's states (schemas/states.py), one row each, and their masks are the states' own, never
drawn. The modes are the usual ones: mc completes the masked positions from the visible tokens alone (so its
weights correct for visible tokens the teacher finds unlikely, which a student's own tokens often are); topk and
fim condition on the whole row, whose masked positions hold the student's own completion. Such rows have no
ground truth at their masked positions, which the manifest says (``states``): the trainer computes the KD term
alone on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.targets import RowMasks, TargetPlan
from ar2mdm.schemas import SchemaError
from ar2mdm.schemas.states import StateRecord, read_states
from ar2mdm.shared.digest import file_sha256
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.split import share_of


@dataclass
class StatesInput:
    """This rank's states, and what the manifest says of where they came from."""

    records: list[StateRecord]  # this rank's share
    corpus: dict  # the manifest's corpus entry: the states file
    provenance: dict  # the manifest's `states`: run, checkpoint step, sampler, how many


def load_states(cfg: BuildConfig, tokenizer_sha256: str) -> StatesInput:
    """The states of ``cfg.states``, checked against the build's settings and the teacher's tokenizer."""
    try:
        records = read_states(cfg.states)
    except SchemaError as e:
        raise UserError(str(e)) from None
    src, L = records[0].source, len(records[0].input_ids)
    if src.tokenizer_sha256 != tokenizer_sha256:
        raise UserError(
            f"--states {cfg.states}: states from another tokenizer ({src.tokenizer_sha256[:12]}) than the teacher's "
            f"({tokenizer_sha256[:12]}); sample them from a student trained on this teacher's shards"
        )
    if L != cfg.seq_len:
        raise UserError(f"--states {cfg.states}: its rows are {L} tokens; pass --seq-len {L}")
    chat = any(r.prompt_len > 0 for r in records)
    if chat != (cfg.task == "sft"):
        raise UserError(
            f"--states {cfg.states}: states of a {'chat' if chat else 'pretrain'} student; pass --task "
            f"{'sft' if chat else 'pretrain'}"
        )
    sha = file_sha256(cfg.states)
    provenance = {"run": src.run, "step": src.step, "sampler": src.sampler, "rows": len(records), "sha256": sha}
    corpus = {"path": str(cfg.states), "fingerprint": sha, "files": 1}
    return StatesInput(share_of(records, cfg.rank, cfg.world_size).files, corpus, provenance)


def states_plan(cfg: BuildConfig, records: list[StateRecord]) -> TargetPlan:
    """The plan of some states: one row each, its mask the state's own, targets at its masked positions."""
    ids = np.asarray([r.input_ids for r in records], np.int32)
    plen = np.asarray([r.prompt_len for r in records], np.int32)
    masks = [np.asarray(r.mask_positions, np.int32) for r in records]
    maskable = [cfg.seq_len - max(1, int(p)) for p in plen]
    t = np.asarray([len(m) / n for m, n in zip(masks, maskable)], np.float32)  # the share of maskable still masked
    keys = [r.example_id for r in records]
    rows = RowMasks(example_ids=keys, t=t.tolist(), masks=masks, src=list(range(len(records))), block_t=None)
    mc = cfg.mode == "mc"
    return TargetPlan(
        ids=ids,
        plen=plen,
        seq_keys=keys,
        rows=rows,
        row_positions=masks,
        mask_dependent=mc,
        seq_positions=None if mc else masks,
    )
