#!/usr/bin/env python3
"""Runs both sides of every conformance case of the given world sizes (or the
named cases) into --root: our C++ driver first (it writes the initial params
and inputs), then the FSDP2 reference for all of them in one Python process
(torch is imported once, ranks are forked per case). A side that fails writes
<case>/driver_error.txt or <case>/fsdp2_error.txt, which compare.py reports
as that case's failure; this script exits non-zero only if it could not run
at all, so that each case's ctest test reports its own outcome.

  generate.py --driver PATH --root DIR [--world W]... [--case NAME]...
"""

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import cases as case_lib  # noqa: E402


def run_driver(driver, root, case):
    case_dir = os.path.join(root, case.name)
    os.makedirs(case_dir, exist_ok=True)
    for f in os.listdir(case_dir):
        os.remove(os.path.join(case_dir, f))
    cmd = [driver, "--out", case_dir, "--scenario", case.scenario, "--world", str(case.world), "--mode", case.mode,
           "--replicate", str(case.replicate), "--steps", str(case.steps)]
    if case.mode == "prefetch":
        fwd, bwd = case_lib.prefetch_lists(case.scenario)
        for unit, targets in fwd.items():
            cmd += ["--forward-prefetch", f"{unit}={','.join(targets)}"]
        for unit, targets in bwd.items():
            cmd += ["--backward-prefetch", f"{unit}={','.join(targets)}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        err = None if proc.returncode == 0 else f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    except (OSError, subprocess.TimeoutExpired) as e:
        err = f"{' '.join(cmd)}: {e}"
    if err:
        with open(os.path.join(case_dir, "driver_error.txt"), "w") as f:
            f.write(err)
    return err


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--driver", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--world", type=int, action="append", default=[])
    parser.add_argument("--case", action="append", default=[])
    parser.add_argument("--family", choices=case_lib.FAMILIES, default="base",
                        help="with --world: the base matrix, or the mixed-precision or training-loop cases (own ctest fixtures)")
    args = parser.parse_args()
    selected = [case_lib.parse_case(n) for n in args.case]
    selected += [c for c in case_lib.all_cases() if c.world in args.world and c.family == args.family]
    if not selected:
        parser.error("no cases selected")
    os.makedirs(args.root, exist_ok=True)
    ready = []
    for case in selected:
        start = time.time()
        err = run_driver(args.driver, args.root, case)
        print(f"ours  {case.name}: {'FAILED: ' + err.splitlines()[0] if err else 'ok'} ({time.time() - start:.1f} s)",
              flush=True)
        if not err:
            ready.append(case)
    if ready:
        import fsdp2_reference  # imports torch: only now
        for case in ready:
            errors, seconds = fsdp2_reference.run_case(case, args.root, timeout_s=300.0)
            status = "ok" if not errors else "FAILED: " + next(iter(errors.values())).strip().splitlines()[-1]
            print(f"FSDP2 {case.name}: {status} ({seconds:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
