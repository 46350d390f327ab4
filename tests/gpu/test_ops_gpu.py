"""GPU suite, fused ops: every op of ``fastkd.ops`` (``feature_align``, ``gather_tokens``,
``token_relation``, ``ema_``) on CUDA through its compiled kernel, forward and backward, against its
``*_reference`` on the same device and against a float64 CPU truth (the reference on the same,
already rounded, inputs cast to float64). Cases: fp32 / bf16 / fp16 at ViT-S/B/L shapes (N = 197,
D = 384 / 768 / 1024, 6 / 12 / 16 heads of dim 64), ragged, strided and mixed-dtype inputs, tensors
past 2^31 elements (when the GPU has the memory), inputs on ``cuda:1`` while device 0 is current,
grid-limit sizes, and EMA of fp32 denormals. Run with ``make gpu-test``."""

from __future__ import annotations

import time

import pytest
import torch
from triton.runtime.jit import JITFunction

from fastkd.ops import (
    build_info, ema_, ema_reference, feature_align, feature_align_reference, gather_tokens, gather_tokens_reference,
    random_keep, token_relation, token_relation_reference,
)
from tests.gpu.conftest import require_free_memory, require_time
from tests.ops.test_ema import TOL as EMA_TOL
from tests.ops.test_ema import assert_gap_close, make_pairs
from tests.ops.test_feature_align import _kw as feature_align_kwargs
from tests.ops.test_gather_tokens import _fwd_bwd as gather_forward_backward
from tests.ops.test_token_relation import _forward_backward as relation_forward_backward
from tests.ops.test_token_relation import _inputs as relation_inputs

pytestmark = pytest.mark.gpu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VIT = {"vit_s": (384, 6), "vit_b": (768, 12), "vit_l": (1024, 16)}  # D, heads (head dim 64)
N_TOKENS = 197
# Largest error relative to the largest truth value: (op outputs, gradients / low-precision outputs).
# Outputs of feature_align / token_relation are fp32 whatever the inputs; gradients (and gather's
# output) are in the input dtype, so they carry its rounding (bf16: 2^-9, fp16: 2^-12 relative).
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-4, 2e-2),
    torch.float16: (2e-4, 4e-3),
}
GIB = 2**30


def _tol(*dtypes: torch.dtype) -> tuple[float, float]:
    """The looser tolerances of the dtypes involved."""
    return tuple(max(TOL[d][i] for d in dtypes) for i in range(2))


def _cpu64(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return None
    return x.detach().to("cpu", torch.float64 if x.is_floating_point() else x.dtype)


# ----------------------------------------------------------------------------- environment


def test_triton_kernels_are_compiled(fig):
    """The suite runs the compiled Triton kernels: no interpreter, every kernel a JITFunction."""
    import fastkd.kernels.feature_align as fa
    import fastkd.kernels.gather_tokens as gt
    import fastkd.kernels.token_relation as tr

    kernels = {name: obj for module in (fa, gt, tr) for name, obj in vars(module).items() if name.endswith("_kernel")}
    assert kernels, "no Triton kernel found in fastkd.kernels"
    wrong = {name: type(k).__name__ for name, k in kernels.items() if type(k) is not JITFunction}
    assert not wrong, f"kernels not compiled by Triton (interpreter on?): {wrong}"
    fig.note(f"{len(kernels)} kernels are JITFunctions")


def test_native_extension_has_cuda_kernels(fig):
    """fastkd._C was built with its CUDA sources for this GPU's architecture (ema_ runs its CUDA kernel)."""
    info = build_info()
    fig.note(f"build_info {info}")
    assert info.get("built"), "fastkd._C is not built: install with pip install --no-build-isolation --no-deps -e ."
    assert info.get("cuda"), "fastkd._C was built without its CUDA sources"
    major, minor = torch.cuda.get_device_capability()
    archs = [a.strip().split("+")[0] for a in str(info.get("cuda_archs", "")).replace(",", ";").split(";")]
    assert any(a.rstrip("a").startswith(f"{major}.") for a in archs), f"no sm_{major}x in cuda_archs={archs}"


# ----------------------------------------------------------------------------- feature_align


def check_feature_align(fig, student, teacher, mask=None, mode=("layernorm", False, "smooth_l1"), label=""):
    """Forward (per-row loss) and backward (student gradient for a random upstream gradient) of the
    fused op against the reference on the GPU and the float64 CPU truth."""
    kw = feature_align_kwargs(mode)
    tol_fwd, tol_grad = _tol(student.dtype, teacher.dtype)
    upstream = torch.rand(student.shape[:-1], device=student.device)

    def run(fn, s, t, m, up):
        s = s.detach().clone().requires_grad_(True) if s.is_contiguous() else s.detach().requires_grad_(True)
        rows = fn(s, t, m, **kw)
        (grad,) = torch.autograd.grad(rows, s, up)
        return rows.detach(), grad

    rows, grad = run(feature_align, student, teacher, mask, upstream)
    ref_rows, ref_grad = run(feature_align_reference, student, teacher, mask, upstream)
    true_rows, true_grad = run(feature_align_reference, _cpu64(student), _cpu64(teacher), _cpu64(mask), _cpu64(upstream))
    assert rows.dtype == torch.float32 and rows.device == student.device
    assert grad.dtype == student.dtype and grad.device == student.device
    fig.compare(f"{label}loss vs fp64", rows, true_rows, tol_fwd)
    fig.compare(f"{label}grad vs fp64", grad, true_grad, tol_grad)
    fig.compare(f"{label}loss vs reference", rows, ref_rows, 2 * tol_fwd)
    fig.compare(f"{label}grad vs reference", grad, ref_grad, 2 * tol_grad)


def _randn(*shape, dtype, device="cuda", scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=device) * scale + shift).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vit", VIT)
def test_feature_align_vit(vit, dtype, fig):
    D, _ = VIT[vit]
    dtype = DTYPES[dtype]
    student = _randn(2, N_TOKENS, D, dtype=dtype)
    teacher = _randn(2, N_TOKENS, D, dtype=dtype, scale=2.0, shift=0.5)
    mask = torch.rand(2, N_TOKENS, device="cuda") > 0.25
    check_feature_align(fig, student, teacher, mask)


