"""Transformers end to end: `models:vit_tiny` (torchvision's VisionTransformer: nn.MultiheadAttention,
class token, positional embedding, LayerNorm, GELU), `models:gpt_tiny` (byte embedding, causal
F.scaled_dot_product_attention) and a small torchvision SwinTransformer (shifted windows with their
mask, padding to whole windows, relative-position bias, patch merging of an odd map) compile with no float fallback, keep their float numbers when
traced, train with quantized gradients entering every attention matmul, lower to integer ops only,
and run in onnxruntime and as C, bit-exact with the integer reference."""
import operator
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.backends import parity, reference
from qcompile.backends.onnx import to_onnx
from qcompile.models import get
from qcompile.passes.quantize import FloatFallbackWarning
from qcompile.passes.trace import trace
from qcompile.tools.experiments.attention_gradients import attention_matmuls, gradient_recorder
from test_codegen import check_bit_exact

W8A8G8 = dict(weight_bits=8, act_bits=8, grad_bits=8, act_range="hindsight", grad_range="hindsight", seed=0)


def vit_inputs(n=4):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def gpt_inputs(n=4):
    return torch.randint(0, 256, (n, 64), generator=torch.Generator().manual_seed(0))


def swin_small(v2: bool = False):
    """torchvision's SwinTransformer at 20×20: patch 4 gives a 5×5 map, padded to 6×6 for 3×3 windows
    (4 windows, the second block shifted by 1 with the shifted-window mask); patch merging pads 5×5 to
    6×6; the second stage's 3×3 map is one window (no shift). Stochastic depth on. v2: cosine attention,
    logit scale, continuous position bias, post-norm blocks; a non-zero key bias (which v2 ignores)."""
    from torchvision.models import swin_transformer as tv
    extra = dict(block=tv.SwinTransformerBlockV2, downsample_layer=tv.PatchMergingV2) if v2 else {}
    model = tv.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[3, 3],
                               stochastic_depth_prob=0.2, num_classes=10, **extra)
    if v2:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, tv.ShiftedWindowAttentionV2):
                    m.qkv.bias.uniform_(-0.5, 0.5)
    return model


def swin_inputs(n=4):
    return torch.randn(n, 3, 20, 20, generator=torch.Generator().manual_seed(0))


# name: (model, inputs, attention matmuls: q·kᵀ and p·v of each block)
MODELS = {"vit_tiny": (lambda: get("models:vit_tiny"), vit_inputs, 4),
          "gpt_tiny": (lambda: get("models:gpt_tiny"), gpt_inputs, 4),
          "swin": (swin_small, swin_inputs, 8),
          "swin_v2": (lambda: swin_small(v2=True), swin_inputs, 8)}


