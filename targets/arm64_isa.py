"""Count the integer dot / matrix instructions in an AArch64 shared object (what a build selected).

    python -m targets.arm64_isa dist/mobilemoe-tiny-android-arm64-i8mm/lib.so
    -> {"sdot": 1234, "smmla": 567, "udot": 0, "usmmla": 0}

Reads the ELF's executable sections with pyelftools and matches the 32-bit A64 encodings (Arm ARM,
"Advanced SIMD three registers, extension": SDOT/UDOT (vector) and SMMLA/UMMLA/USMMLA); no
disassembler needed, so it works on any host.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# (mask, value) of each instruction's fixed bits, any registers
ENCODINGS = {
    "sdot": (0xBFE0FC00, 0x0E809400),  # SDOT (vector) Vd.<T>, Vn.<Tb>, Vm.<Tb>: Q free, U=0, size=10
    "udot": (0xBFE0FC00, 0x2E809400),
    "smmla": (0xFFE0FC00, 0x4E80A400),
    "ummla": (0xFFE0FC00, 0x6E80A400),
    "usmmla": (0xFFE0FC00, 0x4E80AC00),
}


def count_instructions(lib: str | Path) -> dict[str, int]:
    """Occurrences of each ENCODINGS instruction in the executable sections of an AArch64 ELF."""
    from elftools.elf.constants import SH_FLAGS  # pyelftools: deferred, only this tool needs it
    from elftools.elf.elffile import ELFFile  # deferred: pyelftools, as above

    counts = dict.fromkeys(ENCODINGS, 0)
    with open(lib, "rb") as f:
        elf = ELFFile(f)
        if elf["e_machine"] != "EM_AARCH64":
            raise ValueError(f"{lib}: not an AArch64 ELF (e_machine {elf['e_machine']})")
        for sec in elf.iter_sections():
            if not sec["sh_flags"] & SH_FLAGS.SHF_EXECINSTR or sec["sh_type"] == "SHT_NOBITS":
                continue
            data = sec.data()
            words = np.frombuffer(data[: len(data) // 4 * 4], dtype="<u4")
            for name, (mask, value) in ENCODINGS.items():
                counts[name] += int(np.count_nonzero((words & mask) == value))
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m targets.arm64_isa", description=__doc__.split("\n")[0])
    p.add_argument("lib", type=Path, help="an AArch64 shared object (an artifact's lib.so)")
    a = p.parse_args(argv)
    try:
        print(json.dumps(count_instructions(a.lib)))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
