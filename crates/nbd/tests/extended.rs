//! Extended headers (64-bit requests, 32-byte reply headers) over a raw
//! socket. libnbd here (1.14) predates them; qemu ≥ 8.2 uses them, which the
//! qemu tests in `peers.rs` exercise; this pins the wire format.

mod support;

use std::io::Write;
use std::sync::Arc;

use support::*;
use tessera_nbd::proto::*;
use tessera_nbd::{Config, ExportMap, MemDevice};

fn ext_request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
    let mut v = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend(flags.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend(cookie.to_be_bytes());
    v.extend(offset.to_be_bytes());
    v.extend(len.to_be_bytes());
    v
}

/// (flags, type, cookie, offset, payload)
fn ext_reply(s: &mut std::os::unix::net::UnixStream) -> (u16, u16, u64, u64, Vec<u8>) {
    let h = read_exact(s, 32);
    assert_eq!(be32(&h), EXTENDED_REPLY_MAGIC);
    let len = be64(&h[24..]) as usize;
    (
        u16::from_be_bytes([h[4], h[5]]),
        u16::from_be_bytes([h[6], h[7]]),
        be64(&h[8..]),
        be64(&h[16..]),
        read_exact(s, len),
    )
}

#[test]
fn extended_headers_round_trip() {
    let data = pattern_image(1 << 20);
    let mut exports = ExportMap::new();
    exports.insert("d", Arc::new(MemDevice::new(data.clone(), false)));
    let server = Server::start(exports, Config::default());
    let mut s = server.connect();
    greet(&mut s);
    send_option(&mut s, OPT_EXTENDED_HEADERS, b"");
    assert_eq!(read_option_reply(&mut s).1, REP_ACK);
    // Structured replies are implied; asking again is an error.
    send_option(&mut s, OPT_STRUCTURED_REPLY, b"");
    assert_eq!(read_option_reply(&mut s).1, REP_ERR_EXT_HEADER_REQD);
    send_option(&mut s, OPT_EXTENDED_HEADERS, b"");
    assert_eq!(read_option_reply(&mut s).1, REP_ERR_INVALID);
    let mut m = 1u32.to_be_bytes().to_vec();
    m.extend(b"d");
    m.extend(1u32.to_be_bytes());
    m.extend((BASE_ALLOCATION.len() as u32).to_be_bytes());
    m.extend(BASE_ALLOCATION.as_bytes());
    send_option(&mut s, OPT_SET_META_CONTEXT, &m);
    assert_eq!(read_option_reply(&mut s).1, REP_META_CONTEXT);
    assert_eq!(read_option_reply(&mut s).1, REP_ACK);
    go(&mut s, "d");

    // DF read: one data chunk, done, echoing the request offset.
    s.write_all(&ext_request(CMD_READ, CMD_FLAG_DF, 5, 1000, 3000))
        .unwrap();
    let (flags, rtype, cookie, off, payload) = ext_reply(&mut s);
    assert_eq!(
        (flags, rtype, cookie, off),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 5, 1000)
    );
    assert_eq!(be64(&payload), 1000);
    assert_eq!(&payload[8..], &data[1000..4000]);

    // Success without payload is a NONE chunk (no simple replies at all).
    s.write_all(&ext_request(CMD_CACHE, 0, 6, 0, 4096)).unwrap();
    let (flags, rtype, cookie, _, payload) = ext_reply(&mut s);
    assert_eq!(
        (flags, rtype, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 6)
    );
    assert!(payload.is_empty());

    // Block status uses the 64-bit descriptor format.
    s.write_all(&ext_request(CMD_BLOCK_STATUS, 0, 7, 0, 1 << 20))
        .unwrap();
    let (_, rtype, cookie, _, p) = ext_reply(&mut s);
    assert_eq!((rtype, cookie), (REPLY_TYPE_BLOCK_STATUS_EXT, 7));
    assert_eq!(be32(&p), BASE_ALLOCATION_ID);
    let n = be32(&p[4..]) as usize;
    assert_eq!(p.len(), 8 + 16 * n);
    assert_eq!((be64(&p[8..]), be64(&p[16..])), (256 << 10, 0));
    assert_eq!((be64(&p[24..]), be64(&p[32..])), (256 << 10, 3));

    // A 64-bit length past the end is EINVAL, as an error chunk.
    s.write_all(&ext_request(CMD_READ, 0, 8, 0, 1 << 40))
        .unwrap();
    let (_, rtype, cookie, _, p) = ext_reply(&mut s);
    assert_eq!((rtype, cookie), (REPLY_TYPE_ERROR, 8));
    assert_eq!(be32(&p), Errno::Inval.code());

    // A compact request now means the stream is out of sync: hang up.
    s.write_all(&request(CMD_READ, 0, 9, 0, 1)).unwrap();
    s.write_all(&[0u8; 4]).unwrap();
    assert!(is_closed(&mut s));
}
