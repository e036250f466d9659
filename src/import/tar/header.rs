//! From one tar header (GNU, PAX or ustar, as the `tar` crate decodes them) to a manifest
//! entry's metadata.
//!
//! - Owners are the numeric ids (`tar --numeric-owner`); user and group names are ignored.
//! - Times: PAX `mtime`/`atime`/`ctime` with their fractions (nanoseconds), else the
//!   header's whole seconds (GNU headers' atime/ctime fields when set); a missing atime or
//!   ctime is the mtime.
//! - Extended attributes: PAX `SCHILY.xattr.NAME` records, as GNU tar `--xattrs` and
//!   bsdtar write them. ACL records (`SCHILY.acl.*`) are not converted.
//! - GNU sparse entries (type `S`) keep their holes; PAX-encoded sparse files
//!   (`GNU.sparse.*`) are refused, since the `tar` crate does not decode them.

use std::io::Read;

use ::tar::EntryType;

use crate::tree::{Bytes, Entry, Kind, Time, Xattr};

/// Largest regular file ext4 holds with 4 KiB blocks (16 TiB): anything bigger in a
/// header is corrupt or hostile.
const MAX_SIZE: u64 = 16 << 40;

/// What one archive member asks for.
pub(crate) enum Member {
    /// Metadata-only members: PAX global headers, GNU volume labels.
    Skip,
    /// An entry; files still need their data (`size`, and whether holes are kept).
    Entry {
        entry: Entry,
        size: u64,
        sparse: bool,
    },
    /// A hardlink to the (raw, not yet normalized) path.
    Hardlink { entry: Entry, target: Vec<u8> },
}

