import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from paca_lightning import PaCALinear
from paca_lightning.layers import PaCAFunction
from tests.helpers import saved_bytes

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
             torch.float16: dict(rtol=2e-3, atol=2e-3)}


def make_base(layout: str, bias: bool, in_features=24, out_features=20, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    if layout == "linear":
        return nn.Linear(in_features, out_features, bias=bias).to(dtype)
    layer = Conv1D(out_features, in_features).to(dtype)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    if not bias:
        layer.bias = None
    return layer


def make_layer(layout="linear", bias=True, rank=5, scaling=2.5, dtype=torch.float32, **kwargs):
    base = make_base(layout, bias, dtype=dtype, **kwargs)
    in_features = base.weight.shape[0] if layout == "conv1d" else base.weight.shape[1]
    indices = torch.randperm(in_features, generator=torch.Generator().manual_seed(3))[:rank]
    return PaCALinear(base, indices, scaling)


def dense_reference(layer: PaCALinear, x: torch.Tensor, grad_output: torch.Tensor):
    """The same layer as a dense autograd op on the effective weight."""
    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    x = x.detach().clone().requires_grad_(True)
    y = F.linear(x, weight.t() if layer.transposed else weight, bias)
    y.backward(grad_output)
    column_grad = weight.grad.index_select(0, layer.paca_indices).t() if layer.transposed \
        else weight.grad.index_select(1, layer.paca_indices)
    return y, x.grad, column_grad, None if bias is None else bias.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_shape", [(7,), (3, 7), (2, 3, 5)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_paca_gradient_equals_scaled_dense_column_gradient(layout, bias, input_shape, dtype):
    layer = make_layer(layout, bias, dtype=dtype)
    layer.paca_weight.requires_grad_(True)
    if bias:
        layer.bias.requires_grad_(True)
    x = torch.randn(*input_shape, layer.in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    x.requires_grad_(True)
    grad_output = torch.randn(*input_shape, layer.out_features,
                              generator=torch.Generator().manual_seed(2)).to(dtype)

    y = layer(x)
    y.backward(grad_output)
    y_ref, x_grad_ref, column_grad_ref, bias_grad_ref = dense_reference(layer, x, grad_output)

    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x.grad, x_grad_ref, **tol)
    expected = (layer.scaling * column_grad_ref.float()).to(layer.paca_weight.dtype)
    torch.testing.assert_close(layer.paca_weight.grad, expected, **tol)
    if bias:
        torch.testing.assert_close(layer.bias.grad, bias_grad_ref, **tol)
    assert layer.weight.grad is None


def test_half_precision_weights_train_float32_columns_only_when_asked():
    base = make_base("linear", True, dtype=torch.bfloat16)
    layer = PaCALinear(base, torch.arange(4), 2.0, paca_dtype=torch.float32)
    assert layer.paca_weight.dtype == torch.float32
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    layer(x).sum().backward()
    assert layer.paca_weight.grad.dtype == torch.float32


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_cpu_autocast_bf16_matches_dense_autocast(layout):
    layer = make_layer(layout, bias=True)
    x = torch.randn(2, 6, layer.in_features, requires_grad=True)
    grad_output = torch.randn(2, 6, layer.out_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.backward(grad_output.to(torch.bfloat16))

    weight = layer.weight.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = F.linear(x_ref, weight.t() if layer.transposed else weight, layer.bias.detach())
    y_ref.backward(grad_output.to(torch.bfloat16))
    column_grad = weight.grad.index_select(0, layer.paca_indices).t() if layer.transposed \
        else weight.grad.index_select(1, layer.paca_indices)

    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(layer.paca_weight.grad, layer.scaling * column_grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_layer_saves_only_the_selected_input_columns(layout, dtype):
    layer = make_layer(layout, bias=True, rank=5, dtype=dtype)
    x = torch.randn(4, 33, layer.in_features, dtype=dtype, requires_grad=True)
    nbytes, saved, y = saved_bytes(lambda: layer(x))
    assert nbytes == 4 * 33 * 5 * x.element_size()
    assert [tuple(t.shape) for t in saved] == [(4, 33, 5)]
    y.sum().backward()  # the saved slice is all backward needs
    assert layer.paca_weight.grad is not None and x.grad is not None


def test_columns_follow_every_optimizer_step_without_counters():
    layer = make_layer("linear", bias=True)
    optimizer = torch.optim.SGD([layer.paca_weight], lr=0.5)
    x = torch.randn(8, layer.in_features)
    for _ in range(3):
        layer(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        # the next use (here an eval forward) sees the updated columns
        with torch.no_grad():
            y = layer(x)
        expected_columns = layer.scaling * layer.paca_weight.detach()
        torch.testing.assert_close(layer.weight.index_select(1, layer.paca_indices), expected_columns,
                                   rtol=0, atol=0)
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_weight_outside_selected_columns_never_changes():
    layer = make_layer("conv1d", bias=True)
    before = layer.weight.detach().clone()
    optimizer = torch.optim.AdamW([layer.paca_weight], lr=0.1)
    for _ in range(4):
        layer(torch.randn(5, layer.in_features)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    layer(torch.randn(1, layer.in_features))
    untouched = torch.ones(layer.in_features, dtype=torch.bool)
    untouched[layer.paca_indices] = False
    assert torch.equal(layer.weight[untouched], before[untouched])  # conv1d: rows are inputs
    assert not torch.equal(layer.weight[~untouched], before[~untouched])


def test_load_state_dict_resyncs_columns():
    trained = make_layer("linear", bias=False)
    with torch.no_grad():
        trained.paca_weight.add_(1.0)
    trained(torch.randn(2, trained.in_features))
    fresh = make_layer("linear", bias=False)
    fresh.load_state_dict({k: v for k, v in trained.state_dict().items() if k != "weight"}, strict=False)
    x = torch.randn(3, fresh.in_features)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


def test_disable_restores_pretrained_columns_bit_for_bit_and_enable_restores_training():
    pretrained = make_base("linear", True)
    original = pretrained.weight.detach().clone()
    layer = PaCALinear(pretrained, torch.tensor([1, 4, 9]), 3.0)
    with torch.no_grad():
        layer.paca_weight.mul_(-2.0)
    x = torch.randn(4, layer.in_features)
    trained_out = layer(x)
    layer.set_paca_enabled(False)
    torch.testing.assert_close(layer(x), F.linear(x, original, layer.bias), rtol=0, atol=0)
    layer.set_paca_enabled(True)
    torch.testing.assert_close(layer(x), trained_out, rtol=0, atol=0)
    assert torch.equal(layer.base_module().weight, original)  # unloading writes the pretrained columns back


def test_a_backward_run_while_disabled_still_uses_the_weight_its_forward_used():
    layer = PaCALinear(make_base("linear", True), torch.tensor([0, 5]), 2.0)
    with torch.no_grad():
        layer.paca_weight.add_(0.3)
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    expected = x.grad.clone(), layer.paca_weight.grad.clone()
    x.grad, layer.paca_weight.grad = None, None
    y = layer(x)
    layer.set_paca_enabled(False)
    y.sum().backward()
    assert torch.equal(x.grad, expected[0]) and torch.equal(layer.paca_weight.grad, expected[1])


def test_inference_mode_and_no_grad_use_trained_columns():
    layer = make_layer("linear", bias=True)
    with torch.no_grad():
        layer.paca_weight.add_(0.5)
    x = torch.randn(3, layer.in_features)
    with torch.inference_mode():
        y_inference = layer(x)
    with torch.no_grad():
        y_no_grad = layer(x)
    expected = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(y_inference, expected, rtol=0, atol=0)
    torch.testing.assert_close(y_no_grad, expected, rtol=0, atol=0)


def test_gradient_checkpoint_recompute_gives_same_gradients():
    layer = make_layer("linear", bias=True)
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    layer(x).pow(2).sum().backward()
    for use_reentrant in (True, False):
        twin.paca_weight.grad = None
        out = torch.utils.checkpoint.checkpoint(twin, x, use_reentrant=use_reentrant)
        out.pow(2).sum().backward()
        torch.testing.assert_close(twin.paca_weight.grad, layer.paca_weight.grad, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_output_can_be_modified_in_place_like_a_dense_layers(layout):
    """Models add residuals into a linear output in place (Falcon); autograd refuses that on a view
    returned by a custom Function, and F.linear with a bias returns one for batched input."""
    layer = make_layer(layout, bias=True)
    x = torch.randn(2, 3, layer.in_features)
    residual = torch.randn(2, 3, layer.out_features)
    grad_output = torch.randn(2, 3, layer.out_features)
    y = layer(x)
    y += residual
    y.backward(grad_output)
    _, _, column_grad, _ = dense_reference(layer, x, grad_output)
    torch.testing.assert_close(layer.paca_weight.grad, layer.scaling * column_grad)


def test_bad_indices_are_rejected_with_valid_range():
    base = make_base("linear", False)
    with pytest.raises(ValueError, match=r"distinct values in \[0, 24\)"):
        PaCALinear(base, torch.tensor([0, 24]), 1.0)
    with pytest.raises(ValueError, match="distinct"):
        PaCALinear(make_base("linear", False), torch.tensor([3, 3]), 1.0)
    with pytest.raises(TypeError, match=r"adapts nn.Linear \(or a subclass keeping its plain forward\) or "
                                        "transformers Conv1D, got torch.nn.modules.conv.Conv2d"):
        PaCALinear(nn.Conv2d(3, 3, 1), torch.tensor([0]), 1.0)


def test_function_is_usable_directly_for_custom_layers():
    weight = torch.randn(6, 10)
    paca = torch.zeros(6, 2, requires_grad=True)
    x = torch.randn(4, 10)
    y = PaCAFunction.apply(x, weight, None, paca, torch.tensor([2, 7]), 1.0, False)
    y.sum().backward()
    torch.testing.assert_close(paca.grad, torch.ones(6, 4) @ x[:, [2, 7]])
