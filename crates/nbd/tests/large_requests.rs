//! Requests up to the advertised 64 MiB maximum, and one byte over it,
//! through libnbd's Python bindings (strict mode off, so libnbd sends what
//! it would otherwise refuse itself).

mod support;

use std::io::Write;
use std::process::Command;
use std::sync::Arc;

use support::*;
use tessera_nbd::proto::*;
use tessera_nbd::{Config, ExportMap, MemDevice};

const SIZE: usize = 160 << 20;

#[test]
fn reads_and_writes_up_to_64_mib_and_one_byte_over() {
    let Some(py) = python_nbd() else { return };
    let data = pattern_image(SIZE);
    let mut exports = ExportMap::new();
    exports.insert("rw", Arc::new(MemDevice::new(data.clone(), true)));
    let server = Server::start(exports, Config::default());
    let script = r#"
import errno, hashlib, nbd, sys
MiB = 1 << 20
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 64 * MiB, h.get_block_size(nbd.SIZE_MAXIMUM)
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
def pattern(n, seed):
    return hashlib.shake_256(seed).digest(n)
for size, at in ((40 * MiB, 3 * MiB + 512), (64 * MiB, 70 * MiB)):
    buf = pattern(size, str(size).encode())
    h.pwrite(buf, at)
    assert h.pread(size, at) == buf, size
    print("ok", size, flush=True)
h.set_strict_mode(0)
over = 64 * MiB + 1
for name, op in (("read", lambda: h.pread(over, 0)),
                 ("write", lambda: h.pwrite(b"\xee" * over, 0))):
    try:
        op()
        sys.exit(name + " of 64 MiB + 1 succeeded")
    except nbd.Error as e:
        # libnbd before 1.16 refuses anything over 64 MiB itself (ERANGE),
        # even in non-strict mode; the raw-socket test below covers the
        # server's answer then.
        assert e.errnum in (errno.EINVAL, errno.EOVERFLOW, errno.ERANGE), (name, e)
    # The connection is still in sync: the refused write's payload was
    # drained and nothing of it was written.
    assert h.pread(4096, 3 * MiB + 512) == pattern(40 * MiB, str(40 * MiB).encode())[:4096]
    print("refused", name, flush=True)
h.shutdown()
"#;
    let out = run(Command::new(py).args(["-c", script, &server.uri("rw")]));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "ok 41943040",
            "ok 67108864",
            "refused read",
            "refused write"
        ]
    );
}

/// The same over a raw socket, where the error codes are exact: a write one
/// byte over the maximum gets EINVAL and its payload is skipped, a read one
/// byte over gets EINVAL (EOVERFLOW is for DF reads), and exactly 64 MiB
/// reads back right.
#[test]
fn over_maximum_errors_are_exact_and_keep_sync() {
    let data = pattern_image(72 << 20);
    let mut exports = ExportMap::new();
    exports.insert("rw", Arc::new(MemDevice::new(data.clone(), true)));
    let server = Server::start(exports, Config::default());
    let (mut s, _, _) = open(&server, "rw");
    let over = (64u32 << 20) + 1;
    let mut w = request(CMD_WRITE, 0, 5, 0, over);
    w.resize(w.len() + over as usize, 0xee);
    s.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut s), (Errno::Inval.code(), 5));
    assert_eq!(pread(&mut s, 0, 4096).unwrap(), &data[..4096]);
    assert_eq!(pread(&mut s, 0, over), Err(Errno::Inval.code()));
    let len = 64u32 << 20;
    assert!(pread(&mut s, 4096, len).unwrap() == data[4096..4096 + len as usize]);
}
