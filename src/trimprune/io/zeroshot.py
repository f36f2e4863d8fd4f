"""Zero-shot accuracy through the stock lm-evaluation-harness (`pip install 'trimprune[eval]'`,
lm-eval 0.4.13), on the model in memory (its `HFLM` wrapper), 0-shot as in the pruning papers
(`num_fewshot` K > 0 for K examples in each prompt).

The harness runs one task at a time, so that each task gets its own progress line. Unless
`verbose`, what the harness itself prints stays out of the output: its loggers (`lm_eval`,
`lm-eval` and their children) are set to ERROR, its progress bars and any other text on stderr
(the "fatal: not a git repository" of the `git describe` it runs to record a commit) are caught
while it runs; caught lines that report an error are printed afterwards, and every caught line
when the harness raises.

Offline, `tasks_data` (or TRIMPRUNE_DATA) names a folder laid out like the project's shared data
(`boolq/validation.jsonl`, `hellaswag/validation.jsonl.gz`, `arc_easy/test.jsonl`, ...: Hugging Face
rows). Each task is then pointed at its local file by a task config that includes the harness's own
YAML and overrides only where the data comes from (the harness's task-config mechanism, through a
`TaskManager` include path); the harness itself is neither patched nor copied. Online, the task
names load as usual. Accuracies and their standard errors are read from the harness's results.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from trimprune.calib.data import data_root
from trimprune.core.progress import Progress
from trimprune.errors import TrimpruneError

# the mean zero-shot accuracy of the pruning papers (Wanda, SparseGPT, OWL, AlphaPruning, TRIM): acc
# of
CLASSIC_TASKS = (
    "boolq",
    "rte",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)

# task -> (file in a shared-data folder, the split it holds, overrides of the harness's config)
LOCAL_TASKS = {
    "boolq": (
        "boolq/validation.jsonl",
        "validation",
        {"doc_to_target": "{{answer|int}}"},
    ),  # google/boolq rows
    "rte": ("rte/validation.jsonl", "validation", {}),
    "hellaswag": ("hellaswag/validation.jsonl.gz", "validation", {}),
    "winogrande": ("winogrande/validation.jsonl", "validation", {}),
    "arc_easy": ("arc_easy/test.jsonl", "test", {}),
    "arc_challenge": ("arc_challenge/test.jsonl", "test", {}),
    "openbookqa": ("openbookqa/test.jsonl", "test", {}),
    "piqa": ("piqa/validation.jsonl", "validation", {}),
}


@dataclass(frozen=True)
class TaskScore:
    """One task's harness results: accuracy (and length-normalised accuracy) with their standard
    errors."""

    task: str
    acc: float
    acc_stderr: float
    acc_norm: float | None
    acc_norm_stderr: float | None
    samples: int

    def to_dict(self) -> dict:
        return {
            "acc": self.acc,
            "acc_stderr": self.acc_stderr,
            "acc_norm": self.acc_norm,
            "acc_norm_stderr": self.acc_norm_stderr,
            "samples": self.samples,
        }


def _require_harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TrimpruneError(
            "--tasks needs lm-evaluation-harness: pip install 'trimprune[eval]' (lm-eval==0.4.13)"
        ) from None


@functools.cache
def _builtin_tasks():
    """The harness's own task index (a `TaskManager`; scanning its YAML files takes seconds: done
    once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@functools.cache
def _task_manager(folder: str | None, tasks: tuple[str, ...]):
    """The `TaskManager` for `tasks`: the built-in one, or one whose include path points the tasks
    that have local files in `folder` at them (the configs stay in a folder removed when the process
    exits)."""
    from lm_eval.tasks import TaskManager

    if folder is None:
        return _builtin_tasks()
    tmp = Path(tempfile.mkdtemp(prefix="trimprune-tasks-"))
    atexit.register(shutil.rmtree, tmp, True)
    return (
        TaskManager(include_path=str(tmp))
        if local_task_configs(list(tasks), Path(folder), tmp)
        else _builtin_tasks()
    )


