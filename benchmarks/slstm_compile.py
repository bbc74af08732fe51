"""Off-device resource check of the sLSTM Triton kernels: compile for sm_90 (no GPU needed) and
print shared memory, registers and spill stack per launch shape, so launch defaults can be
chosen before device time is spent.

    TRITON_DEFAULT_FP_FUSION=1 python benchmarks/slstm_compile.py [--dtype bf16|fp32]
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


def compile_sm90(kernel, n_ptrs: int, ptr_types: list[str], constexprs: dict, num_warps: int, num_stages):
    sig = {}
    for i, name in enumerate(kernel.arg_names):
        sig[name] = ptr_types[i] if i < n_ptrs else ("i32" if name in ("B", "T", "H", "D") else "constexpr")
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(n_ptrs)}   # as the JIT marks aligned tensors
    options = dict(num_warps=num_warps, **({"num_stages": num_stages} if num_stages else {}))
    k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 64), options=options)
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
    args = p.parse_args()
    dt = f"*{args.dtype}"
    fwd_ptrs = [dt, dt] + ["*fp32"] * 4 + [dt] + ["*fp32"] * 9
    bwd_ptrs = [dt] + ["*fp32"] * 4 + [dt] + ["*fp32"] * 9
    for bn, bk, nw, ns in itertools.product([32, 64], [32, 64, 128], [4, 8], [None, 2]):
        c = dict(BLOCK_B=16, BLOCK_N=bn, BLOCK_K=bk, FULL_K=False, FORGET_EXP=False,
                 PRECISION="ieee" if args.dtype == "fp32" else "tf32")
        fwd = compile_sm90(slstm_fwd_kernel, 16, fwd_ptrs, {**c, "SAVE": True}, nw, ns)
        bwd = compile_sm90(slstm_bwd_kernel, 15, bwd_ptrs, c, nw, ns)
        print(f"block_n {bn:3d} block_k {bk:3d} warps {nw} stages {ns}: fwd shared {fwd[0]:6d} {fwd[1]} | "
              f"bwd shared {bwd[0]:6d} {bwd[1]}", flush=True)


if __name__ == "__main__":
    main()
