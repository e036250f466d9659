//! Packs: small objects copied back to back, in the order an image reads them.
//!
//! Every object is its own file, and a root filesystem is mostly small files: a cold
//! sequential read of an image opened thousands of files scattered over the disk by their
//! hash-named directories, where a raw image is one file read in order. A pack holds the
//! small objects of an image (those under [`PACK_MAX`]) in image order, each at a 4 KiB
//! boundary, so that reading the image reads the pack from start to end and the kernel's
//! own readahead works across objects; one mapping serves them all.
//!
//! An import writes its new small objects into a pack directly: it spools them ([`Spool`])
//! until it knows the image order, then writes the pack from the spool
//! ([`Store::write_spooled_pack`]) before it names the trees.
//!
//! A pack replaces the loose files of the objects it holds, so that a packed object takes
//! its disk once: `tessera store pack` removes the loose copies once the pack is written,
//! and `store gc` the ones a running server still leased then (it may have found the object
//! loose and open its file again). The store answers for packed objects as for loose ones
//! ([`Store::has_object`], [`Store::read_object`]): an import finds them and writes no
//! copy, a push uploads them, `store verify` hashes them. Objects marked as fetched from a
//! remote are not packed: a bounded cache may evict them. Readers that find an object in a
//! pack read it there, and only there, so that every image naming it shares the same
//! page-cache pages; a server that found an object loose and then finds its file gone reads
//! it from its pack (`blockdev/object.rs`). An object is packed once: a later pack skips
//! objects already in one (two imports that run at once may both pack an object; `store gc`
//! drops the copy readers do not use, which is in the later pack by name). `store gc`
//! removes a pack whose objects are all garbage, and writes the live objects of a pack that
//! holds some garbage into a new pack before it removes the old one.
//!
//! ```text
//! packs/NAME.pack   the objects' bytes, each starting at a multiple of 4096, zero-padded
//! packs/NAME.idx    "TSRPACK1", then the entry count (u64 LE), then per object in
//!                   increasing id order: id (32 bytes), offset in the pack (u64 LE),
//!                   length (u64 LE)
//! ```
//!
//! A process reads the indexes in place and keeps one sorted table over all of them (16
//! bytes per packed object, [`PackSet`]), so a lookup is one binary search however many
//! packs there are.
//!
//! NAME is the BLAKE3 of the index file. The pack is named before its index, so an index
//! always has its pack; a pack without an index (a crash in between) is unused, and
//! removed by `tessera store gc`. Both are written like every store file (under `tmp/`,
//! fsynced, renamed), and loose copies are removed only after both are. A pack whose index
//! is damaged is kept: it may hold the only copy of its objects.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use memmap2::Mmap;

use super::spool::Spool;
use super::{atomic, ObjectId, Store, StoreError};

/// Objects smaller than this are packed: the size below which the read path keeps a
/// descriptor per object rather than a mapping.
pub const PACK_MAX: u64 = 256 << 10;
/// Objects start at multiples of this in a pack: a page, so that a packed object's pages
/// are its own (and shared by every image naming it) and a mapping of it is aligned.
pub const PACK_ALIGN: u64 = 4096;

const MAGIC: &[u8; 8] = b"TSRPACK1";
/// How old the `packs/` mtime must be for a listing to be reused ([`Store::packs`]).
const SETTLED: std::time::Duration = std::time::Duration::from_secs(1);
const HEADER: usize = 16;
const ENTRY: usize = 48;

/// Where a packed object's bytes are: its pack (shared, not copied per object) and its
/// range there.
#[derive(Debug, Clone)]
pub struct Packed {
    pub index: Arc<PackIndex>,
    pub offset: u64,
    pub len: u64,
}

/// What [`Store::write_pack`] did.
#[derive(Debug)]
pub struct PackWritten {
    /// The new pack, or `None` if nothing was left to pack.
    pub index: Option<PackIndex>,
    /// Objects skipped because the store does not have them.
    pub missing: usize,
}

/// One pack's index, mapped; lookups read it in place.
#[derive(Debug)]
pub struct PackIndex {
    name: String,
    pack: PathBuf,
    pack_len: u64,
    idx: Mmap,
    count: usize,
}