/// Decode the member `e` at normalized path `path`. Errors say what is wrong with it.
pub(crate) fn member<R: Read>(
    e: &mut ::tar::Entry<'_, R>,
    path: Vec<u8>,
) -> Result<Member, String> {
    let h = e.header().clone();
    let ty = h.entry_type();
    let raw_path = e.path_bytes().into_owned();
    let kind = match ty {
        EntryType::XGlobalHeader => return Ok(Member::Skip),
        EntryType::Regular | EntryType::Continuous if raw_path.ends_with(b"/") => Kind::Dir,
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => Kind::File,
        EntryType::Link => Kind::File,
        EntryType::Directory => Kind::Dir,
        EntryType::Symlink => Kind::Symlink,
        EntryType::Char => Kind::Chardev,
        EntryType::Block => Kind::Blockdev,
        EntryType::Fifo => Kind::Fifo,
        other => match other.as_byte() {
            b'V' => return Ok(Member::Skip),
            // GNU incremental dump directory: a directory whose data lists its names.
            b'D' => Kind::Dir,
            b'M' => return Err("multi-volume continuation entries are not supported".into()),
            b => return Err(format!("unsupported entry type {:?}", b as char)),
        },
    };

    let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    if let Some(exts) = e
        .pax_extensions()
        .map_err(|e| format!("bad PAX header: {e}"))?
    {
        for ext in exts {
            let ext = ext.map_err(|e| format!("bad PAX record: {e}"))?;
            pax.push((ext.key_bytes().to_vec(), ext.value_bytes().to_vec()));
        }
    }
    let pax_get = |key: &str| {
        pax.iter()
            .rev()
            .find(|(k, _)| k == key.as_bytes())
            .map(|(_, v)| v.as_slice())
    };
    if pax.iter().any(|(k, _)| k.starts_with(b"GNU.sparse.")) {
        return Err("PAX-format sparse files (GNU.sparse.*) are not supported; \
             archive with `tar --format=gnu --sparse` or without --sparse"
            .into());
    }

    let num = |what: &str, r: std::io::Result<u64>| {
        r.map_err(|e| format!("bad {what} field in the header: {e}"))
    };
    let mode = num("mode", h.mode().map(u64::from))? as u16 & 0o7777;
    let id = |what: &str, v: u64| {
        u32::try_from(v).map_err(|_| format!("{what} {v} does not fit in 32 bits"))
    };
    let uid = id("uid", num("uid", h.uid())?)?;
    let gid = id("gid", num("gid", h.gid())?)?;

    let mtime = match pax_get("mtime") {
        Some(v) => pax_time(v).ok_or("bad PAX mtime")?,
        None => Time(num("mtime", h.mtime())? as i64, 0),
    };
    let gnu_time = |which: fn(&::tar::GnuHeader) -> std::io::Result<u64>| {
        h.as_gnu()
            .and_then(|g| which(g).ok())
            .filter(|&t| t != 0)
            .map(|t| Time(t as i64, 0))
    };
    let atime = match pax_get("atime") {
        Some(v) => pax_time(v).ok_or("bad PAX atime")?,
        None => gnu_time(::tar::GnuHeader::atime).unwrap_or(mtime),
    };
    let ctime = match pax_get("ctime") {
        Some(v) => pax_time(v).ok_or("bad PAX ctime")?,
        None => gnu_time(::tar::GnuHeader::ctime).unwrap_or(mtime),
    };

    let mut xattrs: Vec<Xattr> = pax
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(b"SCHILY.xattr.").map(|name| Xattr {
                name: Bytes(name.to_vec()),
                value: Bytes(v.clone()),
            })
        })
        .collect();
    if xattrs
        .iter()
        .any(|x| x.name.0.is_empty() || x.name.0.contains(&0))
    {
        return Err("an extended attribute has an empty name or a NUL byte in it".into());
    }
    // A later record for the same name wins.
    xattrs.reverse();
    xattrs.sort_by(|a, b| a.name.cmp(&b.name));
    xattrs.dedup_by(|a, b| a.name == b.name);

    let size = e.size();
    if kind == Kind::File && size > MAX_SIZE {
        return Err(format!(
            "the header claims {size} bytes of data, more than ext4 can hold in one file"
        ));
    }
    let link_target = || {
        e.link_name_bytes()
            .map(|t| t.into_owned())
            .unwrap_or_default()
    };
    let rdev = if matches!(kind, Kind::Chardev | Kind::Blockdev) {
        let dev = |what: &str, r: std::io::Result<Option<u32>>| {
            r.map_err(|e| format!("bad device {what} number: {e}"))
                .map(Option::unwrap_or_default)
        };
        Some((
            dev("major", h.device_major())?,
            dev("minor", h.device_minor())?,
        ))
    } else {
        None
    };

    let mut entry = Entry {
        path: Bytes(path),
        kind,
        mode,
        uid,
        gid,
        atime,
        mtime,
        ctime,
        crtime: None,
        xattrs,
        size: (kind == Kind::File).then_some(size),
        object: None,
        segments: None,
        link: None,
        target: None,
        rdev,
        opaque: false,
    };
    if ty == EntryType::Link {
        let target = link_target();
        if target.is_empty() {
            return Err("hardlink with an empty target".into());
        }
        return Ok(Member::Hardlink { entry, target });
    }
    if kind == Kind::Symlink {
        let target = link_target();
        if target.is_empty() || target.contains(&0) {
            return Err("symlink with an empty target or a NUL byte in it".into());
        }
        entry.target = Some(Bytes(target));
    }
    Ok(Member::Entry {
        entry,
        size,
        sparse: ty == EntryType::GNUSparse,
    })
}

/// A PAX time: decimal seconds, optionally negative, with an optional fraction.
fn pax_time(v: &[u8]) -> Option<Time> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    Some(if !neg {
        Time(secs, nanos)
    } else if nanos == 0 {
        Time(-secs, 0)
    } else {
        Time(-secs - 1, 1_000_000_000 - nanos)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(
            pax_time(b"1700000000.5"),
            Some(Time(1_700_000_000, 500_000_000))
        );
        assert_eq!(pax_time(b"12"), Some(Time(12, 0)));
        assert_eq!(pax_time(b"1.123456789999"), Some(Time(1, 123_456_789)));
        assert_eq!(pax_time(b"-1.25"), Some(Time(-2, 750_000_000)));
        assert_eq!(pax_time(b"x"), None);
        assert_eq!(pax_time(b"1.-2"), None);
    }
}
