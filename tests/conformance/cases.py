#!/usr/bin/env python3
"""The conformance matrix, shared by CMake (which registers one ctest test per
case: `cases.py list`), the FSDP2 reference and the comparator. The C++
driver parses the same case names (tests/conformance/conformance_driver.cpp).

A case name is "<scenario>.<mode>.w<W>" (HSDP: "<scenario>.hsdp<R>x<S>.w<W>").
Modes:
  raf_on    every unit but the root reshards after forward (FSDP2's default,
            reshard_after_forward=None on the root); ours: FullShard
  raf_off   nothing reshards after forward; ours: ShardGradOp
  hsdp      2-D mesh (R replicas x S shards), reshard after forward; ours:
            HybridShard with make_mesh_2d(world, R, S)
  prefetch  raf_on plus explicit lists: each unit (root excluded) prefetches
            the next two units in forward and the previous two in backward
  accum     raf_on, gradient accumulation: per step ACCUM_MICRO micro-batches,
            all but the last with set_requires_gradient_sync(False) and
            set_reshard_after_backward(False), the last with both True
            (ACCUM_SCENARIOS x ACCUM_WORLDS only)
"""

import sys
from dataclasses import dataclass

SCENARIOS = ["mlp_stack", "nested_wrapped", "transformer", "mixture_of_experts", "uneven_shapes", "double_linear"]
# Runnable (generate.py --case, compare.py) but not registered with ctest:
# they show engine differences no documented rule covers yet (README
# "Differences without a rule").
EXTRA_SCENARIOS = ["non_uniform_req_grad"]
WORLDS = [2, 3, 4, 5]
MODES = ["raf_on", "raf_off", "hsdp", "prefetch", "accum"]
ACCUM_SCENARIOS = ["mlp_stack", "nested_wrapped"]
ACCUM_WORLDS = [2, 3]
ACCUM_MICRO = 3  # the driver's kAccumMicro
STEPS = 3
# HSDP meshes (replicas x shards) per world size; 6 adds a 2 x 3 mesh whose
# axes are both larger than one.
HSDP_MESHES = {2: (2, 1), 3: (3, 1), 4: (2, 2), 5: (5, 1), 6: (2, 3)}

# Units (module FQNs) in forward order, the root excluded.
FORWARD_UNITS = {
    "mlp_stack": ["0", "1", "2"],
    "nested_wrapped": ["module.1", "module.1.0", "module.2"],
    "transformer": ["transformer.encoder.layers.0", "transformer.encoder.layers.1",
                    "transformer.decoder.layers.0", "transformer.decoder.layers.1"],
    "mixture_of_experts": ["module.1", "module.2"],
    "uneven_shapes": ["block0", "block1"],
    "double_linear": ["lin1", "lin2"],
    "non_uniform_req_grad": ["module.1", "module.1.0", "module.2"],
}
PREFETCH_DEPTH = 2


@dataclass(frozen=True)
class Case:
    scenario: str
    mode: str
    world: int
    replicate: int = 1
    steps: int = STEPS

    @property
    def micro_batches(self):
        return ACCUM_MICRO if self.mode == "accum" else 1

    @property
    def name(self):
        mode = f"hsdp{self.replicate}x{self.world // self.replicate}" if self.mode == "hsdp" else self.mode
        return f"{self.scenario}.{mode}.w{self.world}"


def all_cases():
    out = []
    for scenario in SCENARIOS:
        for mode in MODES:
            worlds = WORLDS + [6] if mode == "hsdp" else WORLDS
            if mode == "accum":
                worlds = ACCUM_WORLDS if scenario in ACCUM_SCENARIOS else []
            for world in worlds:
                replicate = HSDP_MESHES[world][0] if mode == "hsdp" else 1
                out.append(Case(scenario, mode, world, replicate))
    return out


def parse_case(name):
    try:
        scenario, mode, world = name.split(".")
        W = int(world[1:]) if world.startswith("w") else None
        replicate = 1
        if mode.startswith("hsdp"):
            R, S = (int(v) for v in mode[4:].split("x"))
            if R * S != W:
                raise ValueError
            mode, replicate = "hsdp", R
        if scenario not in SCENARIOS + EXTRA_SCENARIOS or mode not in MODES or W is None or W < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"bad case name {name!r}: expected <scenario>.<mode>.w<W>, "
                         f"scenarios {SCENARIOS}, modes {MODES} (hsdp as hsdp<R>x<S>)") from None
    return Case(scenario, mode, W, replicate)


def prefetch_lists(scenario):
    units = FORWARD_UNITS[scenario]
    forward, backward = {}, {}
    for i, unit in enumerate(units):
        ahead = units[i + 1:i + 1 + PREFETCH_DEPTH]
        behind = list(reversed(units[max(0, i - PREFETCH_DEPTH):i]))
        if ahead:
            forward[unit] = ahead
        if behind:
            backward[unit] = behind
    return forward, backward


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "list":
        worlds = {int(w) for w in sys.argv[2:]}
        for case in all_cases():
            if not worlds or case.world in worlds:
                print(case.name)
    elif len(sys.argv) == 3 and sys.argv[1] == "prefetch":
        fwd, bwd = prefetch_lists(sys.argv[2])
        for unit, targets in fwd.items():
            print("forward", unit, *targets)
        for unit, targets in bwd.items():
            print("backward", unit, *targets)
    else:
        sys.exit("usage: cases.py list [W ...] | cases.py prefetch <scenario>")
