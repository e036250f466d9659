//! Handshake decoders on arbitrary bytes: they may refuse, never panic, and
//! what they accept must be self-consistent. Shared by the cargo-fuzz target
//! and the stable test (`crates/nbd/tests/fuzz_stable.rs`).

use tessera_nbd::option::{decode_client_flags, decode_option, decode_option_header, ClientOption};
use tessera_nbd::proto::MAX_STRING_LEN;

pub fn check(data: &[u8]) {
    if data.len() >= 4 {
        let _ = decode_client_flags(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
    }
    if let Ok(Some(h)) = decode_option_header(data) {
        let payload = &data[16..];
        let payload = &payload[..payload.len().min(h.len as usize)];
        match decode_option(h.code, payload) {
            Ok(ClientOption::Info(r)) | Ok(ClientOption::Go(r)) => {
                assert!(r.name.len() <= MAX_STRING_LEN);
                assert_eq!(4 + r.name.len() + 2 + 2 * r.requests.len(), payload.len());
            }
            Ok(ClientOption::ListMetaContext(m)) | Ok(ClientOption::SetMetaContext(m)) => {
                let used: usize =
                    8 + m.export.len() + m.queries.iter().map(|q| 4 + q.len()).sum::<usize>();
                assert_eq!(used, payload.len());
            }
            _ => {}
        }
    }
    // Every code over the raw input, as if it were a payload.
    for code in 0..12 {
        let _ = decode_option(code, data);
    }
}
