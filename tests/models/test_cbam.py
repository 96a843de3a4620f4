import math

import pytest
import torch

from models import create_model
from models.cbam import CBAM, ChannelAttention, SpatialAttention


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def _identity_mlp(attention: ChannelAttention, fc2_bias=(0.5, -0.5)) -> ChannelAttention:
    with torch.no_grad():
        attention.fc1.weight.copy_(torch.eye(2))
        attention.fc1.bias.zero_()
        attention.fc2.weight.copy_(torch.eye(2))
        attention.fc2.bias.copy_(torch.tensor(fc2_bias))
    return attention


# Channel 0: mean 2.5, max 4. Channel 1: mean 1.0, max 5.
X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [0.0, 5.0]]]])


def test_channel_attention_by_hand():
    attention = _identity_mlp(ChannelAttention(2, reduction=1))
    # MLP(v) = relu(v) + b, shared: MLP(avg) + MLP(max) = [2.5 + 0.5 + 4 + 0.5, 1.0 - 0.5 + 5 - 0.5]
    expected = torch.tensor([_sigmoid(7.5), _sigmoid(5.0)])
    torch.testing.assert_close(attention.attention(X)[0], expected)
    torch.testing.assert_close(attention(X), X * expected.view(1, 2, 1, 1))


def test_channel_attention_uses_both_poolings():
    attention = _identity_mlp(ChannelAttention(2, reduction=1))
    only_max_changed = X.clone()
    only_max_changed[0, 0] = torch.tensor([[0.0, 2.0], [3.0, 5.0]])  # mean still 2.5, max 5
    only_mean_changed = X.clone()
    only_mean_changed[0, 0] = torch.tensor([[1.0, 1.0], [3.0, 4.0]])  # max still 4, mean 2.25
    with torch.no_grad():
        base = attention.attention(X)[0, 0].item()
        after_max = attention.attention(only_max_changed)[0, 0].item()
        after_mean = attention.attention(only_mean_changed)[0, 0].item()
    assert base == pytest.approx(_sigmoid(7.5))
    assert after_max == pytest.approx(_sigmoid(8.5)) and after_max != base
    assert after_mean == pytest.approx(_sigmoid(7.25)) and after_mean != base


@pytest.mark.parametrize(
    ("channels", "reduction", "hidden"),
    [
        (64, 16, 4),
        (64, 8, 8),
        (64, 4, 16),
        (512, 16, 32),
        (2048, 16, 128),
        (64, 2, 32),
        (16, 16, 4),
        (2, 16, 2),
    ],
)
def test_hidden_size_follows_the_reduction_with_a_floor_for_narrow_layers(channels, reduction, hidden):
    attention = ChannelAttention(channels, reduction)
    assert (attention.fc1.in_features, attention.fc1.out_features) == (channels, hidden)
    assert (attention.fc2.in_features, attention.fc2.out_features) == (hidden, channels)


def test_reduction_reaches_the_network():
    model = create_model("cbam_resnet18", reduction=8)
    assert model.layer1[0].attention.channel.fc1.out_features == 8  # 64 // 8
    assert model.layer4[1].attention.channel.fc1.out_features == 64  # 512 // 8


def test_mlp_bias_is_a_knob():
    attention = ChannelAttention(64, bias=False)
    assert attention.fc1.bias is None and attention.fc2.bias is None


def test_spatial_attention_by_hand_max_first():
    attention = SpatialAttention(3).eval()
    with torch.no_grad():
        attention.conv.weight.zero_()
        attention.conv.weight[0, 0, 1, 1] = 1.0  # the max map, centre tap
        attention.conv.weight[0, 1, 1, 1] = 2.0  # the mean map, centre tap
    channel_max = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    channel_mean = torch.tensor([[0.0, 1.0], [1.5, 4.5]])
    bn_scale = 1 / math.sqrt(1 + 1e-5)  # a fresh BatchNorm in eval mode: mean 0, var 1, weight 1
    expected = torch.sigmoid((channel_max + 2 * channel_mean) * bn_scale)
    torch.testing.assert_close(attention.attention(X)[0, 0], expected)
    torch.testing.assert_close(attention(X), X * expected)


def test_spatial_attention_without_norm_has_a_conv_bias():
    attention = SpatialAttention(7, norm=False)
    assert attention.bn is None and attention.conv.bias is not None
    assert attention(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)


@pytest.mark.parametrize("kernel_size", [1, 5, 9, 0])
def test_other_kernel_sizes_are_refused(kernel_size):
    with pytest.raises(ValueError, match=rf"kernel_size should be one of \(3, 7\), got {kernel_size}"):
        SpatialAttention(kernel_size)
    with pytest.raises(ValueError, match="kernel_size should be one of"):
        create_model("cbam_resnet18", spatial_kernel_size=kernel_size)


def test_the_paper_module_is_the_default():
    cbam = CBAM(64)
    assert cbam.channel.fc1.out_features == 4 and cbam.channel.fc1.bias is not None
    assert cbam.spatial.conv.kernel_size == (7, 7) and cbam.spatial.conv.bias is None
    assert (cbam.spatial.bn.eps, cbam.spatial.bn.momentum) == (1e-5, 0.01)


def test_cbam_is_channel_then_spatial():
    torch.manual_seed(0)
    cbam = CBAM(32, reduction=4).eval()
    with torch.no_grad():
        cbam.spatial.bn.weight.fill_(3.0)  # make the spatial map far from constant
        x = torch.randn(2, 32, 6, 6)
        out, maps = cbam.forward_with_maps(x)
        assert torch.equal(out, cbam.spatial(cbam.channel(x)))
        assert not torch.allclose(out, cbam.channel(cbam.spatial(x)))
        assert torch.equal(maps.channel, cbam.channel.attention(x))
        assert torch.equal(maps.spatial, cbam.spatial.attention(cbam.channel(x)).squeeze(1))


@pytest.mark.parametrize(
    ("gates", "has_channel", "has_spatial"), [("channel", True, False), ("spatial", False, True)]
)
def test_ablation_gates(gates, has_channel, has_spatial):
    cbam = CBAM(16, gates=gates)
    assert (cbam.channel is not None, cbam.spatial is not None) == (has_channel, has_spatial)
    _, maps = cbam.forward_with_maps(torch.randn(1, 16, 4, 4))
    assert (maps.channel is not None, maps.spatial is not None) == (has_channel, has_spatial)
    with pytest.raises(ValueError, match="gates should be one of"):
        CBAM(16, gates="both")


def test_bad_channel_arguments():
    with pytest.raises(ValueError, match="reduction should be >= 1, got 0"):
        ChannelAttention(64, 0)
    with pytest.raises(ValueError, match="channels should be >= 1, got 0"):
        ChannelAttention(0)


def test_inplace_cbam_overwrites_its_input_only_without_autograd():
    torch.manual_seed(0)
    cbam, reference = CBAM(32, inplace=True).eval(), CBAM(32).eval()
    reference.load_state_dict(cbam.state_dict())
    x = torch.randn(2, 32, 6, 6)
    expected = reference(x)
    kept = x.clone()
    out = cbam(x)  # autograd on: must leave x alone
    assert torch.equal(x, kept) and torch.equal(out, expected)
    with torch.no_grad():
        out = cbam(x)
    assert out.data_ptr() == x.data_ptr() and torch.equal(out, expected)
