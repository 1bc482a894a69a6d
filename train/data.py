"""Training data: local files -> tokenized, packed fixed-length rows, in a deterministic order.

Sources (no download at run time; a directory means every supported file under it, sorted):
    *.jsonl / *.json   one JSON object a line: {"text": str} (field name: `text_field`) or
                       {"messages": [{"role", "content"}, ...]} (chat, see mobilemoe.tokenizer)
    *.txt / *.md / *.rst  the whole file is one document
    *.parquet          a "text" or "messages" column (needs pyarrow)
    a directory written by `datasets.Dataset.save_to_disk` (needs the `datasets` package)

Packing (`packing`), every row holds seq_len + 1 tokens (inputs = row[:-1], targets = row[1:]):
    "stream"    documents as BOS + ids + EOS, concatenated and cut into rows with stride seq_len
                (each token is a target exactly once; documents run across row boundaries).
    "examples"  each record is one example, never split across rows except long text documents
                (cut into seq_len + 1 pieces); examples are packed greedily in order, the rest of a
                row is PAD. Chat records train on the answer tokens only (encode_chat's mask),
                text records on every token.
BOS, EOS, PAD and the chat format are the model's (mobilemoe/text_format.py): ours, or those of an
imported HF checkpoint (its tokenizer's BOS, its config's EOS, its Jinja chat template).

Rows are tokenized once into a cache directory keyed by a hash of the files' contents, the
tokenizer and text format, and every packing setting, so a resumed run (or a second process) reads the very same
rows. Order: epoch e visits the rows in the permutation `default_rng([seed, e])`; a run's data
position is the number of rows consumed so far (`samples`), so resuming is O(1) and exact.

Held-out data: separate files, or (`heldout_frac`) a deterministic hash split of the records.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mobilemoe.checkpoint import atomic_dir
from mobilemoe.text_format import OURS, ChatTemplateError, TextFormat

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
CACHE_VERSION = 1
IGNORE_INDEX = -100  # target id that the loss skips (masked or padding positions)
PACKINGS = ("stream", "examples")


class DataError(ValueError):
    """Training data is missing, empty or malformed; the message names the file and what was expected."""


# ---------------------------------------------------------------------------- reading records
def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def resolve_files(paths) -> list[Path]:
    """Expand directories into their supported files (sorted); raise DataError for a missing path."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: data file or directory not found")
        if p.is_file() or is_hf_dataset_dir(p):
            out.append(p)
            continue
        found = sorted(f for f in p.rglob("*") if f.is_file()
                       and f.name.endswith(TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES))
        if not found:
            raise DataError(f"{p}: directory holds no data files "
                            f"(expected {', '.join(TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES)})")
        out.extend(found)
    if not out:
        raise DataError("no data files given")
    return out


def _record(obj, where: str, text_field: str) -> dict:
    if isinstance(obj, dict) and "messages" in obj:
        if not isinstance(obj["messages"], list):
            raise DataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        return {"messages": obj["messages"], "path": obj.get("path", ""), "source": obj.get("source", "")}
    if isinstance(obj, dict) and isinstance(obj.get(text_field), str):
        return {"text": obj[text_field], "path": obj.get("path", ""), "source": obj.get("source", "")}
    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise DataError(f"{where}: expected a JSON object with a '{text_field}' string or a 'messages' list, got {keys}")


def iter_records(path, text_field: str = "text") -> Iterator[dict]:
    """Records {"text"} or {"messages"} (+ "path", "source" when the file has them) of one file."""
    path = Path(path)
    if is_hf_dataset_dir(path):
        try:
            import datasets  # deferred: optional (HF dataset directories only), and heavy
        except ImportError:
            raise DataError(f"{path}: a Hugging Face datasets directory needs the `datasets` package "
                            f"(pip install datasets)") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        for i, row in enumerate(ds):
            yield _record(row, f"{path}[{i}]", text_field)
    elif path.name.endswith(PARQUET_SUFFIXES):
        try:
            import pyarrow.parquet as pq  # deferred: optional, Parquet files only
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs the `pyarrow` package (pip install pyarrow)") from None
        pf = pq.ParquetFile(str(path))
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield _record(row, f"{path}[row {i}]", text_field)
                i += 1
    elif path.name.endswith(JSON_SUFFIXES):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                yield _record(obj, f"{path}:{n}", text_field)
    elif path.name.endswith(TEXT_SUFFIXES):
        yield {"text": path.read_text(encoding="utf-8", errors="replace"), "path": path.name, "source": ""}
    else:
        raise DataError(f"{path}: unsupported data file type (expected "
                        f"{', '.join(TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES)} or a datasets dir)")


def in_split(record: dict, index: int, file: Path, split: str, heldout_frac: float) -> bool:
    """Deterministic hash split of records: "heldout" for ~heldout_frac of them ("all": every record)."""
    if split == "all" or heldout_frac <= 0:
        return split != "heldout"
    key = f"{record.get('source', '')}/{record.get('path') or f'{file.name}#{index}'}"
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return (h < heldout_frac) == (split == "heldout")


