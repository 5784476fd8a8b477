"""Compile the Triton kernels ahead of time for a GPU architecture, without a GPU (Triton's own ptxas).

    TRITON_INTERPRET=0 python tests/ops/triton_aot.py 90 80

Prints one line per kernel, dtype and block size with its shared memory; exits non-zero on the first
kernel that does not compile. Used by tests/ops/test_triton_kernels.py.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ipu_app.ops import triton as tk

INDEX = {name: "*i32" for name in ("PTR", "BLK", "OTHER", "ROWS", "COLS")}
INTS = {name: "i32" for name in ("T", "LDA", "LDC", "T_BUCKET", "N_LINES", "LDY", "LDX", "TOKENS_PER_SPLIT")}


def signature(fn, dtype: str, constants: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constants:
            sig[name] = "constexpr"
        elif name in INDEX or name in INTS:
            sig[name] = INDEX.get(name) or INTS[name]
        else:
            sig[name] = "*fp32" if name == "DV" else f"*{dtype}"
    return sig


def main(archs: list[int]) -> int:
    for arch in archs:
        for dtype in ("fp32", "bf16", "fp16"):
            for b in tk.BLOCK_SIZES:
                precision = "ieee" if dtype == "fp32" else "tf32"
                # the largest autotuning config: the most shared memory
                options = {"num_warps": 8, "num_stages": 3}
                lines = {"B": b, "TRANS_W": True, "HAS_BIAS": True, "PRECISION": precision, "UPCAST": False,
                         "BLOCK_T": 128}
                sddmm = {"B": b, "PRECISION": precision, "UPCAST": False, "BLOCK_T": 128}
                for name, fn, constants in (("lines", tk._lines.fn, lines), ("sddmm", tk._sddmm.fn, sddmm)):
                    kernel = triton.compile(ASTSource(fn, signature(fn, dtype, constants), constexprs=constants),
                                            target=GPUTarget("cuda", arch, 32), options=options)
                    print(f"sm_{arch} {name} {dtype} b={b} shared={kernel.metadata.shared}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main([int(a) for a in sys.argv[1:]] or [90]))
