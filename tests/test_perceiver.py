"""Perceiver AR, Double / Compressed / Split attention and LLP/ECP (spec `perceiver_ar_and_llp.md`, §7 checklist).

The models here are tiny: a window of n = 12 tokens ending in N = 5 latents (h = 7 context positions), LLP segments
of m = 4, and sequences of up to 30 tokens, so every test crosses the latent window, the window and several
segments.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import polyattn
from polyattn.cli import main
from polyattn.data.text import pad_documents
from polyattn.data.tokenizers import ByteTokenizer
from polyattn.errors import UserError
from polyattn.layers.attention import Attention
from polyattn.layers.tied_kv_attention import TiedKVAttention
from polyattn.models.perceiver_ar import PerceiverAR
from polyattn.models.perceiver_family import LatentPerceiver
from polyattn.models.perceiver_llp import LLPTransformer
from polyattn.models.perceiver_variants import (
    CompressedAttentionPerceiver,
    DoubleAttentionPerceiver,
    SplitAttentionPerceiver,
)
from polyattn.ops.attention import attention, causal_mask, causal_mask_at, double_mask, llp_mask, split_mask
from polyattn.registry import count_parameters
from polyattn.tasks.causal_lm import evaluate_lm
from polyattn.testing import decode_in_steps
from polyattn.train.config import build_config
from polyattn.train.loop import train

V, D, DEPTH, HEADS = 37, 32, 3, 2
WINDOW, LATENTS, COMPRESSED, SEGMENTS, SEGMENT_LEN = 12, 5, 3, 2, 4
LATENT_VARIANTS = ["ar", "double", "compressed", "split"]
VARIANT_CLASSES = {"ar": PerceiverAR, "double": DoubleAttentionPerceiver, "compressed": CompressedAttentionPerceiver,
                   "split": SplitAttentionPerceiver}
VARIANT_ARGS = {"compressed": {"compressed_len": COMPRESSED}, "split": {"num_segments": SEGMENTS}}
MODES = [False, True]  # clean, faithful


def perceiver(variant: str, faithful: bool = False, **kw) -> LatentPerceiver:
    torch.manual_seed(0)
    args = dict(vocab_size=V, dim=D, depth=DEPTH, num_heads=HEADS, max_seq_len=WINDOW, num_latents=LATENTS,
                faithful=faithful, **VARIANT_ARGS.get(variant, {}))
    return VARIANT_CLASSES[variant](**{**args, **kw}).eval()


def llp(faithful: bool = False, **kw) -> LLPTransformer:
    torch.manual_seed(0)
    args = dict(vocab_size=V, dim=D, depth=DEPTH, num_heads=HEADS, segment_len=SEGMENT_LEN, max_seq_len=WINDOW,
                faithful=faithful)
    return LLPTransformer(**{**args, **kw}).eval()


def every_model():
    """(id, builder) for every family member in both modes."""
    cases = [(f"{v}-{'faithful' if f else 'clean'}", lambda v=v, f=f: perceiver(v, f))
             for v in LATENT_VARIANTS for f in MODES]
    return cases + [(f"llp-{'faithful' if f else 'clean'}", lambda f=f: llp(f)) for f in MODES]


MODELS = dict(every_model())


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def output_positions(model, T: int) -> list[int]:
    """The sequence position of each output row of `model(tokens [B, T])`."""
    if isinstance(model, LLPTransformer):
        return list(range(T - (min(T, WINDOW) if model.faithful else T), T))
    L = min(T, WINDOW, LATENTS)
    return list(range(T - L, T))


# ---- §7.3 mask functions equal double-loop references -------------------------------------------------------

def loop_mask(rule, Tq, Tk):
    return torch.tensor([[bool(rule(t, u)) for u in range(Tk)] for t in range(Tq)])


@pytest.mark.parametrize("n", [7, 12, 13])
def test_masks_equal_double_loop_references(n):
    pos = torch.arange(n)
    for h in range(0, n + 1):
        ref = loop_mask(lambda t, u, h=h: u < h if t < h else u <= t, n, n)
        torch.testing.assert_close(double_mask(pos, pos, h), ref)
        for S in (1, 2, 3):
            seg = lambda p, h=h, S=S: p * S // h
            ref = loop_mask(lambda t, u, h=h, seg=seg: (u < h and seg(u) == seg(t)) if t < h else u <= t, n, n)
            torch.testing.assert_close(split_mask(pos, pos, h, S), ref)
    for m in (1, 3, 4, 5, n, n + 4):  # n not a multiple of m as well
        ref = loop_mask(lambda t, u, m=m: u <= t and u // m >= t // m - 1, n, n)
        torch.testing.assert_close(llp_mask(pos, pos, m), ref)
    torch.testing.assert_close(causal_mask_at(pos, pos), loop_mask(lambda t, u: u <= t, n, n))
    # per-row context lengths broadcast over a batch
    rows = double_mask(pos.expand(2, n), pos.expand(2, n), torch.tensor([2, 5]))
    assert torch.equal(rows[0], double_mask(pos, pos, 2)) and torch.equal(rows[1], double_mask(pos, pos, 5))


def test_llp_mask_is_a_block_sliding_window_and_dense_causal_for_one_segment():
    n, m = 20, 4
    pos = torch.arange(n)
    widths = llp_mask(pos, pos, m).sum(-1)
    assert widths[m:].min() == m + 1 and widths.max() == 2 * m  # m + 1 … 2m keys past the first segment
    for m in (n, n + 3):  # §7.4: one segment (S = 1, m ≥ n) is dense causal attention
        assert torch.equal(llp_mask(pos, pos, m), causal_mask(n, n))


# ---- §7.5 bottom-right alignment -------------------------------------------------------------------------------

def test_cross_attend_mask_is_bottom_right_aligned_and_top_left_is_not_the_same():
    n, N = WINDOW, LATENTS
    mask = causal_mask(N, n)  # what the cross-attend layer uses: query i sits at position i + (n − N)
    assert torch.equal(mask, loop_mask(lambda i, u: u <= i + (n - N), N, n))
    assert torch.equal(mask, causal_mask_at(torch.arange(n - N, n), torch.arange(n)))
    q, k, v = torch.randn(1, N, 2, 8), torch.randn(1, n, 2, 8), torch.randn(1, n, 2, 8)
    bottom_right = attention(q, k, v, attn_mask=mask)
    top_left = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)
    assert not torch.allclose(bottom_right, top_left, atol=1e-3)  # SDPA's is_causal masks the wrong keys here


# ---- §7.1 gradient causality, §7.2 perturbation causality -------------------------------------------------

def embedding_gradients(model, x: torch.Tensor, rows_fn) -> torch.Tensor:
    """`[R, T]`: |∂ (row r of rows_fn()) / ∂ embedding u| summed, in float64 (the rows' random projections)."""
    model = model.double()
    emb = model.io.embed(x).detach().requires_grad_(True)
    handle = model.io.embed.register_forward_hook(lambda mod, inp, out: emb)
    try:
        rows = rows_fn()  # (B, R, C)
    finally:
        handle.remove()
    w = torch.randn(rows.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = [torch.autograd.grad((rows[:, r] @ w).sum(), emb, retain_graph=True)[0].abs().sum((0, 2))
             for r in range(rows.shape[1])]
    return torch.stack(grads)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradient_causality_of_every_trained_position(name):
    model = MODELS[name]()
    x = tokens(2, WINDOW)  # a full window: the training regime
    grads = embedding_gradients(model, x, lambda: model(x))
    for r, t in enumerate(output_positions(model, WINDOW)):
        assert grads[r, t + 1:].sum() == 0, f"logit at position {t} depends on a later token"
        assert grads[r, t] > 0 and grads[r, : t + 1].min() > 0, f"position {t} does not see all of its window"


@pytest.mark.parametrize("variant", ["double", "split"])
@pytest.mark.parametrize("faithful", MODES)
def test_a_loss_on_context_rows_would_leak_the_future(variant, faithful):
    """§7.6: context rows attend bidirectionally among themselves, which is why only the latents are scored."""
    model = perceiver(variant, faithful)
    x = tokens(1, WINDOW)
    grads = embedding_gradients(model, x, lambda: model.forward_features(x))
    h = WINDOW - LATENTS
    assert grads[0, 1:h].max() > 0  # context row 0 sees later context tokens: not causal
    for t in range(h, WINDOW):  # the latent rows are
        assert grads[t, t + 1:].sum() == 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_changing_token_u_changes_no_output_before_u(name):
    model = MODELS[name]()
    T = 30  # beyond the window: the oldest tokens have dropped out of every Perceiver output
    x = tokens(2, T)
    ref, positions = model(x), output_positions(model, T)
    for u in (0, 10, 20, 27, 29):
        y = x.clone()
        y[:, u] = (y[:, u] + 1) % V
        out = model(y)
        before = [r for r, t in enumerate(positions) if t < u]
        torch.testing.assert_close(out[:, before], ref[:, before], atol=1e-6, rtol=0)
        if u >= T - WINDOW or (isinstance(model, LLPTransformer) and not model.faithful):
            assert not torch.allclose(out, ref), "the changed token had no effect"
        else:
            torch.testing.assert_close(out, ref, atol=0, rtol=0)  # older than the window: dropped out


# ---- §7.4 reductions ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [
    lambda: perceiver("ar", num_latents=WINDOW),  # N = n: the cross-attend is a dense causal layer
    lambda: perceiver("double"),  # T ≤ N: no context rows
    lambda: perceiver("split"),
    lambda: llp(segment_len=64),  # one segment
], ids=["ar", "double", "split", "llp"])
def test_with_every_position_a_latent_or_one_segment_the_clean_models_are_llama(build):
    model = build()
    llama = polyattn.create_model("llama_lm_nano", vocab_size=V, dim=D, depth=DEPTH, num_heads=HEADS).eval()
    llama.load_state_dict(model.state_dict())  # the same module tree: the clean block is the LLaMA block
    T = min(WINDOW, model.num_latents) if isinstance(model, LatentPerceiver) else 30
    x = tokens(2, T)
    torch.testing.assert_close(model(x), llama(x), atol=2e-5, rtol=1e-4)


