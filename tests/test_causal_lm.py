"""The causal LM task: loss and metrics, the training job, and end-to-end training, eval, resume and generate."""

import gzip
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from polyattn.cli import main
from polyattn.data.text import EMBEDDED
from polyattn.data.tokenizers import ByteTokenizer, train_bpe
from polyattn.errors import UserError
from polyattn.ops.losses import cross_entropy
from polyattn.tasks.causal_lm import evaluate_lm, lm_metrics, stream_text
from polyattn.train.config import build_config
from polyattn.train.loop import train
from polyattn.train.run_log import read_metrics

TINY = ["model.dim=32", "model.depth=1", "model.num_heads=2", "data.seq_len=16", "train.batch_size=4",
        "data.eval_batch_size=8", "data.eval_tokens=300", "train.progress=false", "train.log_every=2",
        "train.precision=fp32"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """12 KB of Shakespeare: 10.8K training tokens (168 steps of 4 x 16 per epoch)."""
    with gzip.open(EMBEDDED["shakespeare"], "rt", encoding="utf-8") as f:
        text = f.read(12_000)
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(text)
    return path


def config(recipe, tmp_path, corpus_file, *extra):
    return build_config(recipe, [*TINY, f"data.source={corpus_file}", f"train.out_dir={tmp_path}", *extra])


class Uniform(nn.Module):
    """Equal logits for every token: loss ln V, bits per byte log2 V for bytes."""

    vocab_size = 256

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab_size) + self.w


def test_loss_ignores_padding_and_metrics_follow_their_definitions():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[1, 2:] = -100
    keep = targets != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(cross_entropy(logits, targets), manual)
    torch.testing.assert_close(cross_entropy(logits, targets, reduction="sum"), manual * keep.sum())
    m = lm_metrics(total_nats=200.0, num_tokens=100, num_bytes=400)
    assert m["loss"] == 2.0 and m["ppl"] == pytest.approx(math.exp(2.0))
    assert m["bpb"] == pytest.approx(2.0 / math.log(2) / 4)  # 4 bytes per token


def test_uniform_model_scores_log_v_and_bpe_counts_decoded_bytes():
    tokens = np.frombuffer(b"It is the east, and Juliet is the sun." * 5, dtype=np.uint8).astype(np.uint16)
    m = evaluate_lm(Uniform(), tokens, ByteTokenizer(), seq_len=16, batch_size=3, device=torch.device("cpu"))
    assert m["tokens"] == len(tokens) - 1
    assert m["loss"] == pytest.approx(math.log(256)) and m["bpb"] == pytest.approx(8.0)

    text = "It is the east, and Juliet is the sun. " * 20
    bpe = train_bpe([text], vocab_size=300)
    ids = bpe.encode(text)
    model = Uniform()
    model.vocab_size = bpe.vocab_size
    m = evaluate_lm(model, ids, bpe, seq_len=8, batch_size=4, device=torch.device("cpu"))
    n_bytes = len(bpe.decode(ids[1:]).encode())
    assert m["bpb"] == pytest.approx(math.log2(bpe.vocab_size) * (len(ids) - 1) / n_bytes)
    assert m["bpb"] < math.log2(bpe.vocab_size)  # several bytes per token


