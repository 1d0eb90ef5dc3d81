"""lorafit.lora against the real loralib 0.1.2: same init, outputs, gradients, keys, checkpoints.

Tolerances: fp32 outputs and gradients are compared with atol=1e-6, rtol=1e-5 (the two
libraries order a few additions differently: loralib adds in place, lorafit out of place;
MergedLinear builds B@A with a grouped conv in loralib and a batched matmul here).
"""

from __future__ import annotations

import copy
import io
import pickle

import loralib
import pytest
import torch
import torch.nn as nn

from lorafit import lora

ATOL, RTOL = 1e-6, 1e-5


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# name -> (constructor args, kwargs, input maker); kernel size 1 for Conv1d/3d, where loralib works.
CASES = {
    "Linear": ((12, 10), {"r": 4, "lora_alpha": 8}, lambda: torch.randn(3, 5, 12)),
    "Linear_fan_in_fan_out": (
        (12, 10),
        {"r": 4, "lora_alpha": 8, "fan_in_fan_out": True},
        lambda: torch.randn(3, 12),
    ),
    "Embedding": ((20, 8), {"r": 4, "lora_alpha": 8, "padding_idx": 0}, lambda: torch.randint(0, 20, (3, 7))),
    "MergedLinear": (
        (12, 18),
        {"r": 2, "lora_alpha": 4, "enable_lora": [True, False, True]},
        lambda: torch.randn(4, 12),
    ),
    "MergedLinear_fan_in_fan_out": (
        (12, 18),
        {"r": 2, "lora_alpha": 4, "enable_lora": [True, True, False], "fan_in_fan_out": True},
        lambda: torch.randn(2, 3, 12),
    ),
    "Conv1d": ((4, 6, 1), {"r": 2, "lora_alpha": 4}, lambda: torch.randn(2, 4, 9)),
    "Conv2d": ((4, 6, 3), {"r": 2, "lora_alpha": 4, "padding": 1}, lambda: torch.randn(2, 4, 7, 7)),
    "Conv3d": ((4, 6, 1), {"r": 2, "lora_alpha": 4}, lambda: torch.randn(2, 4, 3, 5, 5)),
}


def build(lib, name: str, seed: int = 0) -> nn.Module:
    args, kwargs, _ = CASES[name]
    cls = getattr(lib, name.split("_")[0])
    torch.manual_seed(seed)
    return cls(*args, **kwargs)


def randomize_lora(m: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(params=sorted(CASES))
def case(request):
    name = request.param
    ref, ours = build(loralib, name), build(lora, name)
    randomize_lora(ref)
    ours.load_state_dict(ref.state_dict())
    return name, ref, ours


def test_same_init_and_keys_as_loralib() -> None:
    for name in CASES:
        ref, ours = build(loralib, name), build(lora, name)
        assert list(ref.state_dict()) == list(ours.state_dict()), name
        for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values(), strict=True):
            assert a.shape == b.shape, (name, k)
            close(a, b, atol=0, rtol=0)
        assert [n for n, p in ref.named_parameters() if p.requires_grad] == [
            n for n, p in ours.named_parameters() if p.requires_grad
        ]