impl PackIndex {
    /// Opens and checks the index `NAME.idx` in `dir` (and the length of its pack).
    pub fn open(dir: &Path, name: &str) -> Result<PackIndex, StoreError> {
        let path = dir.join(format!("{name}.idx"));
        let pack = dir.join(format!("{name}.pack"));
        let file = File::open(&path).map_err(|e| StoreError::io("open pack index", &path, e))?;
        // SAFETY: store files are immutable once named (written under tmp/, renamed into
        // place, never modified; gc only unlinks). Every read of the mapping is
        // bounds-checked against its length, fixed here.
        let idx = unsafe { Mmap::map(&file) }.map_err(|e| StoreError::io("map", &path, e))?;
        let bad = |why: &str| StoreError::BadPack {
            path: path.clone(),
            why: why.to_owned(),
        };
        if idx.len() < HEADER || &idx[..8] != MAGIC {
            return Err(bad("not a pack index (no TSRPACK1 header)"));
        }
        let count = u64::from_le_bytes(idx[8..16].try_into().expect("8 bytes")) as usize;
        if Some(idx.len()) != count.checked_mul(ENTRY).and_then(|n| n.checked_add(HEADER)) {
            return Err(bad("its length does not match its entry count"));
        }
        let pack_len = fs::metadata(&pack)
            .map_err(|e| StoreError::io("stat pack", &pack, e))?
            .len();
        let index = PackIndex {
            name: name.to_owned(),
            pack,
            pack_len,
            idx,
            count,
        };
        for i in 0..count {
            let (id, offset, len) = index.entry(i);
            if i > 0 && index.entry(i - 1).0 .0 >= id.0 {
                return Err(bad("its entries are not in increasing id order"));
            }
            if offset % PACK_ALIGN != 0 || offset.checked_add(len).is_none_or(|e| e > pack_len) {
                return Err(bad("an entry lies outside its pack"));
            }
        }
        Ok(index)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pack_path(&self) -> &Path {
        &self.pack
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the pack file.
    pub fn pack_len(&self) -> u64 {
        self.pack_len
    }

    /// Entry `i`: (id, offset, length).
    pub fn entry(&self, i: usize) -> (ObjectId, u64, u64) {
        let e = &self.idx[HEADER + i * ENTRY..HEADER + (i + 1) * ENTRY];
        let id = ObjectId(e[..32].try_into().expect("32 bytes"));
        let offset = u64::from_le_bytes(e[32..40].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(e[40..48].try_into().expect("8 bytes"));
        (id, offset, len)
    }

    /// Every entry, in id order.
    pub fn entries(&self) -> impl Iterator<Item = (ObjectId, u64, u64)> + '_ {
        (0..self.count).map(|i| self.entry(i))
    }
}

/// A store's packs, with one sorted table over all their entries: finding an object costs
/// one binary search however many packs there are (a store where every image was packed on
/// its own has as many packs as images).
#[derive(Debug, Default)]
pub struct PackSet {
    packs: Vec<Arc<PackIndex>>,
    /// Per packed object: the first 8 bytes of its id, its pack (index into `packs`) and
    /// its entry there; sorted by id prefix, then pack, so the first pack (by name) that
    /// holds an object is the one every reader uses.
    table: Vec<(u64, u32, u32)>,
}

impl PackSet {
    fn new(packs: Vec<Arc<PackIndex>>) -> PackSet {
        let mut table = Vec::with_capacity(packs.iter().map(|p| p.len()).sum());
        for (p, pack) in packs.iter().enumerate() {
            for i in 0..pack.len() {
                table.push((prefix(&pack.entry(i).0), p as u32, i as u32));
            }
        }
        table.sort_unstable();
        PackSet { packs, table }
    }

    /// The packs, sorted by name.
    pub fn packs(&self) -> &[Arc<PackIndex>] {
        &self.packs
    }

    /// Where `id` is packed, if it is.
    pub fn find(&self, id: &ObjectId) -> Option<Packed> {
        self.find_where(id, |_| true)
    }

    /// Where `id` is packed in a pack that `pick` accepts, if it is.
    pub fn find_where(&self, id: &ObjectId, pick: impl Fn(&PackIndex) -> bool) -> Option<Packed> {
        let key = prefix(id);
        let first = self.table.partition_point(|e| e.0 < key);
        self.table[first..]
            .iter()
            .take_while(|e| e.0 == key)
            .find_map(|&(_, p, i)| {
                let pack = &self.packs[p as usize];
                let (at, offset, len) = pack.entry(i as usize);
                (at == *id && pick(pack)).then(|| Packed {
                    index: pack.clone(),
                    offset,
                    len,
                })
            })
    }
}

impl Packed {
    /// The object's bytes, read from its pack and checked against `id`.
    pub fn read_checked(&self, id: &ObjectId) -> Result<Vec<u8>, StoreError> {
        use std::os::unix::fs::FileExt;
        let path = self.index.pack_path();
        let file = File::open(path).map_err(|e| StoreError::io("open pack", path, e))?;
        let mut bytes = vec![0u8; self.len as usize];
        file.read_exact_at(&mut bytes, self.offset)
            .map_err(|e| StoreError::io("read pack", path, e))?;
        let actual = ObjectId::of(&bytes);
        if actual != *id {
            return Err(StoreError::CorruptPackedObject {
                pack: path.to_path_buf(),
                id: *id,
                actual,
            });
        }
        Ok(bytes)
    }
}

/// Where [`Store::write_pack`] reads an object from.
enum Source {
    Loose(PathBuf),
    Packed(Packed),
}

fn prefix(id: &ObjectId) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"))
}

/// The packs of a store, as last listed.
#[derive(Debug, Default)]
pub(super) struct PackList {
    /// The `packs/` directory's modification time when listed: a new pack renamed into it
    /// changes it, and the list is read again.
    listed: Option<SystemTime>,
    set: Arc<PackSet>,
}

/// The store's packs, shared by its clones.
pub(super) type SharedPackList = Arc<Mutex<PackList>>;

impl Store {
    pub(crate) fn pack_dir(&self) -> PathBuf {
        self.root.join("packs")
    }

