"""The AR teacher on held-out chats, as a yardstick for SFT students (docs/sft.md):

    python scripts/teacher_chat.py HELDOUT.jsonl [--teacher PATH] [--seq-len 64] [--ask "What is AI?" ...]

1. Its left-to-right NLL of each response through its end of turn, given the prompt: the same tokens, rendered
   by the same code (`pack_sft`, the build's chat template and truncation), that `kdtrain eval --task sft`
   scores. The teacher's figure is exact (-log p); a student's is an upper bound that also sees the response's
   length (its EOS padding stays visible), so the teacher's is a reference for scale, not a paired baseline.
2. Its own greedy answers to the --ask prompts, rendered as `kdtrain sample --chat` renders them.
Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("heldout")
    ap.add_argument("--teacher", default=None, help="HF folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--max-rows", type=int, default=256)
    ap.add_argument("--messages-field", default="messages")
    ap.add_argument("--ask", action="append", default=[], help="a prompt to answer (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from ar2mdm.precompute.teacher import load_tokenizer, resolve_teacher
    from ar2mdm.shared.corpus import CorpusStats, iter_sft_examples, list_corpus_files
    from ar2mdm.shared.tokenizer import pack_sft, response_length, stop_ids, user_prompt_row

    folder, _ = resolve_teacher(a.teacher)
    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    stops = stop_ids(tok)
    examples = iter_sft_examples(list_corpus_files(Path(a.heldout)), CorpusStats(), a.messages_field)
    nll, count = [], []
    with torch.no_grad():
        for j, (ids, plen) in enumerate(pack_sft(examples, tok, a.seq_len)):
            if j >= a.max_rows:
                break
            n = response_length(ids, plen, stops)
            x = torch.as_tensor(ids[: plen + n], dtype=torch.long)[None]  # (1, P + n)
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)  # (P + n - 1, V): predicts x[1:]
            tgt = x[0, plen : plen + n]
            nll.append(float(-logp[plen - 1 : plen - 1 + n].gather(1, tgt[:, None]).sum()))
            count.append(n)
        answers = {}
        for q in a.ask:
            p = torch.tensor([user_prompt_row(tok, q, chat=bool(tok.chat_template))])
            out = model.generate(
                p, max_new_tokens=a.max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tok.eos_token_id
            )
            answers[q] = tok.decode([t for t in out[0, p.shape[1] :].tolist() if t not in stops])
            print(f"teacher: {q!r} -> {answers[q]!r}")
    from ar2mdm.shared.stats import ratio_se  # the standard error kdtrain eval reports

    est, tokens = torch.tensor(nll, dtype=torch.float64), torch.tensor(count, dtype=torch.float64)
    print(
        json.dumps(
            {
                "teacher_response_nll": float(est.sum() / tokens.sum()),
                "teacher_response_nll_se": ratio_se(est, tokens),
                "rows": len(est),
                "tokens": int(tokens.sum()),
                "answers": answers,
            }
        )
    )


if __name__ == "__main__":
    main()
