"""Build the wheel directory carried to the lent GPU machine (`make gpu-wheels`), which has torch
and transformers but no ray, deepspeed or math-verify, and cannot reach a package index.

    python -m launch.gpu_check.wheels .whl

Wheels are for CPython 3.12 on manylinux2014 x86_64 (the device machine's interpreter). Pins come
from one `pip install --dry-run --report` resolution of ray + deepspeed's + math-verify's
requirements (2026-12-02); torch, numpy, sympy and tqdm are on the machine (torch and transformers
need them, with no version floor from these packages) and are not carried. deepspeed is published as an sdist only: its wheel is built here
(`pip wheel`, pure Python, no compiled ops: the learner uses torch's AdamW). ray's wheel is 79 MB
and the device tool carries at most 64 MiB with the repository, so its Java jars (32 MB, only for
Java workers) and the dashboard's JavaScript source maps are dropped and RECORD rewritten to match.
"""
from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

PYTHON_VERSION = "3.12"
PLATFORM = "manylinux2014_x86_64"
CARRY_LIMIT_BYTES = 64 * 2**20
"""The device tool's limit on the working tree plus carried paths."""
RAY = "ray==2.60.0"
DEEPSPEED = "deepspeed==0.19.8"
MATH_VERIFY = "math-verify==0.9.0"
TOP_LEVEL = (RAY, DEEPSPEED, MATH_VERIFY)
"""What `launch/gpu_check.sh` installs from the carried directory."""
DEPENDENCIES = (
    # math-verify
    "latex2sympy2_extended==1.11.0", "antlr4-python3-runtime==4.13.2",
    # deepspeed
    "einops==0.8.2", "hjson==3.1.0", "msgpack==1.2.4", "ninja==1.13.2", "psutil==7.2.2", "py-cpuinfo==9.0.0",
    "pydantic==2.14.4", "pydantic_core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
    # on the device through torch/transformers, but maybe older than required (pydantic needs
    # typing-extensions >= 4.16): carried so pip can upgrade them without an index
    "typing_extensions==4.16.0", "filelock==4.3.1", "PyYAML==6.0.4",
    # ray
    "click==8.5.1", "packaging==26.4", "protobuf==7.36.2", "jsonschema==4.26.0", "attrs==26.1.0",
    "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1", "requests==2.34.2",
    "charset-normalizer==3.5.3", "idna==3.20", "urllib3==2.8.0", "certifi==2026.10.19.post1",
)
RAY_DROP = ("ray/jars/", ".js.map")
"""Paths (prefix) or suffixes removed from the ray wheel."""


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def trim_wheel(wheel: Path, drop: tuple[str, ...]) -> int:
    """Rewrite `wheel` in place without the members matching `drop` (prefix or suffix), with a
    RECORD that lists exactly what remains. Returns the bytes saved."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in src.infolist():
            name = info.filename
            if name == record_name or name.startswith(drop) or name.endswith(drop):
                continue
            data = src.read(info)
            dst.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{name},sha256={digest},{len(data)}")
        lines.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(lines) + "\n")
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def repo_bytes(root: Path) -> int:
    """Bytes of the files git tracks or would carry (untracked, not ignored) under `root`."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout
    return sum((root / p).stat().st_size for p in out.decode().split("\0") if p and (root / p).is_file())


def build(dest: Path) -> int:
    """Fill `dest`; returns the carried total (wheels + repository) in bytes, which must stay under
    CARRY_LIMIT_BYTES (raises otherwise)."""
    dest.mkdir(parents=True, exist_ok=True)
    _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--platform", PLATFORM,
         "-d", str(dest), RAY, MATH_VERIFY, *DEPENDENCIES)
    _pip("wheel", "--no-deps", "-w", str(dest), DEEPSPEED)
    for ray_wheel in dest.glob("ray-*.whl"):
        saved = trim_wheel(ray_wheel, RAY_DROP)
        if saved:
            print(f"trimmed {ray_wheel.name}: -{saved / 2**20:.1f} MiB", flush=True)
    wheels = sum(p.stat().st_size for p in dest.iterdir())
    total = wheels + repo_bytes(Path.cwd())
    print(f"{dest}: {len(list(dest.iterdir()))} wheels, {wheels / 2**20:.1f} MiB; with the repository "
          f"{total / 2**20:.1f} MiB of the {CARRY_LIMIT_BYTES / 2**20:.0f} MiB the device tool carries", flush=True)
    if total >= CARRY_LIMIT_BYTES:
        raise SystemExit(f"carried total {total / 2**20:.1f} MiB exceeds {CARRY_LIMIT_BYTES / 2**20:.0f} MiB")
    return total


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else ".whl"))