def loss_of(name, out, x):
    if name == "gpt_tiny":
        return F.cross_entropy(out[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    return F.cross_entropy(out, torch.arange(len(x)) % 10)


def compiled_trained_lowered(model, x, steps: int):
    """W8A8G8 with no float fallback, calibrated, `steps` SGD steps on mean(y²), eval: (qm, its IR)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatFallbackWarning)
        qm = qcompile.compile(model, x, qcompile.QConfig(**W8A8G8))
    qm.calibrate([x])
    opt = torch.optim.SGD(qm.parameters(), lr=0.05)
    for _ in range(steps):
        loss = qm(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    qm.eval()
    return qm, qcompile.lower(qm)


@pytest.fixture(scope="module", params=sorted(MODELS))
def trained(request):
    """(name, qm after 3 W8A8G8 steps in eval, inputs, the gradients that entered each attention matmul)."""
    name = request.param
    make, inputs, _ = MODELS[name]
    torch.manual_seed(0)
    x = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatFallbackWarning)
        qm = qcompile.compile(make(), (x,), qcompile.QConfig(**W8A8G8))
    qm.calibrate([x])
    opt = torch.optim.AdamW(qm.parameters(), lr=2e-3)
    grads, losses = {}, []
    recorder = gradient_recorder(qm, grads)
    qm.train()
    for _ in range(3):
        loss = loss_of(name, recorder.run(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    qm.eval()
    return name, qm, x, grads, losses


def test_traced_attention_keeps_the_float_numbers():
    """nn.MultiheadAttention (ViT), scaled_dot_product_attention (GPT) and Swin's wrapped window attention
    and patch merging traced as linear/matmul/softmax give the float model's outputs, with the same
    state_dict keys."""
    from torchvision.models import swin_transformer as tv_swin
    assert any(not (m.qkv.bias[16:32] == 0).all() for m in swin_small(v2=True).modules()
               if isinstance(m, tv_swin.ShiftedWindowAttentionV2))            # the key bias v2 zeroes is not 0
    for name, (make, inputs, _) in MODELS.items():
        torch.manual_seed(0)
        model, x = make().eval(), inputs()
        gm = trace(model, (x,))
        assert not any(isinstance(m, (nn.MultiheadAttention, tv_swin.ShiftedWindowAttention, tv_swin.PatchMerging))
                       for m in gm.modules()), name
        assert not any(n.target in (F.scaled_dot_product_attention, tv_swin.shifted_window_attention,
                                    tv_swin._patch_merging_pad) for n in gm.graph.nodes), name
        assert set(gm.state_dict()) == set(model.state_dict()), name
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_three_steps_train_with_quantized_gradients_into_every_attention_matmul(trained):
    name, qm, x, grads, losses = trained
    assert all(np.isfinite(losses)), losses
    matmuls = attention_matmuls(qm)
    assert len(matmuls) == MODELS[name][2] and set(grads) == {n.name for n in matmuls}
    for node_name, g in grads.items():
        assert 1 < g.unique().numel() <= 2 ** 8, (name, node_name, g.unique().numel())
    for n in matmuls:       # both operands on a grid, their gradients quantized on the way out
        for arg in n.args[:2]:
            assert qcompile.passes.quantize.grid_source(arg, qm) is not None


def test_lowered_graph_is_integer_and_every_backend_agrees(trained, tmp_path):
    name, qm, x, _, _ = trained
    graph = qcompile.lower(qm)
    kinds = {op.kind for op in graph.ops}
    assert {"softmax", "layer_norm", "matmul", "linear"} <= kinds
    assert ("embedding" if name == "gpt_tiny" else "constant") in kinds
    if name == "gpt_tiny":
        assert any(op.kind == "softmax" and op.attrs.causal for op in graph.ops)
    if name.startswith("swin"):      # the shifted block's mask (4 windows of 9×9, broadcast over heads), zero padding
        masks = [op.attrs.visible.shape for op in graph.ops if op.kind == "softmax" and op.attrs.visible is not None]
        assert masks == [(4, 9, 9)]
        constants = {op.output for op in graph.ops if op.kind == "constant"}
        assert sum(op.kind == "concat" and bool(constants & set(op.inputs)) for op in graph.ops) >= 4
    if name == "swin_v2":   # cosine attention: F.normalize as a non-centred norm; the per-head logit scale
        assert any(op.kind == "layer_norm" and not op.attrs.centered for op in graph.ops)
    # QOperator's QLinearConv carries 8-bit tensors only: swin_v2's logit-scale multiply (a per-head
    # depthwise conv) has a 16-bit output, exported in QDQ (opset 21)
    qop = name != "swin_v2"
    to_onnx(graph, "qop" if qop else "qdq")                 # checked with full_check inside
    with torch.no_grad():
        trained_out = qm(x)
    backends = ("reference", "onnx:qop", "onnx:qdq") if qop else ("reference", "onnx:qdq")
    cmp = parity.compare(graph, x, backends=backends, given={"PyTorch": trained_out})
    assert not qop or cmp.mismatch("reference", "onnx:qop") == 0
    # QDQ: each op within one step of the reference alone (ties of onnxruntime's float QLinearAdd), which
    # can compound to two steps end to end (gpt_tiny on an AVX-512 VNNI Xeon; one on an AVX2 EPYC)
    assert parity.onnx_per_op(graph, x, "qdq")["local_max_lsb"] <= 1 and cmp.max_lsb("reference", "onnx:qdq") <= 2
    # the integer approximations of softmax and LayerNorm move some output codes of qm.eval() (docs/transformers.md)
    assert cmp.mismatch("reference", "PyTorch") < 0.5
    check_bit_exact(graph, tmp_path, n=2, codes=[reference.quantize_input(graph, x[:2]).astype(np.int64)])


def test_vit_b_16_has_no_float_fallback_and_lowers_to_integer_ops():
    """torchvision's ViT-B/16 (no training: the structure) quantizes attention, LayerNorm, GELU, the class
    token and the positional embedding, and lowers."""
    import torchvision
    model = torchvision.models.vit_b_16(num_classes=10, image_size=32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatFallbackWarning)
        qm = qcompile.compile(model, torch.randn(2, 3, 32, 32), qcompile.QConfig())
    qm.calibrate([torch.randn(2, 3, 32, 32)])
    graph = qcompile.lower(qm.eval())
    kinds = [op.kind for op in graph.ops]
    assert kinds.count("layer_norm") == 25 and kinds.count("softmax") == 12 and kinds.count("constant") == 2


def test_key_padding_masks_are_refused_naming_the_module():
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, key_padding_mask=x[..., 0] > 0)[0]

    with pytest.raises(qcompile.errors.TraceError, match="attn.*key_padding_mask"):
        qcompile.compile(Padded(), torch.randn(2, 4, 8))


class MaskedAttention(nn.Module):
    """nn.MultiheadAttention with a float causal mask made in forward (0 / -inf, nn.Transformer's form),
    then SDPA with a bool buffer mask (True takes part): both become the softmax's `visible`."""

    def __init__(self, length=6, dim=8):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.register_buffer("band", (torch.arange(length)[:, None] - torch.arange(length)[None, :]).abs() <= 2)
        self.length = length

    def forward(self, x):
        causal = torch.triu(torch.full((self.length, self.length), float("-inf")), diagonal=1)
        x = x + self.attn(x, x, x, attn_mask=causal, need_weights=False)[0]
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.band).transpose(1, 2).flatten(2)


def test_constant_attention_masks_train_lower_and_run_bit_exact(tmp_path):
    torch.manual_seed(0)
    model, x = MaskedAttention(), torch.randn(8, 6, 8)
    with torch.no_grad():
        torch.testing.assert_close(trace(model.eval(), (x,))(x), model(x), rtol=1e-5, atol=1e-5)
    qm, graph = compiled_trained_lowered(model.train(), x, steps=2)
    masks = [op.attrs.visible for op in graph.ops if op.kind == "softmax"]
    assert len(masks) == 2
    np.testing.assert_array_equal(masks[0], np.tril(np.ones((6, 6), np.int8)))
    np.testing.assert_array_equal(masks[1], model.band.numpy().astype(np.int8))
    with torch.no_grad():
        cmp = parity.compare(graph, x, backends=("reference", "onnx:qop"), given={"PyTorch": qm(x)})
    assert cmp.mismatch("reference", "onnx:qop") == 0 and cmp.max_lsb("reference", "PyTorch") <= 2
    check_bit_exact(graph, tmp_path, n=2, codes=[reference.quantize_input(graph, x[:2]).astype(np.int64)])


def test_a_float_bias_passed_as_a_mask_is_refused():
    class Biased(nn.Module):
        def forward(self, x):
            q = x.unflatten(-1, (2, -1)).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q, attn_mask=torch.full((4, 4), 0.5))

    with pytest.raises(qcompile.errors.QCompileError, match="additive bias, not a mask"):
        qcompile.compile(Biased(), torch.randn(2, 4, 8))


def test_cross_attention_quantizes_three_projections():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x * 2, x * 2, need_weights=False)[0]

    x = torch.randn(2, 4, 8)
    model = Cross().eval()
    qm = qcompile.compile(model, x, qcompile.QConfig())
    linears = [n for n in qm.graph.nodes if n.target is F.linear]
    assert len(linears) == 4 and all(n.args[1].op == "call_module" for n in linears)
    with torch.no_grad():
        qm.set_quantization(False)
        torch.testing.assert_close(qm.eval()(x), model(x), rtol=1e-5, atol=1e-5)
    assert operator.getitem in {n.target for n in qm.graph.nodes}


