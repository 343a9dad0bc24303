"""Causal language modelling: the next-token loss, perplexity, bits per byte, and the training job.

Metrics on a split (`evaluate_lm`), over consecutive windows that predict every token of the split once:

- `loss`: mean cross-entropy in nats per token (padding excluded);
- `ppl`: `exp(loss)`;
- `bpb`: bits per byte `= loss / ln 2 × tokens / bytes`, where `bytes` is the UTF-8 size of the decoded target
  text. With the byte-level tokenizer tokens are bytes; with BPE it makes models with different vocabularies
  comparable.

`CausalLMJob` feeds a causal LM to the training loop (`polyattn.train.loop.TrainingJob`): random windows of
`data.seq_len + 1` tokens from the first `1 − data.val_fraction` of the token stream, at positions that are a
pure function of `(train.seed, epoch, step)` so a resumed run sees the same batches; evaluation on the last
`data.val_fraction` (the `val` split; `test` names the same held-out tail, since text corpora here come without
a separate test set). Its data plumbing (tokenizer, stream, splits, epoch size, the token-weighted loss step) is
`TextStreamJob`, which the masked-LM job (`polyattn.tasks.masked_lm`) shares.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.loader import to_device
from ..data.text import (
    EMBEDDED,
    eval_windows,
    load_token_file,
    random_windows,
    resolve_text_source,
    scored_range,
    split_stream,
    token_file_for_source,
)
from ..data.tokenizers import TOKENIZER_FILE, BpeTokenizer, ByteTokenizer, StreamDecoder, Tokenizer, train_bpe
from ..distributed import all_sum, shard
from ..errors import UserError
from ..files import default_cache_dir
from ..models.generation import stream_generate
from ..ops.losses import IGNORE_INDEX, cross_entropy
from ..progress import progress_bar
from ..settings import Section

BPE_CACHE_VERSION = 1


@dataclass
class CausalLMConfig(Section):
    """The `task` section of causal language modelling: nothing to set beyond the data (`data.seq_len`, ...)."""


def scored_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The targets that `logits [B, L, V]` score: the last `L` of `targets [B, T]`. Most models score every
    position (`L = T`); Perceiver AR and its variants return logits for their latents only, the window's last
    positions."""
    return targets[:, targets.shape[1] - logits.shape[1]:]


def lm_metrics(total_nats: float, num_tokens: int, num_bytes: int) -> dict[str, float]:
    """`{"loss", "ppl", "bpb", "tokens"}` from summed nats over `num_tokens` targets that decode to `num_bytes`."""
    loss = total_nats / max(num_tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)),
            "bpb": total_nats / math.log(2) / max(num_bytes, 1), "tokens": num_tokens}


def target_bytes(tokenizer: Tokenizer, targets: np.ndarray) -> int:
    """UTF-8 size of the text the scored targets decode to (equal to their count for byte-level)."""
    if isinstance(tokenizer, ByteTokenizer):
        return len(targets)
    return len(tokenizer.decode(targets).encode("utf-8"))


