"""Tests for prologue_export.train.losses (GAN loss, discriminator, perceptual loss)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from prologue_export.train.losses import (
    VGG16_CONV_LAYERS,
    ConvNeXtPerceptualLoss,
    GANLoss,
    PatchDiscriminator,
    PerceptualLoss,
    PerceptualWeightsError,
    diff_augment,
    load_perceptual,
)
from prologue_export.runtime.errors import PrologueError


# ---------------------------------------------------------------------------------- helpers


class FirstChannel(nn.Module):
    """Stub discriminator: logits = first input channel, so every loss is hand-computable."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * x[:, :1]


class Constant(nn.Module):
    """Stub discriminator that ignores its input."""

    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return self.value.expand(x.shape[0], 1, 2, 2)


def stub_gan(disc, **kw):
    kw.setdefault("aug_prob", 0.0)
    gan = GANLoss(in_channels=3, **kw)
    gan.discriminator = disc
    return gan


# ---------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("size,out", [(32, 2), (256, 30)])
def test_discriminator_output_shape(size, out):
    d = PatchDiscriminator(3)
    y = d(torch.randn(2, 3, size, size))
    assert y.shape == (2, 1, out, out)
    assert torch.isfinite(y).all()


def test_discriminator_init_and_batch1_eval():
    d = PatchDiscriminator(3)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert abs(convs[1].weight.std().item() - 0.02) < 0.002
    assert abs(bns[-1].weight.mean().item() - 1.0) < 0.005
    # conv biases (first and last conv only) keep PyTorch's default U(+-1/sqrt(fan_in))
    # (release model_gan.py:98-103 re-initialises weights only)
    assert [m.bias is not None for m in convs] == [True, False, False, False, True]
    assert 0 < convs[0].bias.abs().max() <= 1 / (3 * 16) ** 0.5
    assert 0 < convs[-1].bias.abs().max() <= 1 / (512 * 16) ** 0.5
    assert all(m.bias.abs().max() == 0 for m in bns)
    assert all(m.eps == 1e-5 and m.momentum == 0.1 for m in bns)
    gan = GANLoss(in_channels=3).eval()
    with torch.no_grad():
        out = gan.discriminator_loss(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32))
        assert torch.isfinite(out["loss"])
        assert torch.isfinite(gan.generator_loss(torch.randn(1, 3, 32, 32)))


def test_discriminator_num_layers_generalises():
    d = PatchDiscriminator(1, base_channels=8, num_layers=4)
    widths = [m.out_channels for m in d.main if isinstance(m, nn.Conv2d)]
    assert widths == [8, 16, 32, 64, 64, 1]
    assert d(torch.randn(2, 1, 64, 64)).shape == (2, 1, 2, 2)


def test_gan_state_dict_matches_official_table(reference_dir):
    table = json.loads((reference_dir / "official_keys" / "prologue-b-tokenizer.json").read_text())
    keys = table["files"]["model_4.safetensors"]["keys"]
    sd = GANLoss(in_channels=3).state_dict()
    assert sd.pop("d_updates").dtype == torch.int64  # ours: the R1 cadence counter
    assert set(sd) == set(keys)
    for k, meta in keys.items():
        assert list(sd[k].shape) == meta["shape"], k
        assert str(sd[k].dtype).removeprefix("torch.") == meta["dtype"], k
    n_params = sum(p.numel() for p in GANLoss(in_channels=3).parameters())
    assert n_params == table["files"]["model_4.safetensors"]["num_params"]


# ------------------------------------------------------------------------------ GAN losses


