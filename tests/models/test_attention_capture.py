import pytest
import torch

from models import create_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = create_model("cbam_resnet20_cifar", num_classes=10).eval()
    with torch.no_grad():  # non-trivial spatial maps (the authors' init starts them all at 0.5)
        for name in model.attention_blocks:
            model.get_submodule(name).attention.spatial.bn.weight.normal_()
    return model


def _all_hooks_empty(model) -> bool:
    from torch.nn.modules import module as nn_module

    global_hooks = (nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks)
    return not any(global_hooks) and all(
        not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()
    )


def test_logits_are_identical_and_no_hooks_remain(model):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        logits, maps = model.forward_with_attention(x)
        again = model(x)
    assert torch.equal(plain, logits) and torch.equal(plain, again)
    assert _all_hooks_empty(model)
    assert list(maps) == model.attention_blocks == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]


def test_maps_have_the_documented_shapes_and_values(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, maps = model.forward_with_attention(x)
        # layer1.0's maps, recomputed by hand from the block's residual branch.
        block = model.layer1[0]
        residual = block._residual(model._stem(x))
        channel = block.attention.channel.attention(residual)
        spatial = block.attention.spatial.attention(residual * channel[:, :, None, None])
    assert torch.equal(maps["layer1.0"].channel, channel)
    assert torch.equal(maps["layer1.0"].spatial, spatial[:, 0])
    for name, (width, size) in {"layer1.0": (16, 32), "layer2.2": (32, 16), "layer3.1": (64, 8)}.items():
        assert maps[name].channel.shape == (2, width)
        assert maps[name].spatial.shape == (2, size, size)
    for m in maps.values():
        assert m.channel.min() > 0 and m.channel.max() < 1
        assert m.spatial.min() > 0 and m.spatial.max() < 1
    assert maps["layer1.0"].spatial.std() > 0.01  # a real map, not a constant


def test_a_subset_of_blocks(model):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits, maps = model.forward_with_attention(x, blocks=["layer3.2", "layer1.0"])
        _, single = model.forward_with_attention(x, blocks="layer2.1")
        _, none = model.forward_with_attention(x, blocks=[])
        assert torch.equal(logits, model(x))
    assert list(maps) == ["layer1.0", "layer3.2"]  # network order, whatever order was asked
    assert list(single) == ["layer2.1"] and none == {}


def test_unknown_blocks_are_named(model):
    with pytest.raises(ValueError, match=r"unknown attention blocks \['layer4.0', 'stem'\]"):
        model.forward_with_attention(torch.randn(1, 3, 32, 32), blocks=["layer1.0", "stem", "layer4.0"])


def test_plain_resnets_have_no_attention_blocks():
    model = create_model("resnet18", num_classes=10).eval()
    assert model.attention_blocks == []
    with torch.no_grad():
        logits, maps = model.forward_with_attention(torch.randn(1, 3, 32, 32))
    assert maps == {} and logits.shape == (1, 10)


@pytest.mark.parametrize(("gates", "kinds"), [("channel", (True, False)), ("spatial", (False, True))])
def test_ablation_models_return_the_maps_they_have(gates, kinds):
    model = create_model("cbam_resnet8_cifar", num_classes=10, gates=gates).eval()
    with torch.no_grad():
        _, maps = model.forward_with_attention(torch.randn(1, 3, 32, 32))
    assert all((m.channel is not None, m.spatial is not None) == kinds for m in maps.values())


def test_channels_last_stays_channels_last(model):
    x = torch.randn(2, 3, 32, 32)
    fast = create_model("cbam_resnet20_cifar", num_classes=10).eval()
    fast.load_state_dict(model.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        features = fast.layer1(fast._stem(x_cl))
        logits, maps = fast.forward_with_attention(x_cl)
        torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)
    assert features.is_contiguous(memory_format=torch.channels_last)
    assert maps["layer1.0"].spatial.shape == (2, 32, 32)


def test_gradients_flow_through_captured_maps():
    model = create_model("cbam_resnet8_cifar", num_classes=10)
    logits, maps = model.forward_with_attention(torch.randn(2, 3, 32, 32))
    (logits.sum() + maps["layer1.0"].spatial.sum()).backward()
    assert model.layer1[0].attention.spatial.bn.weight.grad is not None


@pytest.mark.slow
def test_export_traces_both_forwards(model):
    class WithAttention(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            logits, maps = self.inner.forward_with_attention(x, blocks=["layer2.0"])
            return logits, maps["layer2.0"].channel, maps["layer2.0"].spatial

    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(WithAttention(model), (x,)).module()
    plain = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        logits, channel, spatial = exported(x)
        expected, maps = model.forward_with_attention(x)
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(plain(x), expected)
    torch.testing.assert_close(spatial, maps["layer2.0"].spatial)
    torch.testing.assert_close(channel, maps["layer2.0"].channel)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_onnx_export_matches(model, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    x = torch.randn(2, 3, 32, 32)
    torch.onnx.export(model, (x,), tmp_path / "m.onnx", input_names=["x"], output_names=["logits"])
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    (logits,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-4, atol=1e-5)


def test_inference_and_autograd_paths_agree(model):
    # Without autograd CBAM multiplies the spatial map in place; with it, it must not.
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        no_grad_logits, no_grad_maps = model.forward_with_attention(x)
    logits, maps = model.forward_with_attention(x)
    assert torch.equal(logits.detach(), no_grad_logits)
    assert torch.equal(maps["layer3.2"].spatial.detach(), no_grad_maps["layer3.2"].spatial)


@pytest.mark.slow
def test_both_forwards_compile_without_graph_breaks(model):
    # fullgraph=True fails on any graph break; the eager backend keeps the test fast (no codegen).
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with_attention = torch.compile(
        lambda t: model.forward_with_attention(t, blocks=["layer1.1"]), fullgraph=True, backend="eager"
    )
    with torch.no_grad():
        expected, maps = model.forward_with_attention(x)
        assert torch.equal(compiled(x), expected)
        logits, compiled_maps = with_attention(x)
    assert torch.equal(logits, expected)
    assert list(compiled_maps) == ["layer1.1"]
    assert torch.equal(compiled_maps["layer1.1"].spatial, maps["layer1.1"].spatial)
