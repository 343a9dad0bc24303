"""Datasets, tokenizers and loaders for images and text; no model code.

Images: `load_image_split` (embedded digits, image folders, `.tar`/`.tar.gz` archives, decoded once and cached)
gives an `ImageDataset` of uint8 tensors; `BatchLoader` batches it resumably; `TrainAugment`, `MixupCutmix` and
`EvalTransform` work on whole batches. Text: tokenizers, memory-mapped token files, padded and packed batches.
Any object with `images` (uint8 `[N, C, H, W]`), `labels`, `classes` and `source` works as an image dataset.
"""

from ..files import default_cache_dir
from .images import ImageDataset, load_image_split, register_image_source, stratified_split
from .loader import BatchLoader
from .text import (
    EMBEDDED,
    TextSource,
    TokenFile,
    build_token_file,
    eval_windows,
    load_token_file,
    pack_documents,
    pad_documents,
    random_windows,
    resolve_text_source,
    scored_range,
    shift_targets,
    split_stream,
    token_file_for_source,
)
from .tokenizers import BpeTokenizer, ByteTokenizer, StreamDecoder, Tokenizer, load_run_tokenizer, train_bpe
from .transforms import EvalTransform, MixupCutmix, TrainAugment, channel_stats, normalize, resize_center_crop

__all__ = [
    "EMBEDDED",
    "BatchLoader",
    "BpeTokenizer",
    "ByteTokenizer",
    "EvalTransform",
    "ImageDataset",
    "MixupCutmix",
    "StreamDecoder",
    "TextSource",
    "TokenFile",
    "Tokenizer",
    "TrainAugment",
    "build_token_file",
    "channel_stats",
    "default_cache_dir",
    "eval_windows",
    "load_image_split",
    "load_run_tokenizer",
    "load_token_file",
    "normalize",
    "pack_documents",
    "pad_documents",
    "random_windows",
    "register_image_source",
    "resize_center_crop",
    "resolve_text_source",
    "scored_range",
    "shift_targets",
    "split_stream",
    "stratified_split",
    "token_file_for_source",
    "train_bpe",
]
