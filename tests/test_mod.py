"""Mixture-of-Depths (arXiv 2404.02258, `polyattn.layers.mod`) on the LLaMA-style LM: capacity 1.0 is the plain
block stack with router-weighted residuals, top-k training computes the capacity's share of tokens, the inference
(predictor) routing is causal, and cached decoding equals the full forward in that mode."""

import pytest
import torch

from polyattn.models import LlamaLM

V, D, DEPTH = 37, 32, 4


def mod_model(capacity, **kw):
    torch.manual_seed(0)
    return LlamaLM(vocab_size=V, dim=D, depth=DEPTH, num_heads=2, mod_capacity=capacity, **kw)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(1))


def predictor_bias(model, value):
    """Sets every predictor's output bias, its weights spread so that its sign varies by token: a large bias
    chooses every token, a large negative one none, 0 some."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for router in model.mod.values():
            last = router.predictor[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=gen) * 20)
            last.bias.fill_(value)


def test_capacity_one_is_the_plain_stack_with_router_weighted_blocks(tokens):
    model = mod_model(1.0).train()
    logits, routings = model(tokens, return_routing=True)
    assert all(r.selected.all() for r in routings)
    # the reference: every block on every token, each routed block's residual branches scaled by its router weight
    x = model.io.embed_tokens(tokens)
    rope = model.rope(torch.arange(tokens.shape[1]))
    for i, block in enumerate(model.blocks):
        if str(i) in model.mod:
            r = model.mod[str(i)].router(x)  # (B, T, 1)
            y, _ = block(x, rope=rope)
            x = x + r * (y - x)
        else:
            x, _ = block(x, rope=rope)
    torch.testing.assert_close(logits, model.io.logits(x), atol=1e-5, rtol=1e-5)
    # with the predictor choosing every token, the inference routing is the same network
    predictor_bias(model, 50.0)
    torch.testing.assert_close(model.eval()(tokens), logits, atol=1e-5, rtol=1e-5)


def test_top_k_computes_the_capacity_and_trains_router_and_predictor(tokens):
    model = mod_model(0.25).train()
    logits, routings = model(tokens, return_routing=True)
    assert len(routings) == DEPTH // 2
    assert all((r.selected.sum(1) == 5).all() for r in routings)  # round(0.25 · 20) tokens per row
    loss = logits.square().mean() + sum(r.predictor_loss for r in routings)
    loss.backward()
    for router in model.mod.values():
        assert router.router.weight.grad.abs().sum() > 0  # the router weight multiplies the block output
        assert router.predictor[0].weight.grad.abs().sum() > 0


def test_routing_runs_under_bfloat16_autocast(tokens):
    model = mod_model(0.25)
    predictor_bias(model, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, routings = model.train()(tokens, return_routing=True)
        (logits.float().mean() + sum(r.predictor_loss for r in routings)).backward()
        with torch.no_grad():
            _, cache = model.eval().forward_cached(tokens[:, :6])
            model.forward_cached(tokens[:, 6:7], cache)


def test_inference_routing_is_causal(tokens):
    model = mod_model(0.5).eval()
    predictor_bias(model, 0.0)  # roughly half the tokens chosen, varying by row
    with torch.no_grad():
        base, routings = model(tokens, return_routing=True)
        assert any(0 < r.selected.sum() < r.selected.numel() for r in routings)
        for t in (0, 7, 19):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % V
            out = model(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bias", [0.0, -50.0], ids=["some tokens", "no tokens"])
def test_cached_decoding_equals_full_forward_in_inference_mode(tokens, bias):
    model = mod_model(0.5).eval()
    predictor_bias(model, bias)
    with torch.no_grad():
        full = model(tokens)
        prompt = 8
        logits, cache = model.forward_cached(tokens[:, :prompt])
        steps = [logits]
        for t in range(prompt, tokens.shape[1]):
            logits, cache = model.forward_cached(tokens[:, t:t + 1], cache)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # greedy generation through the cache equals generation by full forwards
    with torch.no_grad():
        assert torch.equal(model.generate(tokens[:, :5], 6), model.generate(tokens[:, :5], 6, use_cache=False))


def test_bad_settings_are_refused(tokens):
    from polyattn.deploy.decode_step import BoundedKVStep
    from polyattn.errors import UserError

    with pytest.raises(UserError, match="Mixture-of-Depths model's routed blocks"):
        BoundedKVStep(mod_model(0.5), 8)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        mod_model(0.0)
    with pytest.raises(ValueError, match="needs reversible=False"):
        mod_model(0.5, reversible=True)
    padded = torch.ones_like(tokens)
    padded[0, 0] = 0
    with pytest.raises(ValueError, match="takes no padding"):
        mod_model(0.5)(tokens, attention_mask=padded)
    model = mod_model(0.5).eval()  # a mask with every token real is no padding
    torch.testing.assert_close(model(tokens, attention_mask=torch.ones_like(tokens)), model(tokens))
    with pytest.raises(ValueError, match="build it with mod_capacity"):
        LlamaLM(vocab_size=V, dim=D, depth=2, num_heads=2)(tokens, return_routing=True)


def test_the_inference_threshold_is_calibrated_to_the_capacity_in_training(tokens):
    """A predictor that has not learnt the top-k (here: untrained) would choose almost no token at the paper's
    logit 0 once its bias is low; the calibrated threshold chooses the capacity's share of the training batch."""
    model = mod_model(0.25)
    predictor_bias(model, -30.0)  # logits spread around -30: the literal rule (logit > 0) chooses nothing
    first = model.mod["1"]
    with torch.no_grad():
        _, routings = model.eval()(tokens, return_routing=True)
        assert not routings[0].selected.any()
        model.train()(tokens)
        assert int(first.threshold_updates) == 1 and first.threshold < -1.0
        _, routings = model.eval()(tokens, return_routing=True)
    # the first routed block reads the same input in both modes: exactly round(0.25 · 20) tokens per row in all
    assert int(routings[0].selected.sum()) == 3 * 5
    # a second measurement is averaged with the first, not substituted for it
    before = first.threshold.clone()
    with torch.no_grad():
        model.train()(tokens.flip(1))
    measured = 2 * first.threshold - before  # weight 1/2 on the second measurement
    assert int(first.threshold_updates) == 2 and not torch.equal(measured, before)


def test_the_threshold_is_saved_and_an_older_model_loads_with_the_papers_rule(tokens):
    model = mod_model(0.25).train()
    with torch.no_grad():
        model(tokens)
    state = model.state_dict()
    assert "mod.1.threshold" in state
    again = mod_model(0.25)
    again.load_state_dict(state)
    assert torch.equal(again.mod["1"].threshold, model.mod["1"].threshold)
    older = {k: v for k, v in state.items() if "threshold" not in k}  # saved before the buffer existed
    again.load_state_dict(older)
    assert float(again.mod["1"].threshold) == 0.0 and float(again.mod["1"].threshold_updates) == 0.0
