"""Three lm-eval tasks made from held-out text, for machines without the hub (`kdtrain lm-eval --tasks heldout`).

Each is a task folder the harness reads with ``--include_path``: a YAML over a local JSONL file (``dataset_path:
json``), tagged ``heldout``. From the speeches of a corpus of plays or prose (the default: the comedies, which the
quickstart's students never train on), with every choice drawn from ``seed``:

- ``heldout_choice`` (multiple choice, acc / acc_norm): a speech's opening lines, then which of four lines comes next
  (the speech's own, or three lines of other speeches);
- ``heldout_cloze`` (loglikelihood, acc / perplexity, LAMBADA's form): a speech up to a line's last word, and that
  word (without its punctuation);
- ``heldout_continue`` (generate_until, exact_match): the same contexts, the student writing until the line ends;
  its first word is matched against the line's last word (case and punctuation ignored).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ar2mdm.shared.corpus import CorpusStats, iter_documents, list_corpus_files

TAG = "heldout"
TASKS = ("heldout_choice", "heldout_cloze", "heldout_continue")
WORD = re.compile(r"^(.*\S)\s+([A-Za-z][A-Za-z']*)[^A-Za-z']*$")  # a line's text before its last word, the word


def speeches(corpus: str, split: str | None = "test") -> list[list[str]]:
    """The runs of text lines between headings, speaker names and stage directions, Markdown markup removed."""
    out, cur = [], []
    for doc in iter_documents(list_corpus_files(corpus, split), CorpusStats(), False, "text"):
        for line in doc.text.splitlines() + [""]:
            line = line.strip()
            if not line or line[0] in "#*_[<>|!" or line.isupper():
                if len(cur) >= 3:
                    out.append(cur)
                cur = []
            else:
                cur.append(line)
    return out


def make_docs(runs: list[list[str]], docs: int, seed: int) -> dict[str, list[dict]]:
    """Up to ``docs`` examples of each task from the speeches ``runs``."""
    rng = random.Random(seed)
    order = rng.sample(range(len(runs)), len(runs))
    lines = [line for run in runs for line in run]
    choice, cloze = [], []
    for i in order:
        run = runs[i]
        k = rng.randrange(2, len(run))  # the line to guess (choice) or to end (cloze); at least two before it
        context = "\n".join(run[:k]) + "\n"
        if len(choice) < docs:
            others = [o for o in rng.sample(lines, 8) if o != run[k]][:3]
            if len(others) == 3:
                gold = rng.randrange(4)
                options = others[:gold] + [run[k]] + others[gold:]
                choice.append({"context": context, "choices": options, "gold": gold})
        m = WORD.match(run[k])
        if m and len(cloze) < docs:
            cloze.append({"context": context + m.group(1), "target": m.group(2)})
        if len(choice) >= docs and len(cloze) >= docs:
            break
    return {"heldout_choice": choice, "heldout_cloze": cloze, "heldout_continue": cloze}


YAML = {
    "heldout_choice": """output_type: multiple_choice
doc_to_text: "{{context}}"
target_delimiter: ""
doc_to_choice: "{{choices}}"
doc_to_target: gold
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    "heldout_cloze": """output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{' ' + target}}"
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
    "heldout_continue": """output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 8, do_sample: false, temperature: 0.0}
filter_list:
  - name: first_word
    filter:
      - {function: regex, regex_pattern: "([A-Za-z][A-Za-z']*)", group_select: 0}
      - {function: take_first}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, ignore_punctuation: true}
""",
}


def write_tasks(corpus: str, out: Path, *, docs: int = 200, seed: int = 0, split: str | None = "test") -> Path:
    """Write the three tasks (data and YAML) into ``out``; returns it, the folder to pass as an include path."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in make_docs(speeches(corpus, split), docs, seed).items():
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        head = (
            f"task: {name}\ntag: {TAG}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
            "test_split: test\nmetadata: {version: 1.0}\n"
        )
        (out / f"{name}.yaml").write_text(head + YAML[name])
    return out
