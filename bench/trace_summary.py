#!/usr/bin/env python3
"""Sums the GPU kernels of Chrome traces (from `bench --profile`, ours and PyTorch's) by kind.

Usage: trace_summary.py TRACE.json [TRACE.json ...]

For each trace: the number of kernels, their total time, and that time by kind (matrix
products, attention, layer norm, softmax and cross-entropy, the optimizer, reductions, casts and
copies, other elementwise work), then the kernels that took longest. Kinds are read from kernel
names (cuBLAS, CUTLASS and PyTorch's own), first match wins. Which ops ran, in which dtypes,
side by side: trace_ops.py.
"""

import collections
import json
import re
import sys

KINDS = [
    ("attention", r"fmha|flash|attention|efficient_attention"),
    ("matrix products", r"gemm|cutlass|xmma|nvjet|cublas|s\d+gemm|wgmma"),
    ("layer norm", r"layer_norm|LayerNorm"),
    ("softmax / cross-entropy", r"softmax|nll_loss|cross_entropy|log_softmax"),
    ("optimizer", r"adam|Adam|multi_tensor"),
    ("reductions", r"reduce_kernel|Reduce"),
    ("casts and copies", r"copy|cast|Copy|convert"),
    ("elementwise", r"elementwise|Elementwise|Functor|functor"),
]


def kind(name):
    for label, pattern in KINDS:
        if re.search(pattern, name):
            return label
    return "other"


def summary(path):
    with open(path) as trace:
        events = json.load(trace)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    total = sum(e["dur"] for e in kernels) / 1000
    by_kind = collections.Counter()
    by_name = collections.Counter()
    for e in kernels:
        by_kind[kind(e["name"])] += e["dur"] / 1000
        by_name[e["name"][:110]] += e["dur"] / 1000
    ops = sum(1 for e in events if e.get("cat") == "cpu_op")
    print(f"{path}: {ops} ops, {len(kernels)} kernels, {total:.2f} ms of GPU time")
    for label, ms in by_kind.most_common():
        print(f"  {label:<24} {ms:8.2f} ms  {100 * ms / max(total, 1e-9):5.1f}%")
    print("  longest:")
    for name, ms in by_name.most_common(8):
        print(f"    {ms:8.2f} ms  {name}")


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    for path in sys.argv[1:]:
        summary(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
