"""Rectified flow, guidance, samplers, the classifier Fréchet distance, and `polyattn sample` end to end."""

import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from polyattn.cli import main
from polyattn.errors import UserError
from polyattn.tasks.diffusion import (
    DiffusionJob,
    RectifiedFlow,
    ddim_step,
    guided_velocity,
    image_grid,
    integrate,
    parse_classes,
    sample,
    to_uint8,
)
from polyattn.tasks.sample_quality import classifier_frechet_distance, frechet_distance, gaussian_fit
from polyattn.train.config import build_config
from polyattn.train.loop import train

# ---- the objective ------------------------------------------------------------------------------------------------


def test_interpolant_endpoints_and_velocity():
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    flow = RectifiedFlow()
    assert torch.equal(flow.interpolate(x0, noise, torch.zeros(4)), x0)
    assert torch.equal(flow.interpolate(x0, noise, torch.ones(4)), noise)
    t = torch.tensor([0.1, 0.4, 0.5, 0.9])
    expected = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    assert torch.allclose(flow.interpolate(x0, noise, t), expected)
    h = 1e-3  # the target is the time derivative of the path
    derivative = (flow.interpolate(x0, noise, t + h) - flow.interpolate(x0, noise, t - h)) / (2 * h)
    assert torch.allclose(derivative, flow.target(x0, noise), atol=1e-3)
    assert torch.equal(flow.target(x0, noise), noise - x0)


def test_training_times():
    g = torch.Generator().manual_seed(0)
    for mode in ("logit_normal", "uniform"):
        t = RectifiedFlow(mode).sample_time(20000, g)
        assert t.min() > 0 and t.max() < 1
        assert abs(float(t.median()) - 0.5) < 0.02
    # logit-normal concentrates on the middle: fewer draws near the ends than uniform
    assert (RectifiedFlow("logit_normal").sample_time(20000, g) < 0.1).float().mean() < 0.05
    with pytest.raises(UserError, match="time_sampling"):
        RectifiedFlow("cosine")


def test_loss_is_zero_for_the_exact_velocity():
    class Oracle(torch.nn.Module):  # knows the pair (x0, noise): predicts noise − x0 exactly
        def forward(self, x, t, y):
            return self.noise - self.x0

    oracle = Oracle()
    oracle.x0, oracle.noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    loss = RectifiedFlow().loss(oracle, oracle.x0, torch.zeros(2, dtype=torch.long), oracle.noise, torch.rand(2))
    assert loss.item() == 0.0


# ---- samplers with an oracle velocity --------------------------------------------------------------------------

MU, S = 0.7, 0.3  # data distribution N(MU, S²) per pixel


def gaussian_velocity(mu, s):
    """The exact rectified-flow velocity E[ε − x0 | x_t] for data x0 ~ N(mu, s²) (s = 0: a single image)."""

    def velocity(x, t):
        t = t.view(-1, *([1] * (x.ndim - 1))).double()
        r = x.double() - (1 - t) * mu
        var = (1 - t) ** 2 * s**2 + t**2  # Var(x_t)
        e_noise, e_x0 = t * r / var, mu + (1 - t) * s**2 * r / var
        return (e_noise - e_x0).to(x.dtype)

    return velocity


def test_euler_lands_exactly_on_a_single_training_image():
    image = torch.randn(1, 3, 4, 4).double()
    v = gaussian_velocity(image, 0.0)  # optimal velocity (x − image) / t
    noise = torch.randn(5, 3, 4, 4).double()
    for steps in (1, 4):
        assert torch.allclose(integrate(v, noise, steps, sampler="euler"), image.expand(5, -1, -1, -1), atol=1e-12)
    assert torch.allclose(integrate(v, noise, 4, sampler="ddim"), image.expand(5, -1, -1, -1), atol=1e-12)


