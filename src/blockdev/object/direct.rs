//! An object's side of a planned read (`ImageDevice::plan_read`): copy what is resident,
//! else hand back an open descriptor for the caller to read from.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use tessera_nbd::pread_nowait;

use super::{Backing, Object};
use crate::blockdev::fds::Open;

/// How one data piece of a planned read is served.
pub(in crate::blockdev) enum Direct {
    /// Already copied into the buffer: its pages were resident.
    Done,
    /// To be read from this descriptor, at the piece's own object offset plus `base` (where
    /// the object starts in its file: non-zero in a pack).
    Read {
        file: Arc<dyn AsFd + Send + Sync>,
        base: u64,
    },
    /// Only the blocking path serves it: bytes fetched from a remote store, or checked
    /// against the object's name first (`serve --verify`) and not checked yet.
    Blocking,
}

impl AsFd for Open {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Object {
    /// Serves `out` (the object's bytes at `offset`) without waiting for the disk: copied
    /// now if resident, else the descriptor to read it from.
    pub(in crate::blockdev) fn plan(
        &self,
        out: &mut [u8],
        offset: u64,
        verify: bool,
    ) -> io::Result<Direct> {
        let remote =
            self.remote.is_some() && (self.partial.get().is_some() || self.backing.get().is_none());
        if verify || remote {
            return Ok(match self.read_resident(out, offset, verify) {
                Some(r) => r.map(|()| Direct::Done)?,
                None => Direct::Blocking,
            });
        }
        let len = out.len() as u64;
        match self.backing()? {
            Backing::Mapped(map) => {
                if offset
                    .checked_add(len)
                    .is_none_or(|end| end > map.len() as u64)
                {
                    return Err(self.too_short(map.len() as u64, offset, len));
                }
                if let Some(r) = self.read_resident(out, offset, false) {
                    return r.map(|()| Direct::Done);
                }
                if let Some((pack, base)) = map.pack_file() {
                    return Ok(Direct::Read {
                        file: pack.clone(),
                        base,
                    });
                }
                // The mapping keeps no descriptor: a cold range of a large object costs an
                // open, small beside the disk read it saves the queue from waiting on.
                Ok(Direct::Read {
                    file: Arc::new(self.open()?),
                    base: 0,
                })
            }
            Backing::Small { len: have, fd } => {
                if offset.checked_add(len).is_none_or(|end| end > *have) {
                    return Err(self.too_short(*have, offset, len));
                }
                let open = fd.get_or_open(|| self.open_small())?;
                // A failed RWF_NOWAIT read (not resident, or an error the real read will
                // report) leaves the range to the caller's read.
                match pread_nowait(&open.file, out, offset) {
                    Some(Ok(())) => Ok(Direct::Done),
                    _ => Ok(Direct::Read {
                        file: open,
                        base: 0,
                    }),
                }
            }
        }
    }
}
