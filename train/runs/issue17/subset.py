"""The half of the corpus that fits beside the tree in one device call (64 MiB), chosen by document.

    python train/runs/issue17/subset.py data/corpus OUT_DIR [--train 0.5] [--heldout 0.5]
    tar -C OUT_DIR -cf - corpus/train.jsonl corpus/heldout.jsonl | xz -9e -T1 > .i17/dev/corpus.tar.xz

Keeps a document when sha1(source/path) falls in the first TRAIN (or HELDOUT) share of the hash range:
every source keeps about that share of its documents, the held-out split stays disjoint from the
training one. The fourth and fifth H100 calls used 0.5 / 0.5: 12,434 training documents (91.7 MB,
25.2M tokens of the retrained BPE), 271 held-out (2.4 MB); 16.6 MB as xz -9e.
"""
import hashlib
import json
import sys
from pathlib import Path


def keep(doc: dict, share: float) -> bool:
    h = hashlib.sha1(f"{doc['source']}/{doc['path']}".encode()).hexdigest()[:8]
    return int(h, 16) / 2 ** 32 < share


def main(argv: list[str]) -> int:
    src, out = Path(argv[0]), Path(argv[1]) / "corpus"
    shares = {"train": 0.5, "heldout": 0.5}
    for name in shares:
        if f"--{name}" in argv:
            shares[name] = float(argv[argv.index(f"--{name}") + 1])
    out.mkdir(parents=True, exist_ok=True)
    for name, share in shares.items():
        n = nbytes = 0
        with open(src / f"{name}.jsonl") as f, open(out / f"{name}.jsonl", "w") as o:
            for line in f:
                if keep(json.loads(line), share):
                    o.write(line)
                    n, nbytes = n + 1, nbytes + len(line)
        print(f"{name}: {n} documents, {nbytes / 1e6:.1f} MB -> {out / f'{name}.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
