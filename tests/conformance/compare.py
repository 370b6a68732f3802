#!/usr/bin/env python3
"""Compares one conformance case: our engine (ours_rank*.json/.pt, written by
conformance_driver) against PyTorch FSDP2 (fsdp2_rank*.json/.pt, written by
fsdp2_reference.py). Exit status 0 when everything agrees or differs only by a
documented known difference (printed as such), 1 otherwise; a missing side is
a failure.

Per rank and step it checks:
  numerics     the loss; every param and grad after the step: our shard
               against its rows of FSDP2's full tensor, |ours - fsdp2| <=
               ATOL + RTOL * |fsdp2| (see TOLERANCE below); a grad defined on
               one side only is a mismatch;
  collectives  (op, group's global ranks, dtype, input and output element
               counts, reduce op), in issue order;
  events       unshard / reshard / pre_backward / post_backward / prefetch /
               final_callback with the unit's FQN ("" = root), in order.

Known differences (README "Known differences"), each applied only when the
strict comparison fails and reported by id when it explains the difference:
  K1 final-callback order: units whose post-backward runs in the end-of-
     backward callback (their forward inputs need no grad, e.g. the root and
     the first block) are processed root-first in module pre-order by FSDP2
     (FSDPState._root_post_backward_final_callback walks all_states), in
     reverse forward order by our engine (Engine::Impl::final_callback). The
     check: the segments after the last pre_backward agree as multisets of
     per-unit event blocks and of collectives; everything before is strict.
  K2 HSDP all-reduce placement: FSDP2 all-reduces each unit's reduce-scatter
     output across replicas right after its reduce-scatter (foreach_reduce);
     our engine issues every all-reduce at the end of backward
     (finish_reductions). The check: the sequences without all-reduces are
     equal (strict, or under K1), and all collectives agree as a multiset.
  K3 parameter-less root: our engine makes such a root a unit anyway: it
     issues an all-gather of 0 elements every forward, emits its unshard /
     pre_backward / reshard / post_backward, and its backward prefetch
     gathers the last block before that block's pre_backward. FSDP2 builds no
     param group for it: no collective, no event, no prefetch. The check:
     without our 0-element all-gathers and the root's events (the all-gather
     its prefetch issued moved behind the target's pre_backward), strict or
     under K1/K2.
Vocabulary mapping (not differences in behaviour, so always applied):
  V1 our on_prefetch with an empty target ("nothing to prefetch") has no
     FSDP2 counterpart: dropped.
  V2 FSDP2 unshard / reshard of a unit whose all-gather group has size 1 (MoE
     expert on its own rank; HSDP with one shard per replica) moves no data;
     our EngineHooks contract emits neither for such a unit: dropped.
  V3 FSDP2 calls post_backward from the final callback for every group not
     yet post-backwarded, also for groups that never unsharded (a no-op);
     our on_post_backward fires only for units that computed with gathered
     params: FSDP2's calls on a group that was not unsharded are dropped.
  V4 FSDP2's end-of-backward callback runs on the state whose pre-backward
     queued it (not always the root's); ours names the root. The
     final_callback event is compared without its unit.
"""

import argparse
import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as case_lib  # noqa: E402

# fp32 tolerance, |ours - fsdp2| <= ATOL + RTOL * |fsdp2|, per element.
# Why not bitwise: (1) the two sides are different builds of ATen (LibTorch
# 1.13 from Debian vs the torch 2.15 wheel until the port lands; even then
# separate builds) whose matmul / sum / softmax kernels block and vectorise
# differently: the same step-0 forward differs by a few ulp per op already;
# (2) Gloo's reduce-scatter / all-reduce sum in its own order and divide
# (AVG) after, our fake backend sums in rank order 0..W-1 then divides;
# (3) three SGD steps with momentum compound both. RTOL 1e-4 is ~840 fp32
# ulp of relative error, ATOL 1e-5 absorbs values near zero (biases, grads
# that cancel); the maxima actually seen are printed per case and stay
# about 2 orders of magnitude below (README "Conformance").
RTOL = 1e-4
ATOL = 1e-5

