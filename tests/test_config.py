import pytest
import torch
from torch import nn

from qcompile import QConfig


@pytest.mark.parametrize("field,value", [
    ("weight_bits", 1), ("act_bits", 17), ("grad_bits", 0), ("act_bits", 8.0),
    ("act_range", "minmax"), ("grad_range", "ema"), ("weight_granularity", "per_row"),
    ("momentum", 1.0), ("momentum", -0.1), ("dsgc_interval", 0), ("overflow", "clip"),
    ("tile", 0), ("acc_bits", 2), ("on_nonfinite", "ignore"),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        QConfig(**{field: value})


def test_pairwise_overflow_sums_pairs():
    """overflow='pairwise' (AVX2's saturating pair sums) has tiles of 2: tile None means 2, another tile is
    an error naming it."""
    assert QConfig(acc_bits=16, overflow="pairwise").acc_tile == 2
    assert QConfig(acc_bits=16, tile=8).acc_tile == 8
    with pytest.raises(ValueError, match="tile=8 with overflow='pairwise'"):
        QConfig(acc_bits=16, tile=8, overflow="pairwise")
    from qcompile import config
    from qcompile.core import accumulator
    assert (config.OVERFLOW_MODES, config.PAIR) == (accumulator.OVERFLOW_MODES, accumulator.PAIR)


def test_fixed_estimator_needs_a_range():
    with pytest.raises(ValueError, match="act_fixed_range"):
        QConfig(act_range="fixed")
    assert QConfig(act_range="fixed", act_fixed_range=(-1, 1)).act_fixed_range == (-1.0, 1.0)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="wbits"):
        QConfig.from_dict({"wbits": 4})
    assert QConfig.from_dict({"grad_bits": 4, "grad_range": "dsgc"}).grad_range == "dsgc"


def test_from_toml(tmp_path):
    p = tmp_path / "q.toml"
    p.write_text('[qcompile]\nweight_bits = 4\ngrad_bits = 8\nact_range = "running"\n')
    c = QConfig.from_toml(p)
    assert (c.weight_bits, c.grad_bits, c.act_range) == (4, 8, "running")


def test_overrides_by_glob_and_type():
    c = QConfig(weight_bits=4, overrides={nn.Linear: {"weight_bits": 6}, "fc": {"weight_bits": 8},
                                          "layer1.*": {"act_bits": 4}})
    assert c.for_layer("fc", nn.Linear).weight_bits == 8          # glob beats type
    assert c.for_layer("head", nn.Linear).weight_bits == 6
    assert c.for_layer("layer1.0.conv1", nn.Conv2d).act_bits == 4
    assert c.for_layer("layer2.0.conv1", nn.Conv2d) is c
    with pytest.raises(ValueError, match="overrides"):
        QConfig(overrides={"fc": {"act_bits": 99}})


def test_overrides_reach_the_quantizers(small_net):
    import qcompile
    qm = qcompile.compile(small_net, torch.randn(1, 3, 8, 8), QConfig(weight_bits=4, overrides={"fc": {"weight_bits": 8}}))
    assert qm.get_submodule("fc.weight_quant").bits == 8
    assert qm.get_submodule("conv1.weight_quant").bits == 4
