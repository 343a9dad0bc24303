"""`polyattn hf RUN_DIR OUT`: a language-model run directory as a Hugging Face model folder.

OUT holds `config.json` (a `PolyattnConfig`: the model name, its constructor arguments, the source run),
`model.safetensors`, `generation_config.json` (causal LMs), and the tokenizer files (`tokenizer.json`,
`tokenizer_config.json`) that `AutoTokenizer` reads. The folder is written beside OUT and reloaded before it takes
OUT's name: the reloaded tokenizer must give the run tokenizer's ids, and the reloaded model the converted model's
logits bit for bit, on a sample text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..files import staged_dir
from ..registry import model_task
from .modeling import WRAPPERS, PolyattnConfig
from .tokenizer import hf_tokenizer

DTYPES = {"auto": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""`--precision` → the dtype of the saved weights; auto: float32, the dtype of every run's own weights (a run
trained in bfloat16 autocasts float32 weights)."""

CHECK_TEXT = "ROMEO: But soft, what light through yonder window breaks?"


def convert_run(run_dir: Path | str, out: Path | str, *, ema: bool | None = None, precision: str = "auto",
                device: torch.device | str = "cpu") -> Path:
    """Writes the Hugging Face folder `out` (new or empty) of the LM run `run_dir` and returns it.

    Args:
        ema (bool, Optional): None = the averaged weights when the run kept them, False = the raw weights.
        precision (str): the saved weights' dtype (`DTYPES`).
        device: where the reload check runs.
    """
    from transformers import GenerationConfig

    from .. import __version__
    from ..train.loop import load_run, load_run_config

    run_dir, out = Path(run_dir), Path(out)
    config = load_run_config(run_dir)
    task = model_task(config.model.name)
    if task not in WRAPPERS:
        raise UserError(f"{run_dir} holds a {task} model ('{config.model.name}'); `polyattn hf` converts causal and "
                        f"masked language-model runs.")
    if config.deploy:
        raise UserError(f"{run_dir} is a {config.deploy[-1]['transform']}d run, whose modules the Hugging Face "
                        f"wrapper does not rebuild; convert the run it came from ({config.deploy[0]['source_run']}).")
    if precision not in DTYPES:
        raise UserError(f"Precision '{precision}' is not one of {', '.join(DTYPES)}.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; pass a new OUT or remove it.")
    run = load_run(run_dir, ema=ema)
    model_args = config.resolved_model_args()
    hf_config = PolyattnConfig(model_name=config.model.name, model_args=model_args, dtype=DTYPES[precision],
                               polyattn_version=__version__, source_run=str(run_dir.resolve()),
                               source_weights=run.weights)
    wrapper = WRAPPERS[task](hf_config)
    wrapper.model.load_state_dict(run.model.state_dict())
    wrapper = wrapper.to(DTYPES[precision]).eval()
    tokenizer = hf_tokenizer(run.tokenizer, mask_token_id=wrapper.model.mask_token_id if task == "masked_lm" else None)

    if task == "causal_lm":
        # as polyattn's generate: exactly max_new_tokens, no stop token (a BPE model's <|endoftext|> separates
        # documents, and the model may well continue past it)
        wrapper.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id)

    with staged_dir(out) as staging:  # a folder named OUT is always a checked one
        wrapper.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _check(staging, wrapper, run.tokenizer, task, device)
    return out


def _check(folder: Path, wrapper, tokenizer, task: str, device) -> None:
    """The reloaded folder gives the run tokenizer's ids and the wrapper's logits, bit for bit."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    ids = tokenizer.encode(CHECK_TEXT).tolist()
    if AutoTokenizer.from_pretrained(folder)(CHECK_TEXT)["input_ids"] != ids:
        raise RuntimeError("the saved tokenizer encodes text differently from the run's; please report this bug")
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForMaskedLM
    reloaded = auto.from_pretrained(folder).to(device).eval()
    ids = torch.tensor([ids], device=device)
    logits = (lambda m: m(ids, use_cache=False).logits) if task == "causal_lm" else (lambda m: m(ids).logits)
    with torch.no_grad():
        expected, got = logits(wrapper.to(device)), logits(reloaded)
    if not torch.equal(expected, got):
        raise RuntimeError(f"the reloaded model's logits differ from the run's (max |Δ| "
                           f"{(expected - got).abs().max():.3g}); please report this bug")


__all__ = ["CHECK_TEXT", "DTYPES", "convert_run"]