    /// The store's packs (read again if `packs/` changed since last asked). A pack whose
    /// index is damaged is left out, with a warning.
    pub fn packs(&self) -> Arc<PackSet> {
        let dir = self.pack_dir();
        let mtime = fs::metadata(&dir).and_then(|m| m.modified()).ok();
        let mut list = self.packs.lock().unwrap_or_else(|e| e.into_inner());
        if list.listed.is_some() && list.listed == mtime {
            return list.set.clone();
        }
        let mut packs = Vec::new();
        for name in self.pack_names().unwrap_or_default() {
            // Keep what is already mapped.
            if let Some(p) = list.set.packs.iter().find(|p| p.name == name) {
                packs.push(p.clone());
                continue;
            }
            match PackIndex::open(&dir, &name) {
                Ok(p) => packs.push(Arc::new(p)),
                Err(e) => {
                    tracing::warn!(pack = %name, error = %super::error_chain(&e), "ignoring a pack")
                }
            }
        }
        // File times tick with the kernel's coarse clock (a few ms): a pack named in the
        // same tick as this listing would leave the mtime unchanged. Trust a listing only
        // once its mtime is old enough that no change can share it.
        let settled = |m: &SystemTime| m.elapsed().is_ok_and(|age| age > SETTLED);
        list.listed = mtime.filter(settled);
        list.set = Arc::new(PackSet::new(packs));
        list.set.clone()
    }

    /// Names of the packs that have an index, sorted.
    pub fn pack_names(&self) -> Result<Vec<String>, StoreError> {
        super::names_with_suffix(&self.pack_dir(), ".idx")
    }

    /// Files under `packs/` that no index names: packs whose index was never written.
    pub fn orphan_pack_files(&self) -> Result<Vec<PathBuf>, StoreError> {
        let dir = self.pack_dir();
        let names: HashSet<String> = self.pack_names()?.into_iter().collect();
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(out);
        };
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("list", &dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let named = name
                .strip_suffix(".pack")
                .is_some_and(|stem| names.contains(stem));
            if !named && !name.ends_with(".idx") {
                out.push(entry.path());
            }
        }
        Ok(out)
    }

