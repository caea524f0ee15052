#!/usr/bin/env python3
"""make_regress.py TARGET DIR: writes into DIR the regression inputs of TARGET that
are made rather than kept as files under regress/TARGET/ (images too large to keep
in the repository, built here by hand). Each says what the fuzzer found."""
import os
import struct
import sys

OP_CHECK = 13


def ops_input(image, ops):
    """fuzz_engine_ops' input: the image, the op script, its length."""
    script = b"".join(struct.pack("4B", *op) for op in ops)
    return image + script + bytes([len(script)])


def qcow2_v3(size, cluster_bits, l1_off, l1_size, rt_off, rt_clusters):
    """A v3 header (104 bytes) padded to one cluster, no extensions."""
    h = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, 0, 0, cluster_bits, size, 0, l1_size, l1_off,
                    rt_off, rt_clusters, 0, 0, 0, 0, 0, 4, 104)
    return h.ljust(1 << cluster_bits, b"\0")


def check_reftable_garbage():
    """check (and the refcount rebuild of a dirty image at open) compared every
    cluster covered by a refcount table entry past the end of the file, one
    failing block read per cluster: 8 table clusters of garbage offsets in a 40 KiB
    file took minutes (a timeout in fuzz_engine_ops)."""
    cb, cs = 12, 4096
    rt_clusters = 8
    img = qcow2_v3(1 << 20, cb, (1 + rt_clusters) * cs, 1, cs, rt_clusters)
    img += struct.pack(">Q", 0x2121212121212121) * (rt_clusters * cs // 8)
    img += b"\0" * cs  # the L1 table: nothing allocated
    return ops_input(img, [(OP_CHECK, 0, 0, 0), (OP_CHECK, 1, 0, 0)])


CASES = {
    "fuzz_engine_ops": {"check-reftable-garbage": check_reftable_garbage},
}


def main():
    target, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for name, make in CASES.get(target, {}).items():
        with open(os.path.join(out, "made-" + name), "wb") as f:
            f.write(make())


if __name__ == "__main__":
    main()
