"""`kdtrain lm-eval`: a student and its teacher on the same LM Evaluation Harness tasks, one table.

The student runs as the harness model `harness.StudentLM`; the teacher through the harness's own ``hf`` model
(the folder ar2mdm converts a GGUF teacher into, with BOS first as the student's rows have it). ``heldout`` names
the three offline tasks of `tasks` (written into a folder the harness includes); any other name is the harness's
own task or tag. The table gives each task's metrics for both, with the harness's standard errors, and what the
student kept: student / teacher where higher is better, teacher / student where lower is (perplexity).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ar2mdm.shared.errors import UserError
from ar2mdm.train.config import LmEvalConfig


def harness():
    """The lm_eval package, or a one-line refusal where the eval extra is not installed."""
    try:
        import lm_eval

        from ar2mdm.train import harness  # noqa: F401  (registers the ar2mdm model)
    except ImportError:
        raise UserError("kdtrain lm-eval needs the LM Evaluation Harness: pip install 'ar2mdm[eval]'") from None
    return lm_eval


def task_manager(cfg: LmEvalConfig, tasks: list[str], folder: Path):
    from lm_eval.tasks import TaskManager

    from ar2mdm.shared.defaults import default_corpus
    from ar2mdm.train.tasks import TAG, TASKS, write_tasks

    include = None
    if TAG in tasks or any(t in TASKS for t in tasks):
        include = str(write_tasks(cfg.heldout or str(default_corpus("comedies")), folder, docs=cfg.docs, seed=cfg.seed))
    manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: {', '.join(unknown)} unknown to lm-eval (e.g. heldout, hellaswag, arc_easy)")
    return manager


def evaluate_model(lm_eval, model, cfg: LmEvalConfig, tasks: list[str], manager) -> dict:
    try:
        res = run_tasks(lm_eval, model, cfg, tasks, manager)
    except (ConnectionError, OSError) as e:  # a hub task where neither the hub nor its cache is reachable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--tasks {','.join(tasks)}: a task's data could not be loaded ({first}); run where the hub or its cache "
            "is reachable, or use --tasks heldout"
        ) from None
    return {"results": res["results"], "higher_is_better": res.get("higher_is_better", {})}


def run_tasks(lm_eval, model, cfg: LmEvalConfig, tasks: list[str], manager) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        tasks=tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=manager,
        log_samples=False,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )


def table(student: dict, teacher: dict | None) -> list[dict]:
    """One row per (task, metric): both values, their standard errors, and what the student kept. The harness's
    keys are ``metric,filter`` and ``metric_stderr,filter``."""
    rows = []
    for task, metrics in sorted(student["results"].items()):
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not isinstance(value, (int, float)) or metric.endswith("_stderr") or not filt:
                continue
            se = f"{metric}_stderr,{filt}"
            row = {"task": task, "metric": metric, "filter": filt, "student": value, "student_se": metrics.get(se)}
            if teacher is not None:
                t = teacher["results"].get(task, {})
                row["teacher"], row["teacher_se"] = t.get(key), t.get(se)
                higher = student["higher_is_better"].get(task, {}).get(metric, True)
                if row["teacher"] and value:
                    row["kept"] = value / row["teacher"] if higher else row["teacher"] / value
            rows.append(row)
    return rows


def run_lm_eval(cfg: LmEvalConfig) -> dict:
    """Evaluate the student (and the teacher, unless ``teacher`` is none) on ``tasks``; returns the table and the
    harness's results."""
    cfg.check()
    lm_eval = harness()
    from ar2mdm.train.harness import StudentLM

    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    extra = dict(kv.split("=", 1) for kv in cfg.model_args.split(",") if kv.strip())
    with tempfile.TemporaryDirectory(prefix="ar2mdm-tasks-") as folder:
        manager = task_manager(cfg, tasks, Path(folder))
        student_lm = StudentLM(pretrained=cfg.run, device=cfg.device, seed=cfg.seed, **extra)
        student = evaluate_model(lm_eval, student_lm, cfg, tasks, manager)
        if student_lm.forwards:  # generation tasks: the tokens the student's sampler wrote per forward
            student["tokens_per_forward"] = student_lm.generated / student_lm.forwards
        del student_lm
        teacher = None
        if cfg.teacher != "none":
            from lm_eval.models.huggingface import HFLM

            from ar2mdm.shared.hfmodel import resolve_model
            from ar2mdm.train.device import resolve_device

            folder_t = resolve_model(cfg.teacher)[0]
            hf = HFLM(pretrained=str(folder_t), add_bos_token=True, dtype="float32", device=resolve_device(cfg.device))
            teacher = evaluate_model(lm_eval, hf, cfg, tasks, manager)
    out = {"run": cfg.run, "teacher": cfg.teacher, "tasks": tasks, "table": table(student, teacher)}
    out["student"], out["teacher_results"] = student, teacher
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(out, indent=2, default=str))
    return out


def main() -> None:
    """``ar2mdm-lm-eval``: the harness's own command line (``lm-eval run --model ar2mdm --model_args
    pretrained=RUN ...``) with the ar2mdm model registered."""
    from ar2mdm.shared.errors import fail

    try:
        harness()
    except UserError as e:
        fail(str(e))
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
