"""Compile every entflash Triton kernel ahead of time for a GPU target, on a host without a GPU.

The CPU tests run kernels through Triton's interpreter (TRITON_INTERPRET=1), which never compiles them,
so errors only the compiler sees (a global that is not tl.constexpr, a type clash inside one constexpr
branch, an unsupported op) reach a GPU untested. This script finds them on the CPU:

1. it runs the real launchers (the autograd path of entflash.autograd.triton_attention, the forward
   entmax_forward, the row-wise entmax and loss Functions) on small CPU tensors, with every launch of an
   entflash kernel intercepted instead of run, so the constexprs, launch options and argument
   specializations are exactly the ones the launchers choose on a GPU (the launchers pick their tiles from
   entflash.kernels.launch.interpreting(), which is false here, never from the tensors' device);
2. each distinct launch is compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
   32)): the CUDA backend lowers to PTX and assembles it with the ptxas bundled in the triton wheel, so
   no driver and no GPU are needed;
3. it prints one row per compiled specialization: kernel, the case that first launched it, its constexprs,
   ok/error, registers and spill bytes (from the ptxas log), shared memory (bytes, from the compiled
   metadata) and compile seconds; errors are printed in full below the table. A kernel needing more
   shared memory than the target offers (SHARED_LIMIT) is an error too: it would fail at launch.

Usage:
    python scripts/compile_kernels.py [--subset full|smoke] [--arch 90] [--jobs N] [--filter REGEX]
                                      [--json PATH]
Exit status: 0 when every kernel compiled, 1 when one failed, 2 when ahead-of-time compilation is
unavailable on this platform (the reason is printed). TRITON_INTERPRET is ignored (removed at start).
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # interpreted kernels cannot be compiled: decide before imports

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Callable, List, Optional  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

WARP_SIZE = 32
# Largest dynamic shared memory per block (bytes, opt-in) by compute capability; a kernel needing more
# compiles but fails at launch with triton.runtime.errors.OutOfResources, so the table marks it an error.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


# ----------------------------------------------------------------------------------------------
# capturing launches
# ----------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One intercepted `kernel[grid](*args, **kwargs)` call and the case that made it."""
    kernel: JITFunction
    args: tuple
    kwargs: dict
    case: str


def _entflash_kernels() -> List[JITFunction]:
    """Every @triton.jit function defined in entflash.kernels (launched kernels and jit helpers)."""
    import importlib
    import pkgutil

    import entflash.kernels as pkg

    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, JITFunction) and value.__module__ == module.__name__ and value not in found:
                found.append(value)
    return found


@contextlib.contextmanager
def intercept_launches(sink: List[Launch], case: str):
    """Within the block, a launch of any entflash kernel appends a Launch to `sink` and runs nothing.

    Output tensors of intercepted launches stay as allocated (uninitialized), which the host code of
    the launchers never inspects beyond shapes, so whole forward + backward passes can be traced."""
    kernels = _entflash_kernels()

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            sink.append(Launch(kernel, args, kwargs, case))
        return run

    for kernel in kernels:
        kernel.run = recorder(kernel)
    try:
        yield
    finally:
        for kernel in kernels:
            del kernel.run  # back to JITFunction.run


# ----------------------------------------------------------------------------------------------
# compiling one launch
# ----------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What triton.compile needs for one launch, plus a readable description and a dedupe key."""
    kernel: JITFunction
    case: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    spec: str
    key: str