    /// Removes the pack `name` (index first, so no reader finds a pack without data).
    pub fn remove_pack(&self, name: &str) -> Result<(), StoreError> {
        let dir = self.pack_dir();
        for ext in ["idx", "pack"] {
            let path = dir.join(format!("{name}.{ext}"));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove", &path, e)),
            }
        }
        atomic::sync_dir(&dir)
    }

    /// Packs `objects` (in this order; duplicates, large objects, objects already in a pack
    /// and objects not here, such as those a remote cache has not fetched, are skipped) into
    /// a new pack. Objects marked as fetched from a remote are skipped too: a bounded cache
    /// may evict them, which it could not do to a packed copy. Each object is read from its
    /// loose file or, if it has none, from its pack, and checked against its name first.
    /// Call holding the store lock (shared).
    pub fn write_pack(&self, objects: &[ObjectId]) -> Result<PackWritten, StoreError> {
        self.write_pack_replacing(objects, &HashSet::new())
    }

    /// Writes the objects of the pack `index` that `keep` accepts into a new pack, in their
    /// order there, before the caller removes that pack (`store gc` dropping garbage,
    /// `store verify --repair` dropping corrupt copies): the old pack does not count as
    /// holding them. Remove the old pack only if nothing was `missing`.
    pub(crate) fn rewrite_pack(
        &self,
        index: &PackIndex,
        keep: impl Fn(&ObjectId) -> bool,
    ) -> Result<PackWritten, StoreError> {
        let mut kept: Vec<(u64, ObjectId)> = index
            .entries()
            .filter(|(id, _, _)| keep(id))
            .map(|(id, offset, _)| (offset, id))
            .collect();
        kept.sort_unstable();
        let order: Vec<ObjectId> = kept.into_iter().map(|(_, id)| id).collect();
        self.write_pack_replacing(&order, &HashSet::from([index.name().to_owned()]))
    }

    /// [`Store::write_pack`], with objects held only by the packs named in `retiring`
    /// counted as not packed.
    fn write_pack_replacing(
        &self,
        objects: &[ObjectId],
        retiring: &HashSet<String>,
    ) -> Result<PackWritten, StoreError> {
        let packs = self.packs();
        let mut seen = HashSet::new();
        let mut entries: Vec<(ObjectId, u64, u64)> = Vec::new();
        let mut offset = 0u64;
        let mut pending = Vec::new();
        let mut missing = 0;
        for id in objects {
            let packed = packs.find_where(id, |p| !retiring.contains(p.name()));
            if !seen.insert(*id) || packed.is_some() {
                continue;
            }
            let path = self.object_path(id);
            // A retiring pack's copy first: its length is in the index, its bytes are
            // checked as they are read, and a loose copy (if any) is the fallback.
            let (len, source) = match (packs.find(id), fs::metadata(&path)) {
                (Some(p), _) => (p.len, Source::Packed(p)),
                (None, Ok(_)) if super::remote::origin::of(&path).is_some() => continue,
                (None, Ok(m)) => (m.len(), Source::Loose(path)),
                (None, Err(e)) if e.kind() == io::ErrorKind::NotFound => {
                    missing += 1;
                    continue;
                }
                (None, Err(e)) => return Err(StoreError::io("stat", &path, e)),
            };
            if len >= PACK_MAX {
                continue;
            }
            entries.push((*id, offset, len));
            pending.push(source);
            offset = (offset + len).next_multiple_of(PACK_ALIGN);
        }
        if entries.is_empty() {
            return Ok(PackWritten {
                index: None,
                missing,
            });
        }
        let index = self.write_pack_files(&entries, |i, id, buf| {
            match &pending[i] {
                Source::Packed(p) => match p.read_checked(id) {
                    Ok(bytes) => *buf = bytes,
                    // A corrupt packed copy: take a good loose one, if there is one.
                    Err(e @ StoreError::CorruptPackedObject { .. }) => {
                        match fs::read(self.object_path(id)) {
                            Ok(bytes) if ObjectId::of(&bytes) == *id => *buf = bytes,
                            _ => return Err(atomic::Abort::Store(e)),
                        }
                    }
                    Err(e) => return Err(atomic::Abort::Store(e)),
                },
                Source::Loose(path) => {
                    File::open(path)?.read_to_end(buf)?;
                    let actual = ObjectId::of(buf);
                    if actual != *id {
                        return Err(atomic::Abort::Store(StoreError::HashMismatch {
                            expected: *id,
                            actual,
                        }));
                    }
                }
            }
            Ok(())
        })?;
        Ok(PackWritten {
            index: Some(index),
            missing,
        })
    }

    /// Packs the objects of `spool` into a new pack: those named in `order` first, in that
    /// order, then the rest as they were spooled. Objects a pack holds by now (another
    /// import's) are left out. `None` if nothing was left to pack. The spooled bytes are
    /// not hashed again: the import hashed them as it read them, and the spool is its own.
    /// Call holding the store lock (shared).
    pub fn write_spooled_pack(
        &self,
        spool: &Spool,
        order: &[ObjectId],
    ) -> Result<Option<PackIndex>, StoreError> {
        let spooled = spool.entries();
        let at: HashMap<ObjectId, (u64, u64)> = spooled
            .iter()
            .map(|&(id, at, len)| (id, (at, len)))
            .collect();
        let packs = self.packs();
        let mut seen = HashSet::new();
        let mut entries = Vec::new();
        let mut from = Vec::new();
        let mut offset = 0u64;
        for id in order.iter().chain(spooled.iter().map(|e| &e.0)) {
            let Some(&(spooled_at, len)) = at.get(id) else {
                continue;
            };
            if !seen.insert(*id) || packs.find(id).is_some() {
                continue;
            }
            entries.push((*id, offset, len));
            from.push(spooled_at);
            offset = (offset + len).next_multiple_of(PACK_ALIGN);
        }
        if entries.is_empty() {
            return Ok(None);
        }
        let index = self.write_pack_files(&entries, |i, _, buf| {
            buf.resize(entries[i].2 as usize, 0);
            Ok(spool.read_at(buf, from[i])?)
        })?;
        Ok(Some(index))
    }

    /// Writes a pack of `entries` (id, offset, length; offsets aligned and increasing) and
    /// then its index, each durably named; `fill(i, id, buf)` puts entry `i`'s bytes into
    /// the empty `buf`.
    fn write_pack_files(
        &self,
        entries: &[(ObjectId, u64, u64)],
        mut fill: impl FnMut(usize, &ObjectId, &mut Vec<u8>) -> Result<(), atomic::Abort>,
    ) -> Result<PackIndex, StoreError> {
        let dir = self.pack_dir();
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create directory", &dir, e))?;
        let mut idx = Vec::with_capacity(HEADER + entries.len() * ENTRY);
        idx.extend_from_slice(MAGIC);
        idx.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        let mut sorted = entries.to_vec();
        sorted.sort_by_key(|e| e.0 .0);
        for (id, offset, len) in &sorted {
            idx.extend_from_slice(&id.0);
            idx.extend_from_slice(&offset.to_le_bytes());
            idx.extend_from_slice(&len.to_le_bytes());
        }
        let name = ObjectId::of(&idx).to_hex();
        atomic::write(self, &dir.join(format!("{name}.pack")), 0o444, |f| {
            let mut out = io::BufWriter::with_capacity(1 << 20, f);
            let mut buf = Vec::with_capacity(PACK_MAX as usize);
            for (i, (id, offset, len)) in entries.iter().enumerate() {
                buf.clear();
                fill(i, id, &mut buf)?;
                if buf.len() as u64 != *len {
                    return Err(atomic::Abort::Store(StoreError::HashMismatch {
                        expected: *id,
                        actual: ObjectId::of(&buf),
                    }));
                }
                out.write_all(&buf)?;
                let pad = (offset + len).next_multiple_of(PACK_ALIGN) - (offset + len);
                out.write_all(&[0u8; PACK_ALIGN as usize][..pad as usize])?;
            }
            out.flush()?;
            Ok(())
        })?;
        atomic::write(self, &dir.join(format!("{name}.idx")), 0o444, |f| {
            Ok(f.write_all(&idx)?)
        })?;
        PackIndex::open(&dir, &name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn packed_objects_are_found_at_aligned_offsets_with_their_bytes() {
        let (_dir, store) = store();
        let small: Vec<Vec<u8>> = (0..20u8)
            .map(|i| vec![i; 1000 + i as usize * 997])
            .collect();
        let large = vec![7u8; PACK_MAX as usize];
        let mut ids: Vec<ObjectId> = small
            .iter()
            .map(|b| store.put_object_bytes(b).unwrap())
            .collect();
        let large_id = store.put_object_bytes(&large).unwrap();
        ids.insert(5, large_id);
        ids.push(ids[0]);
        let index = store.write_pack(&ids).unwrap().index.expect("a pack");
        assert_eq!(
            index.len(),
            20,
            "large objects and duplicates are not packed"
        );
        let pack = fs::read(index.pack_path()).unwrap();
        let mut last = None;
        for (i, bytes) in small.iter().enumerate() {
            let at = store.packs().find(&ObjectId::of(bytes)).expect("packed");
            assert_eq!(at.offset % PACK_ALIGN, 0);
            assert!(last.is_none_or(|l| at.offset > l), "image order kept");
            last = Some(at.offset);
            assert_eq!(
                &pack[at.offset as usize..(at.offset + at.len) as usize],
                &bytes[..],
                "object {i}"
            );
        }
        assert!(store.packs().find(&large_id).is_none());
        // Packed once: a second pack of the same objects is not written.
        assert!(store.write_pack(&ids).unwrap().index.is_none());
        let extra = store.put_object_bytes(b"one more").unwrap();
        let absent = ObjectId::of(b"never stored");
        let second = store.write_pack(&[ids[1], extra, absent]).unwrap();
        assert_eq!(second.missing, 1, "an object not here is skipped");
        let second = second.index.unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(store.packs().packs().len(), 2);
        assert_eq!(
            store.packs().find(&extra).unwrap().index.name(),
            second.name()
        );
    }

    #[test]
    fn a_spool_is_packed_in_the_order_asked_then_as_spooled() {
        let (_dir, store) = store();
        let bytes: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 100 + 5000 * i as usize]).collect();
        let ids: Vec<ObjectId> = bytes.iter().map(|b| ObjectId::of(b)).collect();
        // Object 5 is packed already (by another import, say).
        let loose = store.put_object_bytes(&bytes[5]).unwrap();
        store.write_pack(&[loose]).unwrap().index.unwrap();
        let spool = Spool::new(&store).unwrap();
        for (id, b) in ids.iter().zip(&bytes) {
            spool.append(*id, b).unwrap();
        }
        assert!(!store.has_object(&ids[0]), "spooled is not stored");
        let never_spooled = ObjectId::of(b"not in the spool");
        let order = [ids[3], never_spooled, ids[1], ids[3]];
        let index = store.write_spooled_pack(&spool, &order).unwrap().unwrap();
        assert_eq!(
            index.len(),
            5,
            "every spooled object but the packed one, once"
        );
        let packs = store.packs();
        let offsets: Vec<u64> = [3, 1, 0, 2, 4]
            .iter()
            .map(|&i| {
                let p = packs.find(&ids[i]).expect("packed");
                assert_eq!(p.index.name(), index.name());
                assert_eq!(p.read_checked(&ids[i]).unwrap(), bytes[i]);
                p.offset
            })
            .collect();
        assert!(
            offsets.is_sorted(),
            "asked order, then spool order: {offsets:?}"
        );
        assert_ne!(packs.find(&ids[5]).unwrap().index.name(), index.name());
        let empty = Spool::new(&store).unwrap();
        assert!(store.write_spooled_pack(&empty, &ids).unwrap().is_none());
    }

    #[test]
    fn objects_are_found_among_many_packs_by_their_whole_id() {
        let (dir, store) = store();
        let mut all = Vec::new();
        for p in 0..30u32 {
            let ids: Vec<ObjectId> = (0..3u32)
                .map(|i| store.put_object_bytes(&(p * 10 + i).to_le_bytes()).unwrap())
                .collect();
            let index = store.write_pack(&ids).unwrap().index.unwrap();
            all.extend(
                ids.into_iter()
                    .map(|id| (id, index.pack_path().to_path_buf())),
            );
        }
        let set = store.packs();
        assert_eq!(set.packs().len(), 30);
        for (id, pack) in &all {
            assert_eq!(set.find(id).expect("packed").index.pack_path(), pack);
        }
        assert!(set.find(&ObjectId::of(b"not packed")).is_none());

        // Two ids that share their first 8 bytes, in a hand-written index: each is found
        // at its own entry, and an id with the same prefix but in neither is not.
        let (a, mut b, mut c) = (ObjectId([7; 32]), ObjectId([7; 32]), ObjectId([7; 32]));
        b.0[31] = 8;
        c.0[20] = 9;
        let mut idx = MAGIC.to_vec();
        idx.extend_from_slice(&2u64.to_le_bytes());
        for (id, offset) in [(a, 0u64), (b, 4096)] {
            idx.extend_from_slice(&id.0);
            idx.extend_from_slice(&offset.to_le_bytes());
            idx.extend_from_slice(&10u64.to_le_bytes());
        }
        let packs = dir.path().join("packs");
        fs::write(packs.join("zz.pack"), vec![0u8; 8192]).unwrap();
        fs::write(packs.join("zz.idx"), &idx).unwrap();
        let set = store.packs();
        assert_eq!(set.packs().len(), 31, "the new pack was listed");
        assert_eq!(set.find(&a).unwrap().offset, 0);
        assert_eq!(set.find(&b).unwrap().offset, 4096);
        assert!(set.find(&c).is_none());
    }

    #[test]
    fn a_damaged_index_is_ignored_not_trusted() {
        let (dir, store) = store();
        let id = store.put_object_bytes(b"packed bytes").unwrap();
        let index = store.write_pack(&[id]).unwrap().index.unwrap();
        let idx_path = dir
            .path()
            .join("packs")
            .join(format!("{}.idx", index.name()));
        let mut bytes = fs::read(&idx_path).unwrap();
        // Point the entry past the end of its pack.
        bytes[HEADER + 32..HEADER + 40].copy_from_slice(&(1u64 << 40).to_le_bytes());
        fs::remove_file(&idx_path).unwrap();
        fs::write(&idx_path, &bytes).unwrap();
        let err = PackIndex::open(&dir.path().join("packs"), index.name()).unwrap_err();
        assert!(err.to_string().contains("outside its pack"), "{err}");
        let reopened = Store::open(dir.path()).unwrap();
        assert!(reopened.packs().find(&id).is_none());
    }

    #[test]
    fn a_changed_loose_object_is_not_packed() {
        let (_dir, store) = store();
        let id = store.put_object_bytes(b"original").unwrap();
        let path = store.object_path(&id);
        let mut perms = fs::metadata(&path).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        fs::set_permissions(&path, perms).unwrap();
        fs::write(&path, b"damaged!").unwrap();
        let err = store.write_pack(&[id]).unwrap_err();
        assert!(matches!(err, StoreError::HashMismatch { .. }), "{err}");
        assert!(store.pack_names().unwrap().is_empty());
        assert!(store.orphan_pack_files().unwrap().is_empty());

        // An object both packed and loose, one copy damaged: a rewrite of its pack copies
        // the good one, either way round.
        for damage_pack in [false, true] {
            let bytes = format!("good copies, damaging the pack: {damage_pack}");
            let good = store.put_object_bytes(bytes.as_bytes()).unwrap();
            // A second object the rewrite drops, so the new pack is not the old one again.
            let dropped = store.put_object_bytes(&[damage_pack as u8; 9]).unwrap();
            let old = store.write_pack(&[good, dropped]).unwrap().index.unwrap();
            if damage_pack {
                let at = store.packs().find(&good).unwrap();
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(old.pack_path())
                    .unwrap();
                std::os::unix::fs::FileExt::write_all_at(&f, b"!", at.offset).unwrap();
            } else {
                let path = store.object_path(&good);
                fs::remove_file(&path).unwrap();
                fs::write(&path, b"a longer and damaged loose copy").unwrap();
            }
            let new = store.rewrite_pack(&old, |id| *id == good).unwrap();
            let new = new.index.unwrap();
            store.remove_pack(old.name()).unwrap();
            let p = store.packs().find(&good).unwrap();
            assert_eq!(p.index.name(), new.name());
            assert_eq!(p.read_checked(&good).unwrap(), bytes.as_bytes());
        }
    }
}
