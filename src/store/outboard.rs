//! Outboard tree hashes: enough of an object's BLAKE3 tree to check one 64 KiB group of it
//! against the object's name without reading the rest.
//!
//! BLAKE3 hashes 1 KiB chunks into a binary tree whose left subtrees are always complete
//! powers of two. A 64-chunk group that starts on a 64 KiB boundary is therefore a subtree
//! of every input longer than 64 KiB (the last group may be short), and its chaining value
//! (CV) depends only on its bytes and its offset. The outboard keeps the CV of every group;
//! merging them with the same left-power-of-two rule gives the root, which must equal the
//! object's id. So an outboard is checked once against the id when loaded, and afterwards
//! each group is checked on its own against its CV.
//!
//! File format (`outboard/ab/cdef…`, named like the object it describes):
//!
//! ```text
//! offset  size  field
//!      0     8  magic b"tssr-obo"
//!      8     1  version (1)
//!      9     1  log2 of the group size (16: 64 KiB groups)
//!     10     6  zero
//!     16     8  object length in bytes, little-endian
//!     24  32*n  CV of group 0, 1, … n-1, n = ceil(length / group size) >= 2
//! ```
//!
//! The file needs no checksum of its own: a damaged CV makes the merged root differ from the
//! id, and the outboard is then ignored (and recomputed from the object if the object is
//! intact). This module is pure: [`Outboard`] checks byte ranges, wherever the bytes came
//! from (a local object, or a chunk fetched from elsewhere).

use std::fs::{self, File};
use std::io;
use std::ops::Range;
use std::path::PathBuf;

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use rayon::prelude::*;

use super::{atomic, Area, ObjectId, Staged, Store, StoreError};

/// Bytes per group: the unit of verification.
pub const GROUP_LEN: u64 = 1 << GROUP_SHIFT;
const GROUP_SHIFT: u8 = 16;

/// Objects longer than this have an outboard; shorter ones are verified whole, against their
/// id, which costs at most this many bytes of hashing per object.
pub const OUTBOARD_MIN: u64 = 256 << 10;

const MAGIC: &[u8; 8] = b"tssr-obo";
const VERSION: u8 = 1;
const HEADER: usize = 24;

/// The group chaining values of one object.
#[derive(Clone, PartialEq, Eq)]
pub struct Outboard {
    len: u64,
    cvs: Vec<ChainingValue>,
}

impl std::fmt::Debug for Outboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outboard")
            .field("len", &self.len)
            .field("groups", &self.cvs.len())
            .finish()
    }
}

/// Why outboard bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboardError {
    #[error("not an outboard file (bad magic or version)")]
    Header,
    #[error("group size 2^{0} is not the supported 2^16")]
    GroupSize(u8),
    #[error("object length {0} needs no outboard (at most 64 KiB)")]
    TooShort(u64),
    #[error("{have} bytes of group hashes, {need} expected for the object length")]
    Length { have: usize, need: u64 },
    #[error("the group hashes merge to {actual}, not to the object's id")]
    Root { actual: ObjectId },
}

/// A group whose bytes do not match the outboard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bytes {}..{} (group {group}) do not match the object's hash", .range.start, .range.end)]
pub struct GroupMismatch {
    pub group: u64,
    pub range: Range<u64>,
}

impl Outboard {
    /// The outboard of `data`, or `None` if it is one group (then check it whole).
    pub fn compute(data: &[u8]) -> Option<Outboard> {
        let len = data.len() as u64;
        if len <= GROUP_LEN {
            return None;
        }
        let cvs = data
            .par_chunks(GROUP_LEN as usize)
            .enumerate()
            .map(|(i, group)| group_cv(i as u64, group))
            .collect();
        Some(Outboard { len, cvs })
    }

    /// Parse an outboard file and check it against `id`, the object it claims to describe.
    pub fn decode(id: &ObjectId, bytes: &[u8]) -> Result<Outboard, OutboardError> {
        let header = bytes.get(..HEADER).ok_or(OutboardError::Header)?;
        if &header[..8] != MAGIC || header[8] != VERSION || header[10..16] != [0; 6] {
            return Err(OutboardError::Header);
        }
        if header[9] != GROUP_SHIFT {
            return Err(OutboardError::GroupSize(header[9]));
        }
        let len = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
        if len <= GROUP_LEN {
            return Err(OutboardError::TooShort(len));
        }
        let body = &bytes[HEADER..];
        let need = len.div_ceil(GROUP_LEN);
        if body.len() as u64 != need.saturating_mul(32) {
            return Err(OutboardError::Length {
                have: body.len(),
                need: need.saturating_mul(32),
            });
        }
        let cvs = body
            .chunks_exact(32)
            .map(|cv| cv.try_into().expect("32 bytes"))
            .collect();
        let outboard = Outboard { len, cvs };
        let actual = outboard.root();
        if actual != *id {
            return Err(OutboardError::Root { actual });
        }
        Ok(outboard)
    }

