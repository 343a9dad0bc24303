"""The Hugging Face interface: transformers' `generate` with each family's own cache gives polyattn's greedy tokens,
`save_pretrained`/`from_pretrained` round-trips through the Auto classes with identical logits, the losses follow
transformers' conventions, the tokenizers give polyattn's ids, and `polyattn hf` converts a run directory."""

import json
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

import polyattn.hf as hf
from polyattn.cli import main
from polyattn.ops.losses import IGNORE_INDEX, cross_entropy
from polyattn.registry import get_entry, resolve_model_args

V = 37
TEST_SIZE = dict(vocab_size=V, dim=32, depth=2, num_heads=2, max_seq_len=32, num_latents=16, segment_len=8,
                 chunk_size=8, compressed_len=8)

CAUSAL = ["llama_lm_nano", "lightnet_lm_nano", "perceiver_ar_nano", "perceiver_double_nano", "perceiver_split_nano",
          "perceiver_compressed_nano", "llp_nano"]
MASKED = ["bert_nano", "lightnet_mlm_nano"]


def small(name: str, **extra) -> tuple[torch.nn.Module, dict]:
    """A registered LM at a test size with its weights moved off their initial values, and its arguments."""
    params = get_entry(name).parameters()
    args = resolve_model_args(name, **{k: v for k, v in {**TEST_SIZE, **extra}.items() if k in params})
    torch.manual_seed(0)
    model = get_entry(name).cls(**args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, args


def wrapped(name: str, **extra):
    model, args = small(name, **extra)
    return model, hf.from_polyattn(model, name, args).eval()


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 6 and 3 tokens, the shorter one left-padded (padding ids are arbitrary)."""
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :3] = False
    return ids, mask


@pytest.mark.parametrize("name", CAUSAL)
def test_generate_with_the_models_own_cache_gives_polyattns_greedy_tokens(name):
    """40 new tokens (past the Perceivers' 32-token window, so their caches slide), a left-padded batch: cached and
    uncached `generate` give `polyattn`'s own greedy output token for token, from the same logits bit for bit."""
    model, wrapper = wrapped(name)
    ids, mask = left_padded_prompts()
    greedy = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)
    for use_cache in (False, True):
        expected, logits = model.generate(ids, 40, attention_mask=mask, use_cache=use_cache, return_logits=True)
        out = wrapper.generate(ids, attention_mask=mask.long(), max_new_tokens=40, use_cache=use_cache, **greedy)
        assert torch.equal(out.sequences, expected) and torch.equal(torch.stack(out.logits, 1), logits)
        assert len(set(expected[:, 6:].flatten().tolist())) > 3  # a test model that does not repeat one token
    assert isinstance(out.cache, hf.PolyattnCache) and out.cache.seen == 6 + 40 - 1  # the cached run's
    assert type(out.cache.state).__name__ == {"llama_lm_nano": "tuple", "lightnet_lm_nano": "LightNetLMCache",
                                              "perceiver_ar_nano": "PerceiverARCache", "llp_nano": "LLPCache"}.get(
                                                  name, "WindowCache")
    # one unpadded prompt: generate drops the all-ones mask, as polyattn's own decoding has none; and generation
    # continued from the returned cache, which is fed only the one column it has not seen
    first = wrapper.generate(ids[:1], max_new_tokens=10, **greedy)
    assert torch.equal(first.sequences, model.generate(ids[:1], 10))
    more = wrapper.generate(first.sequences, cache=first.cache, max_new_tokens=5, **greedy)
    assert more.cache.seen == 6 + 15 - 1
    expected, logits = model.generate(ids[:1], 15, return_logits=True)
    assert torch.equal(more.sequences, expected) and torch.equal(torch.stack(more.logits, 1), logits[:, 10:])


def test_a_cache_passed_back_continues_the_sequence():
    """Forward with `use_cache`, then the next tokens with the returned cache: the last logits of one call over the
    whole sequence (transformers' own calling convention: the mask covers the cached columns too)."""
    for name in ["llama_lm_nano", "lightnet_lm_nano"]:
        _, wrapper = wrapped(name)
        ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            first = wrapper(ids[:, :6], attention_mask=torch.ones(2, 6), use_cache=True)
            assert first.cache.get_seq_length() == 6
            more = wrapper(ids[:, 6:], attention_mask=torch.ones(2, 9), cache=first.cache)
            whole = wrapper(ids, use_cache=False)
        assert more.cache is first.cache and more.cache.seen == 9
        torch.testing.assert_close(more.logits, whole.logits[:, 6:], rtol=1e-5, atol=1e-5)


def test_beam_search_is_refused_in_one_sentence():
    _, wrapper = wrapped("llama_lm_nano")
    with pytest.raises(ValueError, match="only supports"):
        wrapper.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, num_beams=2)


