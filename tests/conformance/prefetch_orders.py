#!/usr/bin/env python3
"""Checks the hand-transcribed orders of tests/prefetch_order_test.cpp
against PyTorch FSDP2 itself: the same model (root-owned in_proj and
out_proj, Linear units L0..Ln-1 with relu between, the root's input needing
no grad), world 2, Gloo, reshard after forward, implicit and explicit
prefetch. For each case the FSDP2 event sequence, projected on the kinds the
C++ test compares (U unshard, R reshard, PB post-backward, final; P prefetch
where listed), must equal the C++ test's expected list, copied here from its
constants (kForward3, kBackward3, ...). Vocabulary as compare.py: FSDP2's
no-op post-backward calls are dropped, our "P x>none" has no FSDP2
counterpart. Exit status 1 on any difference.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fsdp2_reference as ref  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

F3 = ["U root", "U L0", "R L0", "U L1", "R L1", "U L2", "R L2"]
B3 = ["U L2", "U L1", "R L2", "PB L2", "U L0", "R L1", "PB L1", "R L0", "PB L0", "R root", "PB root"]
F4 = ["U root", "U L0", "R L0", "U L1", "R L1", "U L2", "R L2", "U L3", "R L3"]
B4 = ["U L3", "U L2", "R L3", "PB L3", "U L1", "R L2", "PB L2", "U L0", "R L1", "PB L1", "R L0", "PB L0",
      "R root", "PB root"]
AGAIN = ["U L0", "R L0", "U L1", "R L1", "U L2", "R L2"]
PATTERN = ["U L2", "U L1", "R L2", "PB L2", "U L0", "R L1", "PB L1", "R L0", "PB L0"]
URPB = ("U", "R", "PB", "final")

# name: (layers, forward k, backward k, reshard after forward, forwards, kinds, expected)
CASES = {
    "ImplicitThreeLayers": (3, 0, 0, True, 1, URPB, F3 + B3 + ["final"]),
    "ImplicitThreeLayersDecisions": (3, 0, 0, True, 1, ("U", "R", "PB", "P"), F3 + [
        "P root>L2", "U L2", "P L2>L1", "U L1", "R L2", "PB L2", "P L1>L0", "U L0", "R L1", "PB L1",
        "R L0", "PB L0", "R root", "PB root"]),  # ours adds "P L0>none" (no target): V1
    "NoReshardAfterForwardMeansNoBackwardUnshards": (3, 0, 0, False, 1, URPB, [
        "U root", "U L0", "U L1", "U L2", "R L2", "PB L2", "R L1", "PB L1", "R L0", "PB L0", "R root", "PB root",
        "final"]),
    "TwoForwardsThenOneBackward": (3, 0, 0, True, 2, URPB,
                                   F3 + AGAIN + PATTERN + PATTERN + ["R root", "PB root", "final"]),
    "ExplicitForwardPrefetchOneAhead": (4, 1, 0, True, 1, URPB, [
        "U root", "U L0", "U L1", "R L0", "U L2", "R L1", "U L3", "R L2", "R L3"] + B4 + ["final"]),
    "ExplicitForwardPrefetchTwoAhead": (4, 2, 0, True, 1, URPB, [
        "U root", "U L0", "U L1", "U L2", "R L0", "U L3", "R L1", "R L2", "R L3"] + B4 + ["final"]),
    "ExplicitBackwardPrefetchTwoBack": (4, 0, 2, True, 1, URPB, F4 + [
        "U L3", "U L2", "U L1", "R L3", "PB L3", "U L0", "R L2", "PB L2", "R L1", "PB L1", "R L0", "PB L0",
        "R root", "PB root", "final"]),
    "ExplicitBackwardPrefetchOneBackEqualsImplicit": (4, 0, 1, True, 1, URPB, F4 + B4 + ["final"]),
}


class Chain(nn.Module):
    def __init__(self, n, dim=8):
        super().__init__()
        self.in_proj = nn.Linear(dim, dim)
        self.layers = nn.ModuleDict({f"L{i}": nn.Linear(dim, dim) for i in range(n)})
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        x = self.in_proj(x)
        for layer in self.layers.values():
            x = F.relu(layer(x))
        return self.out_proj(x)


def short(e):
    name = lambda fqn: fqn.split(".")[-1] if fqn else "root"  # noqa: E731
    if e["kind"] == "prefetch":
        return f"P {name(e['unit'])}>{name(e['target'])}"
    if e["kind"] == "final_callback":
        return "final"
    return {"unshard": "U", "reshard": "R", "post_backward": "PB", "pre_backward": "PRE"}[e["kind"]] + " " + \
        name(e["unit"])


def run_rank(rank, world, port, spec, queue):
    n, fwd_k, bwd_k, raf, forwards, kinds, _ = spec
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        ref._install_collective_recorders()
        ref._install_event_recorders()
        from torch.distributed.fsdp import fully_shard
        torch.manual_seed(0)
        model = Chain(n)
        layers = [model.layers[f"L{i}"] for i in range(n)]
        for layer in layers:
            fully_shard(layer, reshard_after_forward=raf)
        fully_shard(model, reshard_after_forward=None if raf else False)
        for i in range(n):
            if fwd_k and i + fwd_k < n:
                layers[i].set_modules_to_forward_prefetch([layers[i + j] for j in range(1, fwd_k + 1)])
            if bwd_k and i - bwd_k >= 0:
                layers[i].set_modules_to_backward_prefetch([layers[i - j] for j in range(1, bwd_k + 1)])
        x = torch.randn(4, 8)
        ref._REC["on"] = True
        loss = sum(model(x).sum() for _ in range(forwards))
        loss.backward()
        ref._REC["on"] = False
        events = [e for e in ref._REC["events"]
                  if not (e["kind"] == "post_backward" and not e.get("was_unsharded", True))]
        seq = [short(e) for e in events]
        queue.put((rank, [s for s in seq if s.split(" ")[0] in kinds], None))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001
        queue.put((rank, None, repr(e)))
    finally:
        queue.close()
        queue.join_thread()


def main():
    import torch.multiprocessing as mp
    ctx = mp.get_context("fork")
    failed = 0
    for name, spec in CASES.items():
        queue = ctx.Queue()
        port = ref._free_port()
        procs = [ctx.Process(target=run_rank, args=(r, 2, port, spec, queue)) for r in range(2)]
        for p in procs:
            p.start()
        results = {}
        for _ in procs:
            rank, seq, err = queue.get(timeout=300)
            results[rank] = (seq, err)
        for p in procs:
            p.join(timeout=60)
        expected = spec[-1]
        for rank, (seq, err) in sorted(results.items()):
            if err or seq != expected:
                failed += 1
                print(f"{name} rank {rank}: FSDP2 {'failed: ' + err if err else 'gives'}")
                if seq is not None:
                    print(f"  FSDP2:    {', '.join(seq)}\n  expected: {', '.join(expected)}")
        if all(not err and seq == expected for seq, err in results.values()):
            print(f"{name}: FSDP2 agrees with tests/prefetch_order_test.cpp")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
