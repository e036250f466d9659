//! Encoding of everything the server sends: option replies during the
//! handshake, and simple / structured / extended replies during transmission.

use crate::device::Extent;
use crate::proto::*;

/// One option reply: magic, option, type, length, data.
pub fn option_reply(option: u32, rtype: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend(OPTION_REPLY_MAGIC.to_be_bytes());
    v.extend(option.to_be_bytes());
    v.extend(rtype.to_be_bytes());
    v.extend((data.len() as u32).to_be_bytes());
    v.extend(data);
    v
}

/// Payload of NBD_REP_SERVER (NBD_OPT_LIST).
pub fn rep_server(name: &str, description: Option<&str>) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend(name.as_bytes());
    if let Some(d) = description {
        v.extend(d.as_bytes());
    }
    v
}

pub fn info_export(size: u64, eflags: u16) -> Vec<u8> {
    let mut v = INFO_EXPORT.to_be_bytes().to_vec();
    v.extend(size.to_be_bytes());
    v.extend(eflags.to_be_bytes());
    v
}

pub fn info_string(kind: u16, text: &str) -> Vec<u8> {
    let mut v = kind.to_be_bytes().to_vec();
    v.extend(text.as_bytes());
    v
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    v.extend(min.to_be_bytes());
    v.extend(preferred.to_be_bytes());
    v.extend(max.to_be_bytes());
    v
}

pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = id.to_be_bytes().to_vec();
    v.extend(name.as_bytes());
    v
}

/// Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless the
/// client negotiated NO_ZEROES.
pub fn export_name_reply(size: u64, eflags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = size.to_be_bytes().to_vec();
    v.extend(eflags.to_be_bytes());
    if !no_zeroes {
        v.extend([0u8; 124]);
    }
    v
}

/// Which reply format the transmission phase uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// Only simple replies (no NBD_OPT_STRUCTURED_REPLY).
    Simple,
    /// Structured replies with 20-byte chunk headers.
    Structured,
    /// Extended headers: 32-byte chunk headers, no simple replies at all.
    Extended,
}

impl ReplyMode {
    pub fn structured(self) -> bool {
        self != ReplyMode::Simple
    }

    fn chunk_header_len(self) -> usize {
        match self {
            ReplyMode::Simple => 16,
            ReplyMode::Structured => 20,
            ReplyMode::Extended => 32,
        }
    }

    /// Appends a chunk header. `req_offset` is the request's offset, which
    /// extended headers echo back in every chunk.
    fn chunk_header(
        self,
        out: &mut Vec<u8>,
        flags: u16,
        rtype: u16,
        cookie: u64,
        req_offset: u64,
        payload_len: u64,
    ) {
        match self {
            ReplyMode::Simple => unreachable!("simple replies have no chunks"),
            ReplyMode::Structured => {
                out.extend(STRUCTURED_REPLY_MAGIC.to_be_bytes());
                out.extend(flags.to_be_bytes());
                out.extend(rtype.to_be_bytes());
                out.extend(cookie.to_be_bytes());
                out.extend((payload_len as u32).to_be_bytes());
            }
            ReplyMode::Extended => {
                out.extend(EXTENDED_REPLY_MAGIC.to_be_bytes());
                out.extend(flags.to_be_bytes());
                out.extend(rtype.to_be_bytes());
                out.extend(cookie.to_be_bytes());
                out.extend(req_offset.to_be_bytes());
                out.extend(payload_len.to_be_bytes());
            }
        }
    }

    /// A successful reply without payload.
    pub fn ok(self, cookie: u64, req_offset: u64) -> Vec<u8> {
        match self {
            // Structured mode may still use a simple reply for payload-less
            // successes, and it is the cheaper one.
            ReplyMode::Simple | ReplyMode::Structured => simple(cookie, 0),
            ReplyMode::Extended => {
                let mut v = Vec::with_capacity(32);
                self.chunk_header(
                    &mut v,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_NONE,
                    cookie,
                    req_offset,
                    0,
                );
                v
            }
        }
    }