def test_vanilla_and_hinge_match_hand_computation():
    real, fake = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    lr, lf = real[:, :1], fake[:, :1]

    gan = stub_gan(FirstChannel(), loss="vanilla", lecam_weight=0.0, r1_weight=0.0)
    out = gan.discriminator_loss(real, fake)
    want = torch.log1p(torch.exp(-lr)).mean() + torch.log1p(torch.exp(lf)).mean()
    torch.testing.assert_close(out["d_loss"], want)
    torch.testing.assert_close(out["loss"], want)
    assert out["lecam"] == 0 and out["r1"] == 0
    torch.testing.assert_close(out["logits_real"], lr.mean())
    torch.testing.assert_close(out["logits_fake"], lf.mean())
    torch.testing.assert_close(gan.generator_loss(fake), torch.log1p(torch.exp(-lf)).mean())

    gan = stub_gan(FirstChannel(), loss="hinge", lecam_weight=0.0, r1_weight=0.0)
    out = gan.discriminator_loss(real, fake)
    want = 0.5 * (torch.clamp(1 - lr, min=0).mean() + torch.clamp(1 + lf, min=0).mean())  # model_gan.py:988-991
    torch.testing.assert_close(out["d_loss"], want)
    torch.testing.assert_close(gan.generator_loss(fake), -lf.mean())

    with pytest.raises(ValueError):
        GANLoss(in_channels=3, loss="wgan")


def test_fake_images_are_detached_in_d_loss():
    gan = stub_gan(FirstChannel(), r1_weight=0.0)
    fake = torch.randn(2, 3, 4, 4, requires_grad=True)
    gan.discriminator_loss(torch.randn(2, 3, 4, 4), fake)["loss"].backward()
    assert fake.grad is None
    gan.generator_loss(fake).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_lecam_regulariser_and_ema_update():
    w, decay = 0.5, 0.9
    gan = stub_gan(FirstChannel(), lecam_weight=w, lecam_decay=decay, r1_weight=0.0).train()
    gan.lecam_ema.logits_real_ema.fill_(0.2)
    gan.lecam_ema.logits_fake_ema.fill_(-0.1)
    real, fake = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    lr, lf = real[:, :1], fake[:, :1]
    out = gan.discriminator_loss(real, fake)
    # the EMAs are updated with this batch first, then used (model_gan.py:1177-1178)
    e_r = decay * 0.2 + (1 - decay) * lr.mean()
    e_f = decay * -0.1 + (1 - decay) * lf.mean()
    torch.testing.assert_close(gan.lecam_ema.logits_real_ema, e_r)
    torch.testing.assert_close(gan.lecam_ema.logits_fake_ema, e_f)
    want = w * (F.relu(lr - e_f).pow(2).mean() + F.relu(e_r - lf).pow(2).mean())
    torch.testing.assert_close(out["lecam"], want)
    torch.testing.assert_close(out["loss"], out["d_loss"] + want)
    assert gan.lecam_ema.logits_real_ema.dtype == torch.float32

    # eval mode: regulariser computed with the stored EMAs, EMAs untouched
    gan.eval()
    before = gan.lecam_ema.logits_real_ema.clone(), gan.lecam_ema.logits_fake_ema.clone()
    out = gan.discriminator_loss(real, fake)
    torch.testing.assert_close(out["lecam"], w * (F.relu(lr - e_f).pow(2).mean() + F.relu(e_r - lf).pow(2).mean()))
    assert torch.equal(gan.lecam_ema.logits_real_ema, before[0])
    assert torch.equal(gan.lecam_ema.logits_fake_ema, before[1])


