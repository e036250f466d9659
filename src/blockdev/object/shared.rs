//! An object's side of a read answered without a copy (`ImageDevice::read_resident_shared`):
//! a slice of the object's mapping, kept mapped while the reply that points into it waits
//! for the socket, and handed out only when every page of it is resident (the reply is
//! written from an async thread, where a fault that waits on the disk would stall every
//! client of that thread).
//!
//! Small objects are mapped here on their first such read, through their open descriptor:
//! the mapping lives and dies with the descriptor (`fds.rs`), whose bound also keeps the
//! number of mappings under `vm.max_map_count`.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::Mmap;

use super::resident::Mapping;
use super::{Backing, Object};
use crate::blockdev::fds::Open;

/// Keeps a large object (and so its mapping) alive while a slice of it is in a reply.
struct LargeMap(Arc<Object>);

impl AsRef<[u8]> for LargeMap {
    fn as_ref(&self) -> &[u8] {
        match self.0.backing.get() {
            Some(Backing::Mapped(map)) => map,
            _ => &[],
        }
    }
}

/// Keeps a small object's descriptor and mapping alive while a slice of it is in a reply,
/// even if the clock closes its slot meanwhile.
struct SmallMap(Arc<Open>);

impl AsRef<[u8]> for SmallMap {
    fn as_ref(&self) -> &[u8] {
        self.0.map.get().map_or(&[], |m| &m[..])
    }
}

impl Object {
    /// `len` bytes of the object at `offset` as a slice of its mapping, if they are resident
    /// and (with `verify`) already checked; `None` otherwise (the caller copies, or reads on
    /// an I/O thread).
    pub(in crate::blockdev) fn read_shared(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        verify: bool,
    ) -> Option<io::Result<Bytes>> {
        if len == 0 {
            return Some(Ok(Bytes::new()));
        }
        let end = offset.checked_add(len)?;
        let owned = match self.backing.get()? {
            Backing::Mapped(map) => {
                if verify && !self.check.get()?.is_verified(offset, len) {
                    return None;
                }
                if end > map.len() as u64 || !map.resident(offset as usize, end as usize) {
                    return None;
                }
                Bytes::from_owner(LargeMap(self.clone()))
            }
            Backing::Small { len: have, fd } => {
                if end > *have {
                    return None;
                }
                let open = fd.get()?;
                if verify && !self.check.get()?.is_verified_file(open.ident) {
                    return None;
                }
                let map = mapping(&open)?;
                if end > map.len() as u64 || !map.resident(offset as usize, end as usize) {
                    return None;
                }
                Bytes::from_owner(SmallMap(open))
            }
        };
        Some(Ok(owned.slice(offset as usize..end as usize)))
    }
}

/// The small object's mapping, made on first use; `None` if it cannot be mapped (then it
/// is read with `pread` as before).
fn mapping(open: &Open) -> Option<&Mapping> {
    if let Some(map) = open.map.get() {
        return Some(map);
    }
    // SAFETY: store objects are immutable: written under tmp/, renamed into place read-only
    // and never modified or truncated afterwards (gc only unlinks, which keeps mappings
    // valid). Slices are bounds-checked against the mapping's length, fixed at map time.
    let map = unsafe { Mmap::map(&open.file) }.ok()?;
    Some(open.map.get_or_init(|| Mapping::new(map, open.owner)))
}