@torch.no_grad()
def evaluate_lm(model: nn.Module, tokens: np.ndarray, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                device: torch.device, autocast=None, max_tokens: int | None = None,
                stride: int | None = None, start: int | None = None, progress: bool = False) -> dict[str, float]:
    """Loss, perplexity and bits per byte of `model` on the token stream `tokens` (module docstring).

    The targets `tokens[1:]` are scored once each (the first `max_tokens` of them, from target `start` on when
    given), from the windows of `polyattn.data.text.eval_windows`: consecutive windows of `seq_len` tokens by
    default, or windows advanced by `stride` that give every scored target at least `seq_len − stride` tokens of
    context. The model is put in eval mode and restored. `progress` shows a bar over the scored targets.
    """
    if len(tokens) < 2:
        raise UserError("The evaluated split holds fewer than 2 tokens; use a larger corpus or data.val_fraction.")
    was_training = model.training
    model.eval()
    total, count, scored = 0.0, 0, []
    first, end = scored_range(len(tokens), seq_len, max_tokens, stride=stride, start=start)
    bar = progress_bar(total=end - first, desc="evaluating", unit="tok", unit_scale=True, enabled=progress)
    try:
        for x, y in shard(eval_windows(tokens, seq_len, batch_size, max_tokens, stride=stride, start=start)):
            x, y = x.to(device), y.to(device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits = model(x)
            kept = scored_targets(logits, y)  # a model that scores only its last positions (latents) sees fewer
            if (kept != IGNORE_INDEX).sum() != (y != IGNORE_INDEX).sum():
                raise UserError(f"The model predicts only the last {logits.shape[1]} positions of a window, fewer "
                                f"than the scored ones; set data.eval_stride to at most {logits.shape[1]}.")
            total += cross_entropy(logits, kept, reduction="sum").item()
            kept = kept[kept != IGNORE_INDEX]
            count += kept.numel()
            scored.append(kept.cpu())
            bar.update(kept.numel())
    finally:
        bar.close()
        model.train(was_training)
    scored_bytes = target_bytes(tokenizer, torch.cat(scored).numpy()) if scored else 0
    total, count, scored_bytes = all_sum([total, count, scored_bytes])  # in a distributed run: every share
    return lm_metrics(total, int(count), int(scored_bytes))


def _bpe_for_source(source: str, vocab_size: int, val_fraction: float) -> BpeTokenizer:
    """BPE trained on the training part (the first `1 − val_fraction` of the characters) of a text source,
    cached by source fingerprint and settings so repeated runs do not retrain it."""
    text = resolve_text_source(source)
    key_fields = [BPE_CACHE_VERSION, text.name, text.fingerprint, vocab_size, val_fraction]
    key = hashlib.sha256(json.dumps(key_fields).encode()).hexdigest()[:32]
    path = default_cache_dir() / "tokenizers" / f"{key}.json"
    if path.is_file():
        try:
            return BpeTokenizer.load(path)
        except UserError:
            pass  # a damaged cache entry: retrain and overwrite
    keep = int(text.num_chars() * (1.0 - val_fraction))
    tokenizer = train_bpe(text.text(keep), vocab_size)
    with contextlib.suppress(OSError):  # an unwritable cache only costs retraining next time
        tokenizer.save(path)
    return tokenizer


def _is_token_file(source: str) -> bool:
    return source not in EMBEDDED and Path(source).suffix == ".bin"


class TextStreamJob:
    """The data plumbing every text task shares, for the training loop (`polyattn.train.loop.TrainingJob`).

    A tokenizer (byte-level, the run's own BPE, or a token file's), the token stream of `data.source` split into
    its first `1 − data.val_fraction` (train) and the rest (val, test), the size of an epoch, the files a run
    directory needs, and the loss: summed cross-entropy over the scored targets (`IGNORE_INDEX` elsewhere) and
    their count, which the loop averages over. Subclasses supply `batches` and `evaluate`.

    Args:
        config: the run's `RunConfig` (data.source, data.tokenizer, data.vocab_size, data.seq_len,
            data.val_fraction, data.eval_batch_size, data.eval_tokens, train.batch_size, train.seed).
        device: where batches go.
        splits: the splits needed ("train", "val", "test").
        run_dir: an existing run directory whose `tokenizer.json` is reused (resume, eval), or None.
    """

    throughput_unit = "tokens"
    """The loop reports tokens/s: `samples_per_step` is tokens (every input token of a step's windows)."""
    extra_ids = 0
    """Ids the model has beyond the tokenizer's (a masked LM reserves one for `[MASK]`)."""
    task_label = "a causal LM"
    example_recipe = "llama_lm_shakespeare"

    def __init__(self, config, device: torch.device, splits: tuple[str, ...] = ("train", "test"),
                 run_dir: Path | None = None):
        d, t = config.data, config.train
        if d.source == "digits":
            raise UserError(f"data.source is 'digits', an image dataset, but {self.task_label} trains on text; use "
                            f"data.source=shakespeare (embedded), a .txt file, a directory of .txt files or a "
                            f"token file (.bin), or a text recipe such as `polyattn train {self.example_recipe}`.")
        if not isinstance(d.seq_len, int) or d.seq_len < 1:
            raise UserError(f"data.seq_len must be a positive number of tokens, got {d.seq_len!r}.")
        self.device, self.seq_len, self.seed = device, d.seq_len, t.seed
        self.eval_batch_size, self.eval_tokens, self.eval_stride = d.eval_batch_size, d.eval_tokens, d.eval_stride
        self.eval_start = d.eval_start
        self.tokenizer = self._tokenizer(d, run_dir)
        self.source = d.source
        stream = token_file_for_source(d.source, self.tokenizer)
        train_range, val_range = split_stream(len(stream), d.val_fraction)
        self.splits = {"train": stream.tokens[train_range], "val": stream.tokens[val_range],
                       "test": stream.tokens[val_range]}
        for split in splits:
            if split not in self.splits:
                raise UserError(f"Split '{split}' is not available for text; use 'train', 'val' or 'test' (the "
                                f"last data.val_fraction of the stream).")
        self.eval_split = "val"
        self.final_split = "val"  # "test" is the same held-out stream, which the README calls validation
        self.progress = t.progress
        self.inferred_model_args = {"vocab_size": self.tokenizer.vocab_size + self.extra_ids}
        user_vocab = config.model.args.get("vocab_size")
        if isinstance(user_vocab, int) and user_vocab < self.tokenizer.vocab_size + self.extra_ids:
            raise UserError(f"model.vocab_size={user_vocab} is smaller than {self._ids_needed()}; remove it so the "
                            f"model follows the tokenizer.")
        self.batch_size = t.batch_size
        n_train = len(self.splits["train"])
        if "train" in splits and n_train < d.seq_len + 1:
            raise UserError(f"The training split has {n_train} tokens, fewer than data.seq_len + 1 = "
                            f"{d.seq_len + 1}; use a larger corpus or a shorter data.seq_len.")
        # An "epoch" is as many windows as the training split holds tokens (each token seen once on average).
        self.samples_per_step = t.batch_size * d.seq_len
        self.steps_per_epoch = max(1, n_train // self.samples_per_step)

    def describe_data(self) -> str:
        """One line for the header of a command: the source, its train and held-out tokens, the tokenizer."""
        sizes = " / ".join(f"{len(self.splits[k]):,} {k}" for k in ("train", "val"))
        return f"{self.source} ({sizes} tokens, {type(self.tokenizer).__name__} of {self.tokenizer.vocab_size} ids)"

    def _ids_needed(self) -> str:
        ids = f"the tokenizer's {self.tokenizer.vocab_size} ids"
        return ids if not self.extra_ids else f"{ids} plus {self.extra_ids} reserved"

    @staticmethod
    def _tokenizer(d, run_dir: Path | None) -> Tokenizer:
        if d.tokenizer == "byte":
            return ByteTokenizer()
        if run_dir is not None:  # an existing run (resume, eval): its own tokenizer, never a retrained one
            path = Path(run_dir) / TOKENIZER_FILE
            if not path.is_file():
                raise UserError(f"{run_dir} has no {TOKENIZER_FILE}, which its BPE model needs; restore the file "
                                f"or retrain the run.")
            return BpeTokenizer.load(path)
        if _is_token_file(d.source):
            return load_token_file(d.source).tokenizer()
        return _bpe_for_source(d.source, d.vocab_size, d.val_fraction)

    def save_to_run_dir(self, run_dir: Path) -> None:
        """Writes the tokenizer into the run directory (BPE), so eval/generate/resume need nothing else."""
        if isinstance(self.tokenizer, BpeTokenizer):
            self.tokenizer.save(Path(run_dir) / TOKENIZER_FILE)

    def _check_vocab(self, model: nn.Module) -> None:
        vocab = getattr(model, "vocab_size", None)
        if vocab is not None and vocab < self.tokenizer.vocab_size + self.extra_ids:
            raise UserError(f"The model has {vocab} token ids but the task needs {self._ids_needed()}; remove "
                            f"model.vocab_size so it follows the tokenizer.")

    def _check_start_step(self, start_step: int) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise UserError(f"Cannot resume at step {start_step} of an epoch that has {self.steps_per_epoch} steps; "
                            f"check that the checkpoint matches this corpus and batch size.")

    def check_model(self, model: nn.Module) -> None:
        """Before the run starts: the model has an id for every token of the tokenizer (and of the task)."""
        self._check_vocab(model)

    def prepare(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs and targets on the device, and the targets' host copy, from which `loss` counts the scored
        tokens (counting on the device would sync it at every micro-batch)."""
        x_host, y_host = batch
        x, y = to_device(x_host, y_host, device=self.device)
        return x, y, y_host

    def loss(self, model: nn.Module, batch, inputs: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over a micro-batch's scored targets and their number: a model may score only a
        window's last positions (Perceiver AR's latents), so the targets it scores are the last ones. A
        Mixture-of-Depths model (`mod_capacity`) adds its predictors' summed loss (`polyattn.layers.mod`)."""
        x, y, y_host = batch
        routed = getattr(getattr(model, "module", model), "mod_capacity", None) is not None  # `module`: under DDP
        logits, routings = model(x, return_routing=True, **inputs) if routed else (model(x, **inputs), [])
        scored = int((scored_targets(logits, y_host) != IGNORE_INDEX).sum())
        loss = cross_entropy(logits, scored_targets(logits, y), reduction="sum")
        if routings:  # Mixture-of-Depths: its causal predictors learn beside it (their mean over routed blocks)
            loss = loss + sum(r.predictor_loss for r in routings) / len(routings)
        return loss, scored

    def state_dict(self) -> dict[str, Any]:
        return {}  # batches are a pure function of (seed, epoch, step): nothing to save

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class CausalLMJob(TextStreamJob):
    """Supplies windows of a token stream, the next-token loss and LM metrics to the training loop.

    Training batches: `data.seq_len + 1` tokens at random positions of the training split, drawn from
    `(train.seed, epoch, step)`; evaluation: `evaluate_lm` over consecutive windows. Arguments as `TextStreamJob`.
    """

    def __init__(self, config, device: torch.device, splits: tuple[str, ...] = ("train", "test"),
                 run_dir: Path | None = None):
        super().__init__(config, device, splits, run_dir)
        if self.eval_start is not None:  # checked now, not at the first evaluation after an epoch of training
            scored_range(len(self.splits["val"]), self.seq_len, self.eval_tokens, stride=self.eval_stride,
                         start=self.eval_start)

    def batches(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._check_start_step(start_step)
        tokens = self.splits["train"]
        for step in range(start_step, self.steps_per_epoch):
            yield random_windows(tokens, self.batch_size, self.seq_len, seed=self.seed, epoch=epoch, step=step)

    def check_model(self, model: nn.Module) -> None:
        """Before the run starts: the vocabulary fits (`TextStreamJob.check_model`); a model that reads a window
        (`max_train_len`, Perceiver AR's `max_seq_len`) must hold a whole training row; and a model that predicts
        only a window's last positions (Perceiver AR's latents) must predict the `data.eval_stride` targets each
        evaluation window scores, else the first evaluation would fail after an epoch of training. One forward
        pass in eval mode (no random numbers drawn)."""
        super().check_model(model)
        limit = getattr(model, "max_train_len", None)
        if limit is not None and self.seq_len > limit:
            raise UserError(f"A training row of data.seq_len = {self.seq_len} tokens is longer than the model's "
                            f"window of {limit} tokens (model.max_seq_len), whose older tokens would be ignored; "
                            f"set data.seq_len <= {limit} or model.max_seq_len >= {self.seq_len}.")
        stride = self.eval_stride or self.seq_len
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                predicted = model(torch.zeros(1, self.seq_len, dtype=torch.long, device=self.device)).shape[1]
        finally:
            model.train(was_training)
        if predicted < stride:
            raise UserError(f"The model predicts only the last {predicted} positions of a window, fewer than the "
                            f"data.eval_stride = {stride} targets each evaluation window scores; set "
                            f"data.eval_stride to at most {predicted}.")

    def evaluate(self, model: nn.Module, split: str, *, autocast) -> dict[str, float]:
        self._check_vocab(model)
        return evaluate_lm(model, self.splits[split], self.tokenizer, seq_len=self.seq_len,
                           batch_size=self.eval_batch_size, device=self.device, autocast=autocast,
                           max_tokens=self.eval_tokens, stride=self.eval_stride, start=self.eval_start,
                           progress=self.progress)


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Prompt ids; an empty prompt starts from `<|endoftext|>` (BPE) or a newline (byte-level)."""
    ids = tokenizer.encode(prompt).tolist()
    if ids:
        return ids
    return [tokenizer.eos_id] if tokenizer.eos_id is not None else tokenizer.encode("\n").tolist()


def stream_text(model: nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, *,
                temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                use_cache: bool = True, seed: int | None = None, device: torch.device | str = "cpu",
                cache_transform=None) -> Iterable[str]:
    """Generated text after `prompt`, yielded in pieces as soon as they decode to whole characters
    (`cache_transform`: see `polyattn.models.generation.stream_generate`)."""
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    decoder = StreamDecoder(tokenizer)
    for step in stream_generate(model, ids, max_new_tokens, temperature, top_k, top_p, use_cache,
                                generator=generator, cache_transform=cache_transform):
        piece = decoder.push(step.tokens.tolist())
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest


__all__ = ["CausalLMConfig", "CausalLMJob", "TextStreamJob", "encode_prompt", "evaluate_lm", "lm_metrics",
           "scored_targets", "stream_text"]
