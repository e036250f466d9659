//! Hostile and broken clients over raw sockets. Each case gets the error the
//! spec asks for, or a closed connection, and the server goes on serving a
//! well-behaved client afterwards.

mod support;

use std::io::Write;
use std::sync::Arc;

use support::*;
use tessera_nbd::proto::*;
use tessera_nbd::{Config, ExportMap, MemDevice};

fn server() -> (Server, Vec<u8>) {
    let data = pattern_image(1 << 20);
    let mut exports = ExportMap::new();
    exports.insert("ro", Arc::new(MemDevice::new(data.clone(), false)));
    exports.insert("rw", Arc::new(MemDevice::new(data.clone(), true)));
    (Server::start(exports, Config::default()), data)
}

/// The check every case ends with: a fresh client still reads right.
fn still_serving(server: &Server, data: &[u8]) {
    let (mut s, size, _) = open(server, "ro");
    assert_eq!(size, data.len() as u64);
    assert_eq!(
        pread(&mut s, 12345, 777).unwrap(),
        &data[12345..12345 + 777]
    );
}

#[test]
fn truncated_handshake() {
    let (server, data) = server();
    let mut s = server.connect();
    let _ = read_exact(&mut s, 18);
    s.write_all(&[0, 0]).unwrap(); // half of the client flags
    drop(s);
    // Half an option header.
    let mut s = server.connect();
    greet(&mut s);
    s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(s);
    still_serving(&server, &data);
}

#[test]
fn unknown_client_flags_close() {
    let (server, data) = server();
    let mut s = server.connect();
    let _ = read_exact(&mut s, 18);
    s.write_all(&0x8000_0001u32.to_be_bytes()).unwrap();
    assert!(is_closed(&mut s));
    still_serving(&server, &data);
}

#[test]
fn bad_option_magic_closes() {
    let (server, data) = server();
    let mut s = server.connect();
    greet(&mut s);
    s.write_all(&[0x55; 16]).unwrap();
    assert!(is_closed(&mut s));
    still_serving(&server, &data);
}

#[test]
fn oversize_option_is_refused_or_closed() {
    let (server, data) = server();
    // 128 KiB: skipped and answered with NBD_REP_ERR_TOO_BIG; the session
    // goes on.
    let mut s = server.connect();
    greet(&mut s);
    send_option(&mut s, OPT_INFO, &vec![0u8; 128 << 10]);
    let (opt, rtype, _) = read_option_reply(&mut s);
    assert_eq!((opt, rtype), (OPT_INFO, REP_ERR_TOO_BIG));
    let (size, _) = go(&mut s, "ro");
    assert_eq!(size, data.len() as u64);
    // 1 GiB announced: the server hangs up without reading it.
    let mut s = server.connect();
    greet(&mut s);
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend(OPT_GO.to_be_bytes());
    h.extend((1u32 << 30).to_be_bytes());
    s.write_all(&h).unwrap();
    assert!(is_closed(&mut s));
    still_serving(&server, &data);
}

#[test]
fn unknown_option_is_unsup_and_session_continues() {
    let (server, data) = server();
    let mut s = server.connect();
    greet(&mut s);
    send_option(&mut s, 0x1234, b"some data");
    let (opt, rtype, _) = read_option_reply(&mut s);
    assert_eq!((opt, rtype), (0x1234, REP_ERR_UNSUP));
    go(&mut s, "ro");
    assert_eq!(pread(&mut s, 0, 10).unwrap(), &data[..10]);
}

#[test]
fn malformed_options_are_invalid() {
    let (server, data) = server();
    let mut s = server.connect();
    greet(&mut s);
    // Name length pointing past the payload.
    let mut p = go_payload("ro");
    p[3] = 99;
    send_option(&mut s, OPT_GO, &p);
    assert_eq!(read_option_reply(&mut s).1, REP_ERR_INVALID);
    // LIST with data.
    send_option(&mut s, OPT_LIST, b"x");
    assert_eq!(read_option_reply(&mut s).1, REP_ERR_INVALID);
    // SET_META_CONTEXT before structured replies.
    let mut m = 2u32.to_be_bytes().to_vec();
    m.extend(b"ro");
    m.extend(0u32.to_be_bytes());
    send_option(&mut s, OPT_SET_META_CONTEXT, &m);
    assert_eq!(read_option_reply(&mut s).1, REP_ERR_INVALID);
    // Unknown export via GO is an error reply, not a hang-up.
    send_option(&mut s, OPT_GO, &go_payload("nope"));
    assert_eq!(read_option_reply(&mut s).1, REP_ERR_UNKNOWN);
    // STARTTLS on a server without TLS.
    send_option(&mut s, OPT_STARTTLS, b"");
    assert_eq!(read_option_reply(&mut s).1, REP_ERR_POLICY);
    go(&mut s, "ro");
    assert_eq!(pread(&mut s, 5, 5).unwrap(), &data[5..10]);
}

#[test]
fn export_name_unknown_closes() {
    let (server, data) = server();
    let mut s = server.connect();
    greet(&mut s);
    send_option(&mut s, OPT_EXPORT_NAME, b"nope");
    assert!(is_closed(&mut s));
    // EXPORT_NAME to a real export works (no zeroes negotiated: 10 bytes).
    let mut s = server.connect();
    greet(&mut s);
    send_option(&mut s, OPT_EXPORT_NAME, b"ro");
    let r = read_exact(&mut s, 10);
    assert_eq!(be64(&r), data.len() as u64);
    assert_eq!(pread(&mut s, 1, 3).unwrap(), &data[1..4]);
}

