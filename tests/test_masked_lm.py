"""Masked LM: the masking recipe, BERT and bidirectional LightNet (bidirectional, padding, loss on masked positions
only, fast == reference op), the training job (determinism, fixed evaluation masks, [MASK] id) and end-to-end
train / eval / resume, and `polyattn generate` refusing a masked-LM run."""

import json
import math

import numpy as np
import pytest
import torch

import polyattn
from polyattn.cli import main
from polyattn.data.text import pack_documents, pad_documents
from polyattn.errors import UserError
from polyattn.ops.lightnet import lightnet_reference
from polyattn.tasks.masked_lm import (
    MaskedLMJob,
    MaskingRecipe,
    eval_masked_windows,
    evaluate_mlm,
    masked_windows,
    mlm_metrics,
)
from polyattn.train.config import build_config
from polyattn.train.loop import train
from polyattn.train.run_log import read_metrics

MLMS = ["bert_nano", "lightnet_mlm_nano"]
# every kernelized linear attention as the token mixer of the LightNet MLM body (issue #17 §2)
CONTRACT_MLMS = MLMS + [f"linear_mlm_nano+{k}" for k in ("linear_elu", "linear_relu", "performer", "cosformer",
                                                         "hedgehog")]
V = 41  # 40 token ids + [MASK]


# ---- the masking recipe ----------------------------------------------------------------------------------

def test_recipe_proportions_over_a_large_sample():
    recipe = MaskingRecipe(mask_id=1000, num_token_ids=1000)
    tokens = torch.randint(0, 1000, (400, 500), generator=torch.Generator().manual_seed(0))
    inputs, targets = recipe.apply(tokens, np.random.default_rng(0))
    selected = targets != -100
    n = int(selected.sum())
    assert abs(n / tokens.numel() - 0.15) < 0.002  # the count per row is 0.15 · 500 = 75 exactly
    assert (selected.sum(1) == 75).all()
    assert torch.equal(targets[selected], tokens[selected])
    assert torch.equal(inputs[~selected], tokens[~selected]), "an unselected token was changed"
    masked = selected & (inputs == 1000)
    unchanged = selected & (inputs == tokens)
    random = selected & ~masked & ~unchanged
    # 30 000 selected tokens: 4 standard deviations of a proportion near 0.1 are ~0.007
    assert abs(int(masked.sum()) / n - 0.8) < 0.01
    assert abs(int(random.sum()) / n - 0.1) < 0.008
    assert abs(int(unchanged.sum()) / n - 0.1) < 0.008  # (+0.1 / 1000 for random draws of the same token)
    assert inputs[random].max() < 1000 and inputs[random].min() >= 0
    deciles = torch.bincount(inputs[random] // 100, minlength=10).float()  # ~300 each, std ~17
    assert ((deciles - deciles.mean()).abs() < 80).all(), "random replacements are not uniform over the token ids"


def test_recipe_is_configurable_and_validated():
    tokens = torch.randint(0, 50, (64, 200), generator=torch.Generator().manual_seed(1))
    inputs, targets = MaskingRecipe(50, 50, mask_prob=0.4, mask_replace=1.0, mask_random=0.0).apply(
        tokens, np.random.default_rng(1))
    selected = targets != -100
    assert abs(selected.float().mean() - 0.4) < 0.01 and (inputs[selected] == 50).all()
    # a fractional count is rounded stochastically: its mean is exactly mask_prob · n
    short = torch.zeros(4000, 10, dtype=torch.long)
    _, t = MaskingRecipe(5, 5).apply(short, np.random.default_rng(2))
    assert abs((t != -100).sum(1).float().mean() - 1.5) < 0.03
    for kw in (dict(mask_prob=0.0), dict(mask_prob=1.5), dict(mask_replace=0.9, mask_random=0.2),
               dict(mask_random=-0.1)):
        with pytest.raises(UserError, match=r"task\.mask_"):
            MaskingRecipe(5, 5, **kw)


def test_only_real_tokens_are_masked_and_every_row_gets_one():
    docs = [torch.arange(n) % 30 for n in (3, 40, 1, 17)]
    for side in ("left", "right"):
        x, mask = pad_documents(docs, side=side, pad_id=7)
        for seed in range(20):
            inputs, targets = MaskingRecipe(40, 40).apply(x, np.random.default_rng(seed), attention_mask=mask)
            selected = targets != -100
            assert not (selected & ~mask).any() and torch.equal(inputs[~mask], x[~mask])
            assert (selected.sum(1) >= 1).all()


def test_training_masks_are_a_pure_function_of_seed_epoch_and_step():
    stream = np.arange(5000) % 40
    recipe = MaskingRecipe(40, 40)
    batch = lambda seed, epoch, step: masked_windows(stream, recipe, 8, 32, seed=seed, epoch=epoch, step=step)
    a = batch(0, 1, 5)
    assert all(torch.equal(u, v) for u, v in zip(a, batch(0, 1, 5)))
    for other in (batch(1, 1, 5), batch(0, 2, 5), batch(0, 1, 6)):
        assert not torch.equal(a[1], other[1])
    assert a[0].shape == (8, 32) and ((a[1] != -100).sum(1) >= 1).all()


def test_evaluation_masks_are_fixed_and_do_not_depend_on_the_batch_size():
    stream = np.arange(1000) % 40
    recipe = MaskingRecipe(40, 40)
    rows = lambda bs: [(x[i], y[i]) for x, y in eval_masked_windows(stream, recipe, 64, bs) for i in range(len(x))]
    one, many = rows(1), rows(5)
    assert len(one) == 16 and [len(x) for x, _ in one] == [64] * 15 + [40]  # covers all 1000 tokens once
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(one, many))
    inputs, targets = torch.cat([x for x, _ in one]), torch.cat([y for _, y in one])
    assert not ((inputs != torch.from_numpy(stream)) & (targets == -100)).any()  # only selected tokens change
    limited = list(eval_masked_windows(stream, recipe, 64, 4, max_tokens=100))
    assert [tuple(x.shape) for x, _ in limited] == [(1, 64), (1, 36)]


