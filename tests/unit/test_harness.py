"""The multi-process harness itself: results, errors and hangs."""

import pytest

from megatron_sdpg.testing.distributed import free_port, run_on_ranks


def _sum_ranks(rank, world_size, scale):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank) * scale])
    dist.all_reduce(t)
    return t.item()


def _raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


def _hang_on_rank_one(rank, world_size):
    import torch
    import torch.distributed as dist

    if rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    else:
        import time

        time.sleep(60)


def test_collective_results_per_rank():
    assert run_on_ranks(_sum_ranks, 3, 2.0, timeout=60) == [6.0, 6.0, 6.0]


def test_rank_error_is_reported_with_traceback():
    with pytest.raises(RuntimeError, match="(?s)rank 1 of 2 failed.*boom on purpose"):
        run_on_ranks(_raise_on_rank_one, 2, timeout=60)


def test_hang_becomes_timeout():
    with pytest.raises(TimeoutError, match="did not finish within 8s"):
        run_on_ranks(_hang_on_rank_one, 2, timeout=8)


def test_free_port_gives_a_bindable_run_below_the_ephemeral_range():
    import socket

    for count in (1, 3):
        base = free_port(count)
        assert 1024 < base and base + count <= 32768
        sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
        try:
            for s, port in zip(sockets, range(base, base + count)):
                s.bind(("127.0.0.1", port))
        finally:
            for s in sockets:
                s.close()
