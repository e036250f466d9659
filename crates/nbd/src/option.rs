//! Pure decoding of the handshake: client flags, option headers and option
//! payloads. No I/O here: the handshake reads bytes and hands slices in, so
//! every rule about lengths and encodings is testable (and fuzzable) alone.

use crate::error::OptionError;
use crate::proto::*;

/// Size of an option header: IHAVEOPT, option code, data length.
pub const OPTION_HEADER_LEN: usize = 16;

/// Flags the client sent after the server's greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Decodes the 32-bit client flags. "The server MUST drop the TCP connection
/// if the client sets an unknown flag."
pub fn decode_client_flags(flags: u32) -> Result<ClientFlags, OptionError> {
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(OptionError::UnknownClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub code: u32,
    pub len: u32,
}

/// Decodes an option header. `Ok(None)` if `buf` is shorter than a header
/// (incomplete input is not an error); a wrong magic is fatal to the session.
pub fn decode_option_header(buf: &[u8]) -> Result<Option<OptionHeader>, OptionError> {
    let Some(h) = buf.get(..OPTION_HEADER_LEN) else {
        return Ok(None);
    };
    let magic = be_u64(&h[0..8]);
    if magic != IHAVEOPT {
        return Err(OptionError::BadMagic(magic));
    }
    Ok(Some(OptionHeader {
        code: be_u32(&h[8..12]),
        len: be_u32(&h[12..16]),
    }))
}

/// Payload of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// NBD_INFO_* types the client asked for, in its order.
    pub requests: Vec<u16>,
}

/// Payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ExtendedHeaders,
    ListMetaContext(MetaRequest),
    SetMetaContext(MetaRequest),
    /// Any other code: answered with NBD_REP_ERR_UNSUP.
    Unknown(u32),
}

/// Decodes an option's payload. Errors are `OptionError::Invalid`, which the
/// handshake answers with NBD_REP_ERR_INVALID (or, for EXPORT_NAME, which
/// cannot be answered with an error, by closing the session).
pub fn decode_option(code: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
    let invalid = |reason: &'static str| OptionError::Invalid { code, reason };
    let no_data = |opt: ClientOption| {
        if data.is_empty() {
            Ok(opt)
        } else {
            Err(invalid("option takes no data"))
        }
    };
    match code {
        OPT_EXPORT_NAME => Ok(ClientOption::ExportName(
            decode_string(data).map_err(invalid)?,
        )),
        // "a server SHOULD ignore any data sent by the client" with ABORT.
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => no_data(ClientOption::List),
        OPT_STARTTLS => no_data(ClientOption::StartTls),
        OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        OPT_EXTENDED_HEADERS => no_data(ClientOption::ExtendedHeaders),
        OPT_INFO | OPT_GO => {
            let req = decode_info(data).map_err(invalid)?;
            Ok(if code == OPT_GO {
                ClientOption::Go(req)
            } else {
                ClientOption::Info(req)
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let req = decode_meta(data).map_err(invalid)?;
            Ok(if code == OPT_SET_META_CONTEXT {
                ClientOption::SetMetaContext(req)
            } else {
                ClientOption::ListMetaContext(req)
            })
        }
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// A cursor over an option payload; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if n > self.buf.len() {
            return Err("length exceeds option data");
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        self.take(4).map(be_u32)
    }
    /// A string preceded by its 32-bit length.
    fn string(&mut self) -> Result<String, &'static str> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_LEN {
            return Err("string longer than 4096 bytes");
        }
        decode_string(self.take(len)?)
    }
}

fn decode_string(bytes: &[u8]) -> Result<String, &'static str> {
    if bytes.len() > MAX_STRING_LEN {
        return Err("string longer than 4096 bytes");
    }
    if bytes.contains(&0) {
        return Err("string contains NUL");
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| "string is not UTF-8")
}

fn decode_info(data: &[u8]) -> Result<InfoRequest, &'static str> {
    let mut r = Reader { buf: data };
    let name = r.string()?;
    let n = r.u16()? as usize;
    // The count must describe the rest of the payload exactly.
    if r.buf.len() != n * 2 {
        return Err("information request count does not match length");
    }
    let requests = (0..n).map(|_| r.u16()).collect::<Result<_, _>>()?;
    Ok(InfoRequest { name, requests })
}

fn decode_meta(data: &[u8]) -> Result<MetaRequest, &'static str> {
    let mut r = Reader { buf: data };
    let export = r.string()?;
    let n = r.u32()? as usize;
    // Each query needs at least its 4-byte length: reject absurd counts
    // before allocating for them.
    if n > r.buf.len() / 4 {
        return Err("query count exceeds option data");
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(r.string()?);
    }
    if !r.buf.is_empty() {
        return Err("trailing bytes after queries");
    }
    Ok(MetaRequest { export, queries })
}

pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(code: u32, len: u32) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend(code.to_be_bytes());
        v.extend(len.to_be_bytes());
        v
    }

    fn info_payload(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend(name.as_bytes());
        v.extend((reqs.len() as u16).to_be_bytes());
        for r in reqs {
            v.extend(r.to_be_bytes());
        }
        v
    }

    fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut v = (export.len() as u32).to_be_bytes().to_vec();
        v.extend(export.as_bytes());
        v.extend((queries.len() as u32).to_be_bytes());
        for q in queries {
            v.extend((q.len() as u32).to_be_bytes());
            v.extend(q.as_bytes());
        }
        v
    }

    #[test]
    fn header_incomplete_is_not_an_error() {
        let h = header(OPT_GO, 7);
        for n in 0..OPTION_HEADER_LEN {
            assert_eq!(decode_option_header(&h[..n]).unwrap(), None);
        }
        assert_eq!(
            decode_option_header(&h).unwrap(),
            Some(OptionHeader {
                code: OPT_GO,
                len: 7
            })
        );
    }

    #[test]
    fn header_bad_magic_is_fatal() {
        let mut h = header(OPT_GO, 0);
        h[0] ^= 1;
        assert!(matches!(
            decode_option_header(&h),
            Err(OptionError::BadMagic(_))
        ));
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            decode_client_flags(3).unwrap(),
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            }
        );
        assert!(decode_client_flags(4).is_err());
    }

    #[test]
    fn go_with_requests() {
        let p = info_payload("disk", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            decode_option(OPT_GO, &p).unwrap(),
            ClientOption::Go(InfoRequest {
                name: "disk".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
    }

    #[test]
    fn info_name_past_end_is_invalid() {
        let mut p = info_payload("disk", &[]);
        p[3] = 200; // name length beyond the payload
        assert!(matches!(
            decode_option(OPT_INFO, &p),
            Err(OptionError::Invalid { .. })
        ));
    }

    #[test]
    fn info_count_mismatch_is_invalid() {
        let mut p = info_payload("d", &[1, 2]);
        p.push(0); // odd trailing byte
        assert!(decode_option(OPT_INFO, &p).is_err());
        let mut p = info_payload("d", &[1, 2]);
        p.truncate(p.len() - 2); // count says 2, only 1 present
        assert!(decode_option(OPT_INFO, &p).is_err());
    }

    #[test]
    fn every_truncation_of_go_is_invalid_not_panic() {
        let p = info_payload("export", &[0, 1, 2, 3]);
        for n in 0..p.len() {
            assert!(decode_option(OPT_GO, &p[..n]).is_err(), "len {n}");
        }
    }

    #[test]
    fn meta_queries() {
        let p = meta_payload("e", &["base:allocation", "qemu:dirty-bitmap:x"]);
        let ClientOption::SetMetaContext(m) = decode_option(OPT_SET_META_CONTEXT, &p).unwrap()
        else {
            panic!()
        };
        assert_eq!(m.export, "e");
        assert_eq!(m.queries, vec!["base:allocation", "qemu:dirty-bitmap:x"]);
        for n in 0..p.len() {
            assert!(decode_option(OPT_SET_META_CONTEXT, &p[..n]).is_err());
        }
    }

    #[test]
    fn meta_huge_count_rejected_without_allocating() {
        let mut p = meta_payload("e", &[]);
        let n = p.len();
        p[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_option(OPT_LIST_META_CONTEXT, &p).is_err());
    }

    #[test]
    fn no_data_options_reject_data() {
        for code in [
            OPT_LIST,
            OPT_STARTTLS,
            OPT_STRUCTURED_REPLY,
            OPT_EXTENDED_HEADERS,
        ] {
            assert!(decode_option(code, b"x").is_err());
            assert!(decode_option(code, b"").is_ok());
        }
        assert_eq!(
            decode_option(OPT_ABORT, b"junk").unwrap(),
            ClientOption::Abort
        );
    }

    #[test]
    fn strings_are_checked() {
        assert!(decode_option(OPT_EXPORT_NAME, b"a\0b").is_err());
        assert!(decode_option(OPT_EXPORT_NAME, &[0xff, 0xfe]).is_err());
        assert!(decode_option(OPT_EXPORT_NAME, &vec![b'a'; 4097]).is_err());
        assert_eq!(
            decode_option(OPT_EXPORT_NAME, b"").unwrap(),
            ClientOption::ExportName(String::new())
        );
    }

    #[test]
    fn unknown_codes_pass_through() {
        assert_eq!(
            decode_option(4, b"whatever").unwrap(),
            ClientOption::Unknown(4)
        );
        assert_eq!(
            decode_option(0xdead, b"").unwrap(),
            ClientOption::Unknown(0xdead)
        );
    }
}