#[test]
fn abort_is_acknowledged() {
    let (server, data) = server();
    let mut s = server.connect();
    greet(&mut s);
    send_option(&mut s, OPT_ABORT, b"");
    assert_eq!(read_option_reply(&mut s).1, REP_ACK);
    assert!(is_closed(&mut s));
    still_serving(&server, &data);
}

#[test]
fn unknown_command_is_einval() {
    let (server, data) = server();
    let (mut s, _, _) = open(&server, "ro");
    s.write_all(&request(42, 0, 7, 0, 0)).unwrap();
    assert_eq!(simple_reply(&mut s), (Errno::Inval.code(), 7));
    assert_eq!(pread(&mut s, 0, 4).unwrap(), &data[..4]);
}

#[test]
fn read_past_end_is_einval() {
    let (server, data) = server();
    let (mut s, size, _) = open(&server, "ro");
    assert_eq!(pread(&mut s, size - 1, 2), Err(Errno::Inval.code()));
    assert_eq!(pread(&mut s, u64::MAX - 1, 4), Err(Errno::Inval.code()));
    assert_eq!(pread(&mut s, size - 1, 1).unwrap(), &data[data.len() - 1..]);
}

#[test]
fn oversized_read_is_einval() {
    let (server, _) = server();
    let (mut s, _, _) = open(&server, "ro");
    assert_eq!(pread(&mut s, 0, (64 << 20) + 1), Err(Errno::Inval.code()));
}

#[test]
fn write_to_read_only_is_eperm_and_payload_is_skipped() {
    let (server, data) = server();
    let (mut s, _, flags) = open(&server, "ro");
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    let mut w = request(CMD_WRITE, 0, 9, 0, 4096);
    w.extend([0xaa; 4096]);
    s.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut s), (Errno::Perm.code(), 9));
    for kind in [CMD_TRIM, CMD_WRITE_ZEROES] {
        s.write_all(&request(kind, 0, 10, 0, 512)).unwrap();
        assert_eq!(simple_reply(&mut s), (Errno::Perm.code(), 10));
    }
    // The payload did not desynchronise the stream, and nothing changed.
    assert_eq!(pread(&mut s, 0, 4096).unwrap(), &data[..4096]);
}

#[test]
fn writes_work_on_writable_export() {
    let (server, _) = server();
    let (mut s, size, flags) = open(&server, "rw");
    assert_eq!(flags & FLAG_READ_ONLY, 0);
    let mut w = request(CMD_WRITE, CMD_FLAG_FUA, 1, 100, 5);
    w.extend(b"hello");
    s.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 1));
    assert_eq!(pread(&mut s, 100, 5).unwrap(), b"hello");
    s.write_all(&request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 2, 100, 5))
        .unwrap();
    assert_eq!(simple_reply(&mut s), (0, 2));
    assert_eq!(pread(&mut s, 100, 5).unwrap(), [0; 5]);
    // Past the end: ENOSPC for writes.
    let mut w = request(CMD_WRITE, 0, 3, size - 2, 4);
    w.extend([1, 2, 3, 4]);
    s.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut s), (Errno::NoSpc.code(), 3));
    s.write_all(&request(CMD_FLUSH, 0, 4, 0, 0)).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 4));
}

#[test]
fn bad_request_magic_closes() {
    let (server, data) = server();
    let (mut s, _, _) = open(&server, "ro");
    let mut r = request(CMD_READ, 0, 1, 0, 1);
    r[0] ^= 0xff;
    s.write_all(&r).unwrap();
    assert!(is_closed(&mut s));
    still_serving(&server, &data);
}

#[test]
fn abrupt_disconnect_mid_request() {
    let (server, data) = server();
    // Half a header.
    let (mut s, _, _) = open(&server, "rw");
    s.write_all(&request(CMD_READ, 0, 1, 0, 1)[..13]).unwrap();
    drop(s);
    // A write whose payload never fully arrives.
    let (mut s, _, _) = open(&server, "rw");
    let mut w = request(CMD_WRITE, 0, 1, 0, 1 << 20);
    w.extend([7u8; 1000]);
    s.write_all(&w).unwrap();
    drop(s);
    // Many reads queued, then gone before the replies are read.
    let (mut s, _, _) = open(&server, "ro");
    for i in 0..64 {
        s.write_all(&request(CMD_READ, 0, i, 0, 256 << 10)).unwrap();
    }
    drop(s);
    still_serving(&server, &data);
}

#[test]
fn huge_write_payload_closes() {
    let (server, data) = server();
    let (mut s, _, _) = open(&server, "rw");
    // 4 GiB - 1 announced: too big to even skip.
    let _ = s.write_all(&request(CMD_WRITE, 0, 1, 0, u32::MAX));
    assert!(is_closed(&mut s));
    still_serving(&server, &data);
}

#[test]
fn disc_waits_for_in_flight_replies() {
    let (server, data) = server();
    let (mut s, _, _) = open(&server, "ro");
    let mut reqs = Vec::new();
    for i in 0..8u64 {
        reqs.extend(request(CMD_READ, 0, i, i * 4096, 4096));
    }
    reqs.extend(request(CMD_DISC, 0, 99, 0, 0));
    s.write_all(&reqs).unwrap();
    let mut seen = 0u64;
    for _ in 0..8 {
        let (err, cookie) = simple_reply(&mut s);
        assert_eq!(err, 0);
        let off = cookie as usize * 4096;
        assert_eq!(read_exact(&mut s, 4096), &data[off..off + 4096]);
        seen |= 1 << cookie;
    }
    assert_eq!(seen, 0xff);
    assert!(is_closed(&mut s));
}
