"""What of an artifact is byte-reproducible, and a tool to see where two builds' lib.so differ.

Rebuilding the same checkpoint with the same target and options gives byte-identical
params.safetensors, config.json, tokenizer files and manifest fields, and the same program: the IR
handed to code generation is identical (every `--dump-ir` file of two builds compares equal; its
structural hash is the manifest's "program_hash"). Not byte-stable (TVM 0.27, measured): lib.so.
TVM's LLVM code generation emits the same IR with a different layout from run to run (the Relax VM
shape functions' stores reordered, sometimes functions placed differently), and the GNU build id
follows. The manifest says so under "reproducibility"; the test that builds twice checks everything
else, the program hash and lib.so's exported symbols.
"""
from __future__ import annotations

from pathlib import Path

import tvm_ffi

WHY = ("TVM 0.27's LLVM code generation lays out the host code differently from run to run (seen in the "
       "Relax VM shape functions' store order and in function placement), and the IR handed to it is not always "
       "structurally identical either; every other file is identical across rebuilds")


def reproducibility() -> dict:
    """The manifest's "reproducibility" field: what a rebuild does not reproduce byte for byte, and why."""
    return {"unstable": ["lib.so"], "why": WHY}


def program_hash(mod) -> str:
    """Structural hash of the module given to code generation: equal IR, equal hash, in any process."""
    return f"{tvm_ffi.structural_hash(mod) & (2**64 - 1):016x}"


def exported_symbols(path: Path) -> list[str]:
    """The names an ELF shared object exports (its kernels and entry points), sorted."""
    from elftools.elf.elffile import ELFFile  # test/diagnostic use only: pyelftools is a test extra

    with open(path, "rb") as f:
        dynsym = ELFFile(f).get_section_by_name(".dynsym")
        return sorted(s.name for s in dynsym.iter_symbols() if s.name and s["st_shndx"] != "SHN_UNDEF")
