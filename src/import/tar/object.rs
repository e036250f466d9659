//! Storing an archive entry's data as it streams by: hash while reading, then stage the
//! object under the store's `tmp/` if the store lacks it. Nothing is unpacked anywhere else.
//!
//! The store names objects by their BLAKE3, which is known only once the data has been
//! read, and an archive stream cannot be read twice. Data up to [`IN_MEMORY`] is kept in
//! memory; larger data is spilled to an unlinked file in the store's `tmp/` (gone with the
//! process on a crash) and copied into the staged object (`copy_file_range`).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::import::intake::{Intake, Packing};
use crate::import::ImportError;
use crate::store::{ObjectId, Spool, Store, StoreError};
use crate::tree::Segment;

/// Entries up to this size are buffered in memory.
const IN_MEMORY: u64 = 8 << 20;
const BLOCK: u64 = 4096;
const CHUNK: usize = 1 << 20;

/// Objects stored by one import (in its [`Intake`]), named together before any tree names
/// them.
pub(crate) struct ObjectSink<'s> {
    store: &'s Store,
    pending: HashSet<ObjectId>,
    pub intake: Intake<'s>,
    /// Bytes of file data read (holes excluded).
    pub data_bytes: u64,
    /// Bytes staged as new objects.
    pub new_bytes: u64,
    pub files: usize,
}

/// Why storing an entry failed: reading the archive, or writing the store.
pub(crate) enum SinkError {
    Read(io::Error),
    Store(StoreError),
}

enum Buffer {
    Mem(Vec<u8>),
    Spill(File),
}

impl Buffer {
    fn push(&mut self, store: &Store, chunk: &[u8]) -> Result<(), SinkError> {
        let spill_err = |e| SinkError::Store(StoreError::io("spill to", &store.tmp_dir(), e));
        match self {
            Buffer::Mem(v) if (v.len() + chunk.len()) as u64 <= IN_MEMORY => {
                v.extend_from_slice(chunk)
            }
            Buffer::Mem(v) => {
                let mut f = tempfile::tempfile_in(store.tmp_dir()).map_err(spill_err)?;
                f.write_all(v).map_err(spill_err)?;
                f.write_all(chunk).map_err(spill_err)?;
                *self = Buffer::Spill(f);
            }
            Buffer::Spill(f) => f.write_all(chunk).map_err(spill_err)?,
        }
        Ok(())
    }
}

impl<'s> ObjectSink<'s> {
    pub fn new(store: &'s Store, packing: Packing) -> Result<Self, ImportError> {
        Ok(ObjectSink {
            store,
            pending: HashSet::new(),
            intake: Intake::new(store, packing)?,
            data_bytes: 0,
            new_bytes: 0,
            files: 0,
        })
    }

    /// Read exactly `size` bytes of `data` and stage them as an object unless the store has
    /// it. With `sparse`, all-zero 4 KiB blocks become holes (segments), as a GNU sparse
    /// entry's map describes them; otherwise the file is dense.
    pub fn store(
        &mut self,
        data: &mut dyn Read,
        size: u64,
        sparse: bool,
    ) -> Result<(ObjectId, Option<Vec<Segment>>), SinkError> {
        let mut hasher = blake3::Hasher::new();
        let mut buf = Buffer::Mem(Vec::new());
        let mut segments: Vec<Segment> = Vec::new();
        let mut chunk = vec![0u8; if sparse { BLOCK as usize } else { CHUNK }];
        let mut pos = 0u64;
        while pos < size {
            let want = (size - pos).min(chunk.len() as u64) as usize;
            read_exact(data, &mut chunk[..want])?;
            let piece = &chunk[..want];
            if sparse && piece.iter().all(|&b| b == 0) {
                pos += want as u64;
                continue;
            }
            if sparse {
                match segments.last_mut() {
                    Some(last) if last.0 + last.1 == pos => last.1 += want as u64,
                    _ => segments.push(Segment(pos, want as u64)),
                }
            }
            if want >= 128 << 10 {
                hasher.update_rayon(piece);
            } else {
                hasher.update(piece);
            }
            buf.push(self.store, piece)?;
            pos += want as u64;
        }
        let len: u64 = if sparse {
            segments.iter().map(|s| s.1).sum()
        } else {
            size
        };
        let segments =
            (sparse && size > 0 && segments.as_slice() != [Segment(0, size)]).then_some(segments);
        let id: ObjectId = hasher.finalize().into();
        self.files += 1;
        self.data_bytes += len;
        if !self.store.has_kept_object(&id) && self.pending.insert(id) {
            self.new_bytes += len;
            if let Some(spool) = self.intake.spool().filter(|_| Spool::takes(len)) {
                let Buffer::Mem(bytes) = &buf else {
                    unreachable!("objects a spool takes are smaller than IN_MEMORY")
                };
                let spool_err =
                    |e| SinkError::Store(StoreError::io("spool to", &self.store.tmp_dir(), e));
                spool.append(id, bytes).map_err(spool_err)?;
                return Ok((id, segments));
            }
            let staged = self
                .store
                .stage_object(id, |out| {
                    match &mut buf {
                        Buffer::Mem(v) => out.write_all(v)?,
                        Buffer::Spill(f) => {
                            f.seek(SeekFrom::Start(0))?;
                            io::copy(f, out)?;
                        }
                    }
                    // Hashed as it was read; the copy is of the very bytes hashed.
                    Ok(id)
                })
                .map_err(SinkError::Store)?;
            self.intake.staged.push(staged);
        }
        Ok((id, segments))
    }
}

fn read_exact(data: &mut dyn Read, buf: &mut [u8]) -> Result<(), SinkError> {
    data.read_exact(buf).map_err(|e| {
        SinkError::Read(if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside this entry's data (truncated?)",
            )
        } else {
            e
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_blocks_and_spill() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut sink = ObjectSink::new(&store, Packing::Loose).ok().unwrap();
        let mut data = vec![0u8; 3 * 4096 + 100];
        data[4096] = 1;
        data[3 * 4096 + 99] = 2;
        let (id, segs) = sink
            .store(&mut &data[..], data.len() as u64, true)
            .ok()
            .unwrap();
        assert_eq!(
            segs,
            Some(vec![Segment(4096, 4096), Segment(3 * 4096, 100)])
        );
        let mut object = data[4096..8192].to_vec();
        object.extend_from_slice(&data[3 * 4096..]);
        assert_eq!(id, ObjectId::of(&object));

        let big = vec![7u8; (IN_MEMORY + 5) as usize];
        let (id, segs) = sink
            .store(&mut &big[..], big.len() as u64, false)
            .ok()
            .unwrap();
        assert_eq!(segs, None);
        assert_eq!(id, ObjectId::of(&big));
        store
            .commit(std::mem::take(&mut sink.intake.staged))
            .unwrap();
        assert_eq!(std::fs::read(store.object_path(&id)).unwrap(), big);

        let short = [1u8; 10];
        assert!(matches!(
            sink.store(&mut &short[..], 20, false),
            Err(SinkError::Read(_))
        ));
    }
}
