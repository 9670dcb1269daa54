"""runtime/codegen: the embedding op (rows of a table gathered by token ids; ids past the table read its
last row) in the generated C99 runtime equals the integer reference byte for byte.

The ids are the graph input: the harness reads their codes (uint8 / uint16) and the embedding reads the
input buffer directly. Every id of the input's storage is fed, so the clamp to the last row is exercised
at every id past the table; the builds run under AddressSanitizer + UndefinedBehaviorSanitizer (a read
past the table would abort) and at -O3.
"""
from __future__ import annotations

import numpy as np
import pytest

from qcompile import ir
from qcompile.backends import reference
from qcompile.backends.c.codegen import generate
from qcompile.errors import QCompileError

from test_c_transformer_ops import _pure_integer
from test_codegen import check_bit_exact
from transformer_graphs import embedding_graph, tensor


def every_id(ids: ir.Tensor, rng, extra: int = 3) -> np.ndarray:
    """A batch of id codes holding every code 0..2^bits − 1 of `ids` (shuffled), padded with random ids to
    whole samples, plus `extra` samples: all 0, all qmax, and the ids around the table's end."""
    per = int(np.prod(ids.shape))
    codes = rng.permutation(ids.qmax + 1)
    codes = np.concatenate([codes, rng.integers(0, ids.qmax + 1, -len(codes) % per)])
    special = np.zeros((extra, per), np.int64)
    special[1] = ids.qmax
    return np.concatenate([codes.reshape(-1, per), special]).reshape(-1, *ids.shape)


def _with_edges(codes: np.ndarray, vocab: int) -> np.ndarray:
    """The last special sample reads the rows V − 2, V − 1 and the ids V, V + 1, ... just past the table."""
    flat = codes.reshape(len(codes), -1)
    flat[-1] = vocab - 2 + np.arange(flat.shape[1])
    return codes


@pytest.mark.parametrize("ids_bits,vocab", [(8, 200), (16, 300)], ids=["u8_v200", "u16_v300"])
def test_embedding_graph_bit_exact(ids_bits, vocab, tmp_path):
    """ids (6,) → embedding → add a constant → layer_norm → linear to vocab logits on every id code, under
    ASan + UBSan; the ids past the table give the last row's logits."""
    graph = embedding_graph(ids_bits, vocab=vocab, ids_bits=ids_bits)
    ids = graph.tensor("ids")
    assert ids.bits == ids_bits and ids.qmax > vocab and graph.inputs == ["ids"]
    codes = _with_edges(every_id(ids, np.random.default_rng(ids_bits)), vocab)
    assert set(np.unique(codes)) == set(range(ids.qmax + 1))
    module, (logits,) = check_bit_exact(graph, tmp_path, codes=[codes], sanitize=True)
    _pure_integer(tmp_path / "net.c")
    # an id past the table reads the last row: the logits of the ids clamped to V − 1
    assert (codes >= vocab).mean() > 0.2
    np.testing.assert_array_equal(logits, reference.run_codes(graph, np.minimum(codes, vocab - 1)))
    src = (tmp_path / "net.c").read_text()
    assert f"min(ids[r], {vocab - 1})" in src and f"(id > {vocab - 1}u ? {vocab - 1}u : id)" in src
    header = (tmp_path / "net.h").read_text()
    ctype = "uint8_t" if ids_bits == 8 else "uint16_t"
    assert f"int net_run(const {ctype} *input, int8_t *output, uint8_t *arena)" in header
    # the table counts as weights: V·E int8 codes besides the others
    assert module.weight_bytes > vocab * 8 * 2


def test_embedding_graph_optimized(tmp_path):
    """The same graph at -O3 (vectorized copies) on every 8-bit id, other parameters."""
    graph = embedding_graph(7, vocab=130, ids_bits=8, length=5, dim=16)
    codes = _with_edges(every_id(graph.tensor("ids"), np.random.default_rng(7)), 130)
    check_bit_exact(graph, tmp_path, codes=[codes], opt="-O3")


def embedding_only(ids_shape, ids_bits, vocab, dim, out: ir.Tensor | None = None, seed: int = 0) -> ir.Graph:
    """ids → embedding → the graph output itself (the op reads the input buffer and writes the output's)."""
    rng = np.random.default_rng(seed)
    ids = tensor("ids", ids_shape, 1.0, 0, bits=ids_bits)
    y = out or tensor("y", (*ids_shape, dim), 0.01, 0, bits=16, signed=True)
    y = ir.Tensor(y.name, (*ids_shape, dim), y.bits, y.signed, y.scale, y.zero_point)
    dtype = np.int8 if y.bits <= 8 and y.signed else np.int16
    table = rng.integers(y.qmin, y.qmax + 1, (vocab, dim)).astype(dtype)
    op = ir.Op("embedding", "wte", ["ids"], y.name, ir.Embedding(table=table))
    return ir.verify(ir.Graph(["ids"], [y.name], {"ids": ids, y.name: y}, [op]))


@pytest.mark.parametrize("case", ["u16_ids_2d_int16_table", "u8_ids_vocab_past_storage_uint8_out", "one_row"])
def test_embedding_alone_bit_exact(case, tmp_path):
    """Input → embedding → output: ids of shape (2, 3) (output (2, 3, E)) with an int16 table on a 16-bit
    grid; 8-bit ids into a table of 300 rows (no id can pass it: no clamp emitted) on an unsigned 8-bit
    output grid (int16 table codes 0..255); a table of one row (every id reads it)."""
    rng = np.random.default_rng(1)
    if case == "u16_ids_2d_int16_table":
        graph = embedding_only((2, 3), 16, 1000, 5)
    elif case == "u8_ids_vocab_past_storage_uint8_out":
        graph = embedding_only((4,), 8, 300, 6, out=tensor("y", (), 0.02, 128))
    else:
        graph = embedding_only((3,), 8, 1, 4, out=tensor("y", (), 0.02, -3, signed=True))
    ids, table = graph.tensor("ids"), graph.ops[0].attrs.table
    codes = _with_edges(every_id(ids, rng), max(len(table), 2))
    codes = np.minimum(codes, ids.qmax)
    _, (got,) = check_bit_exact(graph, tmp_path, codes=[codes], sanitize=True)
    np.testing.assert_array_equal(got, table[np.minimum(codes, len(table) - 1)])
    src = (tmp_path / "net.c").read_text()
    assert ("(id > " in src) == (len(table) - 1 < ids.qmax)
    _pure_integer(tmp_path / "net.c")


def test_embedding_table_outside_output_grid_is_an_error():
    graph = embedding_only((3,), 8, 10, 4, out=tensor("y", (), 0.02, 0, bits=4, signed=True))
    graph.ops[0].attrs.table[2, 1] = 9                  # a 4-bit signed grid stops at 7
    with pytest.raises(QCompileError, match=r"embedding.*table values"):
        generate(graph)