REDUCTIONS = ("reduce_scatter", "all_reduce")


def load_json(path):
    with open(path) as f:
        return json.load(f)


def load_cpp_pickle(path):
    import torch
    import torch.jit._pickle
    with torch.serialization.safe_globals([torch.jit._pickle.restore_type_tag]):
        return torch.load(path, weights_only=True)


def coll_key(c):
    return (c["op"], tuple(c["group"]) if isinstance(c["group"], list) else c["group"], c["dtype"],
            c["in_numel"], c["out_numel"], (c.get("reduce_op") or None))


def coll_str(c):
    op, group, dtype, n_in, n_out, red = coll_key(c)
    s = f"{op} group {list(group) if isinstance(group, tuple) else group} {dtype} in {n_in} out {n_out}"
    return s + (f" {red}" if red else "")


def ev_key(e):
    if e["kind"] == "final_callback":
        return ("final_callback", "")  # V4
    return (e["kind"], e["unit"]) + ((e.get("target"),) if e["kind"] == "prefetch" else ())


def ev_str(e):
    unit = e["unit"] if e["unit"] != "" else "<root>"
    if e["kind"] == "prefetch":
        target = e.get("target") if e.get("target") != "" else "<root>"
        return f"prefetch {unit} -> {target}"
    return f"{e['kind']} {unit}"


def normalise_ours_events(events):
    return [e for e in events if not (e["kind"] == "prefetch" and e.get("target", "") == "")]  # V1


def normalise_fsdp2_events(events):
    out = []
    for e in events:
        if e["kind"] in ("unshard", "reshard") and e.get("ag_world", 2) == 1:
            continue  # V2
        if e["kind"] == "post_backward" and not e.get("was_unsharded", True):
            continue  # V3
        out.append(e)
    return out


def first_diff(a, b, fmt):
    """Index and a context listing of the first difference of two lists."""
    n = min(len(a), len(b))
    i = next((k for k in range(n) if a[k] != b[k]), n if len(a) != len(b) else None)
    if i is None:
        return None
    lo = max(0, i - 3)
    lines = []
    for k in range(lo, min(max(len(a), len(b)), i + 4)):
        left = fmt(a[k]) if k < len(a) else "(end)"
        right = fmt(b[k]) if k < len(b) else "(end)"
        mark = ">>" if k == i else "  "
        lines.append(f"      {mark} #{k}: ours {left:<55} | fsdp2 {right}")
    return i, "\n".join(lines)


def tail_start(events, seq_list):
    """Index in seq_list of the first item after the step's last pre_backward."""
    last_pb = max((e["seq"] for e in events if e["kind"] == "pre_backward"), default=None)
    if last_pb is None:
        return len(seq_list)
    return next((i for i, item in enumerate(seq_list) if item["seq"] > last_pb), len(seq_list))


def unit_blocks(events):
    blocks, current = [], []
    for e in events:
        if current and current[-1]["unit"] != e["unit"]:
            blocks.append(tuple(ev_key(x) for x in current))
            current = []
        current.append(e)
    if current:
        blocks.append(tuple(ev_key(x) for x in current))
    return Counter(blocks)


