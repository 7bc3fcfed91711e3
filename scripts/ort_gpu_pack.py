"""Pack an onnxruntime-gpu wheel into parts small enough for the device tool to carry (see scripts/ort_gpu_setup.md).

    python scripts/ort_gpu_pack.py onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl --arch 90 \\
        --out .whl-ort/sm90 --name ort-gpu-1.31.1-sm90 --part-mib 34
    python scripts/ort_gpu_pack.py WHEEL --out .whl-ort/full --name ort-gpu-1.31.1-full --parts 4

The wheel's files (less the TensorRT provider, which qmamba never asks for) go into one ``.tar.xz`` (sorted names,
owner 0, mtime 0), split into ``NAME.tar.xz.part-NN`` with ``NAME.sha256`` beside them; unpacking the tar into a
folder on ``PYTHONPATH`` equals ``pip install --target`` of the wheel. ``--arch 90``: in the CUDA provider library
(``libonnxruntime_providers_cuda.so``) the machine code of every other GPU architecture (sm_75/80/86/89/120 in
1.31.1) is overwritten with zeros, in place: the ELF layout and the fatbin headers stay, the CUDA driver picks the
sm_90 images on an H100/H200 and never reads the others, and the zeros compress away (68.7 MB instead of 202.6 MB
for 1.31.1). Such a pack runs only on sm_90 GPUs. Needs GNU tar and xz.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50


def elf_section(data: bytes, name: str) -> tuple[int, int]:
    """``(offset, size)`` of an ELF64 little-endian section."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    str_off = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)[0]
    for i in range(shnum):
        base = shoff + i * shentsize
        name_off = struct.unpack_from("<I", data, base)[0]
        end = data.index(b"\0", str_off + name_off)
        if data[str_off + name_off:end].decode() == name:
            offset, size = struct.unpack_from("<QQ", data, base + 0x18)
            return offset, size
    raise ValueError(f"no section {name}")


def keep_only_arch(path: Path, arch: int) -> dict:
    """Zero the payload of every fatbin entry of another architecture than ``arch``; returns bytes per arch."""
    data = bytearray(path.read_bytes())
    offset, size = elf_section(data, ".nv_fatbin")
    pos, kept, zeroed = offset, 0, 0
    while pos + 16 <= offset + size:
        magic, _, header, body = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8
            continue
        entry, end = pos + header, pos + header + body
        while entry < end:
            _, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            entry_arch = struct.unpack_from("<I", data, entry + 28)[0]
            start = entry + entry_header
            if entry_arch == arch:
                kept += payload
            else:
                data[start:start + payload] = bytes(payload)
                zeroed += payload
            entry = start + payload
        pos = end
    if kept == 0:
        raise SystemExit(f"{path.name} holds no sm_{arch} code: this pack would run nowhere")
    path.write_bytes(bytes(data))
    return {"kept_mib": round(kept / 2**20, 1), "zeroed_mib": round(zeroed / 2**20, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", required=True, help="file stem, e.g. ort-gpu-1.31.1-sm90")
    ap.add_argument("--arch", type=int, default=None, help="keep only this GPU architecture's code (90 = sm_90)")
    size = ap.add_mutually_exclusive_group(required=True)
    size.add_argument("--part-mib", type=float, help="part size in MiB")
    size.add_argument("--parts", type=int, help="number of equal parts")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "stage"
        with zipfile.ZipFile(args.wheel) as wheel:
            wheel.extractall(stage)
        for lib in stage.glob("onnxruntime/capi/libonnxruntime_providers_tensorrt.so"):
            lib.unlink()
        if args.arch is not None:
            print(keep_only_arch(stage / "onnxruntime/capi/libonnxruntime_providers_cuda.so", args.arch))
        archive = Path(tmp) / f"{args.name}.tar.xz"
        tar = subprocess.Popen(["tar", "--sort=name", "--owner=0", "--group=0", "--numeric-owner", "--mtime=@0",
                                "-C", str(stage), "-cf", "-", "."], stdout=subprocess.PIPE)
        with open(archive, "wb") as sink:
            subprocess.run(["xz", "-T0", "-9"], stdin=tar.stdout, stdout=sink, check=True)
        if tar.wait() != 0:
            raise SystemExit("tar failed")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        total = archive.stat().st_size
        part = int(args.part_mib * 2**20) if args.part_mib else -(-total // args.parts)
        for old in args.out.glob(f"{args.name}.tar.xz.part-*"):
            old.unlink()
        with open(archive, "rb") as src:
            for i in range(-(-total // part)):
                (args.out / f"{args.name}.tar.xz.part-{i:02d}").write_bytes(src.read(part))
        (args.out / f"{args.name}.sha256").write_text(f"{digest}  {archive.name}\n")
    print(f"{args.name}.tar.xz: {total} bytes in {-(-total // part)} parts of <= {part / 2**20:.1f} MiB, "
          f"sha256 {digest} (scripts/ort_gpu_setup.sh expects this sha256 for its pack)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
