"""Model contract tests (CPU), run for every registered model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raykd.errors import ConfigError
from raykd.models import MODELS, SSLModel, build_model

# (in_channels, image_size): digits, Fashion-MNIST, CIFAR
SHAPES = [(1, 8), (1, 28), (3, 32)]
NAMES = MODELS.names()


def _batch(name: str, c: int, s: int) -> torch.Tensor:
    return torch.randn(2 if name == "wrn_28_8" else 4, c, s, s)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_has_expected_models():
    assert {"wrn_28_2", "wrn_28_8", "small_cnn", "resnet18"} <= set(NAMES)
    with pytest.raises(ConfigError):
        build_model("no_such_model", 10, 3, 32)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("c,s", SHAPES)
def test_forward_contract(name: str, c: int, s: int):
    model = build_model(name, num_classes=7, in_channels=c, image_size=s)
    assert isinstance(model, SSLModel)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.in_features == model.feature_dim
    x = _batch(name, c, s)
    model.train()
    logits, h = model(x, with_features=True)
    assert logits.shape == (x.shape[0], 7)
    assert h.shape == (x.shape[0], model.feature_dim)

    # Backward reaches every parameter.
    (logits.logsumexp(1).mean() + h.pow(2).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"

    model.eval()
    with torch.no_grad():
        logits, h = model(x, with_features=True)
        torch.testing.assert_close(logits, model.classifier(h))
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(h, model.features(x))
        stages = model.stages(x)
        assert isinstance(stages, list) and len(stages) >= 2
        assert all(t.dim() == 4 and t.shape[0] == x.shape[0] for t in stages)
        assert stages[-1].shape[1] == model.feature_dim
        assert min(stages[-1].shape[-2:]) >= 1
        torch.testing.assert_close(stages[-1], model.feature_map(x))
        torch.testing.assert_close(h, stages[-1].mean((2, 3)))


@pytest.mark.parametrize("name", NAMES)
def test_bn_momentum_applied_everywhere(name: str):
    model = build_model(name, 10, 3, 32, bn_momentum=0.001)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.momentum == 0.001 for m in bns)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_argument_rejected(name: str):
    with pytest.raises(TypeError, match="bogus_arg"):
        build_model(name, 10, 3, 32, bogus_arg=1)


@pytest.mark.parametrize("name,classes,expected", [("wrn_28_2", 10, 1.47e6), ("wrn_28_8", 100, 23.4e6)])
def test_wrn_parameter_counts(name: str, classes: int, expected: float):
    n = sum(p.numel() for p in build_model(name, classes, 3, 32).parameters())
    assert abs(n - expected) / expected < 0.02, n


def test_wrn_structure():
    model = build_model("wrn_28_2", 10, 3, 32, drop_rate=0.3)
    assert model.feature_dim == 128
    assert [t.shape[1:] for t in model.stages(torch.randn(2, 3, 32, 32))] == [
        (32, 32, 32),
        (64, 16, 16),
        (128, 8, 8),
    ]
    assert sum(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.1 for m in model.modules()) > 0
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert model.classifier.bias.abs().sum() == 0


def test_small_cnn_downsampling_and_width():
    model = build_model("small_cnn", 10, 1, 8, width=16)
    assert model.feature_dim == 64
    assert [t.shape[-1] for t in model.stages(torch.randn(2, 1, 8, 8))] == [8, 4, 2]
    model = build_model("small_cnn", 10, 1, 28)
    assert [t.shape[-1] for t in model.stages(torch.randn(2, 1, 28, 28))] == [28, 14, 7]


def test_resnet18_stages():
    model = build_model("resnet18", 10, 3, 32)
    assert model.feature_dim == 512
    shapes = [t.shape[1:] for t in model.stages(torch.randn(2, 3, 32, 32))]
    assert shapes == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