def check_tasks(tasks: list[str], tasks_data: str | Path | None) -> None:
    """Before the model loads: the harness is installed, --tasks-data is a folder, every task
    exists."""
    _require_harness()
    if tasks_data and not Path(tasks_data).is_dir():
        raise TrimpruneError(
            f"--tasks-data {str(tasks_data)!r} is not a folder: give a folder laid out like "
            "shared/data (boolq/validation.jsonl, ...)"
        )
    known = set(_builtin_tasks().all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise TrimpruneError(
            f"--tasks {unknown[0]} is not a task of lm-evaluation-harness: use e.g. "
            f"{','.join(CLASSIC_TASKS)}"
        )


def local_task_configs(tasks: list[str], folder: Path, out: Path) -> list[str]:
    """Write into `out` one task config per task that has a local file in `folder`: the harness's
    own YAML (included by path) with its data read from that file. Returns the tasks configured."""
    index = _builtin_tasks().task_index
    done = []
    for task in tasks:
        if task not in LOCAL_TASKS:
            continue
        rel, split, extra = LOCAL_TASKS[task]
        data = folder / rel
        entry = index.get(task)
        if not data.is_file() or entry is None or entry.yaml_path is None:
            continue
        cfg = {
            "task": task,
            "include": str(Path(entry.yaml_path).resolve()),
            "tag": "trimprune_local",
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(data.resolve())}},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
            "fewshot_split": None,
        } | extra
        (out / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        done.append(task)
    return done


HARNESS_LOGGERS = ("lm_eval", "lm-eval")


@contextlib.contextmanager
def harness_output(verbose: bool = False):
    """Everything the harness prints to stderr while the body runs, kept out of the output unless
    `verbose`: its loggers at ERROR, and stderr (Python's and file descriptor 2, which its
    subprocesses inherit) caught; afterwards the caught lines that report an error are printed, all
    caught lines (progress bars aside) when the body raised."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(n) for n in HARNESS_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    caught = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as fd2:
        os.dup2(fd2.fileno(), 2)
        try:
            with contextlib.redirect_stderr(caught):
                yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
            fd2.seek(0)
            text = caught.getvalue() + fd2.read().decode(errors="replace")
            lines = [x for x in text.replace("\r", "\n").splitlines() if x.strip()]
            shown = [
                x
                for x in lines
                if ("ERROR" in x or "CRITICAL" in x) or (failed and "it/s]" not in x)
            ]
            for x in shown:
                print(x, file=sys.stderr)


def check_num_fewshot(k: int) -> None:
    if k < 0:
        raise TrimpruneError(
            f"--tasks-num-fewshot {k} must be >= 0 (0: zero-shot, as in the pruning papers)"
        )


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    tasks_data: str | Path | None = None,
    device=None,
    num_fewshot: int = 0,
    progress=False,
    label: str = "the model",
    verbose: bool = False,
) -> dict[str, TaskScore]:
    """Accuracy of `model` on `tasks` with `num_fewshot` examples in each prompt (0: zero-shot);
    offline from `tasks_data` (or TRIMPRUNE_DATA) where the folder holds a task's file. One
    progress line per task; the harness's own output only with `verbose` (`harness_output`)."""
    _require_harness()
    check_num_fewshot(num_fewshot)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    shown = Progress.of(progress)
    folder = Path(tasks_data) if tasks_data else data_root()
    dev = str(device if device is not None else next(model.parameters()).device)
    with shown.stage(f"tasks of {label}: preparing lm-evaluation-harness"), harness_output(verbose):
        manager = _task_manager(str(folder.resolve()) if folder is not None else None, tuple(tasks))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=dev)
    scores = {}
    for task in tasks:
        with shown.stage(f"{num_fewshot}-shot {task} of {label}") as stage:
            try:
                with harness_output(verbose):
                    out = lm_eval.simple_evaluate(
                        model=lm,
                        tasks=[task],
                        num_fewshot=num_fewshot,
                        limit=limit,
                        task_manager=manager,
                        log_samples=False,
                    )
            except (ConnectionError, OSError) as e:
                raise TrimpruneError(
                    f"lm-evaluation-harness could not load its data "
                    f"({str(e).splitlines()[0][:160]}): give local task files with --tasks-data "
                    "DIR or set TRIMPRUNE_DATA"
                ) from e
            r = out["results"][task]
            n = out.get("n-samples", {}).get(task, {}).get("effective", 0)
            scores[task] = TaskScore(
                task,
                r["acc,none"],
                r.get("acc_stderr,none"),
                r.get("acc_norm,none"),
                r.get("acc_norm_stderr,none"),
                int(n),
            )
            stage.result = f"acc {100 * scores[task].acc:.2f} % ({int(n)} examples)"
    return scores


def mean_accuracy(scores: dict[str, TaskScore]) -> float | None:
    """The papers' mean zero-shot accuracy: the mean acc over the seven classic tasks (None unless
    all ran)."""
    if not all(t in scores for t in CLASSIC_TASKS):
        return None
    return sum(scores[t].acc for t in CLASSIC_TASKS) / len(CLASSIC_TASKS)
