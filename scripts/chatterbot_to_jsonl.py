"""Turn chatterbot-corpus's English YAML dialogues (BSD; `pip install --no-deps chatterbot-corpus`) into SFT rows.

    python scripts/chatterbot_to_jsonl.py OUT.jsonl [--format messages|pairs] [--data-dir DIR]
        [--heldout HELDOUT.jsonl --heldout-every 10]

Each consecutive (turn, reply) of a dialogue becomes one row: {"messages": [user, assistant]} (rendered by the
teacher's chat template in `kdtargets build --task sft`) or {"prompt": ..., "response": ...}. With --heldout,
every N-th dialogue goes to that file instead, whole (no dialogue is split between the two), and a held-out row
whose (turn, reply) also occurs among the training rows is dropped: the held-out text is text no student saw.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--format", choices=["messages", "pairs"], default="messages")
    ap.add_argument("--data-dir", default=None, help="default: the installed chatterbot_corpus/data/english")
    ap.add_argument("--heldout", default=None, help="write every --heldout-every-th dialogue here instead")
    ap.add_argument("--heldout-every", type=int, default=10)
    a = ap.parse_args()
    if a.data_dir:
        root = Path(a.data_dir)
    else:
        spec = importlib.util.find_spec("chatterbot_corpus")
        if spec is None:
            raise SystemExit("error: chatterbot-corpus is not installed (pip install --no-deps chatterbot-corpus)")
        root = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    train, held = [], []
    d = 0
    for f in sorted(root.glob("*.yml")):
        for dialogue in yaml.safe_load(f.read_text()).get("conversations", []):
            turns = [str(t).strip() for t in dialogue if str(t).strip()]
            pairs = list(zip(turns, turns[1:]))
            (held if a.heldout and d % a.heldout_every == a.heldout_every - 1 else train).extend(pairs)
            d += 1
    seen = set(train)
    held = [p for p in held if p not in seen]

    def write(path: str, pairs: list) -> None:
        with open(path, "w") as out:
            for q, r in pairs:
                row = (
                    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}
                    if a.format == "messages"
                    else {"prompt": q, "response": r}
                )
                out.write(json.dumps(row) + "\n")

    write(a.out, train)
    print(f"{a.out}: {len(train)} rows from {root}")
    if a.heldout:
        write(a.heldout, held)
        print(
            f"{a.heldout}: {len(held)} held-out rows (every {a.heldout_every}th of {d} dialogues, none also in {a.out})"
        )


if __name__ == "__main__":
    main()
