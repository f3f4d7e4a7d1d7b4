"""Model zoo: registry, normalisation wrapper, classifier lookup, shapes of every architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ulrl.errors import UserError
from ulrl.models import MODELS, NormalizedModel, create_model, find_classifier, list_models

# (name, in_channels, image_size): every registered model in small sizes.
CASES = [
    ("cnn-small", 1, 28), ("cnn-small", 3, 32),
    ("preact-resnet18", 3, 32), ("preact-resnet18", 1, 28),
    ("vgg19-bn", 3, 32), ("vgg19-bn", 1, 28),
    ("vit-small", 1, 28), ("vit-small", 3, 32),
    ("vit-b16", 3, 32),
    ("vgg19-bn-torchvision", 3, 32), ("vit-b16-resize224", 3, 32),  # BackdoorBench's layouts
]


def test_registry_lists_every_family() -> None:
    assert list_models() == sorted(MODELS)
    assert {"cnn-small", "preact-resnet18", "vgg19-bn", "vit-b16", "vit-small"} <= set(list_models())
    builtin = {m for m in list_models() if ":" not in m}  # a user's --arch module:factory registers itself too
    assert {name for name, _, _ in CASES} == builtin


@pytest.mark.parametrize("name,channels,size", CASES)
def test_forward_head_and_buffers(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, 10, channels, size).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    state = model.state_dict()
    assert state["mean"].shape == state["std"].shape == (1, channels, 1, 1)

    layer_name, head = find_classifier(model)
    assert head.out_features == 10
    assert layer_name.startswith("net.")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert head is linears[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        assert torch.count_nonzero(model(x)) == 0  # the head's output is the logits


def test_vit_b16_matches_reference_size() -> None:
    model = create_model("vit-b16", 1000, 3, 224)
    # timm / torchvision vit_base_patch16_224: 86,567,656 parameters (85.8M without the head).
    assert sum(p.numel() for p in model.parameters()) == 86_567_656
    assert find_classifier(model)[0] == "net.head"


def test_vit_head_comes_after_multihead_attention_linears() -> None:
    # Attention and MLP linears are registered before the head; it must still be the last Linear.
    model = create_model("vit-small", 10, 3, 32)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert names[-1] == "net.head" and len(names) > 1


def test_normalisation_is_applied_and_saved() -> None:
    model = create_model("cnn-small", 10, 3, 32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    assert isinstance(model, NormalizedModel)
    seen: list[torch.Tensor] = []
    model.net.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = torch.rand(2, 3, 32, 32)
    model.eval()(x)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], (x - mean) / std)

    other = create_model("cnn-small", 10, 3, 32)
    torch.testing.assert_close(other.mean, torch.zeros(1, 3, 1, 1))
    torch.testing.assert_close(other.std, torch.ones(1, 3, 1, 1))
    other.load_state_dict(model.state_dict())  # mean/std travel with the weights
    torch.testing.assert_close(other.std, std)
    assert create_model("cnn-small", 10, 3, 32, mean=(0.5,), std=(0.5,)).mean.shape == (1, 3, 1, 1)


def test_user_errors() -> None:
    with pytest.raises(UserError, match="known models: .*cnn-small"):
        create_model("resnet-9000", 10)
    with pytest.raises(UserError, match="16x16 patches"):
        create_model("vit-b16", 10, 3, 28)
    with pytest.raises(UserError, match="4x4 patches"):
        create_model("vit-small", 10, 3, 30)
    with pytest.raises(UserError, match="8x8"):
        create_model("cnn-small", 10, 1, 6)
    with pytest.raises(UserError, match="3 channels"):
        create_model("cnn-small", 10, 3, 32, mean=(0.1, 0.2))
    with pytest.raises(UserError, match="positive"):
        create_model("cnn-small", 10, 1, 28, std=(0.0,))
    with pytest.raises(UserError, match="num_classes"):
        create_model("cnn-small", 0, 1, 28)


def test_find_classifier_by_name() -> None:
    model = create_model("vgg19-bn", 10, 3, 32)
    name, layer = find_classifier(model, "net.classifier.3")
    assert name == "net.classifier.3" and layer.out_features == 512
    assert find_classifier(model)[0] == "net.classifier.6"
    with pytest.raises(UserError, match="no layer 'net.nope'"):
        find_classifier(model, "net.nope")
    with pytest.raises(UserError, match="not nn.Linear"):
        find_classifier(model, "net.features.0")
    with pytest.raises(UserError, match="no nn.Linear"):
        find_classifier(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_create_model_accepts_underscored_names() -> None:
    assert isinstance(create_model("PreAct_ResNet18", 10, 3, 32).net.linear, nn.Linear)


def test_preact_resnet_handles_tiny_imagenet_size() -> None:
    model = create_model("preact-resnet18", 200, 3, 64).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 200)