# ---------------------------------------------------------------------------- quality subset
# Mid-training anneals on the better part of the corpus: prose-rich reference and tutorial pages.
# Change logs, the legacy/C-API references and near-empty pages are left out.
LOW_QUALITY_PATHS = re.compile(r"(^|/)(whatsnew|changes|changelog|distutils|c-api|includes|install|man)(/|\.|$)")
MIN_PROSE_FRACTION = 0.5
MIN_QUALITY_CHARS = 1500


def prose_fraction(text: str) -> float:
    """Share of non-empty lines (outside ``` fences) that read as sentences: >= 6 words, mostly letters."""
    prose = total = 0
    fenced = False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("```"):
            fenced = not fenced
            continue
        if not s:
            continue
        total += 1
        if not fenced and len(s.split()) >= 6 and sum(c.isalpha() or c == " " for c in s) >= 0.8 * len(s):
            prose += 1
    return prose / total if total else 0.0


def is_high_quality(record: dict) -> bool:
    if "text" not in record:
        return True  # chat examples pass through
    text = record["text"]
    return (not LOW_QUALITY_PATHS.search(record.get("path", "")) and len(text) >= MIN_QUALITY_CHARS
            and prose_fraction(text) >= MIN_PROSE_FRACTION)


FILTERS = {"": None, "quality": is_high_quality}


# ---------------------------------------------------------------------------- packing
@dataclass(frozen=True)
class DataSpec:
    """Everything that decides the packed rows (and so the cache key)."""
    files: tuple[str, ...]
    seq_len: int
    packing: str = "stream"
    text_field: str = "text"
    filter: str = ""
    split: str = "all"  # "all" | "train" | "heldout" (hash split with heldout_frac)
    heldout_frac: float = 0.0

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise DataError(f"packing must be one of {PACKINGS}, got {self.packing!r}")
        if self.filter not in FILTERS:
            raise DataError(f"filter must be one of {sorted(FILTERS)}, got {self.filter!r}")
        if self.split not in ("all", "train", "heldout"):
            raise DataError(f"split must be all|train|heldout, got {self.split!r}")
        if self.seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {self.seq_len}")


def _hash_path(h, path: Path) -> None:
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)


def cache_key(spec: DataSpec, files: list[Path], tokenizer, fmt: TextFormat = OURS) -> str:
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **asdict(spec), "files": None}, sort_keys=True).encode())
    h.update(tokenizer.to_str().encode())
    if not fmt.own:  # ours: the same key as before imported formats existed
        h.update(fmt.key().encode())
    for f in files:
        _hash_path(h, f)
    return h.hexdigest()[:20]


class _RowWriter:
    """Appends rows of `width` tokens (+ 0/1 masks) to raw files."""

    def __init__(self, d: Path, width: int, token_dtype, with_mask: bool):
        self.width, self.dtype, self.rows = width, token_dtype, 0
        self.tok = open(d / "tokens.bin", "wb")
        self.mask = open(d / "mask.bin", "wb") if with_mask else None

    def add(self, ids, mask=None) -> None:
        self.tok.write(np.asarray(ids, dtype=self.dtype).tobytes())
        if self.mask is not None:
            self.mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.rows += 1

    def close(self) -> None:
        self.tok.close()
        if self.mask is not None:
            self.mask.close()


def _iter_selected(spec: DataSpec, files: list[Path]) -> Iterator[dict]:
    keep = FILTERS[spec.filter]
    for f in files:
        for i, rec in enumerate(iter_records(f, spec.text_field)):
            if in_split(rec, i, f, spec.split, spec.heldout_frac) and (keep is None or keep(rec)):
                yield rec


def _batched(it, n):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _pack_stream(spec, files, tokenizer, fmt: TextFormat, w: _RowWriter, stats) -> None:
    width, buf = spec.seq_len + 1, np.zeros(0, dtype=np.int64)
    for batch in _batched(_iter_selected(spec, files), 256):
        texts = []
        for r in batch:
            if "text" not in r:
                raise DataError(f"packing 'stream' takes text records; got a chat record "
                                f"(path {r.get('path')!r}); use packing 'examples' for chat data")
            texts.append(r["text"])
        parts = [buf]
        for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
            parts.append(np.array(fmt.document(enc.ids), dtype=np.int64))
            stats["records"] += 1
        buf = np.concatenate(parts)
        n = (len(buf) - 1) // spec.seq_len
        for i in range(n):
            w.add(buf[i * spec.seq_len:i * spec.seq_len + width])
        buf = buf[n * spec.seq_len:]
        stats["tokens"] += sum(len(p) for p in parts[1:])


