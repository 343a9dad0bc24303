"""Masked language modelling (BERT, arXiv 1810.04805): the masking recipe, masked-token metrics, the training job.

Masking recipe (`MaskingRecipe`, configured by `task.mask_prob`, `task.mask_replace`, `task.mask_random`):

- in each row, `mask_prob` (15%) of the *real* tokens are selected for prediction, uniformly without
  replacement; the count per row is `mask_prob · n` rounded stochastically (so its mean is exactly
  `mask_prob · n`) and at least 1, so every row has something to predict. Padding is never selected;
- of the selected tokens, `mask_replace` (80%) become `[MASK]`, `mask_random` (10%) a token drawn uniformly from
  the tokenizer's ids, and the rest (10%) stay unchanged;
- targets are the original tokens at the selected positions and `IGNORE_INDEX` everywhere else, so the loss
  covers the selected positions only.

`[MASK]` is the model's last vocabulary id (`polyattn.models.bert`): the job sizes the model one id above the
tokenizer (byte-level: 257 ids, `[MASK]` = 256; BPE: `[MASK]` = the tokenizer's vocabulary size).

Determinism: a training batch (its windows and its masks) is a pure function of `(train.seed, epoch, step)`, so
a resumed run sees exactly the batches of the uninterrupted one. Evaluation masks are fixed: window `i` of a
split is always masked from the seed sequence `(EVAL_MASK_SEED, i)`, whatever `train.seed`, the batch size or
the model, so numbers of different runs on the same data, `data.seq_len` and recipe are comparable.

Metrics on a split (`evaluate_mlm`), over consecutive windows of `data.seq_len` tokens covering the split (its
first `data.eval_tokens` tokens when set):

- `loss`: mean cross-entropy in nats over the masked (selected) tokens;
- `accuracy`: share of masked tokens whose most likely prediction is the original token;
- `ppl`: `exp(loss)`, a pseudo-perplexity under this masking recipe (not the one-token-at-a-time
  pseudo-log-likelihood score of arXiv 1910.14659);
- `tokens`: the number of masked tokens scored.

Masked LMs do not generate text left to right; `polyattn generate` refuses their runs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.text import window_starts
from ..distributed import all_sum, shard
from ..errors import UserError
from ..ops.losses import IGNORE_INDEX, cross_entropy
from ..progress import progress_bar
from ..settings import PROBABILITY, Section, checked
from .causal_lm import TextStreamJob

EVAL_MASK_SEED = 20181011
"""Seed of the fixed evaluation masks (BERT's arXiv date); window `i` uses `SeedSequence([EVAL_MASK_SEED, i])`."""
_MASK_STREAM = 1
"""Fourth entry of a training batch's seed sequence: its masks come from `(seed, epoch, step, 1)`, a stream
independent of the window positions drawn from `(seed, epoch, step)`."""


@dataclass
class MaskedLMConfig(Section):
    """The `task` section of masked language modelling."""

    mask_prob: float = checked(0.15, gt=0, le=1)
    """Masked LM: share of the real tokens of each window selected for prediction (BERT: 0.15)."""
    mask_replace: float = checked(0.8, **PROBABILITY)
    """Masked LM: share of the selected tokens replaced by [MASK] (BERT: 0.8)."""
    mask_random: float = checked(0.1, **PROBABILITY)
    """Masked LM: share of the selected tokens replaced by a random token (BERT: 0.1); the rest stay unchanged."""

    def validate(self, section: str = "task") -> None:
        super().validate(section)
        if self.mask_replace + self.mask_random > 1:
            raise UserError(f"task.mask_replace + task.mask_random must be at most 1 (shares of the selected "
                            f"tokens), got {self.mask_replace} + {self.mask_random}.")


@dataclass(frozen=True)
class MaskingRecipe:
    """BERT's masking recipe (module docstring).

    Attributes:
        mask_id: the `[MASK]` id.
        num_token_ids: random replacements are drawn from `[0, num_token_ids)` (the tokenizer's ids).
        mask_prob: share of the real tokens selected. Default: 0.15.
        mask_replace: share of the selected tokens replaced by `[MASK]`. Default: 0.8.
        mask_random: share of the selected tokens replaced by a random token. Default: 0.1.
    """

    mask_id: int
    num_token_ids: int
    mask_prob: float = 0.15
    mask_replace: float = 0.8
    mask_random: float = 0.1

    def __post_init__(self):
        if not 0.0 < self.mask_prob <= 1.0:
            raise UserError(f"task.mask_prob must be in (0, 1], the share of tokens to predict, got {self.mask_prob}.")
        if self.mask_replace < 0 or self.mask_random < 0 or self.mask_replace + self.mask_random > 1.0 + 1e-9:
            raise UserError(f"task.mask_replace ({self.mask_replace}) and task.mask_random ({self.mask_random}) must "
                            f"be 0 or more and sum to at most 1 (the rest of the selected tokens stay unchanged).")

    def apply(self, tokens: torch.Tensor, rng: np.random.Generator,
              attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(inputs, targets)` `[B, T]` int64 for `tokens [B, T]`, drawing every choice from `rng`.

        Args:
            tokens (Tensor): `[B, T]` int64.
            rng (np.random.Generator): the random source; the same state gives the same masks.
            attention_mask (Tensor, Optional): `[B, T]` bool, True = real token; padding is never selected.
        """
        B, T = tokens.shape
        real = np.ones((B, T), dtype=bool) if attention_mask is None else attention_mask.bool().cpu().numpy()
        n_real = real.sum(1)
        # the same number of draws whatever the data, so a batch's masks depend on (rng state, shape) only
        count_u, order_u, kind_u = rng.random(B), rng.random((B, T)), rng.random((B, T))
        random_ids = rng.integers(0, self.num_token_ids, size=(B, T))
        count = np.floor(self.mask_prob * n_real + count_u).astype(np.int64)
        count = np.where(n_real > 0, np.clip(count, 1, n_real), 0)
        rank = np.argsort(np.argsort(np.where(real, order_u, 2.0), axis=1, kind="stable"), axis=1, kind="stable")
        selected = rank < count[:, None]  # padding ranks last, so it is never among the first `count`
        to_mask = selected & (kind_u < self.mask_replace)
        to_random = selected & (kind_u >= self.mask_replace) & (kind_u < self.mask_replace + self.mask_random)
        inputs = tokens.clone()
        inputs[torch.from_numpy(to_mask)] = self.mask_id
        inputs[torch.from_numpy(to_random)] = torch.from_numpy(random_ids[to_random]).to(tokens.dtype)
        targets = torch.where(torch.from_numpy(selected), tokens, IGNORE_INDEX)
        return inputs, targets


def masked_windows(tokens: np.ndarray, recipe: MaskingRecipe, batch_size: int, seq_len: int, *, seed: int,
                   epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked inputs and targets `([B, L], [B, L])` of random windows of `seq_len` tokens: a pure function of
    `(seed, epoch, step)` (positions as `polyattn.data.text.window_starts`, masks from a separate stream)."""
    starts = window_starts(len(tokens), batch_size, seq_len, seed=seed, epoch=epoch, step=step)
    windows = torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts]))
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, step, _MASK_STREAM]))
    return recipe.apply(windows, rng)


def eval_masked_windows(tokens: np.ndarray, recipe: MaskingRecipe, seq_len: int, batch_size: int,
                        max_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows of `seq_len` tokens covering `tokens` (its first `max_tokens`), in batches of
    `batch_size`, each masked with its fixed evaluation masks (module docstring); the last window may be shorter
    (it comes in a batch of its own)."""
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    bounds = [(s, min(s + seq_len, n)) for s in range(0, n, seq_len)]

    def masked(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = bounds[i]
        window = torch.from_numpy(np.asarray(tokens[start:end], dtype=np.int64))[None]
        return recipe.apply(window, np.random.default_rng(np.random.SeedSequence([EVAL_MASK_SEED, i])))

    full = [i for i, (s, e) in enumerate(bounds) if e - s == seq_len]
    for j in range(0, len(full), batch_size):
        rows = [masked(i) for i in full[j:j + batch_size]]
        yield torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    if len(full) < len(bounds):
        yield masked(len(bounds) - 1)


def mlm_metrics(total_nats: float, num_correct: int, num_tokens: int) -> dict[str, float]:
    """`{"loss", "accuracy", "ppl", "tokens"}` from summed nats and correct predictions over `num_tokens` masked
    tokens."""
    loss = total_nats / max(num_tokens, 1)
    return {"loss": loss, "accuracy": num_correct / max(num_tokens, 1), "ppl": math.exp(min(loss, 700.0)),
            "tokens": num_tokens}


@torch.no_grad()
def evaluate_mlm(model: nn.Module, tokens: np.ndarray, recipe: MaskingRecipe, *, seq_len: int, batch_size: int,
                 device: torch.device, autocast=None, max_tokens: int | None = None,
                 progress: bool = False) -> dict[str, float]:
    """Masked-token loss, accuracy and pseudo-perplexity of `model` on `tokens`, with the fixed evaluation masks
    (module docstring). The model is put in eval mode and restored."""
    if len(tokens) < 1:
        raise UserError("The evaluated split holds no tokens; use a larger corpus or data.val_fraction.")
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    try:
        windows = eval_masked_windows(tokens, recipe, seq_len, batch_size, max_tokens)
        for x, y in progress_bar(shard(windows), desc="evaluating", unit="batch", enabled=progress):
            x, y = x.to(device), y.to(device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits = model(x)
            scored = y != IGNORE_INDEX
            logits, y = logits[scored].float(), y[scored]  # (N, V), (N,)
            total += cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(-1) == y).sum())
            count += y.numel()
    finally:
        model.train(was_training)
    total, correct, count = all_sum([total, correct, count])  # in a distributed run: every process's share
    return mlm_metrics(total, int(correct), int(count))


class MaskedLMJob(TextStreamJob):
    """Supplies masked windows of a token stream, the masked-token loss and MLM metrics to the training loop.

    The data plumbing (tokenizer, stream, splits, epoch size, loss step) is the causal-LM job's
    (`TextStreamJob`); the model gets one id more than the tokenizer, its last, for `[MASK]`.

    Args:
        config: the run's `RunConfig`: as `TextStreamJob`, plus task.mask_prob, task.mask_replace,
            task.mask_random.
        device, splits, run_dir: as `TextStreamJob`.
    """

    extra_ids = 1
    task_label = "a masked LM"
    example_recipe = "bert_shakespeare"

    def __init__(self, config, device: torch.device, splits: tuple[str, ...] = ("train", "test"), run_dir=None):
        super().__init__(config, device, splits, run_dir)
        vocab = config.model.args.get("vocab_size")
        vocab = vocab if isinstance(vocab, int) else self.tokenizer.vocab_size + 1
        task = config.task
        self.recipe = MaskingRecipe(vocab - 1, self.tokenizer.vocab_size, task.mask_prob, task.mask_replace,
                                    task.mask_random)

    def _check_vocab(self, model: nn.Module) -> None:
        super()._check_vocab(model)
        mask_id = getattr(model, "mask_token_id", None)
        if mask_id is None:
            raise UserError(f"{type(model).__name__} is not a masked LM (it has no mask_token_id); train a model "
                            f"registered for the masked_lm task, e.g. bert_nano.")
        if mask_id != self.recipe.mask_id:
            raise UserError(f"The model's [MASK] id is {mask_id} but the task masks with {self.recipe.mask_id}; "
                            f"remove model.vocab_size so the model follows the tokenizer.")

    def batches(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._check_start_step(start_step)
        tokens = self.splits["train"]
        for step in range(start_step, self.steps_per_epoch):
            yield masked_windows(tokens, self.recipe, self.batch_size, self.seq_len, seed=self.seed, epoch=epoch,
                                 step=step)

    def evaluate(self, model: nn.Module, split: str, *, autocast) -> dict[str, float]:
        self._check_vocab(model)
        return evaluate_mlm(model, self.splits[split], self.recipe, seq_len=self.seq_len,
                            batch_size=self.eval_batch_size, device=self.device, autocast=autocast,
                            max_tokens=self.eval_tokens, progress=self.progress)


__all__ = [
    "EVAL_MASK_SEED",
    "MaskedLMConfig",
    "MaskedLMJob",
    "MaskingRecipe",
    "eval_masked_windows",
    "evaluate_mlm",
    "masked_windows",
    "mlm_metrics",
]