def k3_events(events):
    """K3: drop the param-less root's own events and prefetch decisions; the
    all-gather a root prefetch issued moves behind its target's pre_backward
    (where FSDP2, with no root group to prefetch, issues it)."""
    root = [e["kind"] for e in events if e["unit"] == "" and e["kind"] not in ("final_callback", "prefetch")]
    # A root on a shard group of one gathers and frees nothing (no unshard /
    # reshard, as V2); otherwise its empty gather is the step's first event.
    gathered = root == ["unshard", "pre_backward", "reshard", "post_backward"]
    if not (gathered and events and ev_key(events[0]) == ("unshard", "")) and \
            root != ["pre_backward", "post_backward"]:
        return None  # not the pattern K3 describes: no excuse
    out, held = [], {}
    i = 0
    while i < len(events):
        e = events[i]
        if e["unit"] == "" and e["kind"] != "final_callback":
            if e["kind"] == "prefetch" and i + 1 < len(events) and events[i + 1]["kind"] == "unshard" \
                    and events[i + 1]["unit"] == e.get("target"):
                held[e["target"]] = events[i + 1]
                i += 1
            i += 1
            continue
        out.append(e)
        if e["kind"] == "pre_backward" and e["unit"] in held:
            out.append(held.pop(e["unit"]))
        i += 1
    return out


def compare_events(ours, theirs, param_less_root=False):
    """Returns (ok, known_ids, message)."""
    ok, known, msg = compare_events_once(ours, theirs)
    if ok or not param_less_root:
        return ok, known, msg
    trimmed = k3_events(ours)
    if trimmed is None:
        return ok, known, msg
    ok3, known3, _ = compare_events_once(trimmed, theirs)
    return (True, known3 | {"K3"}, "") if ok3 else (ok, known, msg)


def compare_events_once(ours, theirs):
    a = [ev_key(e) for e in ours]
    b = [ev_key(e) for e in theirs]
    if a == b:
        return True, set(), ""
    # K1: strict before the last pre_backward; the tail (without the final
    # callback event, compared last) as a multiset of per-unit blocks.
    ia, ib = tail_start(ours, ours), tail_start(theirs, theirs)
    strip = lambda evs: [e for e in evs if e["kind"] != "final_callback"]  # noqa: E731
    if a[:ia] == b[:ib] and unit_blocks(strip(ours[ia:])) == unit_blocks(strip(theirs[ib:])) \
            and a[-1:] == b[-1:]:
        return True, {"K1"}, ""
    diff = first_diff(a, b, lambda k: " ".join(str(x) if x != "" else "<root>" for x in k))
    return False, set(), f"first difference at event #{diff[0]}:\n{diff[1]}"


def compare_collectives(ours, theirs, ours_events, theirs_events, param_less_root=False):
    ok, known, msg = compare_collectives_once(ours, theirs, ours_events, theirs_events)
    if ok or not param_less_root:
        return ok, known, msg
    # K3: the param-less root's empty all-gathers.
    # Exactly one, the step's first collective, on the group of the next all-gather.
    empty = [i for i, c in enumerate(ours) if c["op"] == "all_gather" and c["in_numel"] == 0]
    trimmed_events = k3_events(ours_events)
    if empty != [0] or len(ours) < 2 or ours[1]["op"] != "all_gather" or ours[0]["group"] != ours[1]["group"] \
            or ours[0]["out_numel"] != 0 or trimmed_events is None:
        return ok, known, msg
    ok3, known3, _ = compare_collectives_once(ours[1:], theirs, trimmed_events, theirs_events)
    return (True, known3 | {"K3"}, "") if ok3 else (ok, known, msg)