def test_forward_and_gradients_equal_loralib(case) -> None:
    name, ref, ours = case
    x = CASES[name][2]()
    for mode in (True, False):
        ref.train(mode)
        ours.train(mode)
        close(ours(x), ref(x))
    ref.train()
    ours.train()
    xf = x.clone().requires_grad_(True) if x.is_floating_point() else x
    xr = x.clone().requires_grad_(True) if x.is_floating_point() else x
    (ours(xf) ** 2).sum().backward()
    (ref(xr) ** 2).sum().backward()
    for (n, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            close(p.grad, q.grad, atol=1e-5)
    if x.is_floating_point():
        close(xf.grad, xr.grad, atol=1e-5)


def test_eval_merges_and_train_unmerges_like_loralib(case) -> None:
    name, ref, ours = case
    ref.eval()
    ours.eval()
    assert ours.merged and ref.merged
    w_ref = ref.conv.weight if hasattr(ref, "conv") else ref.weight
    w_ours = ours.conv.weight if hasattr(ours, "conv") else ours.weight
    close(w_ours, w_ref)
    ref.train()
    ours.train()
    assert not ours.merged
    close(w_ours, w_ref)


@pytest.mark.parametrize("direction", ["loralib->lorafit", "lorafit->loralib"])
def test_checkpoint_round_trip_strict_false(case, direction) -> None:
    name, ref, ours = case
    src, dst_lib = (ref, lora) if direction == "loralib->lorafit" else (ours, loralib)
    pretrained = {k: v for k, v in src.state_dict().items() if "lora_" not in k}
    lora_only = (loralib if dst_lib is lora else lora).lora_state_dict(src)
    buf = io.BytesIO()
    torch.save(lora_only, buf)
    buf.seek(0)
    dst = build(dst_lib, name, seed=123)
    dst.load_state_dict(pretrained, strict=False)
    missing, unexpected = dst.load_state_dict(torch.load(buf, weights_only=True), strict=False)
    assert not unexpected
    assert all("lora_" not in k for k in missing)
    x = CASES[name][2]()
    src.eval()
    dst.eval()
    close(dst(x), src(x))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_helpers_match_loralib_on_a_model(bias) -> None:
    def model(lib):
        torch.manual_seed(0)
        return nn.Sequential(
            lib.Embedding(30, 12, r=2),
            lib.Linear(12, 12, r=4, bias=True),
            nn.Linear(12, 12),
            lib.MergedLinear(12, 24, r=2, enable_lora=[True, False, True]),
            nn.LayerNorm(24),
        )

    ref, ours = model(loralib), model(lora)
    loralib.mark_only_lora_as_trainable(ref, bias=bias)
    lora.mark_only_lora_as_trainable(ours, bias=bias)
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trainable(ours) == trainable(ref)
    a, b = loralib.lora_state_dict(ref, bias=bias), lora.lora_state_dict(ours, bias=bias)
    assert list(a) == list(b)
    for k in a:
        close(a[k], b[k], atol=0, rtol=0)


def test_lora_only_bias_includes_conv_bias_unlike_loralib() -> None:
    # loralib's lora_only looks for m.bias / "<prefix>bias", which its own Conv layers lack.
    m = nn.Sequential(lora.Conv2d(3, 4, 3, r=2))
    lora.mark_only_lora_as_trainable(m, bias="lora_only")
    assert m[0].conv.bias.requires_grad
    assert "0.conv.bias" in lora.lora_state_dict(m, bias="lora_only")


def test_bad_bias_mode_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="lora_only"):
        lora.mark_only_lora_as_trainable(nn.Linear(2, 2), bias="some")


# ---- fixed defects ------------------------------------------------------------------------


@pytest.mark.parametrize("cls,dims", [(lora.Conv1d, 1), (lora.Conv2d, 2), (lora.Conv3d, 3)])
def test_conv_with_kernel_above_one_works_in_every_dimension(cls, dims) -> None:
    m = cls(4, 6, 3, r=2, lora_alpha=4, padding=1)
    randomize_lora(m)
    x = torch.randn(2, 4, *([5] * dims))
    delta = (m.lora_B @ m.lora_A).view(m.conv.weight.shape) * m.scaling
    expected = m.conv._conv_forward(x, m.conv.weight + delta, m.conv.bias)
    close(m(x), expected)
    m.eval()
    close(m(x), expected, atol=1e-5)
    if dims != 2:
        with pytest.raises(RuntimeError, match="shape|size"):  # loralib's shapes do not fit this kernel
            getattr(loralib, cls.__name__)(4, 6, 3, r=2, padding=1)(x)


def test_conv2d_groups_shapes_match_loralib() -> None:
    a = loralib.Conv2d(4, 8, 3, r=2, groups=2)
    b = lora.Conv2d(4, 8, 3, r=2, groups=2)
    assert a.lora_A.shape == b.lora_A.shape and a.lora_B.shape == b.lora_B.shape


