# Exact requests through libnbd's Python bindings, checked against the image
# bytes. Usage: exact_requests.py RO_URI RW_URI IMAGE
import errno
import sys

import nbd

ro_uri, rw_uri, image = sys.argv[1:4]
data = open(image, "rb").read()
MiB = 1 << 20


def expect_errno(fn, want):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == want, f"errno {e.errnum}, wanted {want}: {e}"
        return
    raise AssertionError(f"no error, wanted errno {want}")


# --- structured replies, base:allocation ---
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(ro_uri)
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert h.is_read_only()
size = h.get_size()
assert size == len(data), (size, len(data))

# Odd offsets and lengths.
for off, n in [(0, 1), (1, 4095), (123457, 7777), (size - 3, 3), (MiB - 1, 2)]:
    assert h.pread(n, off) == data[off:off + n], (off, n)

# A read spanning the zero window at [256K, 512K): without DF the server
# sends a hole chunk; with DF exactly one data chunk.
chunks = []


def chunk(buf, offset, status, error):
    chunks.append((status, offset, len(buf)))
    return 0


buf = h.pread_structured(MiB, 0, chunk)
assert buf == data[:MiB]
assert any(c[0] == nbd.READ_HOLE for c in chunks), chunks
assert sum(c[2] for c in chunks) == MiB, chunks
chunks.clear()
buf = h.pread_structured(MiB, 0, chunk, nbd.CMD_FLAG_DF)
assert buf == data[:MiB]
assert chunks == [(nbd.READ_DATA, 0, MiB)], chunks

# Block status: full map, then REQ_ONE gives exactly one extent no longer
# than the request.
extents = []


def extent(meta, offset, entries, error):
    assert meta == "base:allocation"
    extents.append((offset, list(entries)))
    return 0


h.block_status(MiB, 0, extent)
(off, e), = extents
assert off == 0
assert e[0:2] == [256 << 10, 0], e        # data
assert e[2:4] == [256 << 10, 3], e        # hole|zero
extents.clear()
h.block_status(MiB, 300 << 10, extent, nbd.CMD_FLAG_REQ_ONE)
(off, e), = extents
assert len(e) == 2 and e[1] == 3 and e[0] == (512 - 300) << 10, e
extents.clear()
h.block_status(1000, 300 << 10, extent, nbd.CMD_FLAG_REQ_ONE)
(off, e), = extents
assert e == [1000, 3], e

# Errors the spec names, with libnbd's own checks off so they reach us.
h.set_strict_mode(0)
expect_errno(lambda: h.pread(2, size - 1), errno.EINVAL)
expect_errno(lambda: h.pread(1, 1 << 62), errno.EINVAL)
expect_errno(lambda: h.pwrite(b"x", 0), errno.EPERM)
expect_errno(lambda: h.trim(512, 0), errno.EPERM)
expect_errno(lambda: h.zero(512, 0), errno.EPERM)
expect_errno(lambda: h.flush(), errno.EINVAL)             # not advertised
expect_errno(lambda: h.pread(1, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)
expect_errno(lambda: h.block_status(1, size, extent), errno.EINVAL)
# The connection survives all of that.
assert h.pread(10, 10) == data[10:20]
h.shutdown()

# --- simple replies only ---
h = nbd.NBD()
h.set_request_structured_replies(False)
h.add_meta_context("base:allocation")
h.connect_uri(ro_uri)
assert not h.get_structured_replies_negotiated()
assert not h.can_meta_context("base:allocation")
assert not h.can_df()
assert h.pread(99999, 5000) == data[5000:5000 + 99999]
h.set_strict_mode(0)
expect_errno(lambda: h.pread(2, size - 1), errno.EINVAL)
assert h.pread(3, 0) == data[:3]
h.shutdown()

# --- writable export ---
h = nbd.NBD()
h.connect_uri(rw_uri)
assert not h.is_read_only()
assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
assert h.can_fast_zero()
h.pwrite(b"tessera", 4095, nbd.CMD_FLAG_FUA)
assert h.pread(7, 4095) == b"tessera"
h.zero(7, 4095, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(7, 4095) == bytes(7)
h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(4096, 8192) == bytes(4096)
h.pwrite(b"abc", 20000)
h.trim(4096, 16384)
h.flush()
h.set_strict_mode(0)
expect_errno(lambda: h.pwrite(b"xy", size - 1), errno.ENOSPC)
expect_errno(lambda: h.zero(2, size - 1), errno.ENOSPC)
h.shutdown()
print("ok")
