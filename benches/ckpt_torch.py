"""Peer for `otter bench ckpt`: torch.save / torch.load of the same tensors (same count,
sizes and dtype: `params` weights + two AdamW moments each, `mb` MB in all) to one file.
Prints save time without and with an fsync (otter's saves are fsynced), and load time.

    python benches/ckpt_torch.py MB PARAMS DIR
"""
import math
import os
import sys
import time

import torch

mb, params, d = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
per = math.ceil(mb * 1e6 / (12 * params))
torch.manual_seed(0)
state = {}
for i in range(params):
    for k in ("param", "exp_avg", "exp_avg_sq"):
        state[f"{k}.p{i:03}"] = torch.randn(per)
os.makedirs(d, exist_ok=True)
path = os.path.join(d, "torch.pt")
os.sync()  # as `otter bench ckpt`: no earlier dirty pages left to throttle this write
t = time.perf_counter()
torch.save(state, path)
save = time.perf_counter() - t
with open(path, "rb+") as f:
    os.fsync(f.fileno())
save_fsync = time.perf_counter() - t
nbytes = os.path.getsize(path)
del state
os.sync()
t = time.perf_counter()
loaded = torch.load(path)
load = time.perf_counter() - t
assert sum(v.numel() for v in loaded.values()) == per * 3 * params
os.remove(path)
print(f"torch bytes={nbytes} save_s={save:.3f} save_fsync_s={save_fsync:.3f} load_s={load:.3f}")
