"""Two gloo processes on different data end with identical quantization ranges, and folded BatchNorm
under DDP computes the statistics of the global batch (bn_sync)."""
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


def _bn_net_outputs(qm, x, w):
    """Output, loss gradient of every parameter and the BatchNorm running statistics, quantization off."""
    with qm.quantization_disabled():
        out = qm(x)
        (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in qm.named_parameters()}
    stats = {k: v.clone() for k, v in qm.state_dict().items() if "running" in k}
    return out.detach(), grads, stats


def _bn_net(narrow: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 4, 3), torch.nn.BatchNorm2d(4))
    import qcompile
    extra = {"acc_bits": 16, "tile": 8} if narrow else {}
    return qcompile.compile(model, torch.randn(2, 3, 8, 8), **extra)


def _sync_bn_worker(rank: int, port: int, out_dir: str, narrow: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    qm = _bn_net(narrow)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 3, 8, 8, generator=g) * 2 + 1, torch.randn(8, 4, 4, 4, generator=g)
    out, grads, stats = _bn_net_outputs(qm, x[4 * rank:4 * rank + 4], w[4 * rank:4 * rank + 4])
    for v in grads.values():            # what DDP's averaged gradient is, times the world size
        dist.all_reduce(v)
    torch.save({"out": out, "grads": grads, "stats": stats}, os.path.join(out_dir, f"sync{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("narrow", [False, True], ids=["batch-norm-kernel", "float-statistics"])
def test_folded_batchnorm_under_ddp_is_batchnorm_of_the_global_batch(tmp_path, narrow):
    """Two ranks with half a batch each give the outputs, summed gradients and running statistics of one
    process with the whole batch (bn_sync, SyncBatchNorm's arithmetic), in both forms of the fused op."""
    mp.spawn(_sync_bn_worker, args=(_free_port(), str(tmp_path), narrow), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"sync{r}.pt", weights_only=True) for r in range(2)]
    qm = _bn_net(narrow)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 3, 8, 8, generator=g) * 2 + 1, torch.randn(8, 4, 4, 4, generator=g)
    out, grads, stats = _bn_net_outputs(qm, x, w)
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out, rtol=1e-5, atol=1e-5)
    scale = max(float(g.abs().max()) for g in grads.values())
    for r in ranks:
        assert r["stats"].keys() == stats.keys() and len(stats) == 4
        for k in stats:
            torch.testing.assert_close(r["stats"][k], stats[k], rtol=1e-5, atol=1e-6)
        for k in grads:
            # float32 sums in another order: within 1e-5 of the largest gradient (a conv bias before a
            # BatchNorm has gradient 0 in exact arithmetic, float noise here)
            torch.testing.assert_close(r["grads"][k], grads[k], rtol=1e-4, atol=1e-5 * scale)
