//! Request decoding and validation on arbitrary bytes and sessions: whatever
//! validation accepts must lie inside the export and within the limits.
//! Shared by the cargo-fuzz target and the stable test
//! (`crates/nbd/tests/fuzz_stable.rs`).

use tessera_nbd::request::{decode_request, validate, Command, Session};

pub fn check(data: &[u8]) {
    if data.len() < 20 {
        return;
    }
    let (params, rest) = data.split_at(20);
    let session = Session {
        size: u64::from_be_bytes(params[0..8].try_into().unwrap()),
        eflags: u16::from_be_bytes([params[8], params[9]]),
        structured: params[10] & 1 != 0,
        block_status: params[10] & 2 != 0,
        max_len: u64::from(u32::from_be_bytes(params[12..16].try_into().unwrap())),
    };
    let extended = params[11] & 1 != 0;
    let Ok(Some(h)) = decode_request(rest, extended) else {
        return;
    };
    let _ = h.check_payload(extended, 64 << 20);
    let Ok(cmd) = validate(&h, &session) else {
        return;
    };
    let in_range =
        |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= session.size);
    match cmd {
        Command::Read { offset, len, .. } | Command::Write { offset, len, .. } => {
            assert!(in_range(offset, len));
            assert!(len <= session.max_len);
        }
        Command::Trim { offset, len, .. }
        | Command::Cache { offset, len }
        | Command::WriteZeroes { offset, len, .. } => assert!(in_range(offset, len)),
        Command::BlockStatus { offset, len, .. } => {
            assert!(in_range(offset, len) && len > 0 && session.block_status)
        }
        Command::Flush | Command::Disc => {}
    }
}