def test_the_exact_flow_maps_noise_z_to_mu_plus_s_z_with_euler_first_and_heun_second_order():
    v = gaussian_velocity(MU, S)
    z = torch.randn(1000, 1, 2, 2).double()
    exact = MU + S * z  # the ODE of a Gaussian is a linear map

    def error(sampler, steps):
        return float((integrate(v, z, steps, sampler=sampler) - exact).abs().max())

    euler, heun = [error("euler", n) for n in (16, 32)], [error("heun", n) for n in (16, 32)]
    assert 1.8 < euler[0] / euler[1] < 2.2  # halving the step halves the error: first order
    assert 3.3 < heun[0] / heun[1] < 4.4  # ... and quarters it: second order
    assert heun[0] < euler[0] / 10 and heun[1] < 2e-3


def test_ddim_with_eta_zero_is_euler_and_eta_one_samples_the_distribution():
    v = gaussian_velocity(MU, S)
    z = torch.randn(200, 1, 2, 2).double()
    assert torch.allclose(integrate(v, z, 7, sampler="ddim", eta=0.0), integrate(v, z, 7, sampler="euler"),
                          atol=1e-12)
    x, t = torch.randn(3, 2).double(), torch.full((3,), 0.6).double()
    assert torch.allclose(ddim_step(x, v(x, t), 0.6, 0.2), x + (0.2 - 0.6) * v(x, t), atol=1e-12)
    g = torch.Generator().manual_seed(0)
    out = integrate(v, torch.randn(20000, 1, 1, 1, generator=g).double(), 100, sampler="ddim", eta=1.0, generator=g)
    assert abs(float(out.mean()) - MU) < 0.02 and abs(float(out.std()) - S) < 0.02


def test_guidance_scale_one_is_the_conditional_prediction():
    from polyattn.models.dit import DiT

    torch.manual_seed(0)
    model = DiT(img_size=4, patch_size=2, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(4, 1, 4, 4), torch.rand(4), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 3))
        assert torch.equal(guided_velocity(model, x, t, y, 1.0, null_label=3), cond)
        assert torch.allclose(guided_velocity(model, x, t, y, 0.0, null_label=3), uncond, atol=1e-6)
        assert torch.allclose(guided_velocity(model, x, t, y, 2.5, null_label=3), uncond + 2.5 * (cond - uncond),
                              atol=1e-5)


def test_sample_is_deterministic_per_seed_and_independent_of_the_batch_size():
    class Shift(torch.nn.Module):
        def forward(self, x, t, y):
            return (x - y.view(-1, 1, 1, 1).float()) / t.view(-1, 1, 1, 1)  # velocity to the image "all = y"

    labels = torch.tensor([0, 1, 2, 3, 4])
    kw = dict(shape=(1, 2, 2), null_label=5, steps=3, progress=False)
    a = sample(Shift(), labels, generator=torch.Generator().manual_seed(3), batch_size=2, **kw)
    b = sample(Shift(), labels, generator=torch.Generator().manual_seed(3), batch_size=5, **kw)
    assert torch.equal(a, b) and a.shape == (5, 1, 2, 2)
    assert torch.allclose(a, labels.view(-1, 1, 1, 1).float().expand_as(a), atol=1e-6)
    for bad, match in [(dict(steps=0), "steps"), (dict(cfg=-1.0), "guidance"), (dict(sampler="dpm"), "sampler"),
                       (dict(eta=0.5), "eta applies to the ddim")]:
        with pytest.raises(UserError, match=match):
            sample(Shift(), labels, **{**kw, **bad})


def test_pixels_round_trip_and_grid_layout():
    pixels = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    x = (pixels.float() / 255 - 0.5) / 0.5
    assert torch.equal(to_uint8(x, (0.5,) * 3, (0.5,) * 3), pixels)
    assert torch.equal(to_uint8(torch.full((1, 1, 2, 2), 3.0), (0.5,), (0.5,)), torch.full((1, 1, 2, 2), 255,
                                                                                          dtype=torch.uint8))
    grid = image_grid(pixels, [[0, 1, 2], [3]], pad=1)
    assert grid.shape == (3, 1 + 2 * 5, 1 + 3 * 5)
    assert torch.equal(grid[:, 1:5, 6:10], pixels[1]) and torch.equal(grid[:, 6:10, 1:5], pixels[3])