def compare_collectives_once(ours, theirs, ours_events, theirs_events):
    a = [coll_key(c) for c in ours]
    b = [coll_key(c) for c in theirs]
    if a == b:
        return True, set(), ""
    if Counter(a) != Counter(b):
        only_a = Counter(a) - Counter(b)
        only_b = Counter(b) - Counter(a)
        diff = first_diff(a, b, lambda k: coll_str(dict(zip(
            ("op", "group", "dtype", "in_numel", "out_numel", "reduce_op"), k))))
        return False, set(), (f"different collectives: only ours {[coll_str_k(k) for k in only_a.elements()]}, "
                              f"only fsdp2 {[coll_str_k(k) for k in only_b.elements()]}\n"
                              f"    first difference at collective #{diff[0]}:\n{diff[1]}")

    def tail_equal(xs, ys, xs_items, ys_items):
        ix = tail_start(ours_events, xs_items)
        iy = tail_start(theirs_events, ys_items)
        return xs[:ix] == ys[:iy] and Counter(xs[ix:]) == Counter(ys[iy:])

    # K2 (all-reduces placed differently) before K1, so that each report names
    # the narrowest rule that explains the difference.
    oa = [c for c in ours if c["op"] != "all_reduce"]
    ob = [c for c in theirs if c["op"] != "all_reduce"]
    ka, kb = [coll_key(c) for c in oa], [coll_key(c) for c in ob]
    has_all_reduce = any(c["op"] == "all_reduce" for c in theirs)
    if has_all_reduce and ka == kb:
        return True, {"K2"}, ""
    if tail_equal(a, b, ours, theirs):
        return True, {"K1"}, ""
    if has_all_reduce and tail_equal(ka, kb, oa, ob):
        return True, {"K1", "K2"}, ""
    diff = first_diff(a, b, coll_str_k)
    return False, set(), f"first difference at collective #{diff[0]}:\n{diff[1]}"


def coll_str_k(k):
    return coll_str(dict(zip(("op", "group", "dtype", "in_numel", "out_numel", "reduce_op"), k)))