    /// A failed reply. Structured modes carry a message for humans.
    pub fn error(self, cookie: u64, req_offset: u64, errno: Errno, msg: &str) -> Vec<u8> {
        match self {
            ReplyMode::Simple => simple(cookie, errno.code()),
            _ => {
                let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING_LEN)];
                let mut v = Vec::with_capacity(self.chunk_header_len() + 6 + msg.len());
                self.chunk_header(
                    &mut v,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_ERROR,
                    cookie,
                    req_offset,
                    6 + msg.len() as u64,
                );
                v.extend(errno.code().to_be_bytes());
                v.extend((msg.len() as u16).to_be_bytes());
                v.extend(msg);
                v
            }
        }
    }

    /// Bytes of header in front of read data: the reply header plus, for
    /// structured modes, the chunk's 8-byte offset.
    pub fn data_header_len(self) -> usize {
        match self {
            ReplyMode::Simple => 16,
            _ => self.chunk_header_len() + 8,
        }
    }

    /// Writes the header of a data reply into `out`, which has exactly
    /// `data_header_len()` bytes; the caller puts `data_len` bytes after it.
    pub fn data_header(
        self,
        out: &mut Vec<u8>,
        cookie: u64,
        req_offset: u64,
        chunk_offset: u64,
        data_len: u64,
        done: bool,
    ) {
        match self {
            ReplyMode::Simple => out.extend(simple(cookie, 0)),
            _ => {
                let flags = if done { REPLY_FLAG_DONE } else { 0 };
                self.chunk_header(
                    out,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    req_offset,
                    8 + data_len,
                );
                out.extend(chunk_offset.to_be_bytes());
            }
        }
    }

    /// Size of an NBD_REPLY_TYPE_OFFSET_HOLE chunk.
    pub fn hole_len(self) -> usize {
        self.chunk_header_len() + 12
    }

    /// An NBD_REPLY_TYPE_OFFSET_HOLE chunk (structured modes only).
    pub fn hole(
        self,
        out: &mut Vec<u8>,
        cookie: u64,
        req_offset: u64,
        chunk_offset: u64,
        len: u32,
        done: bool,
    ) {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        self.chunk_header(out, flags, REPLY_TYPE_OFFSET_HOLE, cookie, req_offset, 12);
        out.extend(chunk_offset.to_be_bytes());
        out.extend(len.to_be_bytes());
    }

    /// An NBD_REPLY_TYPE_NONE chunk closing a multi-chunk reply.
    pub fn done_chunk(self, out: &mut Vec<u8>, cookie: u64, req_offset: u64) {
        self.chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, req_offset, 0);
    }

    /// A complete block-status reply for one context. `extents` must be
    /// non-empty, with lengths that fit the mode (u32 unless extended).
    pub fn block_status(
        self,
        cookie: u64,
        req_offset: u64,
        context: u32,
        extents: &[(u64, u32)],
    ) -> Vec<u8> {
        let mut v = Vec::new();
        if self == ReplyMode::Extended {
            let len = 8 + 16 * extents.len() as u64;
            self.chunk_header(
                &mut v,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS_EXT,
                cookie,
                req_offset,
                len,
            );
            v.extend(context.to_be_bytes());
            v.extend((extents.len() as u32).to_be_bytes());
            for &(len, flags) in extents {
                v.extend(len.to_be_bytes());
                v.extend((flags as u64).to_be_bytes());
            }
        } else {
            let len = 4 + 8 * extents.len() as u64;
            self.chunk_header(
                &mut v,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                cookie,
                req_offset,
                len,
            );
            v.extend(context.to_be_bytes());
            for &(len, flags) in extents {
                v.extend((len as u32).to_be_bytes());
                v.extend(flags.to_be_bytes());
            }
        }
        v
    }
}

