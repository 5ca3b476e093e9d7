"""VGG16 topology, parameter counts, initialisation and the LightningModule's loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_vgg.models.module import VGGClassifier
from lightning_vgg.models.vgg import VGG16, conv_units, he_normal_, keras_conv_names


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_keras() -> None:
    # Keras VGG16 with a one-unit sigmoid head: 134,264,641; BN adds gamma+beta per channel.
    with torch.device("meta"):  # shapes only; no memory, no init cost
        assert n_params(VGG16(batch_norm="none")) == 134_264_641
        assert n_params(VGG16(batch_norm="every_conv")) == 134_273_089
        assert n_params(VGG16(batch_norm="per_block")) == 134_264_641 + 2 * 1472


def test_topology_is_configuration_d() -> None:
    net = VGG16(width=1 / 16, input_size=64)
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    pools = [m for m in net.features if isinstance(m, nn.MaxPool2d)]
    bns = [m for m in net.features if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 13 and len(pools) == 5 and len(bns) == 13
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert [c.out_channels for c in convs] == [4, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 32]
    linears = [m for m in net.classifier if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (32 * 2 * 2, 256),
        (256, 256),
        (256, 1),
    ]
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())
    out = net(torch.rand(3, 3, 64, 64))
    assert out.shape == (3,)


def test_per_block_batchnorm_is_the_literal_seed() -> None:
    net = VGG16(width=1 / 16, input_size=32, batch_norm="per_block")
    kinds = [type(m).__name__ for m in net.features]
    # block 1: conv relu conv relu BN pool
    assert kinds[:6] == ["Conv2d", "ReLU", "Conv2d", "ReLU", "BatchNorm2d", "MaxPool2d"]
    assert sum(k == "BatchNorm2d" for k in kinds) == 5


def test_keras_batchnorm_defaults() -> None:
    bn = next(
        m for m in VGG16(width=1 / 16, input_size=32).modules() if isinstance(m, nn.BatchNorm2d)
    )
    assert bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3)


def test_he_normal_is_truncated_with_keras_std() -> None:
    torch.manual_seed(0)
    w = torch.empty(512, 256, 3, 3)
    he_normal_(w)
    target = math.sqrt(2.0 / (256 * 9))
    assert w.std().item() == pytest.approx(target, rel=0.01)
    # truncated at two of the pre-truncation stds (target / 0.8796)
    assert w.abs().max().item() <= 2 * target / 0.87962566103423978 + 1e-7
    assert w.mean().abs().item() < 0.01 * target


def test_initialisation_statistics_of_the_network() -> None:
    torch.manual_seed(1)
    net = VGG16(width=0.25, input_size=32)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * 9
            assert m.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.15)
            assert torch.count_nonzero(m.bias) == 0
        if isinstance(m, nn.Linear):
            limit = math.sqrt(6 / (m.in_features + m.out_features))  # glorot_uniform
            assert m.weight.abs().max().item() <= limit
            assert torch.count_nonzero(m.bias) == 0


def test_conv_units_names_and_stages() -> None:
    net = VGG16(width=1 / 16, input_size=32)
    post, pre, conv = conv_units(net, "post"), conv_units(net, "pre"), conv_units(net, "conv")
    assert list(post) == keras_conv_names() and len(post) == 13
    assert next(iter(post)) == "block1_conv1" and list(post)[-1] == "block5_conv3"
    assert all(isinstance(m, nn.ReLU) for m in post.values())
    assert all(isinstance(m, nn.BatchNorm2d) for m in pre.values())
    assert all(isinstance(m, nn.Conv2d) for m in conv.values())


def test_loss_is_bce_with_logits_and_threshold_is_half() -> None:
    module = VGGClassifier(width=1 / 16, input_size=32)
    logits = torch.tensor([-2.0, 0.0, 3.0])
    y = torch.tensor([0, 1, 0])
    # Keras binary_crossentropy on sigmoid(logits), computed by hand:
    p = torch.sigmoid(logits)
    keras = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    ours = nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    assert ours.item() == pytest.approx(keras.item(), rel=1e-6)
    pred = module.predict_step(torch.zeros(1, 3, 32, 32), 0)
    assert set(pred) == {"prob_dog", "pred"}
    assert int(pred["pred"][0]) == int(pred["prob_dog"][0] >= 0.5)


def test_module_saves_hyperparameters_and_builds_optimizer() -> None:
    module = VGGClassifier(width=1 / 16, input_size=32, lr=0.001, momentum=0.9)
    assert module.hparams.width == 1 / 16 and module.hparams.lr == 0.001
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.001 and opt.param_groups[0]["momentum"] == 0.9
