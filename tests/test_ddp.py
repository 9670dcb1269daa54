"""Two gloo processes on different data end with identical quantization ranges."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytestmark = pytest.mark.slow   # part of `make test`; `make test-fast` leaves it out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import qcompile
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = qcompile.models.get("models:lenet5")
    qm = qcompile.compile(model, torch.randn(2, 1, 28, 28), grad_bits=8, seed=rank)
    ddp = DDP(qm, broadcast_buffers=False)      # ranges must agree through the estimators' own all-reduce
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(100 + rank)   # different data on each rank
    for _ in range(3):
        x = torch.randn(16, 1, 28, 28, generator=gen) * (1 + 2 * rank)
        y = torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    ranges = {k: v for k, v in qm.state_dict().items() if k.endswith((".lo", ".hi"))}
    torch.save(ranges, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ranks_hold_identical_ranges(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    assert any(".grad_quant." in k for k in r0) and any(".output_quant." in k for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # rank 1's data are three times wider: the shared input range is rank 1's (rank 0 alone: ~4)
    assert float(r0["conv1.input_quant.estimator.hi"]) > 8.0
