"""The `data` section of a run: what every source shares, and the settings of image and of text sources.

A task's job says which of the two it reads (`polyattn.tasks.TASKS`), so an image run has no `seq_len` and a text
run no crop; the run config (`polyattn.train.config`) keeps the section that fits its model's task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UserError
from ..settings import PROBABILITY, Section, checked


@dataclass
class DataConfig(Section):
    """Where the examples come from and how they are evaluated, for any source."""

    source: str = checked("digits", pattern=r".+", meaning="a dataset name or a path")
    """Images: 'digits' (embedded, no download), an image-folder directory, or a .tar/.tar.gz archive of one.
    Text: 'shakespeare' (embedded, no download), a UTF-8 text file, a directory of .txt files, or a token file
    (.bin with its .json sidecar, see polyattn.data.text)."""
    val_fraction: float = checked(0.0, ge=0, lt=1)
    """Images: share of the training split held out for validation during training; 0 evaluates on the test
    split. Text: the last share of the token stream, held out for validation (and test); text recipes use 0.1."""
    eval_batch_size: int = checked(512, ge=1)
    """Images per evaluation batch; for text, windows of seq_len tokens per evaluation batch."""


@dataclass
class ImageDataConfig(DataConfig):
    """Images: their size, the test split, the training augmentation and the normalisation."""

    image_size: int | None = checked(None, ge=1)
    """Resize images to this size (shorter side, then centre crop); None keeps the stored size."""
    test_fraction: float = checked(0.2, gt=0, lt=1)
    """Share of each class held out as the test split when the source has no train/test folders."""
    crop: Literal["pad", "resized", "none"] = "pad"
    """Training crop: random crop after zero padding, random-resized crop, or none."""
    crop_padding: int = checked(4, ge=0)
    """Zero padding in pixels for crop='pad'."""
    crop_scale: tuple[float, float] = checked((0.35, 1.0), gt=0, le=1)
    """Area range for crop='resized'."""
    hflip: bool = True
    """Random horizontal flips (turn off for data that is not mirror-symmetric, such as digits)."""
    randaugment_ops: int = checked(0, ge=0, le=13)
    """RandAugment: operations applied to each training image (0 = off; DeiT: 2). Needs kornia."""
    randaugment_magnitude: float = checked(9.0, gt=0, lt=10)
    """RandAugment magnitude on the 0-10 scale of timm and DeiT ('rand-m9'), strictly between 0 and 10."""
    random_erase: float = checked(0.0, **PROBABILITY)
    """Probability of erasing one random rectangle of a training image (0 = off; DeiT: 0.25). Needs kornia."""
    mixup_alpha: float = checked(0.0, ge=0)
    """Mixup: λ ~ Beta(α, α) per batch; 0 = off (DeiT: 0.8). Targets become soft; see polyattn.data.transforms."""
    cutmix_alpha: float = checked(0.0, ge=0)
    """CutMix: λ ~ Beta(α, α) per batch; 0 = off (DeiT: 1.0)."""
    mix_prob: float = checked(1.0, **PROBABILITY)
    """Probability that a training batch is mixed, when mixup_alpha or cutmix_alpha is > 0."""
    mix_switch_prob: float = checked(0.5, **PROBABILITY)
    """With both alphas > 0: probability that a mixed batch uses cutmix rather than mixup."""
    mean: tuple[float, ...] | None = checked(None, ge=0, le=1)
    """Per-channel normalisation mean (0..1 scale); None computes it from the training split."""
    std: tuple[float, ...] | None = checked(None, gt=0)
    """Per-channel normalisation std; None computes it from the training split."""

    def validate(self, section: str = "data") -> None:
        """The field rules, then the rules that tie fields of this section together."""
        super().validate(section)
        if self.crop_scale[0] > self.crop_scale[1]:
            raise UserError(f"data.crop_scale must be (min, max) with min ≤ max, got {list(self.crop_scale)}.")
        if (self.mean is None) != (self.std is None):
            raise UserError("data.mean and data.std go together: set both (one value per channel) or neither "
                            "(then both are computed from the training split).")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise UserError(f"data.mean has {len(self.mean)} values but data.std {len(self.std)}; give one per "
                            f"channel in both.")


@dataclass
class TextDataConfig(DataConfig):
    """Text: the tokenizer, the training windows and what evaluation scores."""

    tokenizer: Literal["byte", "bpe"] = "byte"
    """Text: 'byte' (UTF-8 bytes, 256 ids) or 'bpe' (byte-level BPE trained on the training text and saved in the
    run directory as tokenizer.json)."""
    vocab_size: int = checked(4096, ge=257)
    """Text with tokenizer=bpe: vocabulary size to train (the 256 bytes and <|endoftext|> included)."""
    seq_len: int = checked(256, ge=1)
    """Text: tokens per training window (each token is predicted from up to seq_len tokens before it)."""
    eval_tokens: int | None = checked(None, ge=1)
    """Text: score at most this many tokens of the evaluated split; None scores all of it."""
    eval_stride: int | None = checked(None, ge=1)
    """Causal LM evaluation: windows of seq_len advance by this many tokens and score their last eval_stride
    targets, so every scored target has at least seq_len − eval_stride tokens of context (the first ones of the
    split are not scored); None = seq_len, consecutive windows. Perceiver models need it ≤ their latents."""
    eval_start: int | None = checked(None, ge=0)
    """Causal LM evaluation: index of the first scored target in the evaluated split (it needs at least
    seq_len − eval_stride tokens before it), so windows of different lengths score the same targets; with
    eval_tokens, start + tokens must fit the split. None = seq_len − eval_stride."""

    def validate(self, section: str = "data") -> None:
        super().validate(section)
        if self.eval_stride is not None and self.eval_stride > self.seq_len:
            raise UserError(f"data.eval_stride ({self.eval_stride}) must be at most data.seq_len ({self.seq_len}); "
                            f"windows cannot advance by more than their length.")
        check_eval_start(self.eval_start, self.seq_len - (self.eval_stride or self.seq_len))


def check_eval_start(start: int | None, context: int) -> None:
    """One sentence when data.eval_start leaves its first target fewer than `context` (seq_len − eval_stride)
    tokens before it; checked with the config and again where an evaluation picks its targets."""
    if start is not None and start < context:
        raise UserError(f"data.eval_start = {start} leaves less context than seq_len − eval_stride = {context} "
                        f"tokens before the first scored target; set data.eval_start to at least {context} or "
                        f"raise data.eval_stride.")


__all__ = ["DataConfig", "ImageDataConfig", "TextDataConfig", "check_eval_start"]
