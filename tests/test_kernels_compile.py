"""Ahead-of-time compilation of the Triton kernels for sm_90 on the CPU (scripts/compile_kernels.py).

The interpreter the other kernel tests use never compiles a kernel, so compiler-only errors (e.g. a
global that is not tl.constexpr, which broke the learnable-alpha forward on the H100) pass them. These
tests compile a representative subset for an H100 target with the ptxas bundled in the triton wheel,
in a subprocess because the kernels must be imported without TRITON_INTERPRET (tests/conftest.py sets
it for this process). Skipped where ahead-of-time compilation is unavailable (the script exits 2).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compile_kernels.py"
UNAVAILABLE = 2  # the script's exit status when this platform cannot compile for CUDA ahead of time


def run_python(args, tmp_path):
    """Run python with src/ and scripts/ importable and TRITON_INTERPRET unset; skip when the script
    reports that ahead-of-time compilation is unavailable here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "scripts"), str(tmp_path)])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == UNAVAILABLE:
        pytest.skip(f"ahead-of-time Triton compilation unavailable on this platform: {proc.stdout.strip()}")
    return proc


def test_representative_kernels_compile_for_sm90(tmp_path):
    rows_path = tmp_path / "rows.json"
    proc = run_python([str(SCRIPT), "--subset", "smoke", "--jobs", "2", "--json", str(rows_path)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = json.loads(rows_path.read_text())
    assert all(r["ok"] for r in rows)
    specs = {(r["kernel"], r["spec"]) for r in rows}

    def compiled(kernel, *parts):
        return any(k == kernel and all(p in s.split() for p in parts) for k, s in specs)

    # the learnable-alpha backward, and a forward for each alpha branch
    assert compiled("_dq_kernel", "ALPHA_GRAD=1", "ALPHA_MODE=0")
    assert compiled("_dkdv_kernel", "ALPHA_MODE=0") and compiled("_prepare_kernel", "WITH_DELTA=1")
    for mode in (0, 1, 2):
        assert compiled("_solve_kernel", f"ALPHA_MODE={mode}")
        assert compiled("_output_kernel", f"ALPHA_MODE={mode}")
    assert compiled("_sweep_kernel", "CAUSAL=1")
    # GPU configuration, not the interpreter's (which upcasts bf16 operands): bf16 at D = 64 takes 64-row blocks
    # with 4 warps in every forward pass (kernels/launch.py)
    for kernel in ("_sweep_kernel", "_solve_kernel", "_output_kernel"):
        assert compiled(kernel, "bf16", "BLOCK_D=64", "BLOCK_M=64", "UPCAST=0", "w4s3" if kernel == "_sweep_kernel"
                        else "w4s2"), kernel
    # far key tiles bin one score per row when a Newton pass follows (16-bit training), two for inference
    assert compiled("_sweep_kernel", "bf16", "ALPHA_MODE=0", "FAR_SCORES=1")
    assert compiled("_sweep_kernel", "bf16", "ALPHA_MODE=1", "FAR_SCORES=2")
    # row-wise forward, backward with alpha gradient, loss forward and backward
    assert compiled("_entmax_rows_fwd_kernel", "IS_LOSS=0", "ALPHA_PER_ROW=1")
    assert compiled("_entmax_rows_bwd_kernel", "NEED_DALPHA=1")
    assert compiled("_entmax_rows_fwd_kernel", "IS_LOSS=1") and compiled("_entmax_rows_fwd_kernel", "WRITE_GRAD=1")
    # the largest tiles (float32, D = 256) fit the H100's shared memory (the script flags what does not)
    assert compiled("_dq_kernel", "fp32", "BD=256", "BN=32") and compiled("_dkdv_kernel", "fp32", "BD=256", "BM=32")
    assert compiled("_output_kernel", "fp32", "BLOCK_D=256")
    # the ptxas log and the compiled metadata were read
    assert all(r["registers"] and 0 < r["registers"] <= 255 for r in rows)
    assert all(r["shared_bytes"] is not None and r["spill_stores"] is not None for r in rows)


def test_compiler_only_error_is_reported(tmp_path):
    """A kernel reading a non-constexpr global runs in the interpreter but fails to compile: the script's
    compile path must report it as an error row, and accept the same kernel with a constexpr global."""
    (tmp_path / "probe_kernels.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        PLAIN = 0.5
        CONST = tl.constexpr(0.5)

        @triton.jit
        def scale_plain(X, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(X + offs, tl.load(X + offs, mask=offs < n) * PLAIN, mask=offs < n)

        @triton.jit
        def scale_const(X, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(X + offs, tl.load(X + offs, mask=offs < n) * CONST, mask=offs < n)
    '''))
    code = textwrap.dedent('''
        import json, sys
        import torch
        import compile_kernels as ck
        import probe_kernels as pk

        if ck.aot_unavailable_reason() is not None:
            print(ck.aot_unavailable_reason())
            sys.exit(2)
        target = ck.GPUTarget("cuda", 90, 32)
        x = torch.zeros(100)
        rows = []
        for kernel in (pk.scale_plain, pk.scale_const):
            plan = ck.plan_launch(ck.Launch(kernel, (x, 100), dict(BLOCK=128), "probe"), target)
            r = ck.compile_plan(plan, target)
            rows.append(dict(kernel=r.kernel, ok=r.ok, error=r.error, spec=r.spec))
        print(json.dumps(rows))
    ''')
    proc = run_python(["-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, const = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not plain["ok"] and "Cannot access global variable PLAIN" in plain["error"]
    assert const["ok"] and const["error"] == ""
    assert "BLOCK=128" in const["spec"].split()


def test_sass_count_lists_the_sweeps_instructions(tmp_path):
    """scripts/sass_count.py compiles and disassembles one kernel: the dense sweep's listing holds its tensor-core
    products and no float-to-int conversion per score (the histogram bins through common.MAGIC_ROUND); with
    --loops it finds the key-tile loop, which holds the products, and splits it into labelled segments."""
    proc = run_python([str(ROOT / "scripts" / "sass_count.py"), "--subset", "smoke", "--filter",
                       "attn bf16 D64 alpha=1.5 causal inference", "--kernel", "_sweep_kernel", "--top", "200",
                       "--loops"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = proc.stdout.splitlines()
    line = next(row for row in rows if " instructions; " in row)
    counts = dict(item.rsplit(" ", 1) for item in line.split("instructions; ")[1].split(", "))
    assert int(counts["HGMMA"]) > 0
    assert int(counts.get("F2I", 0)) < 16  # a handful outside the loop (index arithmetic), not one per score
    loop = next(row for row in rows if row.strip().startswith("loop of "))
    loop_counts = dict(item.rsplit(" ", 1) for item in loop.split("instructions: ")[1].split(", "))
    assert int(loop_counts["HGMMA"]) > 0 and int(loop.split()[2]) < int(line.split()[0])
    assert sum(row.startswith("    ") and "instructions (" in row for row in rows) >= 2