def test_layers_deepcopy_and_pickle_with_dropout() -> None:
    for m in (
        lora.Linear(8, 8, r=2, lora_dropout=0.1),
        lora.Linear(8, 8, r=2),
        lora.MergedLinear(8, 12, r=2, enable_lora=[True, False, True], lora_dropout=0.2),
        lora.Conv2d(2, 2, 3, r=1),
        lora.Embedding(5, 4, r=2),
    ):
        randomize_lora(m)
        m.eval()
        x = (
            torch.randint(0, 5, (3,))
            if isinstance(m, nn.Embedding)
            else (torch.randn(1, 2, 5, 5) if isinstance(m, lora.ConvLoRA) else torch.randn(3, m.in_features))
        )
        for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            close(clone(x), m(x))
            assert clone.merged
    with pytest.raises((AttributeError, pickle.PicklingError), match="lambda"):  # loralib's lambda
        pickle.dumps(loralib.Linear(8, 8, r=2))


def test_merged_linear_with_every_group_disabled_is_plain_linear() -> None:
    m = lora.MergedLinear(6, 9, r=2, enable_lora=[False, False, False])
    x = torch.randn(2, 6)
    close(m(x), nn.functional.linear(x, m.weight, m.bias))
    m.eval()
    m.train()
    assert not any("lora_" in k for k in m.state_dict())
    with pytest.raises(AttributeError, match="lora_ind|lora_A"):  # loralib's crash
        loralib.MergedLinear(6, 9, r=2, enable_lora=[False, False, False])(x)


def test_merged_linear_index_moves_with_module() -> None:
    m = lora.MergedLinear(6, 9, r=2, enable_lora=[True, False, True])
    assert "lora_ind" in dict(m.named_buffers()) and "lora_ind" not in m.state_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_upcasts(dtype) -> None:
    torch.manual_seed(0)
    m = lora.Linear(64, 64, r=8, lora_alpha=16).to(dtype)
    randomize_lora(m)
    with torch.no_grad():
        m.lora_A.mul_(0.01)
    exact = m.weight.double() + (m.lora_B.double() @ m.lora_A.double()) * m.scaling
    m.eval()
    ours_err = (m.weight.double() - exact).abs().max()
    naive = m.weight.new_zeros(m.weight.shape)  # loralib: add a half-precision delta in place
    m.train()
    naive.copy_(m.weight)
    naive += (m.lora_B @ m.lora_A) * m.scaling
    naive_err = (naive.double() - exact).abs().max()
    # One rounding (ours) never loses to two (delta rounded, then the sum rounded).
    assert ours_err <= naive_err
    assert ours_err <= exact.abs().max() * 2**-7


def test_merging_twice_is_a_no_op_and_unmerge_restores() -> None:
    torch.manual_seed(0)
    m = lora.Linear(8, 8, r=2)
    randomize_lora(m)
    w0 = m.weight.clone()
    m.merge()
    once = m.weight.clone()
    m.merge()
    m.eval()
    close(m.weight, once, atol=0, rtol=0)
    m.unmerge()
    m.unmerge()
    close(m.weight, w0)


def test_eval_mode_checkpoint_does_not_apply_the_update_twice() -> None:
    def fresh(lib):
        torch.manual_seed(0)
        mod = lib.Linear(8, 8, r=2)
        randomize_lora(mod)
        return mod

    x = torch.randn(3, 8)
    for lib in (loralib, lora):
        src = fresh(lib)
        expected = src(x)
        src.eval()  # merges: the weight now holds W0 + delta
        dst = lib.Linear(8, 8, r=2)
        dst.load_state_dict(src.state_dict())
        dst.eval()
        if lib is lora:
            close(dst(x), expected, atol=1e-5)
        else:  # loralib saved the merged weight, then merges the update into it again
            assert not torch.allclose(dst(x), expected, atol=1e-3)


def test_loading_into_a_merged_layer_keeps_it_consistent() -> None:
    torch.manual_seed(0)
    m = lora.Linear(8, 8, r=2)
    m.eval()  # merged with B = 0
    other = lora.Linear(8, 8, r=2)
    other.load_state_dict(m.state_dict())
    randomize_lora(other)
    m.load_state_dict(other.state_dict())
    assert m.merged
    x = torch.randn(2, 8)
    other.train()
    close(m(x), other(x), atol=1e-5)
    m.train()
    close(m(x), other(x), atol=1e-5)


