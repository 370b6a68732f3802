#!/usr/bin/env python3
"""Compares one conformance case: our engine (ours_rank*.json/.pt, written by
conformance_driver) against PyTorch FSDP2 (fsdp2_rank*.json/.pt, written by
fsdp2_reference.py). Exit status 0 when everything agrees or differs only by a
documented known difference (printed as such), 1 otherwise; a missing side is
a failure.

Per rank and step it checks:
  numerics     (clip: also the total grad norm each step returned, with
               the loss's tolerance) the loss; every param and grad after the step: our shard
               against its rows of FSDP2's full tensor, |ours - fsdp2| <=
               ATOL + RTOL * |fsdp2| (see TOLERANCE below); a grad defined on
               one side only is a mismatch;
  collectives  (op, group's global ranks, dtype, input and output element
               counts, reduce op), in issue order;
  events       unshard / reshard / pre_backward / post_backward / prefetch /
               final_callback with the unit's FQN ("" = root), in order.

Known differences (README "Known differences"), each applied only when the
strict comparison fails and reported by id when it explains the difference:
  (K1, the end-of-backward order of units without a post-backward hook,
     was a difference until the engine took FSDP2's root-first module
     pre-order; it is now checked strictly.)
  K2 HSDP all-reduce placement: FSDP2 all-reduces each unit's reduce-scatter
     output across replicas right after its reduce-scatter (foreach_reduce);
     our engine issues every all-reduce at the end of backward
     (finish_reductions). The check: the sequences without all-reduces are
     equal, and all collectives agree as a multiset.
  (K3, a parameter-less root issuing a 0-element all-gather and events of
     its own, was a difference until the engine treated such a unit as
     FSDP2 does a state without a param group; it is now checked strictly.)
  K5 clip_grad_norm_'s all-reduce (mode clip): FSDP2 all-reduces one fp32
     element per grad (each param's local |g|^2), ours one float64 element
     (the rank's sum of squares). Checked: same position, group and op (sum);
     ours 1 float64 element, FSDP2 one fp32 element per grad of the step.
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
# Mixed-precision cases (modes mp_*, param_dtype bf16), per element
# |ours - fsdp2| <= MP_ATOL + MP_RTOL |fsdp2| + MP_TENSOR * max|fsdp2 tensor|.
# With reduce_dtype fp32 every case is bitwise equal (measured); with
# reduce_dtype bf16 at world 3 Gloo sums the bf16 grads in another order than
# our rank order, and each of the W - 1 additions rounds its partial sum to
# bf16 (8 significant bits): one ulp of the result is 2^-8..2^-7 of it
# (MP_RTOL = 2^-6: two ulps), and when the terms cancel the rounding is that
# of the partial sums, bounded by the tensor's largest element (MP_TENSOR =
# 2^-7: one ulp of it). Seen: grads off by one bf16 ulp (0.0156 on -2.03),
# worst element at 0.39 of this bound (README "Tolerance").
MP_RTOL = 2.0**-6
MP_ATOL = 1e-3
MP_TENSOR = 2.0**-7
MP_TOLERANCE_WHY = "bf16: 2^-6 relative + 2^-7 of the tensor's max, see compare.py"


def tolerance(case):
    """(atol, rtol, fraction of the tensor's max|x|) for the case: fp32's, or
    bf16's for the mixed-precision modes."""
    return (MP_ATOL, MP_RTOL, MP_TENSOR) if is_mixed_precision(case) else (ATOL, RTOL, 0.0)


def is_mixed_precision(case):
    """The mp family: bf16 tolerance. mp_accum (train family) reduces in fp32
    and keeps fp32 sums (measured bitwise at worlds 2 and 3): fp32's."""
    return case.mode in case_lib.MP_MODES

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


def compare_events(ours, theirs):
    """Returns (ok, known_ids, message)."""
    a = [ev_key(e) for e in ours]
    b = [ev_key(e) for e in theirs]
    if a == b:
        return True, set(), ""
    diff = first_diff(a, b, lambda k: " ".join(str(x) if x != "" else "<root>" for x in k))
    return False, set(), f"first difference at event #{diff[0]}:\n{diff[1]}"


def clip_norm_all_reduces(case, ours, theirs, grads):
    """K5: clip_grad_norm_'s all-reduce. FSDP2 (torch.nn.utils.clip_grad_norm_
    on DTensor grads) all-reduces every grad's local |g|^2 as one fp32 vector
    of one element per grad (the _NormPartial of the stacked per-param norms,
    redistributed to Replicate); ours all-reduces one float64 element per shard
    group (the rank's sum over all its shards, fsdp/clip_grad.cpp). clip cases
    have no other all-reduce. Returns (ours, theirs) with each such all-reduce
    replaced by a common key after checking its exact shape on both sides
    (group, sum; ours 1 float64 element, FSDP2 `grads` fp32 elements), or None
    if the case is not clip or a shape is not that."""
    if case.mode != "clip":
        return None
    out = []
    for side, colls, dtype, numel in (("ours", ours, "float64", 1), ("fsdp2", theirs, "float32", grads)):
        mapped = []
        for c in colls:
            if c["op"] == "all_reduce":
                if (c["dtype"], c["in_numel"], c["out_numel"], c.get("reduce_op")) != (dtype, numel, numel, "sum"):
                    return None
                c = dict(c, dtype="clip_norm", in_numel=None, out_numel=None)
            mapped.append(c)
        out.append(mapped)
    return out


def compare_collectives(ours, theirs, case=None, grads=0):
    a = [coll_key(c) for c in ours]
    b = [coll_key(c) for c in theirs]
    if a == b:
        return True, set(), ""
    mapped = clip_norm_all_reduces(case, ours, theirs, grads)
    if mapped is not None and [coll_key(c) for c in mapped[0]] == [coll_key(c) for c in mapped[1]]:
        return True, {"K5"}, ""
    if Counter(a) != Counter(b):
        only_a = Counter(a) - Counter(b)
        only_b = Counter(b) - Counter(a)
        diff = first_diff(a, b, lambda k: coll_str(dict(zip(
            ("op", "group", "dtype", "in_numel", "out_numel", "reduce_op"), k))))
        return False, set(), (f"different collectives: only ours {[coll_str_k(k) for k in only_a.elements()]}, "
                              f"only fsdp2 {[coll_str_k(k) for k in only_b.elements()]}\n"
                              f"    first difference at collective #{diff[0]}:\n{diff[1]}")

    # K2: the all-reduces placed differently, everything else in order.
    ka = [coll_key(c) for c in ours if c["op"] != "all_reduce"]
    kb = [coll_key(c) for c in theirs if c["op"] != "all_reduce"]
    if any(c["op"] == "all_reduce" for c in theirs) and ka == kb:
        return True, {"K2"}, ""
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

    atol, rtol, tensor_frac = tolerance(case)
    problems = []
    # One loss per micro-batch (accum: several per step).
    micro = case.micro_batches
    if len(ours_json["losses"]) != len(theirs_json["losses"]):
        problems.append(f"{len(ours_json['losses'])} losses in ours, {len(theirs_json['losses'])} in fsdp2")
    for i, (la, lb) in enumerate(zip(ours_json["losses"], theirs_json["losses"])):
        where = f"step {i // micro}" + (f" micro-batch {i % micro}" if micro > 1 else "")
        d = abs(la - lb)
        report["loss"] = max(report["loss"], d)
        report["ratio"] = max(report["ratio"], d / (atol + rtol * abs(lb)))
        if d > atol + rtol * abs(lb):
            problems.append(f"{where} loss: ours {la!r}, fsdp2 {lb!r}, |diff| {d:.3g}")
    # clip: the total grad norm each step returned (before clipping).
    ours_norms, their_norms = ours_json.get("norms", []), theirs_json.get("norms", [])
    if len(ours_norms) != len(their_norms):
        problems.append(f"{len(ours_norms)} grad norms in ours, {len(their_norms)} in fsdp2")
    for step, (na, nb) in enumerate(zip(ours_norms, their_norms)):
        d = abs(na - nb)
        report["norm"] = max(report.get("norm", 0.0), d)
        report["ratio"] = max(report["ratio"], d / (atol + rtol * abs(nb)))
        if d > atol + rtol * abs(nb):
            problems.append(f"step {step} grad norm: ours {na!r}, fsdp2 {nb!r}, |diff| {d:.3g}")
    if ours_norms and rank == 0:
        report["norms"] = their_norms
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
                bound = atol + tensor_frac * b.double().abs().max().item() + rtol * expected.double().abs()
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
    atol, rtol, _ = tolerance(case)
    print(f"case {name}: {case.world} ranks, {case.steps} steps, tolerance |diff| <= {atol:g} + {rtol:g}|fsdp2|"
          + (f" ({MP_TOLERANCE_WHY})" if is_mixed_precision(case) else ""))
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
        for step in range(case.steps):
            oe, te = normalise_ours_events(oj["events"][step]), normalise_fsdp2_events(tj["events"][step])
            grads = sum(1 for k in tt if k.startswith(f"step/{step}/grad/"))
            good, known, msg = compare_collectives(oj["collectives"][step], tj["collectives"][step], case, grads)
            known_all.update(f"{k} (collectives)" for k in known)
            if not good:
                problems.append(f"step {step} collectives: {msg}")
            good, known, msg = compare_events(oe, te)
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
    norms = ""
    if "norms" in report:
        norms = (f", grad norms {report['norm']:.3g} (FSDP2's rank-0 norms "
                 f"{', '.join(f'{n:.4g}' for n in report['norms'])}, max_norm {case_lib.CLIP_MAX_NORM})")
    print(f"  max |diff| over ranks and steps: loss {report['loss']:.3g}, params {report['param']:.3g}, "
          f"grads {report['grad']:.3g}{norms}; worst element at {report['ratio']:.2g} of its tolerance")
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