def plan_launch(launch: Launch, target: GPUTarget) -> Plan:
    """Turn an intercepted launch into the compile inputs the JIT would build on a `target` GPU.

    Mirrors JITFunction.run: bind the arguments with the backend's specialization rules (pointer
    dtypes, 16-byte alignment, integer divisibility), then JITFunction._pack_args for the signature,
    constexprs, attributes and options."""
    kernel = launch.kernel
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    declared = [p.name for p in kernel.params if p.is_constexpr]
    named = {kernel.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    first_ptr = next((t for t in signature.values() if isinstance(t, str) and t.startswith("*")), "")
    parts = [first_ptr.lstrip("*")] + [f"{n}={_short(named[n])}" for n in declared if n in named]
    parts.append(f"w{options.num_warps}s{options.num_stages}")
    spec = " ".join(parts)
    key = f"{kernel.__name__}|{signature}|{sorted(constexprs.items())}|{sorted(attrs.items())}|{options}"
    return Plan(kernel, launch.case, signature, constexprs, attrs, dict(options.__dict__), spec, key)


def _short(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


@dataclass
class Result:
    """One row of the table."""
    kernel: str
    case: str
    spec: str
    ok: bool
    error: str
    registers: Optional[int]
    spill_stores: Optional[int]
    spill_loads: Optional[int]
    shared_bytes: Optional[int]
    seconds: float


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_plan(plan: Plan, target: GPUTarget) -> Result:
    """Compile one plan for `target` (always afresh, never from Triton's cache) and summarize it."""
    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(plan.kernel, plan.signature, plan.constexprs, plan.attrs),
                                      target=target, options=plan.options)
    except Exception as err:  # any compiler failure is a finding to report, not a crash
        return Result(plan.kernel.__name__, plan.case, plan.spec, False, f"{type(err).__name__}: {err}",
                      None, None, None, None, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spill = _PTXAS_SPILL.search(text)
    shared = int(compiled.metadata.shared)
    limit = SHARED_LIMIT.get(target.arch)
    error = ""
    if limit is not None and shared > limit:
        error = (f"OutOfResources at launch: needs {shared} bytes of shared memory, sm_{target.arch} allows "
                 f"{limit}")
    return Result(plan.kernel.__name__, plan.case, plan.spec, not error, error,
                  int(regs.group(1)) if regs else None,
                  int(spill.group(1)) if spill else None, int(spill.group(2)) if spill else None,
                  shared, seconds)


# ----------------------------------------------------------------------------------------------
# cases: the launchers' real entry points on small CPU tensors
# ----------------------------------------------------------------------------------------------
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def attention_case(dtype, D, alpha="1.5", alpha_grad=False, causal=True, window=None, seqlens=False,
                   heads=(2, 2), grad=True, fold=True) -> Callable[[], None]:
    """Forward (+ backward when grad) of entmax attention through entflash.autograd.triton_attention.

    alpha: "1.5", "2", "1.3" (python floats) or "heads" (a (Hq,) tensor, with a gradient when
    alpha_grad); heads: (Hq, Hkv); grad=False traces the inference forward (no saved tensors);
    fold=False (only with grad=False) calls entmax_forward directly with its normalization close."""
    def run():
        from entflash.autograd import triton_attention
        from entflash.kernels.forward import entmax_forward

        Hq, Hkv = heads
        N = 256
        q = torch.zeros(1, Hq, N, D, dtype=dtype, requires_grad=grad)
        k = torch.zeros(1, Hkv, N, D, dtype=dtype, requires_grad=grad)
        v = torch.zeros(1, Hkv, N, D, dtype=dtype, requires_grad=grad)
        a = (torch.full((Hq,), 1.4, requires_grad=alpha_grad) if alpha == "heads" else float(alpha))
        lens = torch.tensor([N - 5], dtype=torch.int32) if seqlens else None
        if not fold:
            entmax_forward(q, k, v, a, causal, None, window, lens, lens, save_bwd=False, fold=False)
            return
        with torch.set_grad_enabled(grad):
            out = triton_attention(q, k, v, a, causal, D ** -0.5, window, lens, lens, False)
        if grad:
            out.float().sum().backward()
    return run


def rowwise_case(dtype, n_cols, alpha="1.5", alpha_grad=False, loss=False) -> Callable[[], None]:
    """Forward + backward of the fused row-wise entmax (or of the entmax loss when loss) on 4 rows of
    n_cols (n_cols > 32768 takes the chunked multi-sweep path). alpha: "1.5", "2", "1.3" or "rows" (a
    per-row tensor, with a gradient when alpha_grad)."""
    def run():
        from entflash.kernels.rowwise import fused_entmax, fused_entmax_loss

        x = torch.zeros(4, n_cols, dtype=dtype, requires_grad=True)
        if loss:
            out = fused_entmax_loss(x, torch.zeros(4, dtype=torch.int64), float(alpha), label_smoothing=0.1)
        else:
            a = torch.full((4, 1), 1.4, requires_grad=alpha_grad) if alpha == "rows" else float(alpha)
            out = fused_entmax(x, a, dim=-1)
        out.float().sum().backward()
    return run


def cases(subset: str):
    """(name, callable) pairs.

    "full": every dtype x head dim (64, 128) x alpha branch x mask feature, one learnable-alpha case at
    head dim 256 (its own tile configuration), plus the row-wise kernels. "smoke": the learnable-alpha
    backward, one forward per alpha branch and the row-wise forward/backward/loss at bf16 and D = 64,
    and the largest tiles (float32, D = 256)."""
    out = []
    if subset == "smoke":
        bf16 = torch.bfloat16
        out += [("attn bf16 D64 alpha=heads+grad causal", attention_case(bf16, 64, "heads", alpha_grad=True)),
                ("attn bf16 D64 alpha=1.5 causal inference", attention_case(bf16, 64, "1.5", grad=False)),
                ("attn bf16 D64 alpha=2 causal inference", attention_case(bf16, 64, "2", grad=False)),
                ("attn fp32 D256 alpha=heads+grad causal",
                 attention_case(torch.float32, 256, "heads", alpha_grad=True)),
                ("rows bf16 n=1000 alpha=rows+grad", rowwise_case(bf16, 1000, "rows", alpha_grad=True)),
                ("loss bf16 n=1000 alpha=1.5", rowwise_case(bf16, 1000, "1.5", loss=True))]
        return out
    for dname, dtype in DTYPES.items():
        for D in (64, 128):
            tag = f"attn {dname} D{D}"
            for alpha in ("1.5", "2", "1.3"):
                out.append((f"{tag} alpha={alpha} causal", attention_case(dtype, D, alpha)))
            out += [
                (f"{tag} alpha=heads causal", attention_case(dtype, D, "heads")),
                (f"{tag} alpha=heads+grad causal", attention_case(dtype, D, "heads", alpha_grad=True)),
                (f"{tag} alpha=1.5 non-causal", attention_case(dtype, D, causal=False)),
                (f"{tag} alpha=1.5 causal window=(64,None)", attention_case(dtype, D, window=(64, None))),
                (f"{tag} alpha=1.5 window=(16,16)", attention_case(dtype, D, causal=False, window=(16, 16))),
                (f"{tag} alpha=1.5 causal seqlens", attention_case(dtype, D, seqlens=True)),
                (f"{tag} alpha=1.5 causal inference", attention_case(dtype, D, grad=False)),
                (f"{tag} alpha=1.5 inference fold=False", attention_case(dtype, D, grad=False, fold=False)),
                (f"{tag} GQA 4/2 alpha=heads+grad window=(32,8) seqlens",
                 attention_case(dtype, D, "heads", alpha_grad=True, causal=False, window=(32, 8), seqlens=True,
                                heads=(4, 2))),
            ]
        out.append((f"attn {dname} D256 alpha=heads+grad causal", attention_case(dtype, 256, "heads", alpha_grad=True)))
        for n_cols in (1000, 40000):
            tag = f"{dname} n={n_cols}"
            for alpha in ("1.5", "2", "1.3"):
                out.append((f"rows {tag} alpha={alpha}", rowwise_case(dtype, n_cols, alpha)))
            out.append((f"rows {tag} alpha=rows+grad", rowwise_case(dtype, n_cols, "rows", alpha_grad=True)))
            for alpha in ("1.5", "1.3"):
                out.append((f"loss {tag} alpha={alpha}", rowwise_case(dtype, n_cols, alpha, loss=True)))
    return out


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def aot_unavailable_reason() -> Optional[str]:
    """None when this platform can compile for a CUDA target ahead of time, else why not."""
    from triton.backends import backends

    if "nvidia" not in backends:
        return "this triton build has no NVIDIA backend"
    try:
        triton.knobs.nvidia.ptxas.version  # runs the bundled ptxas --version
    except Exception as err:  # missing binary, wrong platform (the wheel's ptxas is linux x86-64/aarch64)
        return f"the ptxas bundled with triton does not run here: {type(err).__name__}: {err}"
    return None


def collect_plans(selected, target: GPUTarget) -> List[Plan]:
    """Trace every case, plan each launch, keep the first plan of every distinct specialization."""
    plans, seen = [], set()
    for name, run in selected:
        launches: List[Launch] = []
        with intercept_launches(launches, name):
            run()
        for launch in launches:
            plan = plan_launch(launch, target)
            if plan.key not in seen:
                seen.add(plan.key)
                plans.append(plan)
    return plans


_PLANS: List[Plan] = []
_TARGET: Optional[GPUTarget] = None


def _compile_index(i: int) -> Result:
    return compile_plan(_PLANS[i], _TARGET)


def compile_all(plans: List[Plan], target: GPUTarget, jobs: int) -> List[Result]:
    """Compile the plans, in `jobs` forked worker processes when jobs > 1; results in plan order."""
    global _PLANS, _TARGET
    _PLANS, _TARGET = plans, target
    if jobs <= 1 or len(plans) <= 1:
        return [_compile_index(i) for i in range(len(plans))]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_index, range(len(plans)), chunksize=1)


def format_table(results: List[Result]) -> str:
    """The results as a fixed-width text table (regs: registers per thread; spills: store/load bytes;
    smem: shared memory bytes; s: compile seconds)."""
    head = ("kernel", "case", "specialization", "status", "regs", "spills", "smem", "s")
    rows = []
    for r in results:
        spills = "" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        rows.append((r.kernel, r.case, r.spec, "ok" if r.ok else "ERROR",
                     "" if r.registers is None else str(r.registers), spills,
                     "" if r.shared_bytes is None else str(r.shared_bytes), f"{r.seconds:.1f}"))
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", choices=("full", "smoke"), default="full")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100), 80")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--filter", default="", help="only cases whose name matches this regex")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    reason = aot_unavailable_reason()
    if reason is not None:
        print(f"ahead-of-time compilation unavailable: {reason}")
        return 2
    target = GPUTarget("cuda", args.arch, WARP_SIZE)
    selected = [(n, f) for n, f in cases(args.subset) if re.search(args.filter, n)]
    start = time.perf_counter()
    plans = collect_plans(selected, target)
    results = compile_all(plans, target, args.jobs)
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"\n=== {r.kernel} [{r.case}] {r.spec}\n{r.error}")
    print(f"\n{len(results)} specializations from {len(selected)} cases for sm_{args.arch}: "
          f"{len(results) - len(failed)} ok, {len(failed)} failed, {time.perf_counter() - start:.0f} s wall")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
