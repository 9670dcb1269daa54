"""The paper's claim on the embedded default: W8A8G8 in-hindsight within 1 point of FP32."""
from qcompile.demo import train_pair


def test_w8a8g8_hindsight_within_one_point_of_fp32():
    result = train_pair(progress=False)
    assert result["fp32_acc"] > 95.0
    assert result["q_acc"] >= result["fp32_acc"] - 1.0, result
