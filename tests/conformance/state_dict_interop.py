#!/usr/bin/env python3
"""Full state dict files between PyTorch and our engine, both ways.

Per scenario, Python builds the twin (fsdp2_reference.make_twin: same FQNs as
scenarios/models.cpp), gives its buffers non-default values and writes
torch.save(dict(twin.state_dict())). Our driver (state_dict_interop.cpp), at world 3
fully sharded, loads that file strictly, gathers the full dict and writes it,
and also writes the full dict of its own init. Here:
  - torch.load(weights_only=True) reads both files as plain dicts (no
    safe_globals allowance);
  - the round trip has the twin's state_dict() keys in order, dtypes, shapes
    and values (bitwise);
  - the driver's own init loads into a fresh twin with strict=True, keys in
    the twin's order.

  state_dict_interop.py --driver PATH --dir DIR
"""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fsdp2_reference  # noqa: E402

import torch  # noqa: E402

SCENARIOS = ["transformer", "nested_wrapped", "mlp_stack"]


def python_state(name):
    torch.manual_seed(7)
    twin = fsdp2_reference.make_twin(name).module
    with torch.no_grad():
        for fqn, buf in twin.named_buffers():
            if buf.is_floating_point():
                buf.copy_(torch.randn_like(buf))
            else:
                buf.copy_(torch.arange(buf.numel(), dtype=buf.dtype).reshape(buf.shape) + 3)
    return twin.state_dict()


def check(name, driver, root):
    out = os.path.join(root, name)
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, k + ".pt") for k in ("python", "init", "roundtrip")}
    expected = python_state(name)
    # The OrderedDict state_dict() returns, with its _metadata, as users save it.
    torch.save(expected, paths["python"])
    subprocess.run([driver, name, "3", paths["python"], paths["init"], paths["roundtrip"]], check=True)

    problems = []
    roundtrip = torch.load(paths["roundtrip"], weights_only=True)
    if type(roundtrip) is not dict:
        problems.append(f"round trip is a {type(roundtrip).__name__}, not a dict")
    if list(roundtrip.keys()) != list(expected.keys()):
        problems.append(f"round trip keys {list(roundtrip.keys())} != the twin's {list(expected.keys())}")
    for fqn, want in expected.items():
        got = roundtrip.get(fqn)
        if got is None:
            continue
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            problems.append(f"{fqn}: got {got.dtype} {tuple(got.shape)}, want {want.dtype} {tuple(want.shape)}"
                            f" (equal values: {got.shape == want.shape and torch.equal(got.to(want.dtype), want)})")

    init = torch.load(paths["init"], weights_only=True)
    twin = fsdp2_reference.make_twin(name).module
    if list(init.keys()) != list(twin.state_dict().keys()):
        problems.append(f"init keys {list(init.keys())} != the twin's {list(twin.state_dict().keys())}")
    try:
        twin.load_state_dict(init, strict=True)
    except RuntimeError as e:
        problems.append(f"the driver's init does not load into the twin: {e}")
    for p in problems:
        print(f"{name}: {p}")
    print(f"{name}: {len(expected)} entries, {'FAIL' if problems else 'ok'}")
    return not problems


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--driver", required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    results = [check(name, args.driver, args.dir) for name in SCENARIOS]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
