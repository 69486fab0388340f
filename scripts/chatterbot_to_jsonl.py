"""Turn chatterbot-corpus's English YAML dialogues (BSD; `pip install --no-deps chatterbot-corpus`) into SFT rows.

    python scripts/chatterbot_to_jsonl.py OUT.jsonl [--format messages|pairs] [--data-dir DIR]

Each consecutive (turn, reply) of a dialogue becomes one row: {"messages": [user, assistant]} (rendered by the
teacher's chat template in `kdtargets build --task sft`) or {"prompt": ..., "response": ...}.
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
    a = ap.parse_args()
    if a.data_dir:
        root = Path(a.data_dir)
    else:
        spec = importlib.util.find_spec("chatterbot_corpus")
        if spec is None:
            raise SystemExit("error: chatterbot-corpus is not installed (pip install --no-deps chatterbot-corpus)")
        root = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    n = 0
    with open(a.out, "w") as out:
        for f in sorted(root.glob("*.yml")):
            for dialogue in yaml.safe_load(f.read_text()).get("conversations", []):
                turns = [str(t).strip() for t in dialogue if str(t).strip()]
                for q, r in zip(turns, turns[1:]):
                    row = ({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}
                           if a.format == "messages" else {"prompt": q, "response": r})  # fmt: skip
                    out.write(json.dumps(row) + "\n")
                    n += 1
    print(f"{a.out}: {n} rows from {root}")


if __name__ == "__main__":
    main()
