"""Off-device resource check of the sLSTM Triton kernels: compile for sm_90 (no GPU needed) and
print shared memory, registers and spill stack per launch shape, so launch defaults can be
chosen before device time is spent. --ir DIR also writes each variant's TTGIR and PTX there
(to see whether the resident R slice leaves the time loop's body).

    python benchmarks/slstm_compile.py [--dtype bf16|fp32] [--D 256] [--ir DIR]
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastxlstm.ops.slstm.triton.bwd import slstm_bwd_kernel
from fastxlstm.ops.slstm.triton.fwd import slstm_fwd_kernel

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
INTS = ("B", "T", "H", "D", "tile0")


def compile_sm90(kernel, ptr_types: list[str], constexprs: dict, num_warps: int, ir: Path | None, tag: str):
    sig = {}
    for i, name in enumerate(kernel.arg_names):
        sig[name] = ptr_types[i] if i < len(ptr_types) else ("i32" if name in INTS else "constexpr")
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(ptr_types))}   # as the JIT marks aligned tensors
    k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 64), options=dict(num_warps=num_warps))
    if ir is not None:
        (ir / f"{tag}.ttgir").write_text(k.asm["ttgir"])
        (ir / f"{tag}.ptx").write_text(k.asm["ptx"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
    regs = next((line.split()[0:2] for line in usage.splitlines() if "REG:" in line), ["?", "?"])
    return k.metadata.shared, " ".join(item.strip() for item in regs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--ir", type=Path, default=None)
    p.add_argument("--bb", default="16,32,64")
    p.add_argument("--bn", default="16,32")
    p.add_argument("--warps", default="2,4,8")
    args = p.parse_args()
    if args.ir:
        args.ir.mkdir(parents=True, exist_ok=True)
    dt = f"*{args.dtype}"
    fwd_ptrs = [dt, dt] + ["*fp32"] * 4 + [dt] + ["*fp32"] * 9 + [dt, "*i32"]
    bwd_ptrs = [dt] + ["*fp32"] * 4 + [dt] + ["*fp32"] * 9 + [dt, "*i32"]
    ints = lambda s: [int(v) for v in s.split(",")]   # noqa: E731
    for bb, bn, nw in itertools.product(ints(args.bb), ints(args.bn), ints(args.warps)):
        c = dict(BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=triton.next_power_of_2(args.D), SPLIT=args.D // bn,
                 FORGET_EXP=False, PRECISION="ieee" if args.dtype == "fp32" else "tf32")
        tag = f"{args.dtype}_b{bb}_n{bn}_w{nw}"
        fwd = compile_sm90(slstm_fwd_kernel, fwd_ptrs, {**c, "SAVE": True}, nw, args.ir, "fwd_" + tag)
        bwd = compile_sm90(slstm_bwd_kernel, bwd_ptrs, c, nw, args.ir, "bwd_" + tag)
        print(f"{args.dtype} block_b {bb:3d} block_n {bn:3d} warps {nw}: fwd shared {fwd[0]:6d} {fwd[1]} | "
              f"bwd shared {bwd[0]:6d} {bwd[1]}", flush=True)


if __name__ == "__main__":
    main()