@pytest.mark.parametrize("name", ["llama_lm_nano", "lightnet_lm_nano", "perceiver_compressed_nano", "llp_nano",
                                  *MASKED])
def test_save_pretrained_round_trips_through_the_auto_classes(name, tmp_path):
    _, wrapper = wrapped(name)
    wrapper.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "polyattn"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), hf.PolyattnConfig)
    auto = AutoModelForMaskedLM if name in MASKED else AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(wrapper)
    ids = torch.randint(0, V - 1, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(reloaded(ids, use_cache=False).logits if name in CAUSAL else reloaded(ids).logits,
                           wrapper(ids, use_cache=False).logits if name in CAUSAL else wrapper(ids).logits)


def test_a_checkpoint_of_the_other_task_is_refused_in_one_sentence(tmp_path):
    _, wrapper = wrapped("bert_nano")
    wrapper.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a masked_lm model, not a causal_lm model; load it with "
                                         "AutoModelForMaskedLM"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_causal_loss_shifts_labels_as_transformers_does():
    from transformers.loss.loss_utils import ForCausalLMLoss

    _, wrapper = wrapped("llama_lm_nano")
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[1, :4] = IGNORE_INDEX
    out = wrapper(ids, labels=labels)
    assert out.cache is None
    torch.testing.assert_close(out.loss, ForCausalLMLoss(out.logits, labels, V))
    # a latent Perceiver scores its last num_latents positions: the loss over those of the shifted labels
    _, wrapper = wrapped("perceiver_ar_nano")
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(6))
    out = wrapper(ids, labels=ids)
    assert out.logits.shape == (2, 16, V)
    torch.testing.assert_close(out.loss, cross_entropy(out.logits[:, :-1], ids[:, -15:]))


@pytest.mark.parametrize("name", MASKED)
def test_masked_loss_is_the_models_own(name):
    model, wrapper = wrapped(name)
    ids = torch.randint(0, V - 1, (2, 10), generator=torch.Generator().manual_seed(7))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3] = ids[:, 3]
    ids[:, 3] = model.mask_token_id
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, -2:] = 0
    out = wrapper(ids, attention_mask=mask, labels=labels)
    logits, loss = model(ids, labels, attention_mask=mask.bool())
    assert torch.equal(out.logits, logits) and torch.equal(out.loss, loss)


def test_tokenizers_give_polyattns_ids():
    from polyattn.data.tokenizers import ByteTokenizer, train_bpe

    text = "ROMEO: Wherefore art thou — ¿qué? 東京 🙂\n"
    byte = ByteTokenizer()
    fast = hf.hf_tokenizer(byte)
    assert fast(text)["input_ids"] == byte.encode(text).tolist() and fast.decode(byte.encode(text)) == text
    masked = hf.hf_tokenizer(byte, mask_token_id=256)
    assert masked.mask_token == "[MASK]" and masked.mask_token_id == 256 and len(masked) == 257
    bpe = train_bpe(["the king and the queen and the knight\n" * 20, text * 5], 300)
    fast = hf.hf_tokenizer(bpe)
    assert fast(text)["input_ids"] == bpe.encode(text).tolist() and fast.decode(bpe.encode(text)) == text
    assert fast.eos_token_id == bpe.eos_id == 0


