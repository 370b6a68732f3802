#!/usr/bin/env python3
"""The comparator must catch what it claims to check: copies generated cases,
plants one defect at a time into our side and asserts that compare.py then
fails (and passes on the untouched copy). Guards against a comparator that
passes by construction.

  selftest.py --root DIR CASE...
"""

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
from contextlib import redirect_stdout

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare  # noqa: E402


def mutate_json(path, fn):
    with open(path) as f:
        data = json.load(f)
    fn(data)
    with open(path, "w") as f:
        json.dump(data, f)


def mutate_pt(path, fn):
    import torch
    tensors = dict(compare.load_cpp_pickle(path))
    fn(tensors)
    torch.save(tensors, path)


def first_key(tensors, prefix):
    return next(k for k in sorted(tensors) if k.startswith(prefix) and tensors[k].numel() > 0)


def swap_first_distinct(items, key, where):
    """Swaps the first two adjacent items (with where(item) true) whose keys differ."""
    for i in range(len(items) - 1):
        if where(items[i]) and where(items[i + 1]) and key(items[i]) != key(items[i + 1]):
            items[i], items[i + 1] = items[i + 1], items[i]
            return True
    raise AssertionError("nothing to swap")


def defects():
    def perturb_param(t):
        k = first_key(t, "step/1/param/")
        t[k] = t[k].clone()
        t[k].view(-1)[0] += 1e-3

    def perturb_grad(t):
        k = first_key(t, "step/0/grad/")
        t[k] = t[k].clone()
        t[k].view(-1)[-1] *= 1.01

    def drop_grad(t):
        del t[first_key(t, "step/2/grad/")]

    def loss(d):
        d["losses"][1] += 1e-3 * max(1.0, abs(d["losses"][1]))

    def swap_gathers(d):
        swap_first_distinct(d["collectives"][0], compare.coll_key, lambda c: c["op"] == "all_gather")

    def reduce_op(d):
        c = next(c for c in d["collectives"][1] if c["op"] == "reduce_scatter")
        c["reduce_op"] = "sum"

    def group(d):
        c = d["collectives"][2][0]
        c["group"] = list(reversed(c["group"])) + [99]

    def numel(d):
        c = d["collectives"][0][-1]
        c["in_numel"] += 1

    def extra_collective(d):
        d["collectives"][1].append(dict(d["collectives"][1][0], seq=10**9))

    def swap_events(d):
        swap_first_distinct(d["events"][0], compare.ev_key, lambda e: e["kind"] in ("unshard", "reshard"))

    def drop_post_backward(d):
        evs = d["events"][1]
        evs.remove(next(e for e in evs if e["kind"] == "post_backward"))

    def prefetch_target(d):
        e = next(e for e in d["events"][0] if e["kind"] == "prefetch" and e.get("target"))
        e["target"] = e["target"] + ".x"

    return [("param", "pt", perturb_param), ("grad", "pt", perturb_grad), ("grad undefined", "pt", drop_grad),
            ("loss", "json", loss), ("all-gather order", "json", swap_gathers),
            ("reduce op", "json", reduce_op), ("group", "json", group), ("element count", "json", numel),
            ("extra collective", "json", extra_collective), ("event order", "json", swap_events),
            ("missing post_backward", "json", drop_post_backward), ("prefetch target", "json", prefetch_target)]


def run_compare(root, case):
    out = io.StringIO()
    with redirect_stdout(out):
        ok = compare.compare_case(root, case, verbose=False)
    return ok, out.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True)
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args()
    failed = 0
    for case in args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            clean = os.path.join(tmp, "clean")
            shutil.copytree(os.path.join(args.root, case), os.path.join(clean, case))
            ok, text = run_compare(clean, case)
            if not ok:
                print(f"{case}: the untouched case does not pass, cannot self-test:\n{text}")
                return 1
            for name, kind, fn in defects():
                root = os.path.join(tmp, name.replace(" ", "_"))
                shutil.copytree(os.path.join(clean, case), os.path.join(root, case))
                rank = 1
                path = os.path.join(root, case, f"ours_rank{rank}.{kind}")
                try:
                    (mutate_pt if kind == "pt" else mutate_json)(path, fn)
                except (AssertionError, StopIteration, IndexError):
                    print(f"{case}: defect '{name}' does not apply to this case")
                    failed += 1
                    continue
                ok, text = run_compare(root, case)
                verdict = "caught" if not ok else "MISSED"
                print(f"{case}: defect '{name}' on rank {rank}: {verdict}")
                if ok:
                    failed += 1
                    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
