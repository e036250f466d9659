//! Pure decoding and validation of transmission requests.
//!
//! Decoding turns a header into numbers; validation turns numbers into a
//! [`Command`] the device can execute, or into the NBD error the spec asks
//! for. Neither does I/O, so both are unit-tested and fuzzed on slices.

use crate::device::ZeroFlags;
use crate::error::RequestError;
use crate::option::{be_u32, be_u64};
use crate::proto::*;

/// A request header as sent (compact or extended form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Effect length (64-bit with extended headers).
    pub len: u64,
}

/// Header size for the negotiated mode.
pub fn header_len(extended: bool) -> usize {
    if extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    }
}

/// Decodes one request header. `Ok(None)` if `buf` is too short. With
/// extended headers negotiated the client must use the extended magic and
/// without them the compact one; anything else means we lost sync.
pub fn decode_request(buf: &[u8], extended: bool) -> Result<Option<RequestHeader>, RequestError> {
    let Some(h) = buf.get(..header_len(extended)) else {
        return Ok(None);
    };
    let magic = be_u32(&h[0..4]);
    let want = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(RequestError::BadMagic(magic));
    }
    let len = if extended {
        be_u64(&h[24..32])
    } else {
        be_u32(&h[24..28]) as u64
    };
    Ok(Some(RequestHeader {
        flags: u16::from_be_bytes([h[4], h[5]]),
        kind: u16::from_be_bytes([h[6], h[7]]),
        cookie: be_u64(&h[8..16]),
        offset: be_u64(&h[16..24]),
        len,
    }))
}

impl RequestHeader {
    /// Bytes of payload that follow this header on the wire. Must be read
    /// (or skipped) even when the request is then refused, to stay in sync.
    pub fn payload_len(&self, extended: bool) -> u64 {
        let flagged = extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0;
        if self.kind == CMD_WRITE || flagged {
            self.len
        } else {
            0
        }
    }

    /// Refuses payloads too large to skip: "either the server or the client
    /// MAY initiate a hard disconnect if the payload of an NBD_CMD_WRITE
    /// request ... would be large enough to be deemed a denial of service".
    pub fn check_payload(&self, extended: bool, limit: u64) -> Result<u64, RequestError> {
        let len = self.payload_len(extended);
        if len > limit {
            return Err(RequestError::PayloadTooLarge {
                command: command_name(self.kind),
                len,
                limit,
            });
        }
        Ok(len)
    }
}

/// What validation needs to know about the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub size: u64,
    /// Transmission flags sent to the client.
    pub eflags: u16,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub block_status: bool,
    /// Largest READ/WRITE we accept (advertised maximum block size).
    pub max_len: u64,
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u64,
        df: bool,
    },
    Write {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Disc,
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
}

const KNOWN_FLAGS: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

