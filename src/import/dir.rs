//! `tessera import dir`: a local directory tree into the store.
//!
//! - Symlinks are recorded, never followed, except one naming the root itself (like `cp -H`).
//! - The walk stays on the root's filesystem: a mount point below the root is recorded as
//!   an empty directory (with the mounted root's metadata), like `cp -x` or `du -x`.
//! - The store directory itself is skipped if it lies inside the imported tree.
//! - Files and directories are read with `O_NOATIME`, so importing does not change the
//!   atimes it records and re-importing an unchanged tree gives the same tree id.
//! - Regular files sharing a device and inode within the tree form one hardlink group.
//! - Unknown file types (none exist on Linux today) are an error rather than silently lost.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use indicatif::ProgressBar;
use rayon::prelude::*;

use super::intake::{Intake, Packing};
use super::{content, meta, readdir, xattr, ImportError, PackSummary};
use crate::store::{ObjectId, Store};
use crate::tree::{Bytes, Entry, Kind, Manifest};

/// What an import stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    pub tree: ObjectId,
    pub entries: usize,
    pub files: usize,
    /// Bytes of file data (holes excluded, hardlinks once).
    pub data_bytes: u64,
    /// Bytes newly written to the store.
    pub new_bytes: u64,
    /// The pack the import wrote its new small objects to, if any.
    pub pack: Option<PackSummary>,
}

/// A walked entry: its manifest entry, where it is on disk, and its inode identity.
struct Found {
    entry: Entry,
    source: PathBuf,
    inode: (u64, u64),
}

/// Import the directory `root`, packing its new small objects as `packing` says.
/// `progress` counts file bytes hashed (its length is set here).
pub fn import_dir(
    store: &Store,
    root: &Path,
    packing: Packing,
    progress: &ProgressBar,
) -> Result<ImportSummary, ImportError> {
    let _lock = store.lock(false)?;
    let mut intake = Intake::new(store, packing)?;
    // A symlink naming the root is followed, like `cp -H`; nothing below it is.
    let root = &root
        .canonicalize()
        .map_err(|e| ImportError::io("resolve", root, e))?;
    let root_meta = fs::symlink_metadata(root).map_err(|e| ImportError::io("stat", root, e))?;
    if !root_meta.is_dir() {
        return Err(ImportError::NotADirectory {
            path: root.to_path_buf(),
        });
    }
    let store_meta =
        fs::metadata(store.root()).map_err(|e| ImportError::io("stat", store.root(), e))?;
    let skip = (store_meta.dev(), store_meta.ino());

    let mut found = walk(root, &root_meta, skip)?;
    found.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
    assign_links(&mut found);

    // One content job per inode: hardlinked files are read once.
    let mut first_of_inode: HashMap<(u64, u64), usize> = HashMap::new();
    let jobs: Vec<usize> = (0..found.len())
        .filter(|&i| found[i].entry.kind == Kind::File)
        .filter(|&i| *first_of_inode.entry(found[i].inode).or_insert(i) == i)
        .collect();
    let total: u64 = jobs.iter().map(|&i| found[i].entry.size.unwrap_or(0)).sum();
    progress.set_length(total);
    let claimed = Mutex::new(HashSet::new());
    let claim = |id| claimed.lock().expect("claim set poisoned").insert(id);
    let spool = intake.spool();
    let stored = jobs
        .par_iter()
        .map(|&i| {
            let f = &found[i];
            let size = f.entry.size.unwrap_or(0);
            let s =
                content::store_file(store, &f.source, size, spool, &claim, &|n| progress.inc(n))?;
            Ok((i, s))
        })
        .collect::<Result<Vec<_>, ImportError>>()?;
    progress.finish_and_clear();

    let mut data_bytes = 0;
    let mut new_bytes = 0;
    let mut by_inode = HashMap::new();
    for (i, s) in stored {
        let f = &mut found[i];
        f.entry.object = Some(s.object);
        f.entry.segments = s.segments;
        data_bytes += f.entry.data_len();
        new_bytes += s.new_bytes;
        intake.staged.extend(s.staged);
        by_inode.insert(f.inode, (s.object, f.entry.segments.clone()));
    }
    for f in found
        .iter_mut()
        .filter(|f| f.entry.kind == Kind::File && f.entry.object.is_none())
    {
        let (object, segments) = by_inode[&f.inode].clone();
        f.entry.object = Some(object);
        f.entry.segments = segments;
    }
    let files = jobs.len();
    let manifest = Manifest::new(found.into_iter().map(|f| f.entry).collect());
    debug_assert!(manifest.validate().is_ok(), "{:?}", manifest.validate());
    // Objects get their names only now that every file was read, then the tree.
    let finished = intake.finish(&[&manifest])?;
    Ok(ImportSummary {
        tree: finished.trees[0],
        entries: manifest.entries.len(),
        files,
        data_bytes,
        new_bytes,
        pack: finished.pack.as_ref().map(PackSummary::of),
    })
}