class RelativeAttention(nn.Module):
    """MaxViT's attention in miniature: q scaled by a python number, einsum of both attention forms, a
    relative-position bias gathered from a parameter table by a buffer of indices, swapaxes."""

    def __init__(self, n=4, heads=2, dim=8):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.table = nn.Parameter(torch.randn((2 * n - 1), heads) * 0.5)
        idx = torch.arange(n)
        self.register_buffer("index", (idx[:, None] - idx[None, :] + n - 1).flatten())
        self.n = n

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        bias = self.table[self.index].view(self.n, self.n, -1).permute(2, 0, 1).unsqueeze(0)
        s = torch.einsum("B H I D, B H J D -> B H I J", q * self.scale, k) + bias
        y = torch.einsum("B H I J, B H J D -> B H I D", torch.softmax(s, dim=-1), v)
        return y.swapaxes(1, 2).flatten(2)


def test_relative_position_attention_in_einsum_lowers_and_matches(tmp_path):
    torch.manual_seed(0)
    model, x = RelativeAttention().eval(), torch.randn(8, 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatFallbackWarning)
        qm = qcompile.compile(model, x, qcompile.QConfig())
    assert torch.einsum not in {n.target for n in qm.graph.nodes}
    qm.calibrate([x])
    qm.eval()
    graph = qcompile.lower(qm)
    assert "constant" in {op.kind for op in graph.ops}          # the gathered bias table, on its weight grid
    with torch.no_grad():
        cmp = parity.compare(graph, x, backends=("reference", "onnx:qop"), given={"PyTorch": qm(x)})
    assert cmp.mismatch("reference", "onnx:qop") == 0 and cmp.max_lsb("reference", "PyTorch") <= 2
    check_bit_exact(graph, tmp_path, n=2, codes=[reference.quantize_input(graph, x[:2]).astype(np.int64)])


