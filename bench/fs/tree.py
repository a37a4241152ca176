#!/usr/bin/env python3
"""The fs row's tree, as a tar: 5 000 files in 50 directories, the sizes of a source tree's
(0 to 8 KiB, 4 KiB on average), every byte a function of its path, every header fixed (owner
0, mode 0644/0755, mtime 0): the same tar on every machine. Prints the entry count `find`
sees after untarring it (the tree, its directories, its files) and the md5 of the files' bytes
concatenated in sorted path order, which the guest checks its reads against.

usage: tree.py OUT.tar"""
import hashlib
import io
import sys
import tarfile

DIRS, FILES_PER_DIR = 50, 100


def content(index: int) -> bytes:
    size = (index * 7919) % 8192
    seed = hashlib.sha256(str(index).encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    files = []
    for d in range(DIRS):
        for f in range(FILES_PER_DIR):
            files.append((f"tree/d{d:02}/f{f:03}.c", content(d * FILES_PER_DIR + f)))
    whole = hashlib.md5()
    for _, data in sorted(files):
        whole.update(data)
    with tarfile.open(sys.argv[1], "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ["tree"] + [f"tree/d{d:02}" for d in range(DIRS)]:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    print(1 + DIRS + len(files), whole.hexdigest())


if __name__ == "__main__":
    main()
