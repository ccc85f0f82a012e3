"""Build the mamba-ssm and causal-conv1d CUDA kernels for exactly the architectures in TORCH_CUDA_ARCH_LIST.

Used by the Dockerfile's CUDA build stage:

    python build_kernels.py --wheel-dir /wheels mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0

Both projects' setup.py hard-code their `-gencode arch=compute_XX,code=sm_XX` flags, and torch's
`BuildExtension` ignores TORCH_CUDA_ARCH_LIST as soon as a package passes arch flags of its own. So
this script downloads each sdist, replaces the hard-coded arch lines with `pass` (keeping every
`if` block valid), builds the wheel with TORCH_CUDA_ARCH_LIST in charge, and then checks with
`cuobjdump` that every extension holds exactly the requested SASS architectures.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("build_kernels")

# A line that only appends a hard-coded arch flag: cc_flag.append("-gencode") or ("arch=compute_80,code=sm_80").
_ARCH_LINE = re.compile(r'^(?P<indent>[ \t]*)\w+\.append\(\s*"(-gencode|arch=compute_\w+,code=\w+)"\s*\)\s*$')
_SASS = re.compile(r"sm_(\d+a?)")


def strip_hardcoded_arches(setup_py: str) -> tuple[str, int]:
    """`setup_py` with every hard-coded `-gencode`/`arch=` append replaced by `pass`; and how many."""
    out, count = [], 0
    for line in setup_py.splitlines(keepends=True):
        match = _ARCH_LINE.match(line)
        if match:
            out.append(f"{match['indent']}pass  # arch from TORCH_CUDA_ARCH_LIST\n")
            count += 1
        else:
            out.append(line)
    return "".join(out), count


def requested_sass(arch_list: str) -> set[str]:
    """TORCH_CUDA_ARCH_LIST ("8.0;8.6 9.0+PTX") -> the SASS names it asks for ({"80", "86", "90"})."""
    arches = set()
    for item in re.split(r"[;\s]+", arch_list.strip()):
        if item:
            arches.add(item.removesuffix("+PTX").replace(".", ""))
    if not arches:
        raise ValueError("TORCH_CUDA_ARCH_LIST is empty")
    return arches


def _run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    log.info("$ %s", " ".join(cmd))
    return subprocess.run(cmd, cwd=cwd, check=True, text=True, stdout=subprocess.PIPE).stdout


def _unpack_sdist(spec: str, workdir: Path) -> Path:
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(workdir),
            spec,
        ]
    )
    (archive,) = [p for p in workdir.iterdir() if p.name.endswith(".tar.gz")]
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    archive.unlink()
    (source,) = [p for p in workdir.iterdir() if p.is_dir()]
    return source


def _build(spec: str, wheel_dir: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        source = _unpack_sdist(spec, Path(tmp))
        setup_py = source / "setup.py"
        patched, count = strip_hardcoded_arches(setup_py.read_text())
        log.info("%s: replaced %d hard-coded arch lines", spec, count)
        setup_py.write_text(patched)
        before = set(wheel_dir.glob("*.whl"))
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-build-isolation",
                "--no-deps",
                "-w",
                str(wheel_dir),
                ".",
            ],
            source,
        )
    (wheel,) = set(wheel_dir.glob("*.whl")) - before
    return wheel


def wheel_sass(wheel: Path) -> set[str]:
    """SASS architectures of every CUDA extension in `wheel` (via cuobjdump --list-elf)."""
    found: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith(".so"):
                listing = _run(["cuobjdump", "--list-elf", zf.extract(name, tmp)])
                found |= set(_SASS.findall(listing))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--wheel-dir", type=Path, required=True)
    parser.add_argument("specs", nargs="+", help="pip requirement specs of the kernel packages")
    args = parser.parse_args(argv)
    want = requested_sass(os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
    args.wheel_dir.mkdir(parents=True, exist_ok=True)
    for spec in args.specs:
        got = wheel_sass(_build(spec, args.wheel_dir))
        if got != want:
            log.error(
                "%s: built for sm_%s, TORCH_CUDA_ARCH_LIST asks for sm_%s", spec, sorted(got), sorted(want)
            )
            return 1
        log.info("%s: kernels built for sm_%s", spec, ", sm_".join(sorted(got)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
