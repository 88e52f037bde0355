"""Make an installed ExLlamaV3 build only the kernels one EXL3 bitrate needs.

ExLlamaV3 compiles its CUDA extension on first import: ~190 files, most of them kernel
instances for every bitrate (1-8 bits, 1.5/2.5/3.5), codebook and MoE shape. Front-end and
PTX only, on this project's 2 busy cores, one bitrate's GEMM instance file took 343 s, as
long as ExLlamaV2's heaviest file (316 s), and there are 24 such files beside ~90 other
instance files: the whole build does not fit in the GPU check's few minutes of GPU time.
A stubbed instance file compiles in 20-55 s there.

The GPU check quantises its tiny dense model with a recipe that gives every layer
``--bits`` (default 4) bits with the mul1 codebook (index 2) and keeps the output layer
unquantised, so it needs one set of instances. This rewrites every other instance file in
``exllamav3_ext/quant/comp_units`` to define the same symbols with null kernels: the
extension links as before, and selecting a removed kernel would find null (never done for
such a model: no other bitrate, no MoE, no half-integer rate). Originals are kept beside
as ``*.cu.orig``; ``--restore`` puts them back.

    python slim_exllamav3.py SITE_PACKAGES [--bits 4] [--restore]

Not for serving real models: a model quantised at other bitrates would fail on null kernels.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

MUL1 = 2
GEMM_ARRAYS = ("fp_exl3_gemm_kernel tfp_exl3_gemm_kernel_fp32_{s}", "fp_exl3_gemm_kernel tfp_exl3_gemm_kernel_fp16_{s}",
               "fp_exl3_mgemm_kernel tfp_exl3_mgemm_kernel_fp32_{s}", "fp_exl3_mgemm_kernel tfp_exl3_mgemm_kernel_fp16_{s}")
NULL_SHAPES = "#define HELEXA_NULL_SHAPE(S, ...) nullptr,\n"


def _arrays(suffix: str) -> str:
    return "".join(f"{decl.format(s=suffix)}[] = {{ nullptr, EXL3_GEMM_FOREACH_SHAPE(HELEXA_NULL_SHAPE, 0) }};\n"
                   for decl in GEMM_ARRAYS)


def stub(name: str, text: str, bits: int) -> str | None:
    """The stubbed text of instance file ``name``, or None to keep it (it holds what a
    ``bits``-bit mul1 model needs, or is not an instance file)."""
    if m := re.fullmatch(r"exl3_comp_unit_(\d)_cb(\d)\.cu", name):
        k, cb = int(m[1]), int(m[2])
        if (k, cb) == (bits, MUL1):
            return None
        return text.replace(f"EXL3_KERNEL_INSTANCES_CB({k}, {cb})", NULL_SHAPES + _arrays(f"b{k}_cb{cb}"))
    if m := re.fullmatch(r"exl3_comp_unit_h(\d)\.cu", name):
        return text.replace(f"EXL3_KERNEL_INSTANCES_H({m[1]})", NULL_SHAPES + _arrays(f"h{m[1]}"))
    if m := re.fullmatch(r"exl3_moe_coop_inst_([kh])(\d)\.cu", name):
        kind, k = m[1], m[2]
        if kind == "k":
            body = (f"MoeCoopKernel exl3_moe_coop_kernel_a_k{k}(int, int, bool) {{ return {{ nullptr, 0 }}; }}\n"
                    f"MoeCoopKernel exl3_moe_coop_kernel_b_k{k}(int, bool) {{ return {{ nullptr, 0 }}; }}\n")
            return text.replace(f"EXL3_MOE_COOP_INST_DEF({k})", body)
        body = (f"MoeCoopKernel exl3_moe_coop_kernel_a_h{k}(int, bool) {{ return {{ nullptr, 0 }}; }}\n"
                f"MoeCoopKernel exl3_moe_coop_kernel_b_h{k}(bool) {{ return {{ nullptr, 0 }}; }}\n")
        return text.replace(f"EXL3_MOE_COOP_INST_DEF_H({k})", body)
    if name.startswith("exl3_moe_inst_"):
        return re.sub(r"return\s+exl3_moe_kernel<[^;]*>\s*;", "return nullptr;", text)
    if m := re.fullmatch(r"exl3_gemv_int8_inst_(coop|sq)_([kh])(\d)\.cu", name):
        if m[2] == "k" and int(m[3]) == bits:
            return None
        return re.sub(r"\(void\s*\*\)\s*exl3_gemv_int8_\w+_kernel<[^>]*>", "(void*) nullptr", text)
    if name == "exl3_gemv_half_inst.cu":
        return re.sub(r"\(void\s*\*\)\s*exl3_gemv_kernel<[^>]*>", "(void*) nullptr", text)
    if m := re.fullmatch(r"quantize_tiles_inst_k(\d)\.cu", name):
        if int(m[1]) == bits:
            return None
        return re.sub(r"return\s+optimized\s*\?[^;]*;", "return nullptr;", text)
    if name == "quantize_tiles_frac_inst.cu":
        return re.sub(r"return\s+quantize_tiles_frac_kernel<[^;]*>\s*;", "return nullptr;", text)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="where exllamav3 is installed")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--restore", action="store_true")
    args = parser.parse_args(argv)
    units = args.site / "exllamav3" / "exllamav3_ext" / "quant" / "comp_units"
    if not units.is_dir():
        print(f"no {units}", file=sys.stderr)
        return 1
    changed = kept = 0
    for path in sorted(units.glob("*.cu")):
        original = path.with_name(path.name + ".orig")
        if args.restore:
            if original.is_file():
                path.write_text(original.read_text())
                original.unlink()
                changed += 1
            continue
        text = original.read_text() if original.is_file() else path.read_text()
        slim = stub(path.name, text, args.bits)
        if slim is None:
            kept += 1
            continue
        if slim == text:
            print(f"{path.name}: expected an instance file, found nothing to stub", file=sys.stderr)
            return 1
        if not original.is_file():
            original.write_text(text)
        if path.read_text() != slim:
            path.write_text(slim)
        changed += 1
    print(f"{'restored' if args.restore else 'stubbed'} {changed} instance files, kept {kept} ({units})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