    /// The file bytes (format in the module doc).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 32 * self.cvs.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[VERSION, GROUP_SHIFT, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&self.len.to_le_bytes());
        for cv in &self.cvs {
            out.extend_from_slice(cv);
        }
        out
    }

    /// The id of the object these groups describe.
    pub fn root(&self) -> ObjectId {
        let split = left_groups(self.cvs.len());
        let (left, right) = self.cvs.split_at(split);
        merge_subtrees_root(&merge(left), &merge(right), Mode::Hash).into()
    }

    /// The object's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: an outboard describes at least two groups.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn groups(&self) -> u64 {
        self.cvs.len() as u64
    }

    /// The byte range of group `index`.
    pub fn group_range(&self, index: u64) -> Range<u64> {
        let start = index * GROUP_LEN;
        start..(start + GROUP_LEN).min(self.len)
    }

    /// The groups that `offset..offset + len` touches (empty for an empty range).
    pub fn groups_covering(&self, offset: u64, len: u64) -> Range<u64> {
        groups_covering(offset, len)
    }

    /// Check the bytes of group `index`.
    pub fn check_group(&self, index: u64, bytes: &[u8]) -> Result<(), GroupMismatch> {
        let range = self.group_range(index);
        let good = self.cvs.get(index as usize).is_some_and(|cv| {
            bytes.len() as u64 == range.end - range.start && group_cv(index, bytes) == *cv
        });
        if good {
            Ok(())
        } else {
            Err(GroupMismatch {
                group: index,
                range,
            })
        }
    }

    /// Check `data`, the object's bytes at `offset`: it must start on a group boundary and
    /// end on one or at the object's end. For a remote fetch, a local read, anything.
    pub fn verify_range(&self, offset: u64, data: &[u8]) -> Result<(), GroupMismatch> {
        let first = offset / GROUP_LEN;
        let end = offset + data.len() as u64;
        let mut at = 0usize;
        for group in groups_covering(offset, data.len() as u64) {
            let range = self.group_range(group);
            let aligned = group != first || range.start == offset;
            if !aligned || range.end > end || range.start >= self.len {
                return Err(GroupMismatch { group, range });
            }
            let n = (range.end - range.start) as usize;
            self.check_group(group, &data[at..at + n])?;
            at += n;
        }
        Ok(())
    }
}

impl Store {
    pub fn outboard_path(&self, id: &ObjectId) -> PathBuf {
        self.content_path(Area::Outboard, id)
    }

    /// The checked outboard of object `id`, or `None` if it has none.
    pub fn read_outboard(&self, id: &ObjectId) -> Result<Option<Outboard>, StoreError> {
        let path = self.outboard_path(id);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("read outboard", &path, e)),
        };
        Outboard::decode(id, &bytes)
            .map(Some)
            .map_err(|source| StoreError::BadOutboard {
                id: *id,
                path,
                source,
            })
    }

    /// Write the outboard of object `id`, replacing any (damaged) one.
    pub fn put_outboard(&self, id: &ObjectId, outboard: &Outboard) -> Result<(), StoreError> {
        let bytes = outboard.encode();
        atomic::write(self, &self.outboard_path(id), 0o444, |f| {
            Ok(io::Write::write_all(f, &bytes)?)
        })
    }

    /// If the staged object `id` is long enough, compute its outboard from the bytes as
    /// written and stage it to be named with the object. Rehashing what was written also
    /// checks it: a mismatch is [`StoreError::HashMismatch`].
    pub(crate) fn attach_outboard(
        &self,
        id: ObjectId,
        staged: &mut Staged,
    ) -> Result<(), StoreError> {
        let tmp = staged.tmp_path().to_path_buf();
        let file = File::open(&tmp).map_err(|e| StoreError::io("open", &tmp, e))?;
        let len = file
            .metadata()
            .map_err(|e| StoreError::io("stat", &tmp, e))?
            .len();
        if len <= OUTBOARD_MIN {
            return Ok(());
        }
        // SAFETY: the file is our own staged copy under tmp/ (a name unique to this process
        // and write), complete and no longer written; nothing else truncates or changes it
        // while the mapping lives, which ends in this function.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| StoreError::io("map", &tmp, e))?;
        let outboard = Outboard::compute(&map).expect("longer than one group");
        let actual = outboard.root();
        if actual != id {
            return Err(StoreError::HashMismatch {
                expected: id,
                actual,
            });
        }
        let bytes = outboard.encode();
        let companion = atomic::stage(self, &self.outboard_path(&id), 0o444, |f| {
            Ok(io::Write::write_all(f, &bytes)?)
        })?;
        staged.attach(companion);
        Ok(())
    }
}