TINY_LM = ["model.dim=32", "model.depth=1", "model.num_heads=2", "data.seq_len=16", "train.batch_size=4",
           "data.eval_batch_size=8", "data.eval_tokens=200", "train.progress=false", "train.precision=fp32",
           "train.max_steps=2", "data.source=shakespeare"]


RUNS = {"byte": ("lightnet_lm_shakespeare", []), "bpe": ("llama_lm_shakespeare", ["data.tokenizer=bpe",
                                                                                  "data.vocab_size=300"]),
        "masked": ("bert_shakespeare", [])}


@pytest.fixture(scope="module", params=list(RUNS))
def lm_run(request, tmp_path_factory):
    """A tiny trained run (two steps) of a causal LM with each tokenizer, and of a masked LM."""
    from polyattn.train.config import build_config
    from polyattn.train.loop import train

    recipe, extra = RUNS[request.param]
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POLYATTN_CACHE", str(out / "cache"))
        train(build_config(recipe, [*TINY_LM, *extra, f"train.out_dir={out}", "train.run_name=lm"]), evaluate=False)
    return out / "lm"


def test_hf_command_converts_a_run_that_generates_its_greedy_text(lm_run, tmp_path, capsys, monkeypatch):
    from polyattn.registry import model_task
    from polyattn.train.loop import load_run

    out = tmp_path / "hf"
    assert main(["hf", str(lm_run), str(out)]) == 0
    assert "a Hugging Face model folder" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(out)
    run = load_run(lm_run)
    if model_task(run.config.model.name) == "masked_lm":
        model = AutoModelForMaskedLM.from_pretrained(out)
        inputs = tokenizer("ROMEO: But [MASK]", return_tensors="pt")
        assert int(inputs["input_ids"][0, -1]) == run.model.mask_token_id
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, run.model(inputs["input_ids"]))
    else:
        assert main(["generate", str(lm_run), "--prompt", "ROMEO:", "--max-new-tokens", "24", "--temperature",
                     "0"]) == 0
        expected = capsys.readouterr().out.rstrip("\n")
        model = AutoModelForCausalLM.from_pretrained(out)
        for use_cache in (True, False):
            ids = model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=24, do_sample=False,
                                 use_cache=use_cache)
            assert tokenizer.decode(ids[0]) == expected
    assert main(["hf", str(lm_run), str(out)]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert main(["hf", str(lm_run), str(tmp_path / "bf16"), "--precision", "bf16", "--no-ema"]) == 0
    reloaded = (AutoModelForMaskedLM if model_task(run.config.model.name) == "masked_lm" else AutoModelForCausalLM
                ).from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    # a folder that fails its check never takes OUT's name, and no staging folder is left behind
    def failing_check(*args):
        raise RuntimeError("the check failed")

    monkeypatch.setattr("polyattn.hf.convert._check", failing_check)
    with pytest.raises(RuntimeError, match="the check failed"):
        hf.convert_run(lm_run, tmp_path / "failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "hf"]


def test_hf_command_refuses_what_it_cannot_convert(tmp_path, capsys, monkeypatch):
    from polyattn.train.config import build_config, save_yaml

    assert main(["hf", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    classifier = tmp_path / "cls"
    classifier.mkdir()
    save_yaml(build_config("default", []).to_dict(), classifier / "config.yaml")
    assert main(["hf", str(classifier), str(tmp_path / "out")]) == 2
    assert "holds a classification model ('vit_nano'); `polyattn hf` converts causal and masked" in \
        capsys.readouterr().err
    # without transformers: one sentence naming the extra
    monkeypatch.setitem(sys.modules, "transformers", None)
    for module in [m for m in sys.modules if m.startswith("polyattn.hf")]:
        monkeypatch.delitem(sys.modules, module)
    assert main(["hf", str(classifier), str(tmp_path / "out")]) == 2
    assert "install it with pip install 'polyattn[hf]'" in capsys.readouterr().err