def test_metrics_follow_their_definitions():
    m = mlm_metrics(total_nats=30.0, num_correct=4, num_tokens=10)
    assert m == {"loss": 3.0, "accuracy": 0.4, "ppl": pytest.approx(math.exp(3.0)), "tokens": 10}


class Uniform(torch.nn.Module):
    vocab_size = V

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.zeros(*x.shape, V) + self.w


def test_uniform_model_scores_log_v():
    m = evaluate_mlm(Uniform(), np.arange(700) % 40, MaskingRecipe(40, 40), seq_len=50, batch_size=3,
                     device=torch.device("cpu"))
    assert m["loss"] == pytest.approx(math.log(V)) and m["ppl"] == pytest.approx(V)
    assert m["tokens"] > 0 and m["accuracy"] < 0.2


# ---- the models ------------------------------------------------------------------------------------------

def tiny_mlm(name, **overrides):
    name, _, mixer = name.partition("+")
    overrides = {**overrides, **({"mixer": mixer} if mixer else {})}
    torch.manual_seed(0)
    return polyattn.create_model(name, vocab_size=V, dim=32, depth=2, num_heads=2, **overrides).eval()


def tokens(B, T, seed=1):
    return torch.randint(0, V - 1, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONTRACT_MLMS)
def test_changing_a_later_token_changes_earlier_outputs(name):
    model = tiny_mlm(name)
    x = tokens(2, 19)
    ref = model(x)
    for j in (5, 18):
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % (V - 1)
        assert not torch.allclose(model(y)[:, :j], ref[:, :j], atol=1e-5), "the encoder is not bidirectional"
    y = x.clone()
    y[:, 3] = model.mask_token_id
    assert not torch.allclose(model(y)[:, 3], ref[:, 3])


