"""What of an artifact is byte-reproducible, and a tool to see where two builds' lib.so differ.

Rebuilding the same checkpoint with the same target and options gives byte-identical
params.safetensors, config.json, tokenizer files and manifest fields, and a lib.so whose kernels are
identical. Not byte-stable (TVM 0.27, measured): the Relax VM shape functions (`shape_func*`, a few
stores each that compute symbolic shapes on the host) come out of TVM's LLVM code generation with
their stores in a different order from run to run, although the TIR given to LLVM is identical
(every IR dump of two builds compares equal); the lib's GNU build id, a hash of its contents,
follows. The manifest records this under "reproducibility", and `differing_symbols` (used by the
test that builds twice) checks that nothing else differs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

UNSTABLE = {
    "unstable": ["lib.so"],
    "unstable_functions": ["__tvm_ffi_shape_func", "shape_func_compute_", "__tvm_ffi_shape_func1",
                           "shape_func1_compute_"],
    "why": ("TVM 0.27's LLVM code generation orders the stores of the Relax VM shape functions "
            "differently from run to run (same TIR in, see compiler/reproducible.py); every other byte of "
            "lib.so and every other file is identical across rebuilds"),
}


def differing_symbols(a: Path, b: Path) -> list[str]:
    """Names of the functions (or sections, where no symbol covers the bytes) in which two builds of
    one ELF shared object differ; [] when they are byte-identical. Needs equal section layouts."""
    from elftools.elf.elffile import ELFFile  # test/diagnostic use only: pyelftools is a test extra

    da, db = Path(a).read_bytes(), Path(b).read_bytes()
    if da == db:
        return []
    if len(da) != len(db):
        return ["<file size>"]
    with open(a, "rb") as f:
        elf = ELFFile(f)
        ranges = []
        for sym in (elf.get_section_by_name(".symtab") or elf.get_section_by_name(".dynsym")).iter_symbols():
            sec = sym["st_shndx"]
            if sym["st_size"] and isinstance(sec, int):
                s = elf.get_section(sec)
                off = s["sh_offset"] + sym["st_value"] - s["sh_addr"]
                ranges.append((off, off + sym["st_size"], sym.name))
        sections = [(s["sh_offset"], s["sh_offset"] + s["sh_size"], s.name) for s in elf.iter_sections()
                    if s["sh_type"] != "SHT_NOBITS"]
    names = set()
    diff = np.nonzero(np.frombuffer(da, np.uint8) != np.frombuffer(db, np.uint8))[0]
    for i in diff.tolist():
        hit = next((n for lo, hi, n in ranges if lo <= i < hi), None)
        hit = hit or next((n for lo, hi, n in sections if lo <= i < hi), f"<offset {i:#x}>")
        names.add(hit)
    return sorted(names)
