import pytest
import torch

from models import create_model, list_models
from models.cbam import CBAM
from models.registry import default_input_size
from models.resnet import BasicBlock, Bottleneck, CBAMResNet

# CBAM paper, Table 4 (ImageNet, 1000 classes), counted exactly for the authors' structure.
PAPER_PARAMS = {
    "cbam_resnet18": 11_779_392,
    "cbam_resnet34": 21_960_468,
    "cbam_resnet50": 28_089_624,
    "cbam_resnet101": 49_330_172,
}
# The paper gives plain ResNets to two decimals, in millions.
PAPER_PLAIN_MILLIONS = {"resnet18": 11.69, "resnet34": 21.80, "resnet50": 25.56, "resnet101": 44.55}


def _params_on_meta(name: str, **kwargs) -> int:
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "expected"), PAPER_PARAMS.items())
def test_cbam_parameter_counts_match_the_paper(name, expected):
    assert _params_on_meta(name) == expected


@pytest.mark.parametrize(("name", "millions"), PAPER_PLAIN_MILLIONS.items())
def test_plain_parameter_counts_match_the_paper(name, millions):
    assert round(_params_on_meta(name) / 1e6, 2) == millions


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_and_runs(name):
    # Nets bigger than ResNet-18 run on the meta device (shapes only): initialising their weights
    # takes seconds. test_bottleneck_cbam_by_value covers real Bottleneck numerics.
    device = "meta" if _params_on_meta(name) > 12_000_000 else "cpu"
    with torch.device(device):
        model = create_model(name, num_classes=10).eval()
        x = torch.randn(2, 3, 32, 32)  # tiny: the global pool takes any size the stem can reduce
    assert model.input_size == default_input_size(name)
    with torch.no_grad():
        logits, maps = model.forward_with_attention(x)
        if device == "cpu":
            assert torch.equal(model(x), logits)
    assert logits.shape == (2, 10)
    assert list(maps) == model.attention_blocks
    assert name.startswith("resnet") == (not model.attention_blocks)


def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'resnet9000'.*cbam_resnet50"):
        create_model("resnet9000")


def test_bottleneck_cbam_by_value():
    torch.manual_seed(0)
    model = CBAMResNet(Bottleneck, (1, 2), 5, widths=(8, 16), stem="cifar", attention=CBAM).eval()
    x = torch.randn(2, 3, 16, 16)
    block = model.layer2[1]
    with torch.no_grad():
        logits, maps = model.forward_with_attention(x)
        assert torch.equal(model(x), logits)
        # Recompute layer2.1 by hand: residual branch -> channel -> spatial -> + identity -> ReLU.
        features = model.layer2[0](model.layer1(model._stem(x)))
        branch = block.bn3(
            block.conv3(block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(features)))))))
        )
        gated = block.attention.spatial(block.attention.channel(branch))
        torch.testing.assert_close(block(features), torch.relu(gated + features))
    assert maps["layer2.1"].channel.shape == (2, 64) and maps["layer2.1"].spatial.shape == (2, 8, 8)
    assert block.attention.channel.fc1.out_features == 4  # 64 // 16
    assert logits.shape == (2, 5)


def test_bad_network_arguments():
    with pytest.raises(ValueError, match="stem should be one of"):
        CBAMResNet(BasicBlock, (1,), widths=(8,), stem="vit")
    with pytest.raises(ValueError, match="one entry per stage"):
        CBAMResNet(BasicBlock, (1, 1), widths=(8,))