def _pack_examples(spec, files, tokenizer, fmt: TextFormat, w: _RowWriter, stats) -> None:
    width = spec.seq_len + 1
    row_ids: list[int] = []
    row_mask: list[int] = []

    def flush():
        if row_ids:
            pad = width - len(row_ids)
            w.add(row_ids + [fmt.pad_id] * pad, row_mask + [0] * pad)
            row_ids.clear()
            row_mask.clear()

    def put(ids, mask):
        if len(ids) > width - len(row_ids):
            flush()
        row_ids.extend(ids)
        row_mask.extend(mask)
        stats["target_tokens"] += sum(mask)  # mask[0] is 0: a row's first token is never a target

    for r in _iter_selected(spec, files):
        stats["records"] += 1
        if "messages" in r:
            try:
                ids, mask = fmt.encode_chat(tokenizer, r["messages"])
            except ChatTemplateError:
                raise
            except ValueError as e:
                raise DataError(f"chat record (path {r.get('path')!r}): {e}") from None
            stats["truncated"] += len(ids) > width
            put(ids[:width], mask[:width])
        else:
            ids = fmt.document(tokenizer.encode(r["text"], add_special_tokens=False).ids)
            mask = [0] + [1] * (len(ids) - 1)
            for s in range(0, max(len(ids) - 1, 1), spec.seq_len):  # pieces overlap by one token
                put(ids[s:s + width], [0] + mask[s + 1:s + width])
        stats["tokens"] += len(ids)
    flush()


def build_rows(spec: DataSpec, tokenizer, cache_dir, fmt: TextFormat = OURS) -> "PackedRows":
    """Tokenize + pack spec's files into cache_dir/<key> (once), and return the rows; `fmt` frames
    documents and chats (mobilemoe.text_format: ours, or an imported model's)."""
    files = resolve_files(spec.files)
    key = cache_key(spec, files, tokenizer, fmt)
    target = Path(cache_dir) / key
    if not (target / "meta.json").is_file():
        token_dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.int32

        def write(tmp: Path):
            stats = {"records": 0, "tokens": 0, "target_tokens": 0, "truncated": 0}
            w = _RowWriter(tmp, spec.seq_len + 1, token_dtype, with_mask=spec.packing == "examples")
            try:
                (_pack_stream if spec.packing == "stream" else _pack_examples)(spec, files, tokenizer, fmt, w, stats)
            finally:
                w.close()
            what = f"{', '.join(map(str, files))} (split {spec.split}, filter {spec.filter or 'none'})"
            if stats["records"] == 0:
                raise DataError(f"{what}: empty corpus, no records selected")
            if w.rows == 0:
                raise DataError(f"{what}: {stats['tokens']} tokens are fewer than one row of "
                                f"seq_len + 1 = {spec.seq_len + 1} tokens")
            meta = {"rows": w.rows, "width": spec.seq_len + 1, "dtype": np.dtype(token_dtype).name,
                    "mask": spec.packing == "examples", "spec": asdict(spec),
                    "files": [str(f) for f in files], **stats}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")

        atomic_dir(target, write)
    return PackedRows(target)


class PackedRows:
    """Rows [N, seq_len + 1] of token ids (+ 0/1 target masks), memory-mapped from a cache dir."""

    def __init__(self, d: Path):
        self.dir = Path(d)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        n, width = self.meta["rows"], self.meta["width"]
        self.tokens = np.memmap(self.dir / "tokens.bin", dtype=self.meta["dtype"], mode="r", shape=(n, width))
        self.mask = (np.memmap(self.dir / "mask.bin", dtype=np.uint8, mode="r", shape=(n, width))
                     if self.meta["mask"] else None)
        self.seq_len = width - 1

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [B] -> inputs [B, S] int64, targets [B, S] int64 (IGNORE_INDEX where not trained)."""
        t = torch.from_numpy(self.tokens[np.asarray(rows)].astype(np.int64))  # [B, S + 1]
        x, y = t[:, :-1], t[:, 1:].clone()
        if self.mask is not None:
            y[torch.from_numpy(self.mask[np.asarray(rows)][:, 1:] == 0)] = IGNORE_INDEX
        return x, y

    def target_tokens(self) -> int:
        if self.mask is None:
            return len(self) * self.seq_len
        return int(sum(int(self.mask[i:i + 4096, 1:].sum()) for i in range(0, len(self), 4096)))


# ---------------------------------------------------------------------------- order
class RowOrder:
    """Global sample index -> row: epoch e = index // N visits rows in permutation(seed, e)."""

    def __init__(self, n_rows: int, seed: int):
        self.n, self.seed = n_rows, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def rows(self, start: int, count: int) -> np.ndarray:
        idx = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(idx // self.n):
            sel = idx // self.n == e
            out[sel] = self._permutation(int(e))[idx[sel] % self.n]
        return out

    def epochs(self, samples: int) -> float:
        return samples / self.n


def split_for_eval(rows: PackedRows, max_tokens: int) -> np.ndarray:
    """The first rows (file order) covering at most max_tokens targets (at least one row)."""
    n = len(rows) if max_tokens <= 0 else min(len(rows), max(1, math.ceil(max_tokens / rows.seq_len)))
    return np.arange(n)
