"""Static instruction counts of the compiled entflash kernels, on a host without a GPU (developer tool).

    python scripts/sass_count.py --filter "attn bf16 D64 alpha=1.5 causal inference" [--kernel _sweep_kernel]
                                 [--arch 90] [--top 25] [--dump DIR]

Compiles the launches of the matching cases of scripts/compile_kernels.py (same cases, same constexprs) for
sm_<arch> with the ptxas bundled in the triton wheel, disassembles each cubin with the bundled nvdisasm, and
prints, per kernel specialization, the number of SASS instructions and the most frequent opcodes (with their
modifiers dropped). A static count is a proxy, not a timing: it weighs every instruction once, loop bodies and
prologues alike, and says nothing about latency or memory. It is useful to compare two versions of a kernel
whose loop body changed (e.g. how many per-score instructions a change removed); timings come from the GPU
(benchmarks/, scripts/kernel_dev.py). --dump writes each SASS listing to DIR.

--loops also lists each loop (a backward branch and the instructions from its target to it), largest first, and
splits the largest into segments at its labels, each with the branches it ends in: a tile loop whose boundary
tiles take a masking branch shows the interior tiles' path as the segments around it. The per-tile instruction
count of a 64 x 64 tile, divided by the 32 scores each of 128 threads holds, gives instructions per score.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compile_kernels  # noqa: E402  (pops TRITON_INTERPRET before triton is imported)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def nvdisasm_path() -> str:
    """The nvdisasm bundled with the triton wheel."""
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm")


def sass_of(cubin: bytes) -> str:
    """SASS listing of a cubin (nvdisasm)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
        path = handle.name
    try:
        return subprocess.run([nvdisasm_path(), "-c", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def opcode_counts(sass: str) -> collections.Counter:
    """Count of each SASS opcode (the mnemonic before the first '.') in a listing."""
    counts = collections.Counter()
    for match in _OPCODE.finditer(sass):
        counts[match.group(1)] += 1
    return counts


def instructions_and_labels(sass: str):
    """([(opcode, line)], {label: index of the instruction it precedes}) of a listing, in order."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        opcode = _OPCODE.search(line)
        if opcode:
            instructions.append((opcode.group(1), line.strip()))
    return instructions, labels


def loops(sass: str):
    """[(first, last)] instruction indices of each loop (a branch back to an earlier label), largest first, with
    the instruction list and labels of instructions_and_labels."""
    instructions, labels = instructions_and_labels(sass)
    found = []
    for index, (opcode, line) in enumerate(instructions):
        target = _BRANCH_TARGET.search(line) if opcode == "BRA" else None
        if target and target.group(1) in labels and labels[target.group(1)] <= index:
            found.append((labels[target.group(1)], index))
    return sorted(found, key=lambda span: span[0] - span[1]), instructions, labels


def _summary(counts: collections.Counter, top: int) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.most_common(top))


def print_loops(sass: str, top: int) -> None:
    """Each loop's size and opcodes, then the largest loop's segments between labels and the branches in them."""
    spans, instructions, labels = loops(sass)
    for first, last in spans:
        if last > first:
            counts = collections.Counter(op for op, _ in instructions[first:last + 1])
            print(f"  loop of {last - first + 1} instructions: {_summary(counts, top)}")
    if not spans or spans[0][1] == spans[0][0]:
        return
    first, last = spans[0]
    cuts = sorted({first, last + 1} | {i for i in labels.values() if first < i <= last})
    names = {index: name for name, index in labels.items()}
    for start, end in zip(cuts, cuts[1:]):
        segment = instructions[start:end]
        branches = [f"@{i} {line.split(';')[0].split('*/')[-1].strip()}" for i, (op, line) in enumerate(segment)
                    if op == "BRA"]
        print(f"    {names.get(start, 'loop start')}: {len(segment)} instructions "
              f"({_summary(collections.Counter(op for op, _ in segment), 6)})"
              + (f"; branches {'; '.join(branches)}" if branches else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", required=True, help="regex over scripts/compile_kernels.py's case names")
    parser.add_argument("--subset", default="full", choices=("full", "smoke"))
    parser.add_argument("--kernel", default="", help="regex over kernel names (default: all)")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--top", type=int, default=25, help="opcodes listed per kernel")
    parser.add_argument("--dump", type=Path, help="folder for the SASS listings")
    parser.add_argument("--loops", action="store_true", help="also each loop and the largest loop's segments")
    args = parser.parse_args(argv)

    target = GPUTarget("cuda", args.arch, compile_kernels.WARP_SIZE)
    selected = [(n, f) for n, f in compile_kernels.cases(args.subset) if re.search(args.filter, n)]
    if not selected:
        print("no case matches --filter", file=sys.stderr)
        return 1
    plans = [p for p in compile_kernels.collect_plans(selected, target) if re.search(args.kernel, p.kernel.__name__)]
    for plan in plans:
        compiled = triton.compile(ASTSource(plan.kernel, plan.signature, plan.constexprs, plan.attrs),
                                  target=target, options=plan.options)
        sass = sass_of(compiled.asm["cubin"])
        counts = opcode_counts(sass)
        print(f"{plan.kernel.__name__}  [{plan.case}]  {plan.spec}")
        print(f"  {sum(counts.values())} instructions; " + _summary(counts, args.top))
        if args.loops:
            print_loops(sass, args.top)
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{plan.kernel.__name__}-{abs(hash(plan.spec)) % 10 ** 8}.sass").write_text(sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())