def test_train_eval_and_generate_end_to_end(tmp_path, cache_dir, corpus_file, capsys):
    summary = train(config("llama_lm_shakespeare", tmp_path, corpus_file, "train.max_steps=6",
                           "train.run_name=run"))
    run = tmp_path / "run"
    assert {"loss", "ppl", "bpb"} <= set(summary["test"]) and summary["train_tokens_per_s"] > 0
    assert summary["test"]["bpb"] == pytest.approx(summary["test"]["loss"] / math.log(2))  # bytes == tokens
    assert not (run / "tokenizer.json").exists()  # byte-level: nothing to save
    assert any("tokens_per_s" in r for r in read_metrics(run))
    capsys.readouterr()

    assert main(["eval", str(run)]) == 0
    assert f"{summary['test']['loss']:.4f}" in capsys.readouterr().out

    argv = ["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(argv) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("ROMEO:") and len(greedy.encode()) >= len("ROMEO:") + 1
    assert main([*argv, "--no-cache"]) == 0
    assert capsys.readouterr().out == greedy
    sampled = [main(["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "7"])
               for _ in range(2)]
    outs = capsys.readouterr().out.split("\n")
    assert sampled == [0, 0] and outs[0] == outs[1]


def test_bpe_run_directory_holds_its_tokenizer(tmp_path, cache_dir, corpus_file, capsys, monkeypatch):
    train(config("lightnet_lm_shakespeare", tmp_path, corpus_file, "data.tokenizer=bpe", "data.vocab_size=320",
                 "train.max_steps=2", "train.run_name=bpe"))
    run = tmp_path / "bpe"
    saved = json.loads((run / "tokenizer.json").read_text())
    assert saved["model"]["type"] == "BPE" and len(saved["model"]["vocab"]) <= 320
    capsys.readouterr()
    # a fresh cache: eval and generate rebuild nothing but the token file, with the run's own tokenizer
    monkeypatch.setenv("POLYATTN_CACHE", str(tmp_path / "other-cache"))
    monkeypatch.setattr("polyattn.tasks.causal_lm.train_bpe", lambda *a, **k: pytest.fail("BPE was retrained"))
    assert main(["eval", str(run)]) == 0
    assert main(["generate", str(run), "--prompt", "KING", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.split("\n")[-2].startswith("KING")


def test_resumed_run_sees_the_same_batches(tmp_path, cache_dir, corpus_file):
    ref = train(config("llama_lm_shakespeare", tmp_path, corpus_file, "train.max_steps=6", "train.run_name=ref",
                       "train.checkpoint_every=3"))
    train(config("llama_lm_shakespeare", tmp_path, corpus_file, "train.max_steps=3", "train.run_name=cut",
                 "train.checkpoint_every=3"))
    cut = tmp_path / "cut"
    for name in ("summary.json", "model.safetensors"):  # as if the process had died right after step 3
        (cut / name).unlink()
    assert main(["train", "--resume", str(cut), "train.max_steps=6"]) == 0
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["test"] == ref["test"]
    train_losses = lambda run: [r["loss"] for r in read_metrics(run) if r.get("event") == "train"]
    assert train_losses(cut) == train_losses(tmp_path / "ref")


def test_stream_text_yields_pieces_of_the_generated_text():
    from polyattn import create_model

    torch.manual_seed(0)
    model = create_model("llama_lm_nano", dim=32, depth=1, num_heads=2)
    pieces = list(stream_text(model, ByteTokenizer(), "", 8, temperature=1.0, seed=1))
    tokens = model.generate(torch.tensor([[10]]), 8, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert "".join(pieces) == ByteTokenizer().decode(tokens[0, 1:])  # an empty prompt starts from a newline


@pytest.mark.parametrize("argv, message", [
    (["train", "llama_lm_shakespeare", "data.source=digits"], "an image dataset"),
    (["train", "llama_lm_shakespeare", "data.val_fraction=0"], "val_fraction"),
    (["train", "llama_lm_shakespeare", "data.tokenizer=wordpiece"], "data.tokenizer expects one of"),
    (["train", "llama_lm_shakespeare", "data.seq_len=100000"], "fewer than data.seq_len"),
    (["generate", "/no/such/run", "--prompt", "x"], "does not exist"),
    (["generate", "/no/such/run", "--temperature", "-1"], "--temperature"),
])
def test_bad_input_is_one_sentence_and_exit_2(argv, message, tmp_path, cache_dir, corpus_file, capsys):
    runs = tmp_path / "runs"
    extra = [f"data.source={corpus_file}", f"train.out_dir={runs}", "data.seq_len=16"] if argv[0] == "train" else []
    code = main([*argv[:2], *extra, *argv[2:]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert not runs.exists(), "a failed start left files behind"


def test_generate_refuses_a_run_of_another_task(tmp_path, cache_dir, capsys):
    from polyattn.train.config import save_yaml

    run = tmp_path / "vit"
    run.mkdir()
    save_yaml(build_config("default", []).to_dict(), run / "config.yaml")
    assert main(["generate", str(run), "--prompt", "x"]) == 2
    assert "needs a causal language model run" in capsys.readouterr().err


def test_job_rejects_a_model_smaller_than_the_vocabulary(tmp_path, cache_dir, corpus_file):
    with pytest.raises(UserError, match="smaller than the tokenizer's 256"):
        train(config("llama_lm_shakespeare", tmp_path, corpus_file, "model.vocab_size=100", "train.max_steps=1",
                     "train.run_name=v"))
    assert not (tmp_path / "v").exists()


def test_generate_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--max-new-tokens" in out and "--no-cache" in out and "--top-p" in out