# target norm x student norm x loss: every option value, in fp32 (ViT-B) and bf16 (ViT-S)
FEATURE_MODES = [("layernorm", False, "smooth_l1"), ("layernorm", True, "cosine"), ("l2", False, "mse"),
                 ("l2", True, "smooth_l1"), ("none", False, "cosine"), ("none", True, "mse")]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_feature_align_modes(dtype, fig):
    dtype = DTYPES[dtype]
    D = 768 if dtype == torch.float32 else 384
    student = _randn(3, 64, D, dtype=dtype)
    teacher = _randn(3, 64, D, dtype=dtype, scale=2.0, shift=0.5)
    weight = torch.rand(3, 64, device="cuda")
    for mode in FEATURE_MODES:
        check_feature_align(fig, student, teacher, weight, mode, label="-".join(map(str, mode)) + " ")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_feature_align_ragged(dtype, fig):
    """Widths that are no power of two (1, 37, 1000), the kernel's widest row (4096) and past it
    (4097: the documented PyTorch path), 1 to 1337 rows."""
    dtype = DTYPES[dtype]
    for rows, D in ((1, 1), (7, 37), (1337, 1000), (3, 4096), (5, 4097), (1, 768)):
        student = _randn(rows, D, dtype=dtype)
        teacher = _randn(rows, D, dtype=dtype, scale=2.0, shift=0.5)
        check_feature_align(fig, student, teacher, None, ("layernorm", False, "smooth_l1"), label=f"[{rows}x{D}] ")


def test_feature_align_strided_and_mixed_dtypes(fig):
    """Sequence-first student rows (a transposed view), a teacher with stride 2 along D, a
    non-contiguous float mask; student and teacher of different dtypes."""
    base = torch.randn(N_TOKENS, 2, 768, device="cuda")
    student = base.transpose(0, 1)  # [2, 197, 768], rows strided
    teacher = (torch.randn(2, N_TOKENS, 1536, device="cuda") * 2 + 0.5)[..., ::2]  # stride 2 along D
    mask = torch.rand(N_TOKENS, 2, device="cuda").t()
    assert not student.is_contiguous() and teacher.stride(-1) == 2 and not mask.is_contiguous()
    check_feature_align(fig, student, teacher, mask, label="strided ")
    for s_dtype, t_dtype in ((torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16)):
        s = torch.randn(2, N_TOKENS, 768, device="cuda").to(s_dtype)
        t = (torch.randn(2, N_TOKENS, 768, device="cuda") * 2 + 0.5).to(t_dtype)
        check_feature_align(fig, s, t, mask, ("l2", True, "cosine"), label=f"{s_dtype}/{t_dtype} ")