/// Validates a request against the session, in the order nbdkit does so that
/// clients see the same errors: write on read-only (EPERM), range (ENOSPC for
/// writes, EINVAL otherwise), flags (EINVAL), size (EINVAL, or EOVERFLOW for
/// an unfragmentable read), then whether the command was advertised.
pub fn validate(h: &RequestHeader, s: &Session) -> Result<Command, Errno> {
    let (offset, len, flags) = (h.offset, h.len, h.flags);
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    match h.kind {
        // DISC has no reply, so nothing about it can be refused.
        CMD_DISC => return Ok(Command::Disc),
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS
        | CMD_FLUSH => {}
        _ => return Err(Errno::Inval),
    }
    if writes && s.eflags & FLAG_READ_ONLY != 0 {
        return Err(Errno::Perm);
    }
    if h.kind == CMD_FLUSH {
        if offset != 0 || len != 0 {
            return Err(Errno::Inval);
        }
    } else if offset.checked_add(len).is_none_or(|end| end > s.size) {
        return Err(if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            Errno::NoSpc
        } else {
            Errno::Inval
        });
    }

    if flags & !KNOWN_FLAGS != 0 {
        return Err(Errno::Inval);
    }
    let only_for = |flag: u16, kind: u16| flags & flag != 0 && h.kind != kind;
    if only_for(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES)
        || only_for(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES)
        || only_for(CMD_FLAG_DF, CMD_READ)
        || only_for(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS)
    {
        return Err(Errno::Inval);
    }
    let advertised = |f: u16| s.eflags & f != 0;
    if flags & CMD_FLAG_DF != 0 && !advertised(FLAG_SEND_DF) {
        return Err(Errno::Inval);
    }
    if flags & CMD_FLAG_FAST_ZERO != 0 && !advertised(FLAG_SEND_FAST_ZERO) {
        return Err(Errno::Inval);
    }
    if flags & CMD_FLAG_FUA != 0 && !advertised(FLAG_SEND_FUA) {
        return Err(Errno::Inval);
    }
    let fua = flags & CMD_FLAG_FUA != 0;

    if matches!(h.kind, CMD_READ | CMD_WRITE) && len > s.max_len {
        // We can send any read up to max_len unfragmented, so EOVERFLOW
        // only ever means "too big", and only a DF read may be told so.
        return Err(if flags & CMD_FLAG_DF != 0 {
            Errno::Overflow
        } else {
            Errno::Inval
        });
    }

    Ok(match h.kind {
        CMD_READ => Command::Read {
            offset,
            len,
            df: flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_FLUSH if advertised(FLAG_SEND_FLUSH) => Command::Flush,
        CMD_TRIM if advertised(FLAG_SEND_TRIM) => Command::Trim { offset, len, fua },
        CMD_CACHE if advertised(FLAG_SEND_CACHE) => Command::Cache { offset, len },
        CMD_WRITE_ZEROES if advertised(FLAG_SEND_WRITE_ZEROES) => Command::WriteZeroes {
            offset,
            len,
            flags: ZeroFlags {
                may_trim: flags & CMD_FLAG_NO_HOLE == 0,
                fast: flags & CMD_FLAG_FAST_ZERO != 0,
                fua,
            },
        },
        // A status reply needs at least one non-empty extent, so an empty
        // query cannot be answered meaningfully.
        CMD_BLOCK_STATUS if s.structured && s.block_status && len > 0 => Command::BlockStatus {
            offset,
            len,
            req_one: flags & CMD_FLAG_REQ_ONE != 0,
        },
        _ => return Err(Errno::Inval),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: u16, flags: u16, offset: u64, len: u32) -> Vec<u8> {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend(flags.to_be_bytes());
        v.extend(kind.to_be_bytes());
        v.extend(0x1122_3344_5566_7788u64.to_be_bytes());
        v.extend(offset.to_be_bytes());
        v.extend(len.to_be_bytes());
        v
    }

    fn hdr(kind: u16, flags: u16, offset: u64, len: u64) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    const RO: Session = Session {
        size: 1 << 20,
        eflags: FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_DF | FLAG_SEND_CACHE,
        structured: true,
        block_status: true,
        max_len: 32 << 20,
    };

    const RW: Session = Session {
        size: 1 << 20,
        eflags: FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_FAST_ZERO,
        structured: false,
        block_status: false,
        max_len: 32 << 20,
    };

    #[test]
    fn decode_compact() {
        let b = raw(CMD_READ, CMD_FLAG_DF, 4096, 512);
        for n in 0..REQUEST_LEN {
            assert_eq!(decode_request(&b[..n], false).unwrap(), None);
        }
        let h = decode_request(&b, false).unwrap().unwrap();
        assert_eq!(h.kind, CMD_READ);
        assert_eq!(h.flags, CMD_FLAG_DF);
        assert_eq!(h.cookie, 0x1122_3344_5566_7788);
        assert_eq!((h.offset, h.len), (4096, 512));
    }

    #[test]
    fn decode_extended() {
        let mut b = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend(0u16.to_be_bytes());
        b.extend(CMD_BLOCK_STATUS.to_be_bytes());
        b.extend(9u64.to_be_bytes());
        b.extend(1u64.to_be_bytes());
        b.extend((5u64 << 32).to_be_bytes());
        let h = decode_request(&b, true).unwrap().unwrap();
        assert_eq!(
            (h.kind, h.cookie, h.offset, h.len),
            (CMD_BLOCK_STATUS, 9, 1, 5 << 32)
        );
        // A compact magic after extended headers were negotiated is fatal.
        let mut compact = raw(0, 0, 0, 0);
        compact.extend([0u8; 4]);
        assert!(decode_request(&compact, true).is_err());
        assert!(decode_request(&b, false).is_err());
    }

    #[test]
    fn bad_magic() {
        let mut b = raw(CMD_READ, 0, 0, 1);
        b[3] = 0;
        assert!(matches!(
            decode_request(&b, false),
            Err(RequestError::BadMagic(_))
        ));
    }

    #[test]
    fn payload_only_for_writes() {
        assert_eq!(hdr(CMD_WRITE, 0, 0, 100).payload_len(false), 100);
        assert_eq!(hdr(CMD_READ, 0, 0, 100).payload_len(false), 0);
        assert_eq!(hdr(CMD_TRIM, 0, 0, 100).payload_len(false), 0);
        assert!(hdr(CMD_WRITE, 0, 0, 1 << 40)
            .check_payload(false, 64 << 20)
            .is_err());
    }

    #[test]
    fn writes_on_read_only_are_eperm_even_past_end() {
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(validate(&hdr(kind, 0, 0, 1), &RO), Err(Errno::Perm));
            assert_eq!(validate(&hdr(kind, 0, u64::MAX, 9), &RO), Err(Errno::Perm));
        }
    }

    #[test]
    fn past_end() {
        let size = RO.size;
        assert_eq!(validate(&hdr(CMD_READ, 0, size, 1), &RO), Err(Errno::Inval));
        assert_eq!(
            validate(&hdr(CMD_READ, 0, u64::MAX, 2), &RO),
            Err(Errno::Inval)
        );
        assert!(validate(&hdr(CMD_READ, 0, size - 1, 1), &RO).is_ok());
        assert_eq!(
            validate(&hdr(CMD_WRITE, 0, size, 1), &RW),
            Err(Errno::NoSpc)
        );
        assert_eq!(
            validate(&hdr(CMD_WRITE_ZEROES, 0, size, 1), &RW),
            Err(Errno::NoSpc)
        );
        assert_eq!(validate(&hdr(CMD_TRIM, 0, size, 1), &RW), Err(Errno::Inval));
        assert_eq!(
            validate(&hdr(CMD_BLOCK_STATUS, 0, size, 1), &RO),
            Err(Errno::Inval)
        );
    }

    #[test]
    fn flags_belong_to_their_commands() {
        assert_eq!(
            validate(&hdr(CMD_READ, 1 << 9, 0, 1), &RO),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&hdr(CMD_READ, CMD_FLAG_REQ_ONE, 0, 1), &RO),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&hdr(CMD_BLOCK_STATUS, CMD_FLAG_DF, 0, 1), &RO),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&hdr(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), &RW),
            Err(Errno::Inval)
        );
        // DF needs structured replies (SEND_DF), FUA needs SEND_FUA.
        assert_eq!(
            validate(&hdr(CMD_READ, CMD_FLAG_DF, 0, 1), &RW),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&hdr(CMD_READ, CMD_FLAG_FUA, 0, 1), &RO),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(
                &hdr(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                    0,
                    8
                ),
                &RW
            ),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 8,
                flags: ZeroFlags {
                    may_trim: false,
                    fast: true,
                    fua: false
                }
            })
        );
    }

    #[test]
    fn oversized_reads() {
        let s = Session {
            size: u64::MAX,
            ..RO
        };
        let big = s.max_len + 1;
        assert_eq!(validate(&hdr(CMD_READ, 0, 0, big), &s), Err(Errno::Inval));
        assert_eq!(
            validate(&hdr(CMD_READ, CMD_FLAG_DF, 0, big), &s),
            Err(Errno::Overflow)
        );
        assert!(validate(&hdr(CMD_READ, CMD_FLAG_DF, 0, s.max_len), &s).is_ok());
    }

    #[test]
    fn unadvertised_commands() {
        assert_eq!(validate(&hdr(CMD_FLUSH, 0, 0, 0), &RO), Err(Errno::Inval));
        assert_eq!(validate(&hdr(CMD_FLUSH, 0, 0, 0), &RW), Ok(Command::Flush));
        assert_eq!(validate(&hdr(CMD_FLUSH, 0, 1, 0), &RW), Err(Errno::Inval));
        assert_eq!(validate(&hdr(CMD_CACHE, 0, 0, 1), &RW), Err(Errno::Inval));
        assert_eq!(
            validate(&hdr(CMD_BLOCK_STATUS, 0, 0, 1), &RW),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&hdr(CMD_BLOCK_STATUS, 0, 0, 0), &RO),
            Err(Errno::Inval)
        );
        assert_eq!(validate(&hdr(99, 0, 0, 0), &RW), Err(Errno::Inval));
        assert_eq!(
            validate(&hdr(CMD_DISC, 0xffff, 5, 5), &RW),
            Ok(Command::Disc)
        );
    }
}
