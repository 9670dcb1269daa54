"""The paper's claim on the embedded default: W8A8G8 in-hindsight within 1 point of FP32."""
from qcompile.demo import train_pair


def test_w8a8g8_hindsight_within_one_point_of_fp32():
    result = train_pair(progress=False)
    assert result["fp32_acc"] > 95.0
    assert result["q_acc"] >= result["fp32_acc"] - 1.0, result


def test_16_bit_accumulator_with_barrier_within_one_point_of_exact():
    """The narrow-accumulator sweep's W8A8 seed-0 rows at 16 bits, tile 64 (LeNet-5, 5 epochs,
    saturating, docs/narrow_accumulators.md): with the log barrier the run is within 1 point of the
    exact-accumulator run and has >= 10x fewer overflow events on the held-out digits than without it."""
    import copy

    import torch

    import qcompile
    from qcompile.data import mnist_5k
    from qcompile.experiments.narrow_acc_sweep import W8A8_BARRIER, train_run
    from qcompile.models import get

    torch.manual_seed(0)                       # as narrow_acc_sweep.sweep(seed=0)
    data = mnist_5k(0)
    init = copy.deepcopy(get("models:lenet5").state_dict())
    base = dict(weight_bits=8, act_bits=8, grad_bits=8, grad_acc_bits=32, seed=0, **W8A8_BARRIER)
    runs = {}
    for name, extra in (("exact", {}), ("off", dict(acc_bits=16, tile=64)),
                        ("on", dict(acc_bits=16, tile=64, log_barrier=True))):
        _, acc, ovf, _ = train_run(data, init, qcompile.QConfig(**base, **extra), epochs=5)
        runs[name] = (acc, ovf["events"])
    assert runs["on"][0] >= runs["exact"][0] - 1.0, runs
    assert runs["on"][1] * 10 <= runs["off"][1], runs
