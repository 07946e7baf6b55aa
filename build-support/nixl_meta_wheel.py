"""Make the `nixl` meta wheel installable by a Pants lock with one CUDA backend.

PyPI's `nixl==1.5.1` is a meta package: pure Python (`nixl/__init__.py` picks the backend module
`nixl_cu12` or `nixl_cu13` at import time) whose metadata requires *both* `nixl-cu12` and
`nixl-cu13`. The dev venv installs it with `pip install --no-deps nixl nixl-cu12`; a Pants 2.17
lock (pex 2.1.137, no `--exclude`/`--no-deps` per requirement) cannot express that.

This script turns the upstream wheel (sha256-checked) into `nixl-1.5.1+<variant>`: the same files,
byte for byte, with one change to the metadata: `Requires-Dist` names only the chosen backend.
That is exactly what the `--no-deps` install leaves in the venv. The wheel is written
deterministically (sorted entries, fixed timestamps), so its sha256 in the Pants lock holds on
every machine (entries are stored, not deflated: no zlib version can change the bytes). The Pants resolve finds it through `[python-repos].find_links`
(`${TANDEM_WHEELS}`, see pants.toml); `nixl==1.5.1` in 3rdparty/python/requirements.txt matches
the local version `1.5.1+cu12`, which pip prefers over PyPI's `1.5.1`.

    python build-support/nixl_meta_wheel.py UPSTREAM.whl cu12 OUTDIR
"""
from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

UPSTREAM = "nixl-1.5.1-py3-none-any.whl"
UPSTREAM_SHA256 = "aa90914d7df16fb586e57be633972917c6c2489b004ad241913ecda02207eaab"
VERSION = "1.5.1"
BACKENDS = ("cu12", "cu13")
EPOCH = (2020, 1, 1, 0, 0, 0)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def rewrite(upstream: Path, variant: str, outdir: Path) -> Path:
    if variant not in BACKENDS:
        raise SystemExit(f"variant {variant!r}: must be one of {', '.join(BACKENDS)}")
    digest = hashlib.sha256(upstream.read_bytes()).hexdigest()
    if upstream.name != UPSTREAM or digest != UPSTREAM_SHA256:
        raise SystemExit(f"{upstream}: expected {UPSTREAM} with sha256 {UPSTREAM_SHA256}, got {digest}")
    old_info, local = f"nixl-{VERSION}.dist-info/", f"{VERSION}+{variant}"
    new_info = f"nixl-{local}.dist-info/"
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(upstream) as z:
        for name in z.namelist():
            if name == old_info + "RECORD":
                continue
            data = z.read(name)
            if name == old_info + "METADATA":
                lines = data.decode().split("\n")
                drop = [f"Requires-Dist: nixl-{b}=={VERSION}" for b in BACKENDS if b != variant]
                if not all(d in lines for d in drop):
                    raise SystemExit(f"{upstream}: METADATA does not require {drop}; the rewrite needs review")
                lines = [ln for ln in lines if ln not in drop]
                lines = [f"Version: {local}" if ln == f"Version: {VERSION}" else ln for ln in lines]
                data = "\n".join(lines).encode()
            files[name.replace(old_info, new_info)] = data
    record = "".join(f"{n},{_record_hash(d)},{len(d)}\n" for n, d in sorted(files.items()))
    files[new_info + "RECORD"] = (record + f"{new_info}RECORD,,\n").encode()
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / f"nixl-{local}-py3-none-any.whl"
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=EPOCH)
            info.external_attr = 0o100644 << 16
            z.writestr(info, files[name])
    tmp.replace(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__.strip().splitlines()[-1].strip())
    print(rewrite(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])))