class RMSBlock(nn.Module):
    """linear → nn.RMSNorm → linear: RMSNorm is the norm op not centred on the mean."""

    def __init__(self, dim=32):
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(8, dim), nn.RMSNorm(dim, eps=1e-6), nn.Linear(dim, 4)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.down(self.norm(self.up(x)))


def test_rms_norm_module_trains_lowers_and_every_backend_agrees(tmp_path):
    torch.manual_seed(0)
    model, x = RMSBlock(), torch.randn(16, 5, 8)
    qm, graph = compiled_trained_lowered(model, x, steps=3)
    assert F.rms_norm in {n.target for n in qm.graph.nodes}
    norms = [op for op in graph.ops if op.kind == "layer_norm"]
    assert len(norms) == 1 and not norms[0].attrs.centered
    with torch.no_grad():
        cmp = parity.compare(graph, x, backends=("reference", "onnx:qop"), given={"PyTorch": qm(x)})
    assert cmp.mismatch("reference", "onnx:qop") == 0 and cmp.max_lsb("reference", "PyTorch") <= 1
    check_bit_exact(graph, tmp_path, n=2, codes=[reference.quantize_input(graph, x[:2]).astype(np.int64)])


def test_gradients_flow_behind_a_zero_initialized_head():
    """torchvision's VisionTransformer starts with a zero head, so every gradient of the first step is 0.
    The gradient quantizers' in-hindsight ranges must not settle on [0, 0]: on the second step the gradient
    entering each attention matmul is non-zero and spread over many grid steps."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    assert not model.heads.head.weight.any()
    x = torch.randn(4, 3, 32, 32)
    qm = qcompile.compile(model, x, qcompile.QConfig(**W8A8G8))
    qm.calibrate([x])
    grads = {}
    recorder = gradient_recorder(qm, grads)
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    for step in range(2):
        loss = F.cross_entropy(recorder.run(x), torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            assert all(not g.any() for g in grads.values())
    assert len(grads) == 4 and all(g.unique().numel() > 16 for g in grads.values()), \
        {k: g.unique().numel() for k, g in grads.items()}
