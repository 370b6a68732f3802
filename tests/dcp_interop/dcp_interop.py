"""fsdp::dcp against the pinned PyTorch's torch.distributed.checkpoint (DCP).

1. Our tool saves a checkpoint at world 2 (fake ranks); Python FSDP2 at world 3
   (Gloo, one process per rank) dcp.loads it into model.state_dict() plus two
   DTensors (int64, bf16); every full_tensor() must equal the pattern bitwise.
2. Python FSDP2 at world 2 dcp.saves the pattern; our tool loads it at world 3
   and into full tensors and compares bitwise.
The pattern (expected()) is exact in every dtype, and the tool computes the same.
Exit status 0 only if both directions match.
"""
import argparse
import io
import os
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SPECS = [("0.weight", (5, 3), torch.float32), ("0.bias", (5,), torch.float32),
         ("1.weight", (1, 5), torch.float32), ("1.bias", (1,), torch.float32),
         ("extra.counts", (7,), torch.int64), ("extra.half", (6, 2), torch.bfloat16)]


def expected(k, shape, dtype):
    n = 1
    for d in shape:
        n *= d
    pattern = (torch.arange(n, dtype=torch.int64) * 7 + k * 3) % 19 - 9
    if dtype == torch.int64:
        return (pattern * 1000003 + (1 << 40)).reshape(shape)
    return (pattern.to(torch.float32) * 0.25).to(dtype).reshape(shape)


def patch_object_collectives():
    # The venv has no numpy, and c10d's object collectives (DCP's plan
    # exchange) turn tensors into bytes with tensor.numpy(). Same bytes without it.
    import torch.distributed.distributed_c10d as c10d

    def tensor_to_object(tensor, tensor_size, group, weights_only=False):
        buf = bytes(tensor.cpu().tolist()[: int(tensor_size)])
        if weights_only:
            return torch.load(io.BytesIO(buf), weights_only=True)
        return c10d._unpickler(io.BytesIO(buf)).load()

    c10d._tensor_to_object = tensor_to_object


def build_state_dict(world, with_pattern):
    """FSDP2 model's state dict + two DTensors, all sharded on dim 0 over `world`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1))
    with torch.no_grad():
        for k, (fqn, shape, dtype) in enumerate(SPECS[:4]):
            p = model.get_parameter(fqn)
            p.copy_(expected(k, shape, dtype) if with_pattern else torch.zeros(shape))
    fully_shard(model, mesh=mesh)
    sd = dict(model.state_dict())
    for k in (4, 5):
        fqn, shape, dtype = SPECS[k]
        full = expected(k, shape, dtype) if with_pattern else torch.zeros(shape, dtype=dtype)
        sd[fqn] = distribute_tensor(full, mesh, [Shard(0)])
    return sd


def worker(rank, world, store, mode, path):
    patch_object_collectives()
    import torch.distributed.checkpoint as dcp
    # A file store, not a TCP port: under ctest -j2 another test's store can
    # take a port picked as free, and a rank that reached it aborted.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        if mode == "save":
            dcp.save(build_state_dict(world, True), checkpoint_id=path)
        else:
            sd = build_state_dict(world, False)
            dcp.load(sd, checkpoint_id=path)
            bad = []
            for k, (fqn, shape, dtype) in enumerate(SPECS):
                got = sd[fqn].full_tensor()
                if got.dtype != dtype or not torch.equal(got, expected(k, shape, dtype)):
                    bad.append(fqn)
            if bad:
                raise SystemExit(f"rank {rank}: Python dcp.load of our checkpoint differs in {bad}")
        # No rank tears Gloo down while a peer still has traffic in flight
        # (a rank that did aborted with "terminate called" under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def python_side(mode, path, world):
    # Once more if a worker was killed by a signal: PyTorch's Gloo has been
    # seen to abort a rank ("terminate called without an active exception")
    # under ctest -j2 load, in its own threads. A wrong checkpoint fails the
    # same way every time, with an exit code rather than a signal.
    for attempt in (1, 2):
        store = f"{path}.{mode}.store"
        if os.path.exists(store):
            os.remove(store)
        if mode == "save":
            shutil.rmtree(path, ignore_errors=True)
        try:
            mp.spawn(worker, args=(world, store, mode, path), nprocs=world)
            break
        except mp.ProcessExitedException as e:
            if attempt == 2 or not e.signal_name:
                raise
            print(f"python {mode} {path} at world {world}: {e}; trying once more", file=sys.stderr)
    print(f"python {mode} {path} at world {world}: ok")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    ours, theirs = os.path.join(args.workdir, "ours"), os.path.join(args.workdir, "theirs")
    os.makedirs(args.workdir)
    subprocess.run([args.tool, "save", ours, "2"], check=True)
    python_side("load", ours, 3)
    python_side("save", theirs, 2)
    subprocess.run([args.tool, "check", theirs, "3"], check=True)
    print("dcp interop: both directions match")


if __name__ == "__main__":
    main()