@pytest.mark.parametrize("name", CONTRACT_MLMS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_the_rows_alone(name, side):
    model = tiny_mlm(name)
    docs = [tokens(1, n, seed=n)[0] for n in (5, 17, 11, 1)]
    x, mask = pad_documents(docs, side=side, pad_id=3)
    out = model(x, attention_mask=mask)
    for i, doc in enumerate(docs):
        torch.testing.assert_close(out[i][mask[i]], model(doc[None])[0], atol=2e-5, rtol=1e-4)
    x2 = torch.where(mask, x, 9)  # padding contents do not matter
    torch.testing.assert_close(model(x2, attention_mask=mask)[mask], out[mask])


@pytest.mark.parametrize("name", CONTRACT_MLMS)
def test_packed_equals_padded(name):
    model = tiny_mlm(name)
    docs = [tokens(1, n, seed=n)[0] for n in (9, 3, 14)]
    padded, mask = pad_documents(docs)
    packed, cu = pack_documents(docs)
    torch.testing.assert_close(model(packed, cu_seqlens=cu)[0], model(padded, attention_mask=mask)[mask],
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", MLMS)
def test_loss_covers_the_masked_positions_only(name):
    model = tiny_mlm(name)
    x = tokens(2, 12)
    inputs, targets = MaskingRecipe(V - 1, V - 1, mask_prob=0.3).apply(x, np.random.default_rng(0))
    logits, loss = model(inputs, targets)
    keep = targets != -100
    manual = -logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(loss, manual)
    (grad,) = torch.autograd.grad(loss, logits)
    assert not grad[~keep].any() and grad[keep].any()


def test_lightnet_mlm_fast_form_equals_the_reference_op(monkeypatch):
    model = tiny_mlm("lightnet_mlm_nano").double()
    docs = [tokens(1, n, seed=n)[0] for n in (13, 6)]
    x, mask = pad_documents(docs, side="left")
    fast = model(x, attention_mask=mask)
    calls = []

    def reference(q, k, v, *, causal, scale, initial_state, output_final_state, mask, chunk_size, normalizer_init,
                  key_features, backend):
        assert backend == "torch"
        calls.append(causal)
        o, _ = lightnet_reference(q, k, v, causal=causal, scale=scale, initial_state=initial_state, mask=mask,
                                  normalizer_init=normalizer_init, key_features=key_features)
        return o.to(v.dtype), None

    monkeypatch.setattr("polyattn.layers.lightnet.lightnet_attn", reference)
    # the fast global form keeps its normaliser and state in float32, whatever the input dtype
    torch.testing.assert_close(model(x, attention_mask=mask), fast, atol=1e-6, rtol=1e-5)
    assert calls == [False, False]


@pytest.mark.parametrize("name", MLMS)
def test_mask_token_is_the_last_id_and_the_head_is_tied(name):
    model = polyattn.create_model(name)
    assert model.vocab_size == 257 and model.mask_token_id == 256 and model.io.head is None


# ---- the job and end-to-end runs -------------------------------------------------------------------------

TINY = ["model.dim=32", "model.depth=1", "model.num_heads=2", "data.seq_len=16", "train.batch_size=4",
        "data.eval_batch_size=8", "data.eval_tokens=400", "train.progress=false", "train.log_every=1",
        "train.precision=fp32", "data.source=shakespeare"]


def config(recipe, tmp_path, *extra):
    return build_config(recipe, [*TINY, f"train.out_dir={tmp_path}", *extra])


def test_job_resumes_batches_exactly_and_sizes_the_model_one_id_above_the_tokenizer(tmp_path, cache_dir):
    job = MaskedLMJob(config("bert_shakespeare", tmp_path), torch.device("cpu"))
    assert job.inferred_model_args == {"vocab_size": 257} and job.recipe.mask_id == 256
    it = job.batches(0, 0)
    first = [next(it) for _ in range(3)]
    resumed = next(job.batches(0, 2))
    assert all(torch.equal(a, b) for a, b in zip(first[2], resumed))
    assert (first[0][0] == 256).any() and (first[0][0] < 257).all()
    with pytest.raises(UserError, match="smaller than the tokenizer's 256 ids plus 1 reserved"):
        MaskedLMJob(config("bert_shakespeare", tmp_path, "model.vocab_size=256"), torch.device("cpu"))
    with pytest.raises(UserError, match="an image dataset, but a masked LM"):
        MaskedLMJob(config("bert_shakespeare", tmp_path, "data.source=digits"), torch.device("cpu"))


def test_bpe_mask_id_is_the_tokenizer_vocabulary_size(tmp_path, cache_dir):
    corpus = tmp_path / "plays.txt"
    corpus.write_text("It is the east, and Juliet is the sun. Arise, fair sun, and kill the envious moon.\n" * 60)
    job = MaskedLMJob(config("bert_shakespeare", tmp_path, f"data.source={corpus}", "data.tokenizer=bpe",
                             "data.vocab_size=300"), torch.device("cpu"))
    n = job.tokenizer.vocab_size
    assert job.recipe.mask_id == n and job.recipe.num_token_ids == n and job.inferred_model_args["vocab_size"] == n + 1


@pytest.mark.parametrize("recipe", ["bert_shakespeare", "lightnet_mlm_shakespeare"])
def test_train_eval_and_generate_refusal_end_to_end(recipe, tmp_path, cache_dir, capsys):
    summary = train(config(recipe, tmp_path, "train.max_steps=3", "train.run_name=run"))
    run = tmp_path / "run"
    test = summary["test"]
    assert {"loss", "accuracy", "ppl", "tokens"} <= set(test) and 0 <= test["accuracy"] <= 1
    assert test["ppl"] == pytest.approx(math.exp(test["loss"])) and test["loss"] < math.log(257) + 0.5
    assert test["tokens"] == pytest.approx(0.15 * 400, abs=8)  # 15% of the 400 evaluated tokens
    assert summary["train_tokens_per_s"] > 0
    capsys.readouterr()

    assert main(["eval", str(run)]) == 0
    assert f"{test['loss']:.4f}" in capsys.readouterr().out

    assert main(["generate", str(run), "--prompt", "ROMEO:"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "masked_lm" in err and "Traceback" not in err and err.count("\n") == 1


def test_resumed_run_sees_the_same_batches(tmp_path, cache_dir):
    ref = train(config("bert_shakespeare", tmp_path, "train.max_steps=4", "train.run_name=ref",
                       "train.checkpoint_every=2"))
    train(config("bert_shakespeare", tmp_path, "train.max_steps=2", "train.run_name=cut", "train.checkpoint_every=2"))
    cut = tmp_path / "cut"
    for name in ("summary.json", "model.safetensors"):  # as if the process had died right after step 2
        (cut / name).unlink()
    assert main(["train", "--resume", str(cut), "train.max_steps=4"]) == 0
    assert json.loads((cut / "summary.json").read_text())["test"] == ref["test"]
    losses = lambda run: [r["loss"] for r in read_metrics(run) if r.get("event") == "train"]
    assert losses(cut) == losses(tmp_path / "ref")
