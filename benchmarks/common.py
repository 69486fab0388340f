"""What the precompute benchmarks share: the build's own rows and masks, random-initialised teachers of a shape
saved as folders, and the copy bandwidth of a GPU.

Throughput does not depend on the weights' values, so a random teacher of a shape stands in for the real one. The
config and tokenizer are the default teacher's where it loads (its package and ``gguf`` installed); on a machine
without them (no ``gguf``, no network) a Llama config of the same sizes with the default teacher's vocabulary size
(49,152) and a character tokenizer (tests/tiny.py): the logits cost the same.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

SHAPES = {  # hidden, layers, heads, KV heads, intermediate (Llama-style)
    "135m": (576, 30, 9, 3, 1536),
    "2l": (576, 2, 9, 3, 1536),  # the 135M shape's first two layers: cheap targets for the trainer's benchmarks
    "1.7b": (2048, 24, 32, 32, 8192),
    "8b": (4096, 32, 32, 8, 14336),
}
VOCAB = 49152  # SmolLM2's


def random_teacher(shape: str, out: Path, dtype: str) -> Path:
    """A teacher folder of ``shape`` with random weights in ``dtype``: config, tokenizer, safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    h, n, a, kv, inter = SHAPES[shape]
    sizes = dict(
        hidden_size=h,
        num_hidden_layers=n,
        num_attention_heads=a,
        num_key_value_heads=kv,
        intermediate_size=inter,
        head_dim=h // a,
    )
    try:
        from ar2mdm.precompute.teacher import load_tokenizer, resolve_teacher

        folder, _ = resolve_teacher(None)
        cfg = AutoConfig.from_pretrained(folder)
        tok = load_tokenizer(folder)
    except Exception as e:  # no default teacher here: the same sizes and vocabulary, a character tokenizer
        from tests.tiny import char_tokenizer

        print(f"(default teacher unavailable: {str(e).splitlines()[0][:80]}; a character tokenizer)", file=sys.stderr)
        cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1)
        tok = char_tokenizer()
    cfg.update(sizes)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def benchmark_rows(cfg, folder: Path) -> tuple[list, list]:
    """(ids, masks): ``cfg.max_sequences`` rows of the default corpus as the build makes them, with the build's own
    masks (t ~ U(0, 1)), tokenized by the teacher in ``folder``."""
    import numpy as np

    from ar2mdm.precompute.targets import draw_row_masks
    from ar2mdm.precompute.teacher import load_tokenizer
    from ar2mdm.shared.corpus import list_corpus_files
    from ar2mdm.shared.defaults import default_corpus

    ids, plen = rank_sequences(cfg, list_corpus_files(default_corpus()), load_tokenizer(folder))
    return ids, draw_row_masks(cfg, np.arange(len(ids)), plen).masks


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * 10 * a.numel() / (time.perf_counter() - t0)


def rank_sequences(cfg, files: list, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """All of this rank's packed rows in memory: (ids (N, L) int32, prompt_len (N,) int32) (the build streams
    them)."""
    from ar2mdm.precompute.plan import no_rows_error, rank_stream, warn_skipped
    from ar2mdm.shared.corpus import CorpusStats
    from ar2mdm.shared.tokenizer import PackStats

    stats, pstats = CorpusStats(), PackStats()
    pairs = list(rank_stream(cfg, files, tokenizer, stats, pstats))
    warn_skipped(stats)
    if not pairs:
        raise no_rows_error(cfg, stats, pstats)
    return np.stack([p[0] for p in pairs]).astype(np.int32), np.asarray([p[1] for p in pairs], np.int32)


class TokenCounter:
    """Counts the input tokens of every forward of a transformers model's base model (the teacher tokens a
    computation spent)."""

    def __init__(self, model):
        self.tokens = 0
        model.base_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += int(ids.numel()) if ids is not None else 0
