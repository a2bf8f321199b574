"""The release's discriminator recipe (OFFICIAL_TRAINING §2.9, release model_gan.py at 3b6db41):
R1 cadence / inputs / factor, no augmentation on the PatchGAN path, LeCam update-before-use."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prologue_export.train.losses import GANLoss


class Recorder(nn.Module):
    """Stub discriminator D(x) = s * x[:, :1] that records every input it sees."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return self.scale * x[:, :1]


def recorded_gan(**kw):
    gan = GANLoss(in_channels=3, base_channels=8, **kw).train()
    gan.discriminator = Recorder()
    return gan


def release_r1_updates(n_updates, every=25):
    """D update k runs at global step g = 2k + 1 (B-steps are odd, §2.1); the release adds R1
    when (g + 1) % 25 == 0 (model_gan.py:1186)."""
    return {k for k in range(n_updates) if (2 * k + 1 + 1) % every == 0}


def test_r1_cadence_inputs_and_factor():
    assert release_r1_updates(51) == {24, 49}
    gan = recorded_gan(lecam_weight=0.0)  # release defaults: r1_weight 0.01, every 25
    g = torch.Generator().manual_seed(0)
    h, w = 6, 5
    fired = set()
    for k in range(51):
        real = torch.randn(2, 3, h, w, generator=g)
        fake = torch.randn(2, 3, h, w, generator=g)
        gan.discriminator.seen.clear()
        out = gan.discriminator_loss(real, fake)
        seen = gan.discriminator.seen
        assert torch.equal(seen[0], fake) and torch.equal(seen[1], real)  # fake first, then real
        if out["r1"] != 0:
            fired.add(k)
            # a third forward on the raw (un-augmented) reals, differentiable w.r.t. them
            assert len(seen) == 3 and torch.equal(seen[2], real) and seen[2].requires_grad
            # grad_x sum D = s on channel 0 -> ||g||^2 = s^2 h w; factor gamma / 2 = 0.005, no x25
            torch.testing.assert_close(out["r1"], torch.tensor(0.005 * 1.5**2 * h * w))
            torch.testing.assert_close(out["loss"], out["d_loss"] + out["r1"])
            (gs,) = torch.autograd.grad(out["r1"], gan.discriminator.scale)
            torch.testing.assert_close(gs, torch.tensor(0.005 * 2 * 1.5 * h * w))  # trains D
        else:
            assert len(seen) == 2
        assert int(gan.d_updates) == k + 1
    assert fired == release_r1_updates(51)


def test_r1_counter_ignores_eval_and_no_grad_and_accumulation():
    gan = recorded_gan(lecam_weight=0.0, r1_every=3)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert gan.discriminator_loss(x, x)["r1"] == 0
    gan.eval()
    assert gan.discriminator_loss(x, x)["r1"] == 0
    gan.train()
    assert int(gan.d_updates) == 0
    r1 = []
    for k in range(6):  # two micro-batches per update share the update's R1 decision
        r1.append(gan.discriminator_loss(x, x)["r1"] != 0)
        r1.append(gan.discriminator_loss(x, x, new_update=False)["r1"] != 0)
    assert int(gan.d_updates) == 6
    assert r1 == [False, False, False, False, True, True] * 2


def test_r1_cadence_survives_state_dict_round_trip():
    torch.manual_seed(0)
    a = GANLoss(in_channels=3, base_channels=8, num_layers=2).train()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)) for _ in range(51)]
    for real, fake in batches[:20]:
        a.discriminator_loss(real, fake)
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    assert int(sd["d_updates"]) == 20
    b = GANLoss(in_channels=3, base_channels=8, num_layers=2).train()
    b.load_state_dict(sd, strict=True)
    for k, (real, fake) in enumerate(batches[20:], start=20):
        ra = a.discriminator_loss(real, fake)
        rb = b.discriminator_loss(real, fake)
        assert (ra["r1"] > 0) == (rb["r1"] > 0) == (k in (24, 49)), k
        torch.testing.assert_close(ra["loss"], rb["loss"])
    # a checkpoint written before the counter existed still loads (counter restarts at 0)
    old = {k: v for k, v in sd.items() if k != "d_updates"}
    c = GANLoss(in_channels=3, base_channels=8, num_layers=2)
    c.load_state_dict(old, strict=True)
    assert int(c.d_updates) == 0


@pytest.mark.parametrize("aug_prob", [0.0, 1.0])
def test_patchgan_path_sees_exactly_the_given_images(aug_prob):
    gan = recorded_gan(aug_prob=aug_prob, r1_every=1)
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)
    gan.generator_loss(fake)
    assert len(gan.discriminator.seen) == 1 and torch.equal(gan.discriminator.seen[0], fake)
    gan.discriminator.seen.clear()
    gan.discriminator_loss(real, fake)
    seen = gan.discriminator.seen
    assert [torch.equal(s, t) for s, t in zip(seen, (fake, real, real))] == [True, True, True]
    # and with the real PatchGAN: logits equal a plain forward of the images (same BN batch stats)
    torch.manual_seed(0)
    gan = GANLoss(in_channels=3, base_channels=8, aug_prob=aug_prob, r1_weight=0.0, lecam_weight=0.0).train()
    out = gan.discriminator_loss(real, fake)
    torch.manual_seed(0)
    ref = GANLoss(in_channels=3, base_channels=8, r1_weight=0.0, lecam_weight=0.0).train()
    torch.testing.assert_close(out["logits_real"], ref.discriminator(real).mean())
    torch.testing.assert_close(gan.generator_loss(fake), F.softplus(-ref.discriminator(fake)).mean())


def test_lecam_updates_before_use_hand_computed():
    gan = recorded_gan(r1_weight=0.0)  # lecam_weight 0.001, decay 0.999, EMAs start at 0
    with torch.no_grad():
        gan.discriminator.scale.fill_(1.0)
    real = torch.full((2, 3, 2, 2), 2.0)  # logits r = 2
    fake = torch.full((2, 3, 2, 2), -1.0)  # logits f = -1
    out = gan.discriminator_loss(real, fake)
    # e_r = 0 + 0.001 * (2 - 0) = 0.002, e_f = 0 + 0.001 * (-1 - 0) = -0.001, then
    # lecam = 0.001 * [relu(2 - e_f)^2 + relu(e_r - (-1))^2] = 0.001 * (2.001^2 + 1.002^2)
    torch.testing.assert_close(gan.lecam_ema.logits_real_ema, torch.tensor(0.002))
    torch.testing.assert_close(gan.lecam_ema.logits_fake_ema, torch.tensor(-0.001))
    torch.testing.assert_close(out["lecam"], torch.tensor(0.001 * (2.001**2 + 1.002**2)), rtol=1e-6, atol=0)
    assert abs(out["lecam"].item() - 0.001 * (2.0**2 + 1.0**2)) > 5e-6  # not the use-then-update order
    d = F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(-1.0))
    torch.testing.assert_close(out["loss"], d + out["lecam"])
    # second step: e <- e + 0.001 (mean - e) again, before use
    real2 = torch.full((2, 3, 2, 2), 0.5)
    out2 = gan.discriminator_loss(real2, fake)
    e_r = 0.002 + 0.001 * (0.5 - 0.002)
    e_f = -0.001 + 0.001 * (-1.0 + 0.001)
    torch.testing.assert_close(out2["lecam"], torch.tensor(0.001 * ((0.5 - e_f) ** 2 + (e_r + 1.0) ** 2)),
                               rtol=1e-6, atol=0)