# ----------------------------------------------------------------------------- gather_tokens


def check_gather(fig, x, keep, pos, label=""):
    """Forward and both gradients (x, pos_embed) against the reference and the float64 CPU truth;
    ``x`` / ``pos`` require grad (leaves or views of leaves)."""
    dtypes = (x.dtype,) if pos is None else (x.dtype, pos.dtype)
    tol_fwd, tol_grad = _tol(*dtypes)
    out_dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    tol_out = tol_grad if out_dtype != torch.float32 else tol_fwd
    grad = torch.randn(x.shape[0], keep.shape[1], x.shape[2], device=x.device).to(out_dtype)
    out, grads = gather_forward_backward(gather_tokens, x, keep, pos, grad)
    ref, ref_grads = gather_forward_backward(gather_tokens_reference, x, keep, pos, grad)
    x64 = _cpu64(x).requires_grad_(True)
    pos64 = None if pos is None else _cpu64(pos).requires_grad_(True)
    truth, true_grads = gather_forward_backward(gather_tokens_reference, x64, keep.cpu(), pos64, _cpu64(grad))
    assert out.dtype == out_dtype and out.device == x.device
    fig.compare(f"{label}out vs fp64", out, truth, tol_out)
    fig.compare(f"{label}out vs reference", out, ref, 2 * tol_out)
    for name, got, want, true in zip(("grad_x", "grad_pos"), grads, ref_grads, true_grads):
        assert got.dtype == want.dtype and got.device == x.device, (name, got.dtype, want.dtype)
        fig.compare(f"{label}{name} vs fp64", got, true, tol_grad)
        fig.compare(f"{label}{name} vs reference", got, want, 2 * tol_grad)


def _leaf(*shape, dtype, device="cuda"):
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vit", VIT)
def test_gather_tokens_vit(vit, dtype, fig):
    """MAE / MOMA keep ratios (25 % and 10 % of 196 patches + the class token) with [N, D] and
    [1, N, D] positional embeddings."""
    D, _ = VIT[vit]
    dtype = DTYPES[dtype]
    for K, pos_shape in ((50, (N_TOKENS, D)), (20, (1, N_TOKENS, D))):
        x = _leaf(4, N_TOKENS, D, dtype=dtype)
        keep = random_keep(4, N_TOKENS, K, device="cuda")[0]
        check_gather(fig, x, keep, _leaf(*pos_shape, dtype=dtype), label=f"K={K} ")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gather_tokens_ragged(dtype, fig):
    """Odd widths, no positional embedding, K = 0, every token kept, repeated indices (their gradients add)."""
    dtype = DTYPES[dtype]
    cases = [  # B, N, D, K, with pos, duplicates
        (3, 197, 1000, 1, True, False), (2, 197, 37, 197, False, False), (5, 9, 1, 4, True, True),
        (2, 4, 8, 0, True, False), (1, 1, 1, 1, True, False), (12, 13, 1030, 13, True, True),
    ]
    for B, N, D, K, with_pos, duplicates in cases:
        x = _leaf(B, N, D, dtype=dtype)
        if duplicates:
            keep = torch.randint(0, N, (B, K), device="cuda")
        else:
            keep = random_keep(B, N, K, device="cuda")[0]
        pos = _leaf(N, D, dtype=dtype) if with_pos else None
        check_gather(fig, x, keep, pos, label=f"[{B},{N},{D}] K={K} ")


def test_gather_tokens_strided_and_mixed_dtypes(fig):
    """x a view with strided rows, pos_embed a strided [1, N, D] view, keep non-contiguous; a bf16 x
    with an fp32 pos_embed (autocast: the sum promotes to fp32) and fp16 with bf16."""
    x_base = _leaf(3, N_TOKENS, 2, 768, dtype=torch.float32)
    pos_base = _leaf(1, N_TOKENS, 2, 768, dtype=torch.float32)
    keep = random_keep(3, N_TOKENS, 60, device="cuda")[0].t().contiguous().t()
    x, pos = x_base[:, :, 1], pos_base[:, :, 0]
    assert not x.is_contiguous() and not pos.is_contiguous() and not keep.is_contiguous()
    check_gather(fig, x, keep, pos, label="strided ")
    for x_dtype, pos_dtype in ((torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16)):
        x = _leaf(3, N_TOKENS, 768, dtype=x_dtype)
        check_gather(fig, x, random_keep(3, N_TOKENS, 50, device="cuda")[0], _leaf(N_TOKENS, 768, dtype=pos_dtype),
                     label=f"{x_dtype}+{pos_dtype} ")


