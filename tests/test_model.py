import torch
from torch import nn
from torchvision.models import resnet50

from rn50_ray.core.model import build_model


def test_parameter_count_at_1000_classes():
    assert sum(p.numel() for p in build_model().parameters()) == 25_557_032


def test_v15_and_v1_differ_only_in_downsampling_strides():
    v15, v1 = build_model(arch="resnet50"), build_model(arch="resnet50-v1")
    for layer in ("layer2", "layer3", "layer4"):
        a, b = getattr(v15, layer)[0], getattr(v1, layer)[0]
        assert (a.conv1.stride, a.conv2.stride) == ((1, 1), (2, 2))  # v1.5: stride in the 3x3
        assert (b.conv1.stride, b.conv2.stride) == ((2, 2), (1, 1))  # v1: stride in the first 1x1
    assert v15.layer1[0].conv2.stride == v1.layer1[0].conv2.stride == (1, 1)
    assert v15.state_dict().keys() == v1.state_dict().keys()
    v1.load_state_dict(v15.state_dict())
    x = torch.randn(2, 3, 64, 64)
    v15.eval(), v1.eval()
    with torch.no_grad():
        assert not torch.allclose(v15(x), v1(x))


def test_torchvision_weights_load_and_give_identical_outputs():
    # No download here: a seeded torchvision resnet50 stands in for its published weights.
    torch.manual_seed(1)
    reference = resnet50(weights=None).eval()
    ours = build_model().eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


def test_init_options():
    m = build_model(zero_init_last_bn=True, num_classes=10)
    assert m.fc.out_features == 10
    assert all(torch.all(b.bn3.weight == 0) for layer in (m.layer1, m.layer4) for b in layer)
    assert torch.all(build_model().layer1[0].bn3.weight == 1)
    torch.manual_seed(0)
    conv = build_model(conv_init="fan_in").layer3[0].conv2  # 256 in x 3x3: fan_in 2304, fan_out 2304
    first = build_model(conv_init="fan_in").conv1  # 3 x 7x7 in: fan_in 147, fan_out 3136
    first_out = build_model(conv_init="fan_out").conv1
    assert abs(first.weight.std().item() - (2 / 147) ** 0.5) < 0.01
    assert abs(first_out.weight.std().item() - (2 / 3136) ** 0.5) < 0.002
    assert conv.weight.shape == (256, 256, 3, 3)


def test_channels_last():
    m = build_model(channels_last=True)
    assert m.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(m.fc, nn.Linear)


def test_each_recipe_initialises_its_convolutions_as_its_source_does():
    # FFCV trains torchvision's resnet50 with torchvision's own init (Kaiming normal, fan_out); NVIDIA's scripts
    # use --conv_init fan_in. The stem (3 -> 64, 7 x 7) tells them apart: fan_in 147, fan_out 3,136.
    import math

    import yaml
    from conftest import ROOT

    from rn50_ray.config import load_config
    from rn50_ray.core.model import model_kwargs

    expected = {"rn50_fast_16e": "fan_out", "rn50_fast_24e": "fan_out", "rn50_fast_88e": "fan_out",
                "rn50_50e": "fan_in", "rn50_90e": "fan_in", "rn50_250e": "fan_in"}  # fmt: skip
    for recipe, mode in expected.items():
        path = ROOT / "recipes" / f"{recipe}.yaml"
        assert yaml.safe_load(path.read_text())["model"]["conv_init"] == mode, recipe  # said in the recipe itself
        torch.manual_seed(0)
        model = build_model(**model_kwargs(load_config([str(path)]).model, 1000, channels_last=False))
        fan = 3 * 7 * 7 if mode == "fan_in" else 64 * 7 * 7
        assert abs(model.conv1.weight.std().item() / math.sqrt(2 / fan) - 1) < 0.05, recipe
    torch.manual_seed(0)
    torchvision_default = resnet50(weights=None).conv1.weight.std().item()
    assert abs(torchvision_default / math.sqrt(2 / (64 * 7 * 7)) - 1) < 0.05  # torchvision's is fan_out


def test_requirements_pin_every_library_the_code_depends_on():
    from conftest import ROOT

    pinned = {
        line.split("==")[0].split("[")[0].strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    needed = {"torch", "torchvision", "ray", "mlflow", "nvidia-dali-cuda120", "timm", "torchmetrics", "pyarrow", "torchft"}
    assert needed <= pinned, sorted(needed - pinned)  # timm's BlurPool2d(pad_mode=...) needs a recent one
