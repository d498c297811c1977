#!/usr/bin/env python3
"""Compares the libtorch ops of two Chrome traces (ours and PyTorch's, from `bench --profile`) op
by op, with the dtypes they ran in.

Usage: trace_ops.py OURS.json THEIRS.json [ROWS]

Both sides record input shapes and dtypes (our profiler and the peer's `record_shapes=True`), so
each op is keyed by its name and its inputs' dtypes: "aten::add f32,bf16" is an f32 tensor plus
a bf16 one, "aten::copy_ f32,bf16" a bf16 tensor copied into an f32 one (an upcast), and
"aten::native_layer_norm bf16,f32,f32" a layer norm reading bf16. For each key, on each side: how
many times it ran, its self time (the op's time less the ops it called, so time is counted once)
and the elements of its largest input, summed (an op recorded inside one of its own name, as
autocast's wrapper records a product it calls again, is counted once, with the dtypes of the
innermost call). Op counts include each side's own bookkeeping records (PyTorch's autograd engine
shows up as `autograd::engine::...` and `...Backward0` rows, ours does not). Ops whose count, dtype or elements differ are
where one side does work the other does not; on the CPU the same dtype flow means the same
kernels on a GPU, so a mismatch found here is worth fixing before a GPU is at hand. Rows are
sorted by the larger side's self time; ROWS (default 40) of them are printed.
"""

import collections
import json
import math
import sys

DTYPES = {"c10::BFloat16": "bf16", "c10::Half": "f16", "float": "f32", "double": "f64",
          "long int": "i64", "int": "i32", "bool": "bool"}


def ops_with_self_time(path):
    """The trace's CPU ops, each with `self`: its duration less that of the ops nested in it."""
    with open(path) as trace:
        events = json.load(trace)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    by_thread = collections.defaultdict(list)
    for event in events:
        if event.get("cat") == "cpu_op" and "dur" in event:
            by_thread[event["tid"]].append(event)
    ops = []
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_ops = []
        for event in thread:
            event["self"] = event["dur"]
            while open_ops and open_ops[-1]["ts"] + open_ops[-1]["dur"] <= event["ts"]:
                open_ops.pop()
            if open_ops:
                open_ops[-1]["self"] -= event["dur"]
                # An op directly inside one of its own name is one call recorded twice (autocast
                # casting the arguments, then calling the op again): counted once, as the outer.
                event["repeat_of"] = open_ops[-1] if open_ops[-1]["name"] == event["name"] else None
            open_ops.append(event)
        for event in reversed(thread):  # inner ones first, so chains fold into the outermost
            outer = event.get("repeat_of")
            if outer is not None:
                outer["self"] += event["self"]
                # Keyed by the innermost call's inputs: what the kernel ran on (autocast's outer
                # record still carries the f32 inputs it then cast).
                outer["args"] = event.get("args", {})
        ops += [event for event in thread if event.get("repeat_of") is None]
    return ops


def key_and_elements(event):
    args = event.get("args", {})
    dtypes = [DTYPES.get(t, t) for t in args.get("Input type", [])
              if t not in ("", "Scalar", "ScalarList")]
    shapes = [dims for dims in args.get("Input Dims", [])
              if dims and all(isinstance(d, int) for d in dims)]
    elements = max((math.prod(dims) for dims in shapes), default=0)
    return (event["name"], ",".join(dtypes[:3])), elements


def totals(path):
    """(name, dtypes) -> [count, self ms, elements]."""
    table = collections.defaultdict(lambda: [0, 0.0, 0])
    for event in ops_with_self_time(path):
        key, elements = key_and_elements(event)
        row = table[key]
        row[0] += 1
        row[1] += event["self"] / 1000
        row[2] += elements
    return table


def main():
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    ours, theirs = totals(sys.argv[1]), totals(sys.argv[2])
    rows = int(sys.argv[3]) if len(sys.argv) == 4 else 40
    empty = [0, 0.0, 0]
    keys = sorted(set(ours) | set(theirs),
                  key=lambda k: -max(ours.get(k, empty)[1], theirs.get(k, empty)[1]))
    print(f"{'op':<58}{'dtypes':<16}{'ours':>7}{'ms':>9}{'Melem':>9}  |"
          f"{'theirs':>7}{'ms':>9}{'Melem':>9}")
    for key in keys[:rows]:
        a, b = ours.get(key, empty), theirs.get(key, empty)
        mark = "" if (a[0], a[2]) == (b[0], b[2]) else "  *"
        print(f"{key[0][:57]:<58}{key[1][:15]:<16}{a[0]:>7}{a[1]:>9.2f}{a[2] / 1e6:>9.2f}  |"
              f"{b[0]:>7}{b[1]:>9.2f}{b[2] / 1e6:>9.2f}{mark}")
    for label, table in (("ours", ours), ("theirs", theirs)):
        count = sum(row[0] for row in table.values())
        ms = sum(row[1] for row in table.values())
        print(f"{label}: {count} ops, {ms:.2f} ms of self time")
    print("* count or elements differ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