def shard_rows(full, index, count):
    dim0 = full.shape[0]
    chunk = -(-dim0 // count)
    begin = min(index * chunk, dim0)
    return full[begin:begin + min(chunk, dim0 - begin)]


def compare_numerics(case, rank, ours_json, ours_t, theirs_json, theirs_t, report):
    import torch

    problems = []
    for step in range(case.steps):
        la, lb = ours_json["losses"][step], theirs_json["losses"][step]
        d = abs(la - lb)
        report["loss"] = max(report["loss"], d)
        report["ratio"] = max(report["ratio"], d / (ATOL + RTOL * abs(lb)))
        if d > ATOL + RTOL * abs(lb):
            problems.append(f"step {step} loss: ours {la!r}, fsdp2 {lb!r}, |diff| {d:.3g}")
    placements = ours_json["placements"]
    fqns = sorted({k.split("/", 3)[3] for k in theirs_t if k.startswith("step/0/param/")})
    ours_fqns = sorted({k.split("/", 3)[3] for k in ours_t if k.startswith("step/0/param/")})
    if fqns != ours_fqns:
        problems.append(f"param FQNs differ: ours only {sorted(set(ours_fqns) - set(fqns))}, "
                        f"fsdp2 only {sorted(set(fqns) - set(ours_fqns))}")
    for step in range(case.steps):
        for what in ("param", "grad"):
            for fqn in fqns:
                key = f"step/{step}/{what}/{fqn}"
                a, b = ours_t.get(key), theirs_t.get(key)
                if (a is None) != (b is None):
                    problems.append(f"step {step} {what} {fqn}: "
                                    f"{'ours undefined' if a is None else 'fsdp2 None'}, the other defined")
                    continue
                if a is None:
                    continue
                place = placements.get(fqn)
                if place is None:
                    problems.append(f"{fqn}: no placement in ours_rank{rank}.json")
                    continue
                expected = shard_rows(b, place["index"], place["count"]) if b.dim() > 0 else b
                if tuple(a.shape) != tuple(expected.shape):
                    problems.append(f"step {step} {what} {fqn}: our shard {tuple(a.shape)}, FSDP2's rows "
                                    f"{tuple(expected.shape)} (shard {place['index']} of {place['count']} of "
                                    f"{tuple(b.shape)})")
                    continue
                if a.dtype != expected.dtype:
                    problems.append(f"step {step} {what} {fqn}: dtype ours {a.dtype}, fsdp2 {expected.dtype}")
                    continue
                if a.numel() == 0:
                    continue
                diff = (a.double() - expected.double()).abs()
                report[what] = max(report[what], diff.max().item())
                bound = ATOL + RTOL * expected.double().abs()
                report["ratio"] = max(report["ratio"], (diff / bound).max().item())
                bad = diff > bound
                if bad.any():
                    k = int(bad.flatten().nonzero()[0])
                    problems.append(f"step {step} {what} {fqn}: {int(bad.sum())} of {a.numel()} elements "
                                    f"out of tolerance, max |diff| {diff.max().item():.3g}; first at flat "
                                    f"index {k}: ours {a.flatten()[k].item()!r}, fsdp2 "
                                    f"{expected.flatten()[k].item()!r}")
    return problems


def compare_case(root, name, verbose):
    case = case_lib.parse_case(name)
    case_dir = os.path.join(root, name)
    print(f"case {name}: {case.world} ranks, {case.steps} steps, tolerance |diff| <= {ATOL:g} + {RTOL:g}|fsdp2|")
    failures = []
    for side, fname in (("ours", "driver_error.txt"), ("FSDP2", "fsdp2_error.txt")):
        path = os.path.join(case_dir, fname)
        if os.path.exists(path):
            with open(path) as f:
                failures.append(f"{side} side failed to run:\n{f.read()}")
    if failures:
        for f in failures:
            print("  FAIL " + f)
        return False
    report = {"loss": 0.0, "param": 0.0, "grad": 0.0, "ratio": 0.0}
    known_all = Counter()
    ok = True
    for rank in range(case.world):
        paths = {s: os.path.join(case_dir, f"{s}_rank{rank}") for s in ("ours", "fsdp2")}
        missing = [p + ext for p in paths.values() for ext in (".json", ".pt") if not os.path.exists(p + ext)]
        if missing:
            print(f"  FAIL rank {rank}: missing {missing} (a case that cannot run fails)")
            return False
        oj, tj = load_json(paths["ours"] + ".json"), load_json(paths["fsdp2"] + ".json")
        ot, tt = load_cpp_pickle(paths["ours"] + ".pt"), load_cpp_pickle(paths["fsdp2"] + ".pt")
        problems = compare_numerics(case, rank, oj, ot, tj, tt, report)
        param_less_root = not any(p["unit"] == "" for p in oj["placements"].values())
        for step in range(case.steps):
            oe, te = normalise_ours_events(oj["events"][step]), normalise_fsdp2_events(tj["events"][step])
            good, known, msg = compare_collectives(oj["collectives"][step], tj["collectives"][step], oe, te,
                                                   param_less_root)
            known_all.update(f"{k} (collectives)" for k in known)
            if not good:
                problems.append(f"step {step} collectives: {msg}")
            good, known, msg = compare_events(oe, te, param_less_root)
            known_all.update(f"{k} (events)" for k in known)
            if not good:
                problems.append(f"step {step} events: {msg}")
        for p in problems[:12]:
            print(f"  FAIL rank {rank} {p}")
        if len(problems) > 12:
            print(f"  ... and {len(problems) - 12} more on rank {rank}")
        ok = ok and not problems
        if verbose and rank == 0:
            for step in range(min(1, case.steps)):
                print("  rank 0 step 0 collectives (ours | fsdp2):")
                for k in range(max(len(oj["collectives"][step]), len(tj["collectives"][step]))):
                    a = coll_str(oj["collectives"][step][k]) if k < len(oj["collectives"][step]) else "-"
                    b = coll_str(tj["collectives"][step][k]) if k < len(tj["collectives"][step]) else "-"
                    print(f"    {a:<60} | {b}")
    print(f"  max |diff| over ranks and steps: loss {report['loss']:.3g}, params {report['param']:.3g}, "
          f"grads {report['grad']:.3g}; worst element at {report['ratio']:.2g} of its tolerance")
    for k, n in sorted(known_all.items()):
        print(f"  KNOWN DIFFERENCE {k}: explains {n} rank-steps (see compare.py / README)")
    print(f"  {'PASS' if ok else 'FAIL'}")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args()
    ok = True
    for name in args.cases:
        ok = compare_case(args.root, name, args.verbose) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
