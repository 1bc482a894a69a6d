"""Fetching and unpacking the corpus' Debian packages, cached so that a rebuild is offline-safe.

``fetch_deb`` keeps each ``{package}_*.deb`` in a cache dir (``apt-get download`` only when it is
absent), ``extract_deb`` unpacks it once (``dpkg-deb -x``; a ``.complete`` marker records success),
``extract_tarball`` unpacks one member of a tarball shipped inside a package (linux-source's
``linux-source-6.1.tar.xz``) the same way. Nothing is installed system-wide; every step that
fails raises :class:`CorpusError` with one line naming the package and what to do.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


class CorpusError(RuntimeError):
    """A corpus build step failed; the message names the command or package needed."""


def run_tool(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    """Run a Debian tool (apt-get, dpkg-deb, tar) for `what`, output captured; CorpusError when the tool
    is missing or exits non-zero (the message names the command and its last line of output)."""
    if shutil.which(cmd[0]) is None:
        raise CorpusError(f"`{cmd[0]}` not found: {what} needs Debian's `{cmd[0]}` "
                          f"(a Debian/Ubuntu machine with apt and dpkg)")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else "no output"
        raise CorpusError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}) during {what}: {last}")
    return proc


def fetch_deb(package: str, cache_dir: Path) -> Path:
    """Return the cached ``{package}_*.deb`` in cache_dir, downloading it with apt-get if absent."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    if shutil.which("apt-get") is None:
        raise CorpusError(f"`apt-get` not found: the corpus needs the Debian package `{package}`, fetched "
                          f"with `apt-get download {package}` (Debian/Ubuntu), or put {package}_*.deb "
                          f"into {cache_dir} by hand")
    tmp = cache_dir / f".download-{package}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            run_tool(["apt-get", "download", package], f"download of package {package}", cwd=tmp)
        except CorpusError as e:
            raise CorpusError(f"cannot fetch Debian package `{package}` ({e}); run `apt-get update` as root "
                              f"with a Debian mirror reachable, or put {package}_*.deb into {cache_dir}") from None
        debs = sorted(tmp.glob(f"{package}_*.deb"))
        if not debs:
            raise CorpusError(f"cannot fetch Debian package `{package}`: `apt-get download {package}` "
                              f"wrote no {package}_*.deb")
        os.replace(debs[-1], cache_dir / debs[-1].name)
        return cache_dir / debs[-1].name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def deb_version(deb: Path) -> str:
    return run_tool(["dpkg-deb", "-f", str(deb), "Version"], f"reading {deb}").stdout.strip()


def _extract_once(dest: Path, stamp: str, fill) -> Path:
    """Run fill(tmp) into a temp dir and rename it to dest, unless dest's marker equals stamp."""
    dest = Path(dest)
    marker = dest / ".complete"
    if marker.exists() and marker.read_text() == stamp:
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    (tmp / ".complete").write_text(stamp)
    os.replace(tmp, dest)
    return dest


def extract_deb(deb: Path, dest: Path) -> Path:
    """Unpack deb into dest with ``dpkg-deb -x`` (once; a ``.complete`` marker records success)."""
    return _extract_once(dest, Path(deb).name,
                         lambda tmp: run_tool(["dpkg-deb", "-x", str(deb), str(tmp)], f"extraction of {deb}"))


def extract_tarball(tarball: Path, member: str, dest: Path) -> Path:
    """Unpack one member (a directory) of a tarball into dest with ``tar`` (once, like extract_deb)."""
    tarball = Path(tarball)
    if not tarball.is_file():
        raise CorpusError(f"{tarball}: tarball not found in the unpacked package")
    return _extract_once(dest, f"{tarball.name}:{member}",
                         lambda tmp: run_tool(["tar", "-xf", str(tarball), "-C", str(tmp), member],
                                              f"extraction of {member} from {tarball}"))
