"""ONNX export of the embedding op: Cast of the id codes to int64, Min with V − 1, Gather of the table.
onnxruntime's codes equal the integer reference's bit for bit, in QDQ and QOperator form.

The ids are the graph input: the model's float input is quantized by QuantizeLinear at scale 1, zero
point 0 (uint8, or uint16 at opset 21 for 16-bit ids), so integer floats give back the ids, and any other
float rounds half to even and saturates as `reference.quantize_input` does.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto

from qcompile import ir
from qcompile.backends import reference as ref
from qcompile.backends.onnx import ExportError, onnxruntime_session, to_onnx
from qcompile.backends.parity import float_to_codes, outputs

from test_c_embedding import embedding_only, every_id
from test_onnx_transformer_ops import FORMATS, assert_bit_exact, exposing
from transformer_graphs import embedding_graph, tensor

EMBEDDING_TENSORS = ["tok", "h", "ln", "logits"]


def _input_quantizer(model: onnx.ModelProto) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.input and n.input[0] == model.graph.input[0].name]
    return node


@pytest.mark.parametrize("ids_bits,vocab", [(8, 200), (16, 300)], ids=["u8_v200", "u16_v300"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_graph_bit_exact(fmt, ids_bits, vocab):
    """ids → embedding → add a constant → layer_norm → linear to logits, every intermediate exposed, on
    every id code of the input's storage (past the table: the last row)."""
    graph = exposing(embedding_graph(ids_bits, vocab=vocab, ids_bits=ids_bits), EMBEDDING_TENSORS)
    ids = graph.tensor("ids")
    codes = every_id(ids, np.random.default_rng(ids_bits))
    codes[-1] = vocab - 2 + np.arange(ids.shape[0])                    # around the table's end
    assert set(np.unique(codes)) == set(range(ids.qmax + 1))
    model = assert_bit_exact(graph, fmt, codes)
    onnx.checker.check_model(model, full_check=True)
    kinds = [n.op_type for n in model.graph.node]
    assert {"Min", "Gather"} <= set(kinds)
    q = _input_quantizer(model)
    assert q.op_type == "QuantizeLinear" and model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    zp = next(i for i in model.graph.initializer if i.name == q.input[2])
    assert zp.data_type == (TensorProto.UINT8 if ids_bits == 8 else TensorProto.UINT16)
    assert model.opset_import[0].version == 21
    table = next(i for i in model.graph.initializer if i.name.startswith("tok_table"))
    assert list(table.dims) == [vocab, 8] and table.data_type == TensorProto.INT8


@pytest.mark.parametrize("ids_bits", [8, 16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_float_ids_at_the_input_boundary(fmt, ids_bits):
    """The float input as a runtime feeds it: integer ids, halves (rounded to even), negatives (to 0) and
    values past the storage (saturated) quantize as the reference's input quantizer does; the output
    matches `reference.run` on the same floats, and the C backend too (through `parity.outputs`)."""
    v = 200 if ids_bits == 8 else 300
    graph = embedding_graph(3, vocab=v, ids_bits=ids_bits, length=6)
    top = float(2 ** ids_bits - 1)
    x = np.array([[0, 1, v - 1, v, top, top + 1], [2.5, 3.5, v - 1.5, v - 0.5, -1, -0.5],
                  [1e9, -1e9, 0.49, 0.51, top - 0.5, top + 0.5]], np.float32)
    codes = ref.quantize_input(graph, x)
    assert codes.tolist()[1] == [2, 4, v - 2, v, 0, 0] and codes.min() == 0 and codes.max() == top
    model = to_onnx(graph, fmt)
    got = onnxruntime_session(model.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_array_equal(float_to_codes(graph, got), ref.run(graph, x))
    if fmt == "qdq":
        np.testing.assert_array_equal(outputs(graph, x, "c"), ref.run(graph, x))


@pytest.mark.parametrize("case", ["u16_ids_2d_int16_table", "u8_ids_vocab_past_storage_uint8_out", "one_row"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_alone_bit_exact(fmt, case):
    """Input → embedding → output (the Gather writes the output codes): (2, 3) uint16 ids into an int16 table
    on a 16-bit grid; uint8 ids into 300 rows (no id can pass them: no Min) on a uint8 grid; one row."""
    if case == "u16_ids_2d_int16_table":
        graph = embedding_only((2, 3), 16, 1000, 5)
    elif case == "u8_ids_vocab_past_storage_uint8_out":
        graph = embedding_only((4,), 8, 300, 6, out=tensor("y", (), 0.02, 128))
    else:
        graph = embedding_only((3,), 8, 1, 4, out=tensor("y", (), 0.02, -3, signed=True))
    ids, table = graph.tensor("ids"), graph.ops[0].attrs.table
    codes = every_id(ids, np.random.default_rng(2))
    model = assert_bit_exact(graph, fmt, codes)
    kinds = [n.op_type for n in model.graph.node]
    assert ("Min" in kinds) == (len(table) - 1 < ids.qmax) and kinds.count("Gather") == 1
    y = graph.tensor(graph.outputs[0])
    stored = next(i for i in model.graph.initializer if i.name.startswith("wte_table"))
    assert stored.data_type == onnx.helper.np_dtype_to_tensor_dtype(np.dtype(
        {(8, True): np.int8, (8, False): np.uint8, (16, True): np.int16}[(y.bits, y.signed)]))


def test_16_bit_ids_need_opset_21():
    graph = embedding_graph(0, vocab=300, ids_bits=16)
    with pytest.raises(ExportError, match="opset >= 21"):
        to_onnx(graph, "qop", opset=18)
    assert_bit_exact(embedding_graph(0, vocab=200, ids_bits=8), "qop",
                     every_id(ir.Tensor("ids", (6,), 8, False, 1.0, 0), np.random.default_rng(0)), opset=13)


def test_embedding_table_outside_output_grid_is_an_error():
    graph = embedding_only((3,), 8, 10, 4, out=tensor("y", (), 0.02, 0, bits=4, signed=True))
    graph.ops[0].attrs.table[2, 1] = 9
    with pytest.raises(ExportError, match=r"embedding.*table values"):
        to_onnx(graph, "qdq")