# ----------------------------------------------------------------------------- token_relation


def check_relation(fig, q_s, k_s, q_t, k_t, label="", **kwargs):
    """KL rows and the student gradients (q_s, k_s) against the reference and the float64 CPU truth."""
    tol_fwd, tol_grad = _tol(q_s.dtype, q_t.dtype)
    B, H_s, N, _ = q_s.shape
    grad = torch.randn(B, H_s, N, device=q_s.device)
    ours = relation_forward_backward(token_relation, q_s, k_s, q_t, k_t, grad, **kwargs)
    ref = relation_forward_backward(token_relation_reference, q_s, k_s, q_t, k_t, grad, **kwargs)
    truth = relation_forward_backward(token_relation_reference, *map(_cpu64, (q_s, k_s, q_t, k_t)), _cpu64(grad),
                                      **kwargs)
    assert ours[0].dtype == torch.float32 and ours[0].device == q_s.device
    assert ours[1].dtype == q_s.dtype and ours[2].dtype == k_s.dtype
    for name, got, want, true, tol in zip(("kl", "dq_s", "dk_s"), ours, ref, truth, (tol_fwd, tol_grad, tol_grad)):
        fig.compare(f"{label}{name} vs fp64", got, true, tol)
        fig.compare(f"{label}{name} vs reference", got, want, 2 * tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vit", VIT)
def test_token_relation_vit(vit, dtype, fig):
    _, heads = VIT[vit]
    q_s, k_s, q_t, k_t = (x.cuda() for x in relation_inputs(2, heads, heads, N_TOKENS, 64, 64, dtype=DTYPES[dtype]))
    check_relation(fig, q_s, k_s, q_t, k_t, temperature=0.7)


def test_token_relation_directions_and_head_map(fig):
    """Both KL directions; a ViT-B teacher (12 heads) onto a ViT-S student (6 heads) with head_map='mean'."""
    for direction in ("teacher_to_student", "student_to_teacher"):
        for dtype in (torch.float32, torch.bfloat16):
            inputs = [x.cuda() for x in relation_inputs(2, 6, 12, N_TOKENS, 64, 64, dtype=dtype)]
            check_relation(fig, *inputs, label=f"{direction} mean {dtype} ", direction=direction, head_map="mean")
            inputs = [x.cuda() for x in relation_inputs(2, 6, 6, N_TOKENS, 64, 64, dtype=dtype)]
            check_relation(fig, *inputs, label=f"{direction} {dtype} ", direction=direction)


def test_token_relation_ragged(fig):
    """Token counts off the block sizes (1, 13, 197, 257), head dims 32 / 80 (padded), G = 3."""
    cases = [(3, 2, 2, 1, 64, 64), (2, 3, 3, 13, 32, 32), (1, 2, 4, 197, 32, 80), (2, 1, 3, 257, 64, 32),
             (5, 4, 4, 50, 64, 64)]
    for dtype in (torch.float32, torch.bfloat16):
        for B, H_s, H_t, N, d_s, d_t in cases:
            inputs = [x.cuda() for x in relation_inputs(B, H_s, H_t, N, d_s, d_t, dtype=dtype)]
            check_relation(fig, *inputs, label=f"[{B},{H_s}/{H_t},{N},{d_s}/{d_t}] {dtype} ",
                           head_map="mean" if H_t > H_s else None)


def _qk_views(qkv: torch.Tensor, sequence_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k ``[B, H, N, d]`` views of a ``[N, B, 3, H, d]`` (sequence-first) or ``[B, N, 3, H, d]`` qkv."""
    if sequence_first:
        return qkv[:, :, 0].permute(1, 2, 0, 3), qkv[:, :, 1].permute(1, 2, 0, 3)
    parts = qkv.permute(2, 0, 3, 1, 4)
    return parts[0], parts[1]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_token_relation_strided_qkv_views(dtype, fig):
    """q / k as non-contiguous views out of one qkv projection (sequence-first student, batch-first
    teacher, a teacher head dim with stride 2): gradients land in the student's qkv tensor."""
    dtype = DTYPES[dtype]
    tol_fwd, tol_grad = _tol(dtype)
    B, H, N, d = 2, 6, N_TOKENS, 64
    qkv_s = (torch.randn(N, B, 3, H, d, device="cuda") * 2).to(dtype).requires_grad_(True)
    qkv_t = (torch.randn(B, N, 3, H, 2 * d, device="cuda") * 2).to(dtype)
    grad = torch.randn(B, H, N, device="cuda")

    def run(fn, qkv_s, qkv_t, grad):
        q_s, k_s = _qk_views(qkv_s, True)
        q_t, k_t = (x[..., ::2] for x in _qk_views(qkv_t, False))
        assert not q_s.is_contiguous() and q_t.stride(-1) == 2
        kl = fn(q_s, k_s, q_t, k_t, temperature=0.7)
        (g,) = torch.autograd.grad(kl, qkv_s, grad)
        return kl.detach(), g

    kl, g = run(token_relation, qkv_s, qkv_t, grad)
    ref_kl, ref_g = run(token_relation_reference, qkv_s, qkv_t, grad)
    true_kl, true_g = run(token_relation_reference, _cpu64(qkv_s).requires_grad_(True), _cpu64(qkv_t), _cpu64(grad))
    assert g.dtype == dtype
    fig.compare("kl vs fp64", kl, true_kl, tol_fwd)
    fig.compare("grad qkv vs fp64", g, true_g, tol_grad)
    fig.compare("kl vs reference", kl, ref_kl, 2 * tol_fwd)
    fig.compare("grad qkv vs reference", g, ref_g, 2 * tol_grad)


def test_token_relation_mixed_dtypes(fig):
    """Student and teacher in different dtypes (a bf16 student against an fp32 or fp16 teacher, ...)."""
    for s_dtype, t_dtype in ((torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16)):
        q_s, k_s = (x.cuda() for x in relation_inputs(2, 6, 6, N_TOKENS, 64, 64, dtype=s_dtype)[:2])
        q_t, k_t = (x.cuda() for x in relation_inputs(2, 6, 12, N_TOKENS, 64, 64, dtype=t_dtype)[2:])
        check_relation(fig, q_s, k_s, q_t, k_t, label=f"{s_dtype}/{t_dtype} ", head_map="mean")


# ----------------------------------------------------------------------------- ema_


def check_ema(fig, teacher, student, momentum, label=""):
    """In-place update and gap against ema_reference on the GPU and on float64 CPU copies."""
    expected, ref_gap = ema_reference(teacher, student, momentum)
    cpu_expected, cpu_gap = ema_reference([t.cpu() for t in teacher], [s.cpu() for s in student], momentum)
    gap = ema_(teacher, student, momentum, return_gap=True)
    assert_gap_close(gap, ref_gap)
    assert_gap_close(gap, cpu_gap)
    for i, (t, e, c) in enumerate(zip(teacher, expected, cpu_expected)):
        rtol, atol = EMA_TOL[t.dtype]
        fig.compare_elementwise(f"{label}teacher[{i}] {t.dtype} vs reference", t, e, rtol, atol)
        fig.compare_elementwise(f"{label}teacher[{i}] {t.dtype} vs fp64 CPU", t, c, rtol, atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vit", VIT)
def test_ema_vit(vit, dtype, fig):
    """EMA of a ViT's parameter shapes (patch embedding, positional embedding, two blocks of qkv,
    proj, MLP and norms) in one call."""
    D, _ = VIT[vit]
    block = [3 * D * D, 3 * D, D * D, D, 4 * D * D, 4 * D, 4 * D * D, D, D, D, D, D]
    sizes = [N_TOKENS * D, D, 16 * 16 * 3 * D] + block * 2
    teacher, student = make_pairs(sizes, DTYPES[dtype], DTYPES[dtype])
    teacher, student = [t.cuda() for t in teacher], [s.cuda() for s in student]
    check_ema(fig, teacher, student, 0.996)
    fig.note(f"{sum(sizes) / 1e6:.1f} M parameters")


def test_ema_ragged_mixed_dtypes_and_strided(fig):
    """Sizes around chunk edges (0, 1, 3, 1023, 65537, 2^20 + 7), student dtypes other than the
    teacher's, non-contiguous students, momentum 0 and 1."""
    sizes = [0, 1, 3, 1023, 65537, 2**20 + 7]
    for t_dtype, s_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                             (torch.float16, torch.float32), (torch.float32, torch.float16)):
        teacher, student = make_pairs(sizes, t_dtype, s_dtype)
        check_ema(fig, [t.cuda() for t in teacher], [s.cuda() for s in student], 0.99, label=f"{t_dtype}<-{s_dtype} ")
    teacher = [torch.randn(64, 48, device="cuda"), torch.randn(1000, device="cuda")]
    student = [torch.randn(48, 64, device="cuda").t(), torch.randn(2000, device="cuda")[::2]]
    check_ema(fig, teacher, student, 0.9, label="strided ")
    for momentum in (0.0, 1.0):
        teacher, student = make_pairs([5, 4097], torch.float32, torch.float32)
        check_ema(fig, [t.cuda() for t in teacher], [s.cuda() for s in student], momentum, label=f"m={momentum} ")


def test_ema_fp32_denormals_match_the_reference(fig):
    """EMA of weights in the fp32 denormal range (< 2^-126) keeps them: no flush to zero. With
    momentum 0.75 (weight 0.25 exact in fp32) the result equals the reference bit for bit; with
    0.996 (weight not exact in fp32) it is within one denormal step (2^-149)."""
    step = 2.0**-149
    n = 1 << 20
    for momentum, max_steps in ((0.75, 0), (0.996, 1)):
        teacher = (torch.randint(-(2**22), 2**22, (n,), device="cuda", dtype=torch.float64) * step).float()
        student = (torch.randint(-(2**22), 2**22, (n,), device="cuda", dtype=torch.float64) * step).float()
        assert float(teacher.abs().max()) < 2.0**-126 and int((teacher != 0).sum()) > n // 2
        expected, _ = ema_reference([teacher], [student], momentum)
        ema_([teacher], [student], momentum)
        err_steps = float((teacher.double() - expected[0].double()).abs().max()) / step
        flushed = int(((teacher == 0) & (expected[0] != 0)).sum())
        fig.note(f"m={momentum}: max |err| {err_steps:.0f} denormal steps, {flushed} flushed to zero")
        assert flushed == 0, f"momentum {momentum}: {flushed} of {n} denormal results flushed to zero"
        assert err_steps <= max_steps, f"momentum {momentum}: error of {err_steps} denormal steps > {max_steps}"
    # a bf16 student (bf16 shares fp32's exponent range, so it has denormals too) into an fp32 teacher
    teacher = (torch.randint(1, 2**20, (4096,), device="cuda", dtype=torch.float64) * step).float()
    student = teacher.to(torch.bfloat16) * 2
    expected, _ = ema_reference([teacher], [student], 0.75)
    ema_([teacher], [student], 0.75)
    assert int(((teacher == 0) & (expected[0] != 0)).sum()) == 0, "bf16 student: denormal results flushed to zero"
    assert torch.equal(teacher, expected[0]), "bf16 student: denormal EMA differs from the reference"


# ----------------------------------------------------------------------------- past 2^31 elements


def test_feature_align_past_2_31_elements(fig):
    """[2^21 + 64, 1024] bf16 rows (2^31 + 65536 elements): rows at both ends against the truth."""
    require_time(30)
    M, D = 2**31 // 1024 + 64, 1024
    require_free_memory(4.5 * M * D * 2)
    start = time.perf_counter()
    student = torch.randn(M, D, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    teacher = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    upstream = torch.rand(M, device="cuda")
    rows = feature_align(student, teacher)
    (grad,) = torch.autograd.grad(rows, student, upstream)
    torch.cuda.synchronize()
    fig.note(f"fused forward + backward {time.perf_counter() - start:.2f} s")
    tol_fwd, tol_grad = _tol(torch.bfloat16)
    for name, sl in (("first", slice(0, 64)), ("last", slice(M - 64, M))):
        s64 = _cpu64(student[sl]).requires_grad_(True)
        true_rows = feature_align_reference(s64, _cpu64(teacher[sl]))
        (true_grad,) = torch.autograd.grad(true_rows, s64, _cpu64(upstream[sl]))
        fig.compare(f"{name} rows loss vs fp64", rows[sl], true_rows, tol_fwd)
        fig.compare(f"{name} rows grad vs fp64", grad[sl], true_grad, tol_grad)


def test_gather_tokens_past_2_31_elements(fig):
    """x [10650, 197, 1024] bf16 (2^31 + 2.5 M elements), 49 kept tokens: the last and first
    samples' outputs and gradients, and the positional gradient over all samples."""
    require_time(30)
    B, N, D, K = 10650, N_TOKENS, 1024, 49
    assert B * N * D > 2**31
    require_free_memory(2.6 * B * N * D * 2 + 4 * B * K * D * 4)
    start = time.perf_counter()
    x = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    pos = torch.randn(N, D, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    keep = random_keep(B, N, K, device="cuda")[0]
    out = gather_tokens(x, keep, pos)
    grad_out = torch.randn(B, K, D, device="cuda", dtype=torch.bfloat16)
    grad_x, grad_pos = torch.autograd.grad(out, (x, pos), grad_out)
    torch.cuda.synchronize()
    fig.note(f"fused forward + backward {time.perf_counter() - start:.2f} s")
    _, tol = _tol(torch.bfloat16)
    for name, sl in (("first", slice(0, 2)), ("last", slice(B - 2, B))):
        truth = gather_tokens_reference(_cpu64(x[sl]), keep[sl].cpu(), _cpu64(pos))
        fig.compare(f"{name} samples out vs fp64", out[sl], truth, tol)
        true_grad_x = torch.zeros(2, N, D, dtype=torch.float64).scatter_add_(
            1, keep[sl].cpu()[..., None].expand(-1, -1, D), _cpu64(grad_out[sl]))
        fig.compare(f"{name} samples grad_x vs fp64", grad_x[sl], true_grad_x, tol)
    true_pos = torch.zeros(N, D, device="cuda", dtype=torch.float64)
    for chunk in range(0, B, 1024):
        rows = slice(chunk, min(chunk + 1024, B))
        true_pos.index_add_(0, keep[rows].reshape(-1), grad_out[rows].reshape(-1, D).double())
    fig.compare("grad_pos vs fp64", grad_pos, true_pos, tol)


def test_token_relation_past_2_31_elements(fig):
    """q / k [2049, 16, 1024, 64] bf16 (2^31 + 1 M elements each; B·H = 32784 programs per query
    block): the first and last samples' KL and gradients against the truth."""
    require_time(60)
    B, H, N, d = 2049, 16, 1024, 64
    assert B * H * N * d > 2**31
    require_free_memory(6.5 * B * H * N * d * 2)
    start = time.perf_counter()
    q_s, k_s, q_t, k_t = (torch.randn(B, H, N, d, device="cuda", dtype=torch.bfloat16) * 2 for _ in range(4))
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    kl = token_relation(q_s, k_s, q_t, k_t)
    grad = torch.randn(B, H, N, device="cuda")
    dq, dk = torch.autograd.grad(kl, (q_s, k_s), grad)
    torch.cuda.synchronize()
    fig.note(f"fused forward + backward {time.perf_counter() - start:.2f} s")
    tol_fwd, tol_grad = _tol(torch.bfloat16)
    for name, sl in (("first", slice(0, 1)), ("last", slice(B - 1, B))):
        truth = relation_forward_backward(token_relation_reference, *(_cpu64(x[sl]) for x in (q_s, k_s, q_t, k_t)),
                                          _cpu64(grad[sl]))
        for part, got, true, tol in zip(("kl", "dq_s", "dk_s"), (kl[sl], dq[sl], dk[sl]), truth,
                                        (tol_fwd, tol_grad, tol_grad)):
            fig.compare(f"{name} sample {part} vs fp64", got, true, tol)


def test_ema_past_2_31_elements(fig):
    """One fp32 teacher of 2^31 + 4099 elements with a bf16 student: both ends against the
    reference, the gap against a chunked float64 sum."""
    require_time(30)
    n = 2**31 + 4099
    require_free_memory(n * (4 + 2) + 6 * GIB)
    teacher = torch.randn(n, device="cuda")
    student = torch.randn(n, device="cuda", dtype=torch.bfloat16).mul_(0.5).add_(teacher)
    head, tail = slice(0, 1 << 20), slice(n - (1 << 20), n)
    before = {name: (teacher[sl].clone(), student[sl].clone()) for name, sl in (("head", head), ("tail", tail))}
    true_gap = torch.zeros(4, dtype=torch.float64, device="cuda")
    for begin in range(0, n, 1 << 27):
        t64, s64 = teacher[begin:begin + (1 << 27)].double(), student[begin:begin + (1 << 27)].double()
        true_gap += torch.stack([(s64 - t64).square().sum(), (s64 * t64).sum(), t64.square().sum(), s64.square().sum()])
        del t64, s64
    start = time.perf_counter()
    gap = ema_([teacher], [student], 0.99, return_gap=True)
    torch.cuda.synchronize()
    fig.note(f"fused ema_ {time.perf_counter() - start:.3f} s")
    assert_gap_close(gap, true_gap.tolist())
    rtol, atol = EMA_TOL[torch.float32]
    for name, sl in (("head", head), ("tail", tail)):
        expected, _ = ema_reference([before[name][0]], [before[name][1]], 0.99)
        fig.compare_elementwise(f"{name} vs reference", teacher[sl], expected[0], rtol, atol)


# ----------------------------------------------------------------------------- grid limits


def test_token_relation_grid_limit(fig):
    """B·H = 70 000 heads (past the 65 535 limit of a CUDA grid's y / z dimension), tiny N and d."""
    B, H, N, d = 7000, 10, 5, 16
    inputs = [x.cuda() for x in relation_inputs(B, H, H, N, d, d, dtype=torch.float32)]
    tol_fwd, tol_grad = _tol(torch.float32)
    grad = torch.randn(B, H, N, device="cuda")
    kl, dq, dk = relation_forward_backward(token_relation, *inputs, grad)
    ref = relation_forward_backward(token_relation_reference, *inputs, grad)
    for name, got, want, tol in zip(("kl", "dq_s", "dk_s"), (kl, dq, dk), ref, (tol_fwd, tol_grad, tol_grad)):
        fig.compare(f"{name} vs reference", got, want, 2 * tol)
    for name, sl in (("last", slice(B - 2, B)),):
        truth = relation_forward_backward(token_relation_reference, *(_cpu64(x[sl]) for x in inputs), _cpu64(grad[sl]))
        for part, got, true, tol in zip(("kl", "dq_s", "dk_s"), (kl[sl], dq[sl], dk[sl]), truth,
                                        (tol_fwd, tol_grad, tol_grad)):
            fig.compare(f"{name} samples {part} vs fp64", got, true, tol)


@pytest.mark.parametrize("with_pos", [False, True], ids=["no_pos", "pos"])
def test_gather_tokens_backward_grid_limit(with_pos, fig):
    """B = 70 000 samples (past the 65 535 limit of a CUDA grid's y / z dimension), tiny N and D."""
    B, N, D, K = 70000, 6, 8, 3
    require_free_memory(64 * B * N * D * 4)
    x = _leaf(B, N, D, dtype=torch.float32)
    pos = _leaf(N, D, dtype=torch.float32) if with_pos else None
    keep = random_keep(B, N, K, device="cuda")[0]
    check_gather(fig, x, keep, pos)


# ----------------------------------------------------------------------------- another device


def test_ops_on_cuda_1_while_device_0_is_current(fig):
    """Every op on cuda:1 tensors while cuda:0 is current: results on cuda:1, equal to the
    reference there, and the current device unchanged."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    dev = torch.device("cuda:1")
    with torch.cuda.device(0):
        student = _randn(2, N_TOKENS, 768, dtype=torch.bfloat16, device=dev)
        teacher = _randn(2, N_TOKENS, 768, dtype=torch.bfloat16, device=dev)
        check_feature_align(fig, student, teacher, torch.rand(2, N_TOKENS, device=dev), label="feature_align ")
        x = _leaf(4, N_TOKENS, 768, dtype=torch.bfloat16, device=dev)
        check_gather(fig, x, random_keep(4, N_TOKENS, 50, device=dev)[0], _leaf(N_TOKENS, 768, dtype=torch.bfloat16,
                                                                                device=dev), label="gather ")
        inputs = [x.to(dev) for x in relation_inputs(2, 12, 12, N_TOKENS, 64, 64, dtype=torch.bfloat16)]
        check_relation(fig, *inputs, label="token_relation ")
        teacher, student = make_pairs([3, 1023, 2**20 + 7], torch.float32, torch.bfloat16)
        check_ema(fig, [t.to(dev) for t in teacher], [s.to(dev) for s in student], 0.996, label="ema_ ")
        assert torch.cuda.current_device() == 0, "an op changed the current CUDA device"
