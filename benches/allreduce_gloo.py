"""Peer for `otter bench allreduce`: torch.distributed all-reduce over Gloo, N local
processes, same sizes, same definitions (nccl-tests): algbw = bytes / time,
busbw = algbw * 2(n-1)/n. Prints one line per size in otter's format.

    python benches/allreduce_gloo.py WORLD SIZES_MB ITERS      (e.g. 4 1,16,64 10)
"""
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank, world, port, sizes, iters):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for mb in sizes:
        n = round(mb * 1e6 / 4)
        t = torch.full((n,), float(rank))
        dist.all_reduce(t)  # warm-up
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
            t /= world  # mean, like otter's all_reduce_mean
        secs = (time.perf_counter() - t0) / iters
        algbw = n * 4 / secs / 1e9
        busbw = algbw * 2 * (world - 1) / world
        if rank == 0:
            print(f"world={world} size_mb={mb:g} time_ms={secs * 1e3:.2f} algbw={algbw:.3f} busbw={busbw:.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    world, sizes, iters = int(sys.argv[1]), [float(s) for s in sys.argv[2].split(",")], int(sys.argv[3])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(world, port, sizes, iters), nprocs=world, join=True)