def test_parse_classes():
    names = ["airplane", "cat", "dog"]
    assert parse_classes(None, names) == [0, 1, 2]
    assert parse_classes("dog, 0,cat", names) == [2, 0, 1]
    with pytest.raises(UserError, match=r"Unknown class 'dgo'.*Did you mean 'dog'"):
        parse_classes("dgo", names)
    with pytest.raises(UserError, match="Unknown class '3'"):
        parse_classes("3", names)
    assert parse_classes("1", ["1", "0"]) == [0]  # names win over indices


# ---- Fréchet distance ----------------------------------------------------------------------------------------------


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    f64 = dict(dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0], **f64), torch.tensor([0.5, 1.0, 1.0], **f64)
    s1, s2 = torch.tensor([1.0, 2.0, 0.5], **f64), torch.tensor([3.0, 0.1, 0.5], **f64)
    closed = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    assert frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2)) == pytest.approx(closed, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_for_full_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T, b @ b.T + 0.1 * torch.eye(6, dtype=torch.float64)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float((mu1 - mu2) @ (mu1 - mu2) + s1.trace() + s2.trace() - 2 * covmean.trace())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_singular():
    feats = torch.randn(50, 8, dtype=torch.float64)
    assert abs(classifier_frechet_distance(feats, feats)) < 1e-9
    few = torch.randn(5, 8, dtype=torch.float64)  # 5 points in 8 dimensions: a singular covariance
    assert abs(classifier_frechet_distance(few, few)) < 1e-6  # √ of round-off-sized eigenvalues: ~1e-8 each
    assert classifier_frechet_distance(feats, feats + 1.0) == pytest.approx(8.0, rel=1e-9)  # a pure mean shift
    with pytest.raises(UserError, match="at least 2"):
        gaussian_fit(torch.randn(1, 8))


# ---- the training job and the command line --------------------------------------------------------------------------

TINY = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=2", "data.image_size=8",
        "train.batch_size=64", "train.progress=false", "train.eval_every=100", "task.eval_images=64"]