def test_r1_penalty():
    real, fake = torch.randn(2, 3, 5, 6), torch.randn(2, 3, 5, 6)
    # constant D: zero penalty
    out = stub_gan(Constant(), r1_weight=1.0, r1_every=1, lecam_weight=0.0).discriminator_loss(real, fake)
    assert out["r1"] == 0
    # D(x) = s * x[:, :1]: grad of sum = s on channel 0 -> ||g||^2 = s^2 * H * W
    gan = stub_gan(FirstChannel(), r1_weight=0.2, r1_every=1, lecam_weight=0.0)
    with torch.no_grad():
        gan.discriminator.scale.fill_(1.5)
    out = gan.discriminator_loss(real, fake)
    torch.testing.assert_close(out["r1"], torch.tensor(0.1 * 1.5**2 * 30))
    (g,) = torch.autograd.grad(out["r1"], gan.discriminator.scale)
    torch.testing.assert_close(g, torch.tensor(0.1 * 2 * 1.5 * 30))  # create_graph -> trainable
    # real discriminator: positive penalty with gradients on every D parameter
    gan = GANLoss(in_channels=3, r1_weight=1.0, r1_every=1, lecam_weight=0.0, aug_prob=0.0).train()
    out = gan.discriminator_loss(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    assert out["r1"] > 0
    grads = torch.autograd.grad(out["r1"], list(gan.discriminator.parameters()), allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    # r1_weight == 0 / no-grad mode -> skipped
    with torch.no_grad():
        assert gan.discriminator_loss(torch.ones(2, 3, 32, 32), torch.zeros(2, 3, 32, 32))["r1"] == 0
    gan.r1_weight = 0.0
    assert gan.discriminator_loss(torch.ones(2, 3, 32, 32), torch.zeros(2, 3, 32, 32))["r1"] == 0


def test_discriminator_training_reduces_d_loss():
    torch.manual_seed(0)
    gan = GANLoss(in_channels=3, base_channels=16).train()
    opt = torch.optim.Adam(gan.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.9))
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(8):
        real = 0.6 + 0.1 * torch.randn(4, 3, 32, 32, generator=g)
        fake = -0.6 + 0.1 * torch.randn(4, 3, 32, 32, generator=g)
        out = gan.discriminator_loss(real, fake, generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["d_loss"].item())
    assert losses[-1] < losses[0] - 0.2, losses
    assert out["logits_real"] > out["logits_fake"]


# ---------------------------------------------------------------------------- augmentation


def test_augmentation():
    x = torch.randn(4, 3, 32, 32)
    assert GANLoss(in_channels=3, aug_prob=0.0).augment(x) is x
    gan = GANLoss(in_channels=3, aug_prob=1.0)
    y = gan.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.equal(y, x)
    # reproducible from a generator; cutout zeroes >= 1/16 of each image (clipped quarter)
    torch.testing.assert_close(y, gan.augment(x, torch.Generator().manual_seed(0)))
    assert ((y == 0).flatten(1).float().mean(1) >= 1 / 16).all()
    # differentiable
    xr = x.clone().requires_grad_(True)
    diff_augment(xr).sum().backward()
    assert xr.grad is not None and set(xr.grad.unique().tolist()) <= {0.0, 1.0}
    # a pure translation keeps content: each sample is a shifted copy (check via constant image)
    ones = torch.ones(2, 1, 16, 16)
    z = diff_augment(ones, torch.Generator().manual_seed(3), cutout_ratio=0.0)
    assert z.sum() >= 2 * 12 * 12  # shift <= 2 px each way at 16 px
    # aug_prob in (0, 1): one coin per call
    half = GANLoss(in_channels=3, aug_prob=0.5)
    g = torch.Generator().manual_seed(0)
    same = [torch.equal(half.augment(x, g), x) for _ in range(20)]
    assert 0 < sum(same) < 20
    # the losses never augment (PatchGAN, as the release), whatever aug_prob says
    stub = stub_gan(FirstChannel(), aug_prob=1.0, lecam_weight=0.0, r1_weight=0.0).train()
    torch.testing.assert_close(stub.generator_loss(x), F.softplus(-x[:, :1]).mean())
    assert GANLoss(in_channels=3).aug_prob == 0.0


# --------------------------------------------------------------------------- perceptual loss


def random_vgg_state(seed=0, lin=True):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (cin, cout) in VGG16_CONV_LAYERS.items():
        sd[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
    if lin:
        for i, c in enumerate((64, 128, 256, 512, 512)):
            sd[f"lin{i}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=g) / c
    return sd


@pytest.fixture(scope="module")
def vgg_state():
    return random_vgg_state()


@pytest.fixture(scope="module")
def perceptual(vgg_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg_lpips.safetensors"
    save_file(vgg_state, str(path))
    return load_perceptual(str(path))


def test_perceptual_basic(perceptual, vgg_state):
    p = perceptual
    assert p.has_lpips_weights and not p.training
    assert all(not q.requires_grad for q in p.parameters())
    p.train()
    assert not p.training and not p.features.training
    torch.testing.assert_close(p.lin2.model[1].weight, vgg_state["lin2.model.1.weight"])

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(p(x, x), torch.zeros(2))
    noise = torch.randn(x.shape, generator=g)
    d = [p(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.05, 0.2, 0.8)]
    assert 0 < d[0] < d[1] < d[2], d

    y = x.clone().requires_grad_(True)
    p(y, x + 0.3 * noise).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0

    grey = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(p(grey, grey * 0.5), p(grey.expand(-1, 3, -1, -1), grey.expand(-1, 3, -1, -1) * 0.5))


def test_perceptual_uniform_fallback_and_module_prefix(vgg_state):
    sd = {"module." + k: v for k, v in vgg_state.items() if not k.startswith("lin")}
    sd["classifier.0.weight"] = torch.zeros(3, 3)  # other keys are ignored
    p = PerceptualLoss.from_state_dict(sd)
    assert not p.has_lpips_weights
    torch.testing.assert_close(p.lin3.model[1].weight, torch.full((1, 512, 1, 1), 1 / 512))
    torch.testing.assert_close(p.features[28].bias, vgg_state["features.28.bias"])


def test_perceptual_bad_files(vgg_state, tmp_path):
    bad = dict(vgg_state)
    del bad["features.12.weight"]
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"features\.12\.weight"):
        load_perceptual(str(tmp_path / "missing.safetensors"))

    bad = dict(vgg_state)
    bad["features.0.bias"] = torch.zeros(65)
    with pytest.raises(ValueError, match=r"features\.0\.bias"):
        PerceptualLoss.from_state_dict(bad)

    partial = dict(vgg_state)
    del partial["lin4.model.1.weight"]
    with pytest.raises(ValueError, match=r"lin4\.model\.1\.weight"):
        PerceptualLoss.from_state_dict(partial)

    with pytest.raises(FileNotFoundError, match="VGG16"):
        load_perceptual(str(tmp_path / "nope.safetensors"))
    with pytest.raises(PrologueError, match="nope.safetensors"):
        load_perceptual(str(tmp_path / "nope.safetensors"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(PerceptualWeightsError, match="w.bin"):
        load_perceptual(str(tmp_path / "w.bin"))
    # a file of neither layout, a corrupt file, a wrong kind: PrologueErrors naming the file
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(PerceptualWeightsError, match=r"other\.safetensors.*neither"):
        load_perceptual(tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PerceptualWeightsError, match=r"broken\.safetensors"):
        load_perceptual(tmp_path / "broken.safetensors")
    with pytest.raises(PerceptualWeightsError, match=r"missing\.safetensors"):
        load_perceptual(tmp_path / "missing.safetensors")
    save_file(vgg_state, str(tmp_path / "vgg.safetensors"))
    with pytest.raises(PerceptualWeightsError, match=r"vgg\.safetensors.*ConvNeXt"):
        load_perceptual(tmp_path / "vgg.safetensors", kind="convnext")
    with pytest.raises(PerceptualWeightsError, match="kind"):
        load_perceptual(tmp_path / "vgg.safetensors", kind="resnet")
    assert load_perceptual(None) is None


def test_perceptual_pt_file(vgg_state, tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save({k: v for k, v in vgg_state.items() if not k.startswith("lin")}, path)
    p = load_perceptual(path)
    assert isinstance(p, PerceptualLoss) and not p.has_lpips_weights
    torch.testing.assert_close(p.features[0].weight, vgg_state["features.0.weight"])
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError):
        load_perceptual(tmp_path / "list.pt")


# ------------------------------------------------------------------- ConvNeXt perceptual loss

TINY_DIMS, TINY_DEPTHS, TINY_CLASSES = (8, 16), (1, 2), 10


def random_convnext_state(seed=0):
    """A tiny stand-in with torchvision's ConvNeXt key names and random weights."""
    torch.manual_seed(seed)
    net = ConvNeXtPerceptualLoss(TINY_DIMS, TINY_DEPTHS, TINY_CLASSES)
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * (0.3 if k.endswith("layer_scale") else 0.2)
            for k, v in net.state_dict().items()}


def test_convnext_layout_is_torchvision_convnext_small():
    keys = ConvNeXtPerceptualLoss().state_dict()
    n = sum(v.numel() for v in keys.values())
    assert n == 50_223_688  # torchvision convnext_small: 50.2M parameters
    for k, shape in {"features.0.0.weight": (96, 3, 4, 4), "features.0.1.weight": (96,),
                     "features.1.0.layer_scale": (96, 1, 1), "features.1.0.block.0.weight": (96, 1, 7, 7),
                     "features.1.0.block.2.weight": (96,), "features.1.0.block.3.weight": (384, 96),
                     "features.1.0.block.5.weight": (96, 384), "features.2.0.weight": (96,),
                     "features.2.1.weight": (192, 96, 2, 2), "features.5.26.layer_scale": (384, 1, 1),
                     "features.7.2.block.5.bias": (768,), "classifier.0.weight": (768,),
                     "classifier.2.weight": (1000, 768)}.items():
        assert tuple(keys[k].shape) == shape, k


def test_convnext_perceptual(tmp_path):
    sd = random_convnext_state()
    path = tmp_path / "convnext_tiny_standin.safetensors"
    save_file(sd, str(path))
    p = load_perceptual(path)  # chosen by its keys
    assert isinstance(p, ConvNeXtPerceptualLoss) and p.kind == "convnext"
    assert p.dims == TINY_DIMS and p.depths == TINY_DEPTHS
    assert not p.training and all(not q.requires_grad for q in p.parameters())
    p.train()
    assert not p.training
    assert isinstance(load_perceptual(path, kind="convnext"), ConvNeXtPerceptualLoss)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert p.logits(x).shape == (2, TINY_CLASSES)
    assert p(x, x).shape == (2,)
    assert torch.equal(p(x, x), torch.zeros(2))
    y = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    d = p(x, y)
    assert (d > 0).all()
    # hand computation: [-1,1] -> [0,1], antialiased bilinear 224, ImageNet norm, logit MSE
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def logits(z):
        z = F.interpolate(z * 0.5 + 0.5, size=224, mode="bilinear", align_corners=False, antialias=True)
        return p.classifier(p.avgpool(p.features((z - mean) / std)))

    torch.testing.assert_close(d, (logits(x) - logits(y)).pow(2).mean(-1))
    # gradients reach the reconstruction only
    yr = y.clone().requires_grad_(True)
    p(x, yr).sum().backward()
    assert yr.grad is not None and yr.grad.abs().sum() > 0
    # grey input is repeated to RGB
    grey = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(p(grey, -grey), p(grey.expand(-1, 3, -1, -1), -grey.expand(-1, 3, -1, -1)))


def test_convnext_bad_files(tmp_path):
    sd = random_convnext_state()
    bad = dict(sd)
    del bad["features.3.1.block.3.weight"]
    save_file(bad, str(tmp_path / "cut.safetensors"))
    with pytest.raises(PerceptualWeightsError, match=r"cut\.safetensors.*features\.3\.1\.block\.3\.weight"):
        load_perceptual(tmp_path / "cut.safetensors")
    bad = dict(sd)
    bad["classifier.0.bias"] = torch.zeros(7)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(PrologueError, match=r"shape\.safetensors.*classifier\.0\.bias"):
        load_perceptual(tmp_path / "shape.safetensors")
    save_file(sd, str(tmp_path / "cnx.safetensors"))
    with pytest.raises(PerceptualWeightsError, match=r"cnx\.safetensors.*VGG16"):
        load_perceptual(tmp_path / "cnx.safetensors", kind="vgg")
