//! The fuzz targets on the stable toolchain: each replays its corpus
//! (`crates/nbd/fuzz/corpus/NAME/`) and then runs on generated inputs for a few seconds
//! (`fuzz/checks/driver.rs` says how). The checks are the cargo-fuzz targets' own
//! (`fuzz/checks/*.rs`); the handshake runs against a real server over a socket.

mod support;

#[path = "../fuzz/checks/driver.rs"]
mod driver;
#[path = "../fuzz/checks/option.rs"]
mod option_check;
#[path = "../fuzz/checks/request.rs"]
mod request_check;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tessera_nbd::proto::*;
use tessera_nbd::{Config, ExportMap, MemDevice};

fn corpus(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name)
}

fn option_bytes(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend(code.to_be_bytes());
    v.extend((data.len() as u32).to_be_bytes());
    v.extend(data);
    v
}

#[test]
fn option_decoders() {
    let mut go = go_payload("disk");
    go.extend([0, 2, 0, INFO_BLOCK_SIZE as u8]);
    go[4 + 4..4 + 6].copy_from_slice(&2u16.to_be_bytes());
    let seeds = vec![
        option_bytes(OPT_GO, &go_payload("disk")),
        option_bytes(OPT_INFO, &go_payload("")),
        option_bytes(OPT_LIST, &[]),
        option_bytes(OPT_EXPORT_NAME, b"disk"),
        option_bytes(
            OPT_SET_META_CONTEXT,
            &meta_payload("disk", &["base:allocation"]),
        ),
        option_bytes(
            OPT_LIST_META_CONTEXT,
            &meta_payload("", &["base:", "qemu:dirty"]),
        ),
        option_bytes(OPT_STRUCTURED_REPLY, &[]),
        option_bytes(OPT_EXTENDED_HEADERS, &[]),
    ];
    let n = driver::run(
        "option",
        &corpus("option"),
        &seeds,
        4096,
        option_check::check,
    );
    assert!(n > 0);
}

#[test]
fn request_decoders() {
    let session = |size: u64, extended: bool| {
        let mut p = size.to_be_bytes().to_vec();
        p.extend((FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_TRIM).to_be_bytes());
        p.push(3);
        p.push(u8::from(extended));
        p.extend((32u32 << 20).to_be_bytes());
        p.extend([0; 4]);
        p
    };
    let mut seeds = Vec::new();
    for (kind, len) in [
        (CMD_READ, 4096),
        (CMD_WRITE, 512),
        (CMD_TRIM, 1 << 20),
        (CMD_FLUSH, 0),
    ] {
        let mut s = session(1 << 30, false);
        s.extend(request(kind, 0, 7, 8192, len));
        seeds.push(s);
    }
    let mut ext = session(1 << 40, true);
    ext.extend(EXTENDED_REQUEST_MAGIC.to_be_bytes());
    ext.extend(0u16.to_be_bytes());
    ext.extend(CMD_BLOCK_STATUS.to_be_bytes());
    ext.extend(9u64.to_be_bytes());
    ext.extend(0u64.to_be_bytes());
    ext.extend((1u64 << 32).to_be_bytes());
    seeds.push(ext);
    let n = driver::run(
        "request",
        &corpus("request"),
        &seeds,
        256,
        request_check::check,
    );
    assert!(n > 0);
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Whole client sessions, valid and mutated, against a server with a read-only and a
/// writable export: the server must never panic (its connection tasks would swallow
/// that, so a panic hook counts them) and must keep serving correct bytes.
#[test]
fn handshake_and_transmission_sessions() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default(info);
    }));
    let image = pattern_image(1 << 20);
    let mut exports = ExportMap::new();
    exports.insert("disk", Arc::new(MemDevice::new(image.clone(), false)));
    exports.insert("rw", Arc::new(MemDevice::new(image.clone(), true)));
    let server = Server::start(exports, Config::default());

    let client_flags = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let session = |options: &[Vec<u8>], requests: &[Vec<u8>]| {
        let mut v = client_flags.clone();
        for o in options {
            v.extend(o);
        }
        for r in requests {
            v.extend(r);
        }
        v
    };
    let mut write = request(CMD_WRITE, 0, 3, 4096, 16);
    write.extend([0xab; 16]);
    let seeds = vec![
        session(&[option_bytes(OPT_LIST, &[])], &[]),
        session(
            &[option_bytes(OPT_GO, &go_payload("disk"))],
            &[
                request(CMD_READ, 0, 1, 0, 4096),
                request(CMD_DISC, 0, 2, 0, 0),
            ],
        ),
        session(
            &[
                option_bytes(OPT_STRUCTURED_REPLY, &[]),
                option_bytes(
                    OPT_SET_META_CONTEXT,
                    &meta_payload("rw", &["base:allocation"]),
                ),
                option_bytes(OPT_GO, &go_payload("rw")),
            ],
            &[
                write,
                request(CMD_BLOCK_STATUS, 0, 4, 0, 65536),
                request(CMD_FLUSH, 0, 5, 0, 0),
            ],
        ),
        session(
            &[
                option_bytes(OPT_EXTENDED_HEADERS, &[]),
                option_bytes(OPT_INFO, &go_payload("")),
            ],
            &[],
        ),
        session(
            &[option_bytes(OPT_EXPORT_NAME, b"disk")],
            &[request(CMD_READ, 0, 1, 1 << 19, 512)],
        ),
        session(
            &[
                option_bytes(OPT_STARTTLS, &[]),
                option_bytes(OPT_ABORT, &[]),
            ],
            &[],
        ),
    ];
    let checked = AtomicUsize::new(0);
    let check = |input: &[u8]| {
        let mut s = server.connect();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The server may close early: write errors are fine, hangs are not.
        let _ = s.write_all(input);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        assert_eq!(PANICS.load(Ordering::SeqCst), 0, "the server panicked");
        // Every so often, a well-behaved client still gets the right bytes.
        if checked.fetch_add(1, Ordering::Relaxed) % 64 == 0 {
            let (mut c, size, _) = open(&server, "disk");
            assert_eq!(size, image.len() as u64);
            assert_eq!(pread(&mut c, 65536, 4096).unwrap(), image[65536..][..4096]);
        }
    };
    let n = driver::run("handshake", &corpus("handshake"), &seeds, 8192, check);
    assert!(n > 0);
    let (mut c, _, _) = open(&server, "disk");
    assert_eq!(pread(&mut c, 0, 4096).unwrap(), image[..4096]);
}
