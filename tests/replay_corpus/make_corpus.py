#!/usr/bin/env python3
"""Writes the replay parser's corpus: small valid traces (valid_*.jsonl, which
must parse) and hostile ones (bad_*.jsonl, which must be refused with one
"trace line N: ..." error). tests/replay_test.cpp runs the parser and the
check on every file here. Rerun after changing a case:
    python3 tests/replay_corpus/make_corpus.py
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def header(world=2, schema="fsdpsim.trace", version=1):
    return json.dumps({"schema": schema, "version": version, "world_size": world}, separators=(",", ":"))


def coll(id, rank, seq, op="all_gather", n=2, inn=2, out=4, dtype="Float", group="world", ranks=None,
         status="completed", reduce_op="sum", root=0, issue=1000, start=1100, end=1200, lc=None, error=""):
    ranks = list(range(n)) if ranks is None else ranks
    lc_issue = lc if lc is not None else 2 * seq - 1
    e = {"id": id, "rank": rank, "kind": "collective", "name": op, "detail": op, "group": group,
         "group_ranks": ranks, "seq": seq, "op": op, "dtype": dtype, "in_numel": inn, "out_numel": out,
         "reduce_op": reduce_op, "root": root, "issue_ns": issue, "start_ns": start if status != "in_flight" else 0,
         "end_ns": end if status != "in_flight" else 0, "logical_clock_issue": lc_issue,
         "logical_clock_end": lc_issue + 1 if status != "in_flight" else 0, "status": status, "error": error}
    return e


def line(obj):
    return json.dumps(obj, separators=(",", ":"))


def engine(id, rank, kind="unshard", start=500, end=900, lc=1):
    return {"id": id, "rank": rank, "kind": kind, "name": "layer0", "detail": "forward", "issue_ns": start,
            "start_ns": start, "end_ns": end, "logical_clock_issue": lc, "logical_clock_end": lc,
            "status": "completed", "error": ""}


def base_events():
    return [
        coll(0, 0, 1), coll(1, 1, 1),
        coll(2, 0, 2, op="all_reduce", inn=8, out=8), coll(3, 1, 2, op="all_reduce", inn=8, out=8),
        coll(4, 0, 3, op="reduce_scatter", inn=4, out=2), coll(5, 1, 3, op="reduce_scatter", inn=4, out=2),
        coll(6, 0, 4, op="broadcast", inn=3, out=3, root=1), coll(7, 1, 4, op="broadcast", inn=3, out=3, root=1),
        coll(8, 0, 5, op="barrier", inn=0, out=0), coll(9, 1, 5, op="barrier", inn=0, out=0),
    ]


def text(lines):
    return "".join(l + "\n" for l in lines)


def trace(events, **kw):
    return text([header(**kw)] + [line(e) for e in events])


def group_line(name="world", ranks=(0, 1)):
    return line({"kind": "group", "group": name, "group_ranks": list(ranks)})


def v2_events():
    """base_events() as version 2 writes them: no group_ranks on records."""
    out = []
    for e in base_events():
        e = dict(e)
        e.pop("group_ranks", None)
        out.append(e)
    return out


cases = {}

# --- valid -------------------------------------------------------------------
cases["valid_clean.jsonl"] = trace(base_events())
cases["valid_header_only.jsonl"] = text([header()])
cases["valid_engine_events.jsonl"] = trace([engine(10, 0), engine(11, 1)] + base_events())
cases["valid_world1.jsonl"] = trace([coll(0, 0, 1, n=1, inn=3, out=3)], world=1)
cases["valid_zero_elements.jsonl"] = trace([coll(0, 0, 1, inn=0, out=0), coll(1, 1, 1, inn=0, out=0)])
cases["valid_bfloat16.jsonl"] = trace([coll(0, 0, 1, dtype="BFloat16"), coll(1, 1, 1, dtype="BFloat16")])
# Well formed, with problems the check reports (not parse errors).
cases["valid_op_mismatch.jsonl"] = trace([coll(0, 0, 1), coll(1, 1, 1, op="reduce_scatter", inn=4, out=2)])
cases["valid_size_mismatch.jsonl"] = trace([coll(0, 0, 1), coll(1, 1, 1, inn=3, out=6)])
cases["valid_dtype_mismatch.jsonl"] = trace([coll(0, 0, 1), coll(1, 1, 1, dtype="Half")])
cases["valid_missing_rank.jsonl"] = trace([coll(0, 0, 1), coll(1, 1, 1), coll(2, 0, 2, status="in_flight")])
cases["valid_failed.jsonl"] = trace([coll(0, 0, 1, status="failed", error="peer died"),
                                     coll(1, 1, 1, status="failed", error="peer died")])
cases["valid_in_flight.jsonl"] = trace([coll(0, 0, 1, status="in_flight"), coll(1, 1, 1, status="in_flight")])
cases["valid_huge_numel.jsonl"] = trace([coll(0, 0, 1, op="all_reduce", inn=10**15, out=10**15),
                                         coll(1, 1, 1, op="all_reduce", inn=10**15, out=10**15)])
cases["valid_subgroups.jsonl"] = trace([
    coll(0, 0, 1, n=4, inn=1, out=4), coll(1, 1, 1, n=4, inn=1, out=4), coll(2, 2, 1, n=4, inn=1, out=4),
    coll(3, 3, 1, n=4, inn=1, out=4),
    coll(4, 0, 1, group="world/split1.0", ranks=[0, 1], inn=2, out=4),
    coll(5, 1, 1, group="world/split1.0", ranks=[0, 1], inn=2, out=4),
    coll(6, 2, 1, group="world/split1.1", ranks=[2, 3], inn=2, out=4),
    coll(7, 3, 1, group="world/split1.1", ranks=[2, 3], inn=2, out=4)], world=4)
cases["valid_crlf.jsonl"] = trace(base_events()).replace("\n", "\r\n")
cases["valid_late_start.jsonl"] = trace([coll(0, 0, 7), coll(1, 1, 7), coll(2, 0, 8), coll(3, 1, 8)])

# Version 2: each group's ranks on one line before its first record.
cases["valid_v2_groups.jsonl"] = text([header(version=2), group_line()] + [line(e) for e in v2_events()])

# --- hostile -----------------------------------------------------------------
cases["bad_v2_undefined_group.jsonl"] = text([header(version=2)] + [line(e) for e in v2_events()])
cases["bad_v2_group_twice.jsonl"] = text([header(version=2), group_line(), group_line(ranks=(1, 0))] +
                                         [line(e) for e in v2_events()])
cases["bad_v2_group_line_in_v1.jsonl"] = text([header(), group_line()] + [line(e) for e in base_events()])
cases["bad_empty.jsonl"] = ""
cases["bad_blank_line.jsonl"] = text([header(), ""])
cases["bad_schema.jsonl"] = trace(base_events(), schema="torch.fr")
cases["bad_version.jsonl"] = trace(base_events(), version=9)
cases["bad_world_zero.jsonl"] = trace([], world=0)
cases["bad_header_array.jsonl"] = "[1,2,3]\n"
cases["bad_binary.jsonl"] = header() + "\n" + "\x00\x01\x02\xff\xfe garbage \x7f\x80\n"
cases["bad_truncated.jsonl"] = trace(base_events())[:-40]
cases["bad_truncated_header.jsonl"] = header()[:20]
ev = base_events(); ev[1]["in_numel"] = "2"
cases["bad_string_numel.jsonl"] = trace(ev)
ev = base_events(); ev[1]["in_numel"] = -2; ev[1]["out_numel"] = -4
cases["bad_negative_numel.jsonl"] = trace(ev)
ev = base_events(); ev[1]["in_numel"] = 1e15; ev[0]["in_numel"] = 1e15
cases["bad_float_numel.jsonl"] = trace(ev)
ev = base_events(); ev[1]["in_numel"] = 10**30
cases["bad_overflow_numel.jsonl"] = trace(ev)
ev = base_events(); ev[0]["op"] = "all_to_all"
cases["bad_unknown_op.jsonl"] = trace(ev)
ev = base_events(); ev[0]["dtype"] = "Float128"
cases["bad_unknown_dtype.jsonl"] = trace(ev)
ev = base_events(); ev[2]["seq"] = 1
cases["bad_duplicate_seq.jsonl"] = trace(ev)
ev = base_events(); ev[4]["seq"] = 1
cases["bad_seq_backwards.jsonl"] = trace(ev)
ev = base_events(); ev[0]["seq"] = 0; ev[1]["seq"] = 0
cases["bad_seq_zero.jsonl"] = trace(ev)
ev = base_events(); ev[0]["rank"] = 5
cases["bad_rank_outside.jsonl"] = trace(ev)
ev = base_events(); ev[0]["group_ranks"] = [0, 0]
cases["bad_group_ranks_twice.jsonl"] = trace(ev)
ev = base_events(); ev[3]["group_ranks"] = [1, 0]
cases["bad_group_changes.jsonl"] = trace(ev)
ev = base_events(); ev[0]["out_numel"] = 5
cases["bad_all_gather_size.jsonl"] = trace(ev)
ev = base_events(); ev[4]["in_numel"] = 5
cases["bad_reduce_scatter_size.jsonl"] = trace(ev)
ev = base_events(); ev[2]["out_numel"] = 9
cases["bad_all_reduce_size.jsonl"] = trace(ev)
ev = base_events(); ev[8]["in_numel"] = 1
cases["bad_barrier_size.jsonl"] = trace(ev)
ev = base_events(); ev[0]["extra"] = 1
cases["bad_unknown_field.jsonl"] = trace(ev)
ev = base_events(); del ev[0]["status"]
cases["bad_missing_field.jsonl"] = trace(ev)
ev = base_events(); ev[1]["id"] = 0
cases["bad_duplicate_id.jsonl"] = trace(ev)
ev = base_events(); ev[0]["status"] = "done"
cases["bad_status.jsonl"] = trace(ev)
ev = base_events(); ev[6]["root"] = 2
cases["bad_root.jsonl"] = trace(ev)
cases["bad_deep_nesting.jsonl"] = header() + "\n" + "[" * 100 + "]" * 100 + "\n"
cases["bad_not_object.jsonl"] = header() + "\n42\n"
cases["bad_nul_in_string.jsonl"] = header() + "\n" + line(base_events()[0])[:-2] + "\\u0000\"}\n"

if __name__ == "__main__":
    for old in os.listdir(HERE):
        if old.endswith(".jsonl"):
            os.remove(os.path.join(HERE, old))
    for name, content in sorted(cases.items()):
        with open(os.path.join(HERE, name), "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            f.write(content)
    print(f"wrote {len(cases)} files to {HERE}")
