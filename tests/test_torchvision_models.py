"""One-call compile + forward + backward + SGD step on real torchvision architectures."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import qcompile

pytestmark = pytest.mark.slow   # part of `make test`; `make test-fast` leaves it out

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "vgg11_bn", "efficientnet_b0",
          "regnet_x_400mf", "shufflenet_v2_x0_5", "squeezenet1_0", "densenet121", "convnext_tiny"]


@pytest.mark.parametrize("name", MODELS)
def test_compile_and_train_one_step(name):
    torch.manual_seed(0)
    model = qcompile.models.get(f"torchvision:{name}", num_classes=10)
    size = 64
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 7])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qcompile.compile(model, (x[:1],), qcompile.QConfig(grad_bits=8, seed=0))
    opt = torch.optim.SGD(qm.parameters(), lr=0.01, momentum=0.9)
    params_before = [p.detach().clone() for p in qm.parameters()]
    loss = F.cross_entropy(qm(x), y) + qm.regularization()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    kinds = {q.kind for _, q in qm.quantizers()}
    assert kinds == {"weight", "activation", "gradient"}
    grad_quants = [q for _, q in qm.quantizers() if q.kind == "gradient"]
    assert sum(bool(q.estimator.initialized) for q in grad_quants) >= len(grad_quants) - 1
    assert any(not torch.equal(a, b) for a, b in zip(params_before, qm.parameters()))
    n_weighted = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) or
                     isinstance(m, torch.nn.LayerNorm) and m.weight is not None for m in model.modules())
    assert sum(q.kind == "weight" for _, q in qm.quantizers()) == n_weighted