def test_job_drops_labels_for_guidance_and_evaluates_deterministically(cache_dir):
    config = build_config("dit_digits", [*TINY, "task.label_dropout=0.5", "train.batch_size=512"])
    job = DiffusionJob(config, torch.device("cpu"))
    assert job.inferred_model_args == {"num_classes": 10, "in_chans": 1, "img_size": 8}
    assert config.data.mean == (0.5,) and config.data.std == (0.5,)
    seen = {}

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y):
            seen.update(x=x, t=t, y=y)
            return x * self.w

    images, labels = next(iter(job.batches(0, 0)))
    job.loss(Spy(), job.prepare((images, labels)), {})
    dropped = seen["y"] == 10
    assert 0.4 < float(dropped.float().mean()) < 0.6
    assert torch.equal(seen["y"][~dropped], labels[~dropped])
    assert seen["x"].shape == (512, 1, 8, 8) and seen["t"].shape == (512,)

    model = Spy()
    first = job.evaluate(model, "test", autocast=nullcontext)
    assert first == job.evaluate(model, "test", autocast=nullcontext)
    # a model predicting 0 has the loss E|ε − x0|² = 1 + E[x0²] on the 64 fixed test images
    assert 1.0 < first["loss"] < 2.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-step diffusion run (with EMA) and a 3-step classifier run on the digits."""
    root = tmp_path_factory.mktemp("runs")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POLYATTN_CACHE", str(cache))
        train(build_config("dit_digits", [*TINY, "train.max_steps=3", f"train.out_dir={root}", "train.run_name=dit",
                                          "train.ema_decay=0.9"]))
        train(build_config("default", ["model.embed_dim=32", "model.depth=1", "model.num_heads=2",
                                       "model.patch_size=4", "data.image_size=8", "train.batch_size=64",
                                       "train.progress=false", "train.max_steps=3", f"train.out_dir={root}",
                                       "train.run_name=cls"]))
    return root


def test_sample_writes_a_grid_and_every_image(runs, cache_dir, capsys):
    out = runs / "samples"
    assert (runs / "dit" / "ema.safetensors").is_file() and (runs / "dit" / "classes.json").is_file()
    code = main(["sample", str(runs / "dit"), "--classes", "0,7", "--n", "3", "--steps", "2", "--cfg", "2",
                 "--out", str(out), "--device", "cpu"])
    assert code == 0
    assert "s per image" in capsys.readouterr().out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "grid.png", "images/0/0000.png", "images/0/0001.png", "images/0/0002.png",
        "images/7/0000.png", "images/7/0001.png", "images/7/0002.png"]
    from PIL import Image

    with Image.open(out / "images" / "7" / "0001.png") as image:
        assert image.size == (8, 8) and image.mode == "L"
    with Image.open(out / "grid.png") as grid:
        # 2 rows x 3 columns, upscaled 8x to 64 px cells, with a margin on the left for the row labels
        width, height = grid.size
        assert height == 8 * (2 + 2 * 10) and 8 * (2 + 3 * 10) < width < 8 * (2 + 3 * 10) + 60
        margin = grid.convert("L").crop((0, 0, width - 8 * (2 + 3 * 10), height))
        assert np.asarray(margin).min() < 128  # the labels are drawn there
    assert not list(out.rglob("*.tmp"))


def test_sample_folders_are_named_by_every_setting_and_never_shared(runs, cache_dir, capsys):
    base = ["sample", str(runs / "dit"), "--n", "1", "--steps", "1", "--device", "cpu"]
    assert main([*base, "--classes", "0,7"]) == 0
    assert main([*base, "--classes", "3"]) == 0
    assert main([*base, "--classes", "3"]) == 0
    assert main([*base, "--classes", "3", "--sampler", "ddim", "--eta", "0.5", "--no-ema"]) == 0
    names = sorted(p.name for p in (runs / "dit" / "samples").iterdir())
    assert names == ["ddim-eta0.5-batch64-1steps-cfg1-seed0-3-n1-raw", "euler-1steps-cfg1-seed0-0+7-n1-ema",
                     "euler-1steps-cfg1-seed0-3-n1-ema", "euler-1steps-cfg1-seed0-3-n1-ema-2"]
    assert "averaged (EMA) weights" in capsys.readouterr().err
    taken = runs / "dit" / "samples" / names[0]
    assert main([*base, "--out", str(taken)]) == 2
    assert "already holds files" in capsys.readouterr().err


def test_sample_with_a_classifier_writes_the_quality_measures(runs, cache_dir, capsys):
    out = runs / "measured"
    code = main(["sample", str(runs / "dit"), "--n", "4", "--steps", "2", "--sampler", "heun", "--out", str(out),
                 "--classifier", str(runs / "cls"), "--device", "cpu"])
    assert code == 0
    metrics = json.loads((out / "quality.json").read_text())
    assert metrics["n_generated"] == 40 and metrics["n_real"] == 40 and metrics["feature_dim"] == 32
    for key in ("classifier_fd", "real_classifier_fd"):
        assert metrics[key] >= 0
    for key in ("classifier_accuracy", "real_classifier_accuracy"):
        assert 0 <= metrics[key] <= 1
    assert "classifier Fréchet distance" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--classes", "0,eleven"], "Unknown class 'eleven'"),
    (["--n", "0"], "--n must be at least 1"),
    (["--steps", "0"], "number of sampling steps"),
    (["--sampler", "ddim", "--eta", "2"], "eta must be in"),
])
def test_bad_sampling_input_is_one_sentence(runs, cache_dir, capsys, args, message, tmp_path):
    assert main(["sample", str(runs / "dit"), "--out", str(tmp_path / "o"), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_sample_refuses_runs_that_are_not_diffusion_runs(runs, cache_dir, capsys, tmp_path):
    assert main(["sample", str(runs / "cls")]) == 2
    assert "needs a diffusion run" in capsys.readouterr().err
    assert main(["sample", str(runs / "dit"), "--classifier", str(runs / "dit")]) == 2
    assert "must be an image-classifier run" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