/// The groups that `offset..offset + len` touches.
pub fn groups_covering(offset: u64, len: u64) -> Range<u64> {
    if len == 0 {
        return 0..0;
    }
    offset / GROUP_LEN..(offset + len).div_ceil(GROUP_LEN)
}

/// The chaining value of group `index` of an object longer than one group.
fn group_cv(index: u64, bytes: &[u8]) -> ChainingValue {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(index * GROUP_LEN);
    if bytes.len() >= 128 << 10 {
        hasher.update_rayon(bytes);
    } else {
        hasher.update(bytes);
    }
    hasher.finalize_non_root()
}

/// How many of `n >= 2` groups form the left subtree: BLAKE3 puts the largest power of two
/// strictly below the total there.
fn left_groups(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The chaining value of a non-root subtree made of `cvs`.
fn merge(cvs: &[ChainingValue]) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (left, right) = cvs.split_at(left_groups(cvs.len()));
    merge_subtrees_non_root(&merge(left), &merge(right), Mode::Hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_u32;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn root_equals_blake3_across_lengths() {
        let g = GROUP_LEN as usize;
        for len in [
            g + 1,
            2 * g,
            2 * g + 1,
            3 * g,
            3 * g + 7,
            4 * g,
            5 * g - 1,
            17 * g + 1000,
        ] {
            let bytes = data(len);
            let ob = Outboard::compute(&bytes).expect("more than one group");
            assert_eq!(ob.root(), ObjectId::of(&bytes), "length {len}");
            assert_eq!(ob.groups(), len.div_ceil(g) as u64);
        }
        assert!(Outboard::compute(&data(g)).is_none());
    }

    #[test]
    fn left_groups_is_largest_power_of_two_below() {
        let expect = [(2, 1), (3, 2), (4, 2), (5, 4), (8, 4), (9, 8), (17, 16)];
        for (n, left) in expect {
            assert_eq!(left_groups(n), left, "n = {n}");
        }
    }

    #[test]
    fn encode_decode_round_trip_and_refusals() {
        let bytes = data(300 << 10);
        let id = ObjectId::of(&bytes);
        let ob = Outboard::compute(&bytes).unwrap();
        let file = ob.encode();
        assert_eq!(file.len(), HEADER + 32 * 5);
        assert_eq!(Outboard::decode(&id, &file).unwrap(), ob);

        let other = ObjectId::of(b"another object");
        assert!(matches!(
            Outboard::decode(&other, &file),
            Err(OutboardError::Root { .. })
        ));
        let mut flipped = file.clone();
        flipped[HEADER + 40] ^= 1;
        assert!(matches!(
            Outboard::decode(&id, &flipped),
            Err(OutboardError::Root { .. })
        ));
        assert!(matches!(
            Outboard::decode(&id, &file[..file.len() - 1]),
            Err(OutboardError::Length { .. })
        ));
        let mut magic = file.clone();
        magic[0] ^= 1;
        assert_eq!(Outboard::decode(&id, &magic), Err(OutboardError::Header));
        assert_eq!(
            Outboard::decode(&id, &file[..10]),
            Err(OutboardError::Header)
        );
    }

    #[test]
    fn verify_range_finds_the_flipped_group_only() {
        let g = GROUP_LEN as usize;
        let mut bytes = data(4 * g + 100);
        let ob = Outboard::compute(&bytes).unwrap();
        assert_eq!(ob.verify_range(0, &bytes), Ok(()));
        bytes[2 * g + 5] ^= 0x40;
        assert_eq!(ob.verify_range(0, &bytes[..2 * g]), Ok(()));
        assert_eq!(ob.verify_range(3 * g as u64, &bytes[3 * g..]), Ok(()));
        let err = ob.verify_range(g as u64, &bytes[g..3 * g]).unwrap_err();
        assert_eq!(err.group, 2);
        // Not on group boundaries: refused rather than guessed at.
        assert!(ob.verify_range(1, &bytes[1..g]).is_err());
        assert!(ob.verify_range(0, &bytes[..g - 1]).is_err());
        assert_eq!(ob.groups_covering(g as u64 - 1, 2), 0..2);
        assert_eq!(ob.groups_covering(5, 0), 0..0);
    }
}