# ---- §7.7 decoding ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_generation_equals_generation_without_cache_beyond_the_window(name):
    model = MODELS[name]()
    prompt = tokens(2, 4)
    out_c, logits_c = model.generate(prompt, 26, return_logits=True)  # 30 tokens: 2.5 windows
    out_n, logits_n = model.generate(prompt, 26, use_cache=False, return_logits=True)
    torch.testing.assert_close(logits_c, logits_n, atol=2e-5, rtol=1e-4)
    assert torch.equal(out_c, out_n)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_decoding_step_equals_the_forward_over_the_sequence_so_far(name):
    model = MODELS[name]()
    x = tokens(2, 30)
    logits, cache = model.forward_cached(x[:, :3])
    torch.testing.assert_close(logits, model(x[:, :3])[:, -logits.shape[1]:], atol=2e-5, rtol=1e-4)
    for t in range(3, 30):
        logits, cache = model.forward_cached(x[:, t:t + 1], cache)
        torch.testing.assert_close(logits[:, -1], model(x[:, :t + 1])[:, -1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("split", [1, 4, 9, 13, 20, 29])
def test_a_prefix_split_into_two_calls_equals_one_call(name, split):
    model = MODELS[name]()
    x = tokens(2, 30)
    full = model(x)
    _, cache = model.forward_cached(x[:, :split])
    second, _ = model.forward_cached(x[:, split:], cache)
    torch.testing.assert_close(second, full[:, -second.shape[1]:], atol=2e-5, rtol=1e-4)
    assert second.shape[1] == min(30 - split, full.shape[1])
    one_call, _ = model.forward_cached(x)
    torch.testing.assert_close(one_call, full, atol=2e-5, rtol=1e-4)


def test_llp_block_aligned_cache_equals_the_full_forward_for_long_sequences_and_stays_bounded():
    model = llp()
    x = tokens(2, 60)  # 15 segments
    full = model(x)
    steps = []
    for logits, cache in decode_in_steps(model, x, 5):
        steps.append(logits)
        assert cache.layers[0].k.shape[1] <= 2 * SEGMENT_LEN  # the previous and the current segment only
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-4)



def test_perceiver_ar_cache_projects_each_token_into_the_cross_attend_keys_once():
    """Decoding reuses the cross-attend layer's keys/values of the window: each step projects its new token only,
    inside the window and after it slides (the oldest keys drop out); the results equal the uncached forward
    (the decoding tests above)."""
    model = perceiver("ar")
    rows = []
    model.blocks[0].attn.k_proj.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    x = tokens(1, 20)
    _, cache = model.forward_cached(x[:, :3])
    assert rows == [3]
    for t in range(3, 20):  # past N (latent stack recomputed) and past n (window slides): still one new key
        _, cache = model.forward_cached(x[:, t:t + 1], cache)
    assert rows[1:] == [1] * 17 and cache.cross.k.shape[1] == WINDOW

def test_perceiver_ar_latent_kv_cache_is_exact_up_to_n_latents_and_a_fresh_forward_after_a_refill():
    """§7.7: the official fixed-size latent memory (cache_mode="latent_kv")."""
    model = perceiver("ar", cache_mode="latent_kv")
    exact = perceiver("ar")
    x = tokens(2, 30)
    logits, cache = model.forward_cached(x[:, :2])
    counts, mismatch = [], False
    for t in range(2, 30):
        logits, cache = model.forward_cached(x[:, t:t + 1], cache)
        seq = x[:, :t + 1]
        counts.append(cache.latent_len)
        if t + 1 <= LATENTS:  # every position a latent: the exact mode
            torch.testing.assert_close(logits[:, -1], exact(seq)[:, -1], atol=2e-5, rtol=1e-4)
        if t + 1 <= WINDOW:  # window start fixed: a forward with as many latents as the memory holds
            torch.testing.assert_close(logits[:, -1], model(seq, num_latents=cache.latent_len)[:, -1], atol=2e-5,
                                       rtol=1e-4)
        if counts[-1] == LATENTS // 2 and len(counts) > 1 and counts[-2] == LATENTS:  # right after a refill
            torch.testing.assert_close(logits[:, -1], model(seq, num_latents=LATENTS // 2)[:, -1], atol=2e-5,
                                       rtol=1e-4)
        mismatch |= not torch.allclose(logits[:, -1], exact(seq)[:, -1], atol=1e-4)
    assert counts.count(LATENTS // 2) >= 3 and max(counts) == LATENTS  # it refilled, several times
    assert mismatch  # and it is an approximation of the exact mode past N tokens (documented)


# ---- §7.9 padding ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
def test_left_padded_rows_equal_the_rows_alone_and_padding_gets_no_weight(name):
    model = MODELS[name]()
    docs = [tokens(1, n, seed=n)[0] for n in (3, 9, 17)]  # shorter than N, than n, longer than n
    x, mask = pad_documents(docs, side="left")
    out = model(x, attention_mask=mask)
    for i, doc in enumerate(docs):
        alone = model(doc[None])[0]
        torch.testing.assert_close(out[i, out.shape[1] - len(alone):], alone, atol=2e-5, rtol=1e-4)
    other = torch.where(mask, x, (x + 7) % V)  # other ids in the padding slots: nothing real changes
    out2 = model(other, attention_mask=mask)
    real = mask[:, -out.shape[1]:]
    torch.testing.assert_close(out2[real], out[real], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_right_padded_rows_equal_the_rows_alone_while_every_position_is_a_latent(name):
    """Right padding keeps the rows' starts aligned; the latents are the last columns, so for the latent models
    this holds while T ≤ N (longer documents go left-padded, as prompts do)."""
    model = MODELS[name]()
    docs = [tokens(1, n, seed=n)[0] for n in (2, LATENTS)]
    x, mask = pad_documents(docs, side="right")
    out = model(x, attention_mask=mask)
    for i, doc in enumerate(docs):
        torch.testing.assert_close(out[i][mask[i]], model(doc[None])[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_left_padded_prompt_batch_generates_what_each_prompt_generates_alone(name):
    model = MODELS[name]()
    prompts = [tokens(1, n, seed=n)[0] for n in (2, 7, 14)]
    x, mask = pad_documents(prompts, side="left")
    for use_cache in (True, False):
        batch = model.generate(x, 18, attention_mask=mask, use_cache=use_cache)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], 18, use_cache=use_cache)
            assert torch.equal(batch[i, -18:], alone[0, -18:])


def test_packed_documents_are_each_their_own_sequence():
    model = perceiver("ar").train()
    docs = [tokens(1, n, seed=n)[0] for n in (3, 11, 8)]  # shorter and longer than N
    packed = torch.cat(docs)[None]
    cu = torch.tensor([0, 3, 14, 22])
    targets = torch.roll(packed, -1, 1)
    logits, loss = model(packed, targets, cu_seqlens=cu)
    alone = [model(d[None])[0] for d in docs]
    torch.testing.assert_close(logits[0], torch.cat(alone), atol=2e-5, rtol=1e-4)
    scored = torch.cat([targets[0, e - len(a):e] for a, e in zip(alone, cu[1:].tolist())])
    torch.testing.assert_close(loss, F.cross_entropy(logits[0], scored))


# ---- loss on the latents, the task ----------------------------------------------------------------------

@pytest.mark.parametrize("variant", LATENT_VARIANTS)
def test_the_loss_is_on_the_latents_only(variant):
    model = perceiver(variant)
    x = tokens(2, WINDOW)
    y = torch.roll(x, -1, 1)
    logits, loss = model(x, y)
    assert logits.shape == (2, LATENTS, V)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), y[:, -LATENTS:].flatten()))
    y2 = y.clone()
    y2[:, :-LATENTS] = (y2[:, :-LATENTS] + 1) % V  # the context targets are never scored
    torch.testing.assert_close(model(x, y2)[1], loss, atol=0, rtol=0)
    llp_logits, _ = llp()(x, y)
    assert llp_logits.shape == (2, WINDOW, V)  # LLP trains on every position


def test_evaluation_scores_the_latents_of_each_window():
    model = perceiver("ar")
    stream = np.asarray(tokens(1, 100)[0])
    m = evaluate_lm(model, stream, ByteTokenizer(), seq_len=WINDOW, batch_size=3, device=torch.device("cpu"),
                    stride=LATENTS)
    # 99 targets, the first WINDOW - LATENTS of them context only: each window scores its last LATENTS targets
    assert m["tokens"] == 99 - (WINDOW - LATENTS) and math.isfinite(m["loss"])
    llama = polyattn.create_model("llama_lm_nano", vocab_size=V, dim=32, depth=1, num_heads=2)
    same = evaluate_lm(llama, stream, ByteTokenizer(), seq_len=WINDOW, batch_size=3, device=torch.device("cpu"),
                       stride=LATENTS)
    assert same["tokens"] == m["tokens"]  # both kinds of model are scored on the same targets
    with pytest.raises(UserError, match="eval_stride to at most"):
        evaluate_lm(model, stream, ByteTokenizer(), seq_len=WINDOW, batch_size=3, device=torch.device("cpu"))


@pytest.mark.parametrize("variant", LATENT_VARIANTS)
def test_a_training_row_longer_than_the_window_is_refused(variant):
    model = perceiver(variant).train()
    with pytest.raises(ValueError, match=f"a training row of {WINDOW + 1} tokens exceeds max_seq_len {WINDOW}"):
        model(tokens(1, WINDOW + 1))
    assert model.eval()(tokens(1, WINDOW + 1)).shape == (1, LATENTS, V)  # inference reads the last n tokens



def test_each_model_takes_only_its_own_arguments():
    """One class per variant: an option of another variant is an error, not silently ignored."""
    with pytest.raises(TypeError, match="num_segments"):
        perceiver("double", num_segments=2)
    with pytest.raises(TypeError, match="compressed_len"):
        perceiver("split", compressed_len=2)
    for variant in ("double", "split", "compressed"):
        with pytest.raises(TypeError, match="cache_mode"):
            perceiver(variant, cache_mode="latent_kv")
    with pytest.raises(ValueError, match="cache_mode 'latent_kv' is an option of the clean mode"):
        perceiver("ar", True, cache_mode="latent_kv")
    with pytest.raises(ValueError, match="fixed by its compression"):
        perceiver("compressed")(tokens(1, WINDOW), num_latents=2)
    assert polyattn.create_model("perceiver_split_nano").num_segments == 4  # the registered variants' own values
    assert polyattn.create_model("perceiver_compressed_nano").compressed_len == 256

def test_cross_attend_dropout_removes_prefix_keys_in_training_only():
    model = perceiver("ar", cross_attn_dropout=0.5)
    x = tokens(2, WINDOW)
    torch.testing.assert_close(model(x), perceiver("ar")(x))  # off in evaluation
    model.train()
    a, b = model(x), model(x)
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


# ---- §7.8 faithful mode -------------------------------------------------------------------------------

def authors_count(V, D, L, heads, ecp=False):
    """§2.11: 2·V·D + V + 2D + L·(11D² + 10D + 2·d_head), plus L·(D² + D) for ECP's to_out_0."""
    return 2 * V * D + V + 2 * D + L * (11 * D * D + 10 * D + 2 * (D // heads)) + (L * (D * D + D) if ecp else 0)


@pytest.mark.parametrize("name, args, expected_m, ecp", [
    ("llp_small", dict(depth=12, segment_len=256, max_seq_len=2048), 129.6, True),
    ("llp_small", dict(depth=24, segment_len=256, max_seq_len=2048), 214.6, True),
    ("llp_small", dict(depth=6, segment_len=256, max_seq_len=1024), 87.1, True),
    ("perceiver_ar_small", dict(depth=12, num_heads=6, max_seq_len=2048, num_latents=1024), 122.5, False),
    ("perceiver_compressed_nano", dict(depth=12, num_heads=6, max_seq_len=2048, num_latents=1024,
                                       compressed_len=512), 128.8, False),
])
def test_faithful_parameter_counts_follow_the_authors_code(name, args, expected_m, ecp):
    vocab = 28_996  # bert-base-cased
    n = count_parameters(name, vocab_size=vocab, dim=768, faithful=True, **args)
    expected = authors_count(vocab, 768, args["depth"], 6, ecp)
    if "compressed" in name:
        expected += args["depth"] * (1024 * 512 + 512)  # a projection_hist in every layer
    assert n == expected and round(n / 1e6, 1) == expected_m


def test_faithful_attention_ties_k_and_v_rotates_the_values_and_clean_attention_does_not():
    torch.manual_seed(0)
    tied, clean = TiedKVAttention(D, HEADS), Attention(D, HEADS, proj_bias=False)
    assert not hasattr(tied, "k_proj") and not hasattr(tied, "v_proj")
    ctx = tied.encode_context(torch.randn(1, 6, D))
    assert ctx.k is ctx.v
    rope = perceiver("ar").rope
    x = torch.randn(1, 6, D)
    mask = causal_mask(6, 6)
    for attn, shift_invariant in ((tied, False), (clean, True)):
        a, _ = attn(x, rope=rope(torch.arange(6)), attn_mask=mask)
        b, _ = attn(x, rope=rope(torch.arange(6) + 5), attn_mask=mask)  # the same tokens 5 positions later
        assert torch.allclose(a, b, atol=1e-5) == shift_invariant  # rotated values see absolute positions


def test_faithful_rope_sits_in_layer_zero_except_in_double_attention():
    for variant in LATENT_VARIANTS:
        assert perceiver(variant).rope_in_layer == (True,) * DEPTH
        expected = (True,) * DEPTH if variant == "double" else (True,) + (False,) * (DEPTH - 1)
        assert perceiver(variant, faithful=True).rope_in_layer == expected
    assert llp(True).rope_in_layer == (True, False, False) and llp().rope_in_layer == (True,) * DEPTH


def test_faithful_ecp_quirks_unused_kv_norm_and_a_segment_zero_output_projection():
    model = llp(True, depth=1)
    x = tokens(1, WINDOW)
    ref = model(x)
    with torch.no_grad():
        model.blocks[0].attn.kv_norm.weight.mul_(3)  # computed but unused in ECPAttention
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
    with torch.no_grad():
        model.blocks[0].attn.o_proj_first.weight.mul_(3)  # to_out_0: segment 0 only
    out = model(x)
    assert not torch.allclose(out[:, :SEGMENT_LEN], ref[:, :SEGMENT_LEN])
    torch.testing.assert_close(out[:, SEGMENT_LEN:], ref[:, SEGMENT_LEN:], atol=0, rtol=0)
    baseline = perceiver("ar", True)  # the baseline does normalise K=V
    ref = baseline(x)
    with torch.no_grad():
        baseline.blocks[0].attn.kv_norm.weight.mul_(3)
    assert not torch.allclose(baseline(x), ref)


def test_faithful_kv_norm_normalises_the_rotated_keys_and_values():
    """The authors rotate K=V, then apply the per-head LayerNorm; the two do not commute (mean subtraction and the
    per-channel affine), so the order is part of the function."""
    torch.manual_seed(0)
    tied = TiedKVAttention(D, HEADS)
    with torch.no_grad():
        tied.kv_norm.weight.uniform_(0.5, 1.5)
        tied.kv_norm.bias.uniform_(-0.5, 0.5)
    x, rot = torch.randn(2, 6, D), perceiver("ar").rope(torch.arange(6))
    kv = tied.kv_proj(x).unflatten(-1, (HEADS, D // HEADS))
    torch.testing.assert_close(tied.encode_context(x, rope=rot).k, tied.kv_norm(rot.apply(kv)))
    assert not torch.allclose(tied.encode_context(x, rope=rot).k, rot.apply(tied.kv_norm(kv)), atol=1e-3)


def authors_double_or_split_latents(model, x: torch.Tensor, num_segments: int | None) -> torch.Tensor:
    """The latents' logits of a faithful Double (`num_segments=None`) or Split model over one full window, written
    from the structure of the authors' layers (not from the library's masks): queries and tied K=V from the
    pre-norm rows, RoPE where the layer has it, then the per-head LayerNorm; the latent rows attend to every row
    under a causal triangle over the latent columns, the context rows (split: each segment of them) only to
    themselves, unmasked; the two outputs concatenated, projected, added to the residual of every row; the
    feed-forward on every row."""
    n, N = model.max_seq_len, model.num_latents
    h, H = n - N, model.blocks[0].attn.num_heads
    segments = num_segments or 1
    z = model.io.embed_tokens(x)
    for i, block in enumerate(model.blocks):
        attn, y = block.attn, block.norm1(z)
        q = attn.q_proj(y).unflatten(-1, (H, -1)).transpose(1, 2)  # (B, H, n, dh)
        kv = attn.kv_proj(y).unflatten(-1, (H, -1))
        if model.rope_in_layer[i]:
            rot = model.rope(torch.arange(n))
            q, kv = rot.apply(q.transpose(1, 2)).transpose(1, 2), rot.apply(kv)
        kv = attn.kv_norm(kv).transpose(1, 2)  # (B, H, n, dh)
        scale = q.shape[-1] ** -0.5
        scores = q[:, :, h:] @ kv.transpose(-1, -2) * scale  # (B, H, N, n)
        scores[..., h:] = scores[..., h:].masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
        latent_out = scores.softmax(-1) @ kv
        m = h // segments
        q_ctx, kv_ctx = q[:, :, :h].unflatten(2, (segments, m)), kv[:, :, :h].unflatten(2, (segments, m))
        context_out = ((q_ctx @ kv_ctx.transpose(-1, -2) * scale).softmax(-1) @ kv_ctx).flatten(2, 3)
        out = torch.cat((context_out, latent_out), 2).transpose(1, 2).flatten(2)  # (B, n, D)
        z = z + attn.o_proj(out)
        z = z + block.mlp(block.norm2(z))
    return model.io.logits(z[:, h:])


@pytest.mark.parametrize("variant", ["double", "split"])
def test_faithful_double_and_split_equal_the_authors_layers(variant):
    """Masks, RoPE placement (every layer in Double, layer 0 in Split), the K=V norm after RoPE, and the context rows'
    own path (pre-norm, residual, feed-forward in every layer), against `authors_double_or_split_latents`."""
    model = perceiver(variant, True, max_seq_len=13, **({"num_segments": 2} if variant == "split" else {}))
    with torch.no_grad():  # norms away from their initial values, so that their placement shows
        for block in model.blocks:
            for norm in (block.norm1, block.norm2, block.attn.kv_norm):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
    x = tokens(2, 13)
    expected = authors_double_or_split_latents(model, x, 2 if variant == "split" else None)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_faithful_feed_forward_drops_its_hidden_activations_only():
    """The authors' feed-forward is Linear, GELU, Dropout, Linear: no dropout on its output."""
    mlp = perceiver("double", True, dropout=0.5).train().blocks[0].mlp
    x = torch.randn(2, 6, D)
    torch.manual_seed(3)
    out = mlp(x)
    torch.manual_seed(3)
    torch.testing.assert_close(out, mlp.fc2(F.dropout(mlp.act(mlp.fc1(x)), 0.5)))


def test_faithful_compressed_builds_a_projection_per_layer_and_uses_the_first():
    model = perceiver("compressed", True)
    assert len(model.compress) == DEPTH and len(perceiver("compressed").compress) == 1
    x = tokens(1, WINDOW)
    ref = model(x)
    with torch.no_grad():
        model.compress[1].weight.mul_(3)
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)


@pytest.mark.parametrize("variant", [*LATENT_VARIANTS, "llp"])
def test_clean_and_faithful_modes_share_the_same_masks(variant):
    masks = {}
    for faithful in MODES:
        model = llp(faithful) if variant == "llp" else perceiver(variant, faithful)
        seen = []
        for block in model.blocks:
            block.attn.register_forward_pre_hook(lambda m, a, kw, seen=seen: seen.append(kw), with_kwargs=True)
        x = tokens(2, WINDOW)
        # a padding mask (all real) keeps clean LLP on its mask form; whole rows go segment by segment
        model(x, attention_mask=torch.ones_like(x, dtype=torch.bool)) if variant == "llp" else model(x)
        masks[faithful] = [kw["attn_mask"] for kw in seen]
        if variant == "llp" and not faithful:
            seen.clear()
            model(x)
            assert all(kw["attn_mask"] is None and kw["block_sparse"].keywords == {"segment_len": model.segment_len}
                       for kw in seen) and len(seen) == DEPTH
    assert len(masks[False]) == len(masks[True]) == DEPTH
    for a, b in zip(masks[False], masks[True]):
        assert torch.equal(a, b)


# ---- registered sizes, recipes ---------------------------------------------------------------------------

def test_nano_models_match_llama_lm_nano_in_parameters():
    llama = count_parameters("llama_lm_nano")
    for name in ("perceiver_ar_nano", "perceiver_double_nano", "perceiver_split_nano", "llp_nano"):
        assert count_parameters(name) == llama  # the same blocks: only the attention pattern differs
    assert count_parameters("perceiver_compressed_nano") == llama + 512 * 256 + 256  # P: R^512 → R^256


@pytest.mark.parametrize("recipe, model_args", [
    ("perceiver_ar_shakespeare", ["model.num_latents=8", "data.eval_stride=8"]),
    ("perceiver_compressed_shakespeare", ["model.num_latents=8", "model.compressed_len=4", "data.eval_stride=8"]),
    ("llp_shakespeare", ["model.segment_len=8"]),
])
def test_three_training_steps_then_generate_from_the_run(recipe, model_args, tmp_path, cache_dir, capsys):
    config = build_config(recipe, [
        "data.source=shakespeare", "model.dim=32", "model.depth=2", "model.num_heads=2", "model.max_seq_len=24",
        *model_args, "data.seq_len=24", "train.batch_size=4", "train.max_steps=3", "data.eval_tokens=200",
        "train.progress=false", "train.precision=fp32", f"train.out_dir={tmp_path}", "train.run_name=run"])
    summary = train(config)
    assert math.isfinite(summary["test"]["loss"])
    capsys.readouterr()
    argv = ["generate", str(tmp_path / "run"), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0"]
    assert main(argv) == 0
    cached = capsys.readouterr().out
    assert main([*argv, "--no-cache"]) == 0
    assert capsys.readouterr().out == cached and cached.startswith("ROMEO:")