def test_non_finite_merge_is_refused() -> None:
    m = lora.Linear(4, 4, r=2)
    with torch.no_grad():
        m.lora_B.fill_(float("nan"))
    w0 = m.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        m.merge()
    assert not m.merged
    close(m.weight, w0, atol=0, rtol=0)


def test_rslora_scaling_is_opt_in() -> None:
    assert lora.Linear(4, 4, r=16, lora_alpha=32).scaling == 2.0
    assert lora.Linear(4, 4, r=16, lora_alpha=32, use_rslora=True).scaling == 8.0


def test_rank_zero_layers_are_plain() -> None:
    m = lora.Linear(4, 3, r=0)
    assert m.weight.requires_grad and not hasattr(m, "lora_A")
    x = torch.randn(2, 4)
    close(m(x), nn.functional.linear(x, m.weight, m.bias))
    m.eval()
    close(m(x), nn.functional.linear(x, m.weight, m.bias))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_autocast_update_equals_the_op_by_op_update(dropout) -> None:
    """Under bf16 autocast Linear runs lora_linear (tests/lora/test_ops.py), its bias trained here
    (loralib leaves it trainable): same output and gradients as the op-by-op update (what PEFT
    computes under autocast) with the same dropout mask, to bf16 rounding."""
    from lorafit.lora import ops

    torch.manual_seed(0)
    layer = lora.Linear(48, 40, r=4, lora_alpha=8, lora_dropout=dropout, merge_weights=False)
    layer.weight.data = layer.weight.data.bfloat16()  # a bf16 base under fp32 LoRA, as apply_lora leaves it
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(3, 5, 40)

    def run(fused: bool) -> list[torch.Tensor]:
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(7)  # the same mask: lora_linear draws its seed first, as below
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                out = layer(x)
            else:
                xd = x
                if dropout:
                    keep = lora.dropout_keep_mask(x.shape, dropout, x.device, ops.draw_seed())
                    xd = (x * keep).mul_(ops.dropout_scale(dropout, x.dtype, x.device))
                update = nn.functional.linear(nn.functional.linear(xd, layer.lora_A), layer.lora_B)
                out = nn.functional.linear(x, layer.weight, layer.bias) + update * layer.scaling
        out.backward(upstream.to(out.dtype))
        return [out.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.bias.grad]

    fused, reference = run(True), run(False)
    assert fused[0].dtype == torch.bfloat16
    assert fused[2].dtype == fused[3].dtype == fused[4].dtype == torch.float32
    for a, b in zip(fused, reference, strict=True):
        assert _rel(a, b) < 5e-3  # about one bf16 rounding (2^-8) of the output


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_mask_keeps_one_minus_p(p) -> None:
    torch.manual_seed(0)
    n = 1 << 20
    keep = lora.dropout_keep_mask(torch.Size([n]), p, torch.device("cpu"))
    assert keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - (1 - p)) < 6 * (p * (1 - p) / n) ** 0.5
    # no structure: neighbours are independent (a shared or repeated draw would correlate them)
    both = (keep[1:] & keep[:-1]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 6 * ((1 - p) ** 2 / n) ** 0.5


def test_parallel_dropout_mask_is_bernoulli_and_seeded(monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # four pieces on any machine
    shape = torch.Size([512, 1024])  # above the size drawn in parallel
    torch.manual_seed(0)
    keep = lora.dropout_keep_mask(shape, 0.25, torch.device("cpu"))
    torch.manual_seed(0)
    assert torch.equal(keep, lora.dropout_keep_mask(shape, 0.25, torch.device("cpu")))
    assert keep.shape == shape and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.75) < 3e-3  # 12 standard deviations of 2^19 draws
    pieces = keep.view(4, -1)
    assert all(not torch.equal(pieces[0], pieces[i]) for i in (1, 2, 3))  # independent generators
    assert abs(pieces.float().mean(1) - 0.75).max() < 6e-3