fn simple(cookie: u64, error: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend(SIMPLE_REPLY_MAGIC.to_be_bytes());
    v.extend(error.to_be_bytes());
    v.extend(cookie.to_be_bytes());
    v
}

/// Bound on descriptors per reply, so one query cannot make a huge reply; the
/// spec lets the server answer less than was asked.
const MAX_DESCRIPTORS: usize = 65536;

/// Turns a device's extent list into block-status descriptors for a query of
/// `[offset, offset+len)`, following the spec's rules: lengths are non-zero,
/// runs of equal status are merged, with REQ_ONE there is exactly one
/// descriptor no longer than the request, otherwise the list stops after the
/// descriptor that reaches the end of the request. `max_desc` caps a single
/// descriptor's length (u32 without extended headers).
pub fn block_descriptors(
    extents: &[(u64, Extent)],
    len: u64,
    req_one: bool,
    max_desc: u64,
) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut covered = 0u64;
    'outer: for &(elen, kind) in extents {
        let flags = kind.status_flags();
        let mut rest = elen;
        while rest > 0 {
            let take = match out.last_mut() {
                Some((l, f)) if *f == flags && *l < max_desc => {
                    let take = rest.min(max_desc - *l);
                    *l += take;
                    take
                }
                _ => {
                    let take = rest.min(max_desc);
                    out.push((take, flags));
                    take
                }
            };
            rest -= take;
            covered += take;
            if covered >= len || out.len() >= MAX_DESCRIPTORS {
                break 'outer;
            }
        }
    }
    if req_one {
        out.truncate(1);
        if let Some((l, _)) = out.first_mut() {
            *l = (*l).min(len);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_reply_layout() {
        let r = option_reply(OPT_GO, REP_ACK, b"");
        assert_eq!(r.len(), 20);
        assert_eq!(&r[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[8..12], &7u32.to_be_bytes());
        assert_eq!(&r[12..16], &1u32.to_be_bytes());
    }

    #[test]
    fn export_name_zeroes() {
        assert_eq!(export_name_reply(1, 3, false).len(), 134);
        assert_eq!(export_name_reply(1, 3, true).len(), 10);
    }

    #[test]
    fn error_chunk() {
        let r = ReplyMode::Structured.error(5, 0, Errno::Inval, "bad");
        assert_eq!(&r[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&r[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&r[16..20], &9u32.to_be_bytes());
        assert_eq!(&r[20..24], &22u32.to_be_bytes());
        assert_eq!(&r[24..26], &3u16.to_be_bytes());
        assert_eq!(&r[26..], b"bad");
        let s = ReplyMode::Simple.error(5, 0, Errno::Perm, "x");
        assert_eq!(s.len(), 16);
        assert_eq!(&s[4..8], &1u32.to_be_bytes());
    }

    #[test]
    fn extended_ok_is_a_none_chunk() {
        let r = ReplyMode::Extended.ok(1, 4096);
        assert_eq!(r.len(), 32);
        assert_eq!(&r[..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[16..24], &4096u64.to_be_bytes());
    }

    #[test]
    fn data_header_lengths() {
        for mode in [
            ReplyMode::Simple,
            ReplyMode::Structured,
            ReplyMode::Extended,
        ] {
            let mut v = Vec::new();
            mode.data_header(&mut v, 1, 0, 0, 100, true);
            assert_eq!(v.len(), mode.data_header_len());
        }
    }

    #[test]
    fn descriptors_merge_and_clip() {
        let e = [
            (4096, Extent::Data),
            (4096, Extent::Data),
            (8192, Extent::Hole),
            (4096, Extent::Zero),
        ];
        assert_eq!(
            block_descriptors(&e, 10000, false, u32::MAX as u64),
            vec![(8192, 0), (8192, 3)]
        );
        assert_eq!(
            block_descriptors(&e, 100, true, u32::MAX as u64),
            vec![(100, 0)]
        );
        assert_eq!(block_descriptors(&e, 1 << 20, false, 4096).len(), 5);
    }
}