/// Depth-first walk of `root`, staying on its filesystem and skipping the inode `skip`.
fn walk(
    root: &Path,
    root_meta: &fs::Metadata,
    skip: (u64, u64),
) -> Result<Vec<Found>, ImportError> {
    let mut out = vec![found(root.to_path_buf(), Vec::new())?.0];
    let mut stack = vec![(root.to_path_buf(), Vec::new())];
    while let Some((dir, rel)) = stack.pop() {
        let names = readdir::read_dir_names(&dir)
            .map_err(|e| ImportError::io("read directory", &dir, e))?;
        for name in names {
            let source = dir.join(&name);
            let rel_path = join(&rel, &name);
            let (f, meta) = found(source.clone(), rel_path.clone())?;
            if f.inode == skip {
                continue;
            }
            if meta.is_dir() && meta.dev() == root_meta.dev() {
                stack.push((source, rel_path));
            }
            out.push(f);
        }
    }
    Ok(out)
}

fn join(parent: &[u8], name: &OsString) -> Vec<u8> {
    let mut p = parent.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name.as_bytes());
    p
}

/// Read the entry at `source`: lstat, xattrs and symlink target.
fn found(source: PathBuf, rel: Vec<u8>) -> Result<(Found, fs::Metadata), ImportError> {
    let lstat = |p: &Path| fs::symlink_metadata(p).map_err(|e| ImportError::io("stat", p, e));
    let mut meta = lstat(&source)?;
    let mut target = None;
    if meta.is_symlink() {
        let link =
            fs::read_link(&source).map_err(|e| ImportError::io("read symlink", &source, e))?;
        target = Some(Bytes(link.into_os_string().into_vec()));
        // readlink(2) updates the link's atime whatever the open flags; record it afterwards,
        // so re-importing an unchanged tree records the same atime.
        meta = lstat(&source)?;
    }
    let mut entry = meta::entry(rel, &meta).ok_or_else(|| {
        ImportError::io(
            "import",
            &source,
            std::io::Error::new(std::io::ErrorKind::Unsupported, "unknown file type"),
        )
    })?;
    entry.target = target;
    entry.xattrs = xattr::read(&source)
        .map_err(|e| ImportError::io("read extended attributes of", &source, e))?;
    let inode = (meta.dev(), meta.ino());
    Ok((
        Found {
            entry,
            source,
            inode,
        },
        meta,
    ))
}

/// Give each set of non-directory entries sharing an inode one link group, numbered in
/// path order so the manifest is deterministic.
fn assign_links(found: &mut [Found]) {
    let mut count: HashMap<(u64, u64), usize> = HashMap::new();
    for f in found.iter().filter(|f| f.entry.kind != Kind::Dir) {
        *count.entry(f.inode).or_default() += 1;
    }
    let mut groups: HashMap<(u64, u64), u64> = HashMap::new();
    for f in found
        .iter_mut()
        .filter(|f| f.entry.kind != Kind::Dir && count[&f.inode] > 1)
    {
        let next = groups.len() as u64;
        f.entry.link = Some(*groups.entry(f.inode).or_insert(next));
    }
}
