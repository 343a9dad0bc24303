"""The faults and bad inputs that `test_reliability.py` injects, and what must happen for each.

One list, two uses: the tests parametrize over `CASES` (every case has a check there, and a check for every
case), and the README's "Reliability" table is rendered from it, so the table cannot drift from what is tested.
`python tests/reliability_cases.py` rewrites the table in README.md; `test_readme_table_matches_the_cases`
fails when it is out of date.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- table:reliability -->", "<!-- /table:reliability -->"


@dataclass(frozen=True)
class Case:
    id: str
    what: str
    """The fault or bad input, as the README shows it."""
    outcome: str
    """What happens, as the README shows it (and the check asserts)."""
    argv: tuple[str, ...] = ()
    """For a bad command-line value: the `polyattn train` arguments (out_dir is added)."""
    message: str = ""
    """For a bad command-line value: part of the one-sentence error."""


def bad_value(override: str, message: str, *, recipe: str = "default") -> Case:
    return Case(f"bad:{override}", f"`{override}`" + (f" ({recipe})" if recipe != "default" else ""),
                f"exit 2: “{message}…”; nothing written", ("train", recipe, *override.split()), message)


CASES: list[Case] = [
    bad_value("train.grad_clip=-1", "train.grad_clip must be greater than 0"),
    bad_value("train.steps=0", "train.steps must be at least 1"),
    bad_value("train.epochs=0", "train.epochs must be at least 1"),
    bad_value("train.eval_every=0", "train.eval_every must be at least 1"),
    bad_value("train.accumulation_steps=0", "train.accumulation_steps must be at least 1"),
    bad_value("train.accumulation_steps=3", "is not divisible by train.accumulation_steps"),
    bad_value("train.lr=nan", "train.lr must be a finite number"),
    bad_value("train.lr=1e-4 train.min_lr=1e-3", "train.min_lr (0.001) must be at most train.lr"),
    bad_value("train.ema_decay=2", "train.ema_decay must be greater than 0 and less than 1"),
    bad_value("train.betas=[0.9,1.0]", "train.betas must be at least 0 and less than 1"),
    bad_value("train.seed=-1", "train.seed must be at least 0"),
    bad_value("train.max_bad_steps=0", "train.max_bad_steps must be at least 1"),
    bad_value("train.checkpoint_every_s=0", "train.checkpoint_every_s must be greater than 0"),
    bad_value("train.run_name=../elsewhere", "train.run_name must be one directory name inside train.out_dir"),
    bad_value("data.crop_scale=[0.9,0.5]", "data.crop_scale must be (min, max) with min ≤ max"),
    bad_value("data.test_fraction=1", "data.test_fraction must be greater than 0 and less than 1"),
    bad_value("task.mask_replace=0.8 task.mask_random=0.5", "task.mask_replace + task.mask_random must be at most 1",
              recipe="bert_shakespeare"),
    bad_value("data.seq_len=64", "data.seq_len is a setting of text data, but model 'vit_nano' trains classification"),
    bad_value("task.mask_prob=0.2", "task.mask_prob is a setting of the masked_lm task, but model 'vit_nano' trains "
              "classification"),
    bad_value("data.eval_stride=300", "data.eval_stride (300) must be at most data.seq_len (256)",
              recipe="llama_lm_shakespeare"),
    bad_value("data.source=/dev/zero", "is not a regular file", recipe="llama_lm_shakespeare"),
    bad_value("data.source=shakespeare data.seq_len=128 model.num_latents=32 data.eval_stride=64",
              "The model predicts only the last 32 positions of a window", recipe="perceiver_ar_shakespeare"),
    bad_value("data.source=shakespeare data.seq_len=128 model.max_seq_len=64 model.num_latents=32 data.eval_stride=32",
              "A training row of data.seq_len = 128 tokens is longer than the model's window of 64 tokens",
              recipe="perceiver_ar_shakespeare"),
    bad_value("model.drop_path_rate=2", "model.drop_path_rate must be at least 0 and less than 1"),
    bad_value("model.num_classes=0", "model.num_classes must be at least 1"),
    bad_value("model.depth=-1", "model.depth must be at least 1"),
    bad_value("model.num_heads=5", "Model 'vit_nano' cannot be built with these arguments: dim (128) is not "
              "divisible by num_heads (5)"),
    bad_value("data.mean=[0.5]", "data.mean and data.std go together"),
    bad_value("data.mean=[0.5,0.5] data.std=[0.2,0.2]", "data.mean and data.std need one value per image channel"),
    Case("nan-loss", "the loss is NaN from the first step",
         "each step is skipped (no update); after `train.max_bad_steps` in a row, one sentence saying no "
         "checkpoint was written"),
    Case("exploding-lr", "the learning rate explodes mid-run (weights become huge, then the loss NaN)",
         "training stops after `train.max_bad_steps` skipped steps; the last checkpoint has finite weights that "
         "give a finite loss, and the sentence names it"),
    Case("nan-gradient", "one batch gives NaN gradients with a finite loss",
         "that step is skipped, training goes on, `bad_steps` in the summary counts it"),
    Case("sigterm", "SIGTERM in the middle of an epoch",
         "a checkpoint is written, exit 143 with one sentence; `--resume` continues and ends with the "
         "uninterrupted run's test metrics"),
    Case("short-run", "a run shorter than an epoch, no `train.checkpoint_every`",
         "a checkpoint at its end (and every `train.checkpoint_every_s`, default 300 s)"),
    Case("corrupt-latest", "the latest checkpoint's weights are corrupted",
         "`--resume` says it is damaged and continues from the newest intact checkpoint, naming it; the damaged "
         "one is removed and written again"),
    Case("deleted-latest", "the latest checkpoint is deleted",
         "`--resume` continues from the earlier checkpoint, not from step 0"),
    Case("all-damaged", "every checkpoint is damaged",
         "`--resume` refuses in one sentence instead of silently starting over"),
    Case("damaged-metrics", "a damaged line in the middle of metrics.jsonl, or one cut short at its end",
         "that line is skipped with a note; the records after it are kept"),
    Case("pointer-escape", "`checkpoints/latest` names a path outside the run",
         "the pointer is never followed: the newest intact step directory of the run is used"),
    Case("stale-temporaries", "temporary files and folders left by a killed write",
         "removed (with a note) when the run is resumed"),
    Case("enospc-checkpoint", "the disk fills while a checkpoint is written",
         "exit 2: “Cannot write …checkpoints/step-…: the disk is full; …”; the previous checkpoint and "
         "`latest` stay intact, no temporaries left"),
    Case("enospc-log", "the disk fills while the metrics log is appended", "one sentence naming metrics.jsonl"),
    Case("enospc-elsewhere", "the disk fills inside a third-party writer (e.g. a plotting library)",
         "exit 2: one sentence with the path, from the command line's last resort"),
    Case("unwritable-out-dir", "`train.out_dir` is below a file (cannot be created)",
         "exit 2: one sentence naming the path; nothing written"),
    Case("wrong-shape-weights", "weights of another width or class count, in `eval` and `--resume`",
         "exit 2: one sentence naming the tensor and both shapes"),
    Case("concurrent-runs", "two trainings with one run name, or a resume of a run that is training",
         "the directory is created atomically and locked; the second gets one sentence"),
    Case("stub-run-dir", "a run directory left without config.yaml by a failed start (older versions)",
         "the run name is not blocked: a new run takes the empty directory over"),
    Case("resume-changes", "`--resume` with a changed seed or batch size",
         "refused in one sentence unless `--force`; with it, the original config is kept as "
         "config.original.yaml"),
    Case("endless-text", "a text file that keeps growing, or a .gz that decompresses without end",
         "read up to the file's size when the run started; decompressed text capped (one sentence)"),
    Case("fifo-images", "an image archive that is a FIFO", "exit 2: “…is not a regular file…”"),
    Case("huge-image", "an image file (in a folder or an archive) larger than 256 MiB",
         "one sentence naming it; it is not read into memory"),
    Case("corrupt-token-cache", "a cached token file with flipped bytes or bad document offsets",
         "detected by its checksum and offsets, rebuilt"),
    Case("enospc-token-cache", "the disk is full while the token cache is written",
         "one sentence naming the cache file; no fallback that keeps writing to /tmp"),
    Case("op-inputs", "integer, wrong-rank, mismatched or T = 0 inputs to the ops, also under `python -O`",
         "`ValueError` naming the op and argument; T = 0 gives an empty output and the state unchanged"),
]


def render_table() -> str:
    rows = ["| Fault or bad input | What happens |", "|---|---|"]
    rows += [f"| {c.what} | {c.outcome} |" for c in CASES]
    return "\n".join(rows)


def readme_with_table(text: str) -> str:
    """`text` (the README) with the table between the markers replaced by `render_table()`."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + render_table() + "\n" + text[end:]


if __name__ == "__main__":
    README.write_text(readme_with_table(README.read_text()))
    print(f"wrote {len(CASES)} rows to {README}", file=sys.stderr)
