"""`kdtrain fill`: the student's top predictions for each [MASK] of a sentence, all predicted at once."""

from __future__ import annotations

from pathlib import Path

import torch

from ar2mdm.shared.errors import UserError
from ar2mdm.train.checkpoint import load_student, run_tokenizer
from ar2mdm.train.config import FillConfig
from ar2mdm.train.device import resolve_device
from ar2mdm.train.sample import chat_template_for, prompt_row

MASK_MARK = "[MASK]"


@torch.no_grad()
def fill(cfg: FillConfig) -> list[list[tuple[str, float]]]:
    """The student's top predictions for each ``[MASK]`` in ``text`` (one token each), all predicted at once.

    A readable look at what a small student has learnt, where free generation is still mostly newlines.
    A space before a mask is left to the masked token (BPE vocabularies attach it to the next word).
    ``chat``: ``text`` is the answer to the user turn ``prompt``, rendered as the SFT build renders a chat,
    and it ends the turn (the end-of-turn token follows it). A block student reads the blocks before each mask's
    own as the text has them (a mask there stays a mask).
    """
    from ar2mdm.shared.tokenizer import end_of_turn_id, special_ids

    cfg.check()
    text, chat, prompt = cfg.text, cfg.chat, cfg.prompt
    if MASK_MARK not in text:
        raise UserError(f"--text needs at least one {MASK_MARK}")
    device = resolve_device(cfg.device)
    model, meta = load_student(Path(cfg.run), device)
    tok = run_tokenizer(Path(cfg.run))
    bos, _ = special_ids(tok)
    pieces = text.split(MASK_MARK)
    ids = prompt_row(meta, tok, prompt, True) if chat else [bos]
    for j, piece in enumerate(pieces):
        ids += tok(piece.rstrip(" ") if j < len(pieces) - 1 else piece, add_special_tokens=False)["input_ids"]
        if j < len(pieces) - 1:
            ids.append(model.config.mask_id)
    if chat:  # the answer ends its turn, as in the rows the student trained on
        ids.append(end_of_turn_id(tok, chat_template_for(meta, tok)))
    if len(ids) > model.config.max_positions:
        raise UserError(f"--text is {len(ids)} tokens, the student has {model.config.max_positions} positions")
    x = torch.tensor([ids], device=device)
    masked = x == model.config.mask_id
    probs = torch.softmax(model(x, masked, context=x).float(), -1).cpu()  # (M, V)
    val, idx = probs.topk(cfg.top, -1)
    return [[(tok.decode([int(i)]), float(v)) for v, i in zip(vs, ix)] for vs, ix in zip(val, idx)]
