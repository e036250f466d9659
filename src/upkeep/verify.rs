//! `tessera store verify`: re-hash every object, check every outboard against its object's
//! id, parse every tree and image, and check that every reference resolves.

use std::collections::{HashMap, HashSet};
use std::fmt;

use rayon::prelude::*;

use crate::image;
use crate::store::error_chain as chain;
use crate::store::pack::PackIndex;
use crate::store::{Area, ObjectId, Store, StoreError};
use crate::tree::{self, Bytes, Manifest};

/// One thing wrong with a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    CorruptObject {
        id: ObjectId,
        actual: ObjectId,
    },
    UnreadableObject {
        id: ObjectId,
        error: String,
    },
    CorruptTree {
        id: ObjectId,
        actual: ObjectId,
    },
    BadTree {
        id: ObjectId,
        error: String,
    },
    BadImage {
        name: String,
        error: String,
    },
    MissingTree {
        image: String,
        tree: ObjectId,
    },
    MissingObject {
        tree: ObjectId,
        path: Bytes,
        object: ObjectId,
    },
    WrongObjectSize {
        tree: ObjectId,
        path: Bytes,
        object: ObjectId,
        have: u64,
        need: u64,
    },
    StrayFile {
        path: std::path::PathBuf,
    },
    /// An outboard that does not describe its object (`serve --verify` ignores it and
    /// recomputes it).
    BadOutboard {
        id: ObjectId,
        error: String,
    },
    /// An outboard whose object is gone; `store gc` removes it.
    OrphanOutboard {
        id: ObjectId,
    },
    /// A pack whose index cannot be used (servers ignore it and read its objects loose
    /// where a loose copy is left; `store gc` keeps it, since it may hold the only copies).
    BadPack {
        name: String,
        error: String,
    },
    /// A packed copy of an object that does not hash to its id (servers would serve it
    /// unless `--verify`).
    CorruptPackedObject {
        pack: String,
        id: ObjectId,
        actual: ObjectId,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::CorruptObject { id, actual } => {
                write!(
                    f,
                    "object {id} is corrupt: its content hashes to {actual} (`store verify --repair` removes it)"
                )
            }
            Problem::UnreadableObject { id, error } => {
                write!(f, "object {id} cannot be read: {error}")
            }
            Problem::CorruptTree { id, actual } => {
                write!(f, "tree {id} is corrupt: its content hashes to {actual}")
            }
            Problem::BadTree { id, error } => write!(f, "tree {id} is invalid: {error}"),
            Problem::BadImage { name, error } => write!(f, "image {name:?} is invalid: {error}"),
            Problem::MissingTree { image, tree } => {
                write!(f, "image {image:?} names missing tree {tree}")
            }
            Problem::MissingObject { tree, path, object } => {
                write!(
                    f,
                    "tree {tree} entry {path:?} names missing object {object}"
                )
            }
            Problem::WrongObjectSize {
                tree,
                path,
                object,
                have,
                need,
            } => write!(
                f,
                "tree {tree} entry {path:?} needs {need} bytes of object {object}, which has {have}"
            ),
            Problem::StrayFile { path } => write!(f, "stray file {}", path.display()),
            Problem::BadOutboard { id, error } => {
                write!(f, "outboard of object {id} is invalid: {error}")
            }
            Problem::OrphanOutboard { id } => {
                write!(f, "outboard of missing object {id} (`store gc` removes it)")
            }
            Problem::BadPack { name, error } => {
                write!(
                    f,
                    "pack {name} is unusable (servers read its objects loose where a loose copy is left): {error}"
                )
            }
            Problem::CorruptPackedObject { pack, id, actual } => write!(
                f,
                "pack {pack} holds a corrupt copy of object {id}: it hashes to {actual} \
                 (`serve --verify` refuses to read it; `store verify --repair` drops it)"
            ),
        }
    }
}

/// Every pack's index, and every packed object's bytes against its id.
fn verify_packs(
    store: &Store,
    report: &mut VerifyReport,
    sizes: &mut HashMap<ObjectId, u64>,
) -> Result<(), StoreError> {
    let dir = store.pack_dir();
    for name in store.pack_names()? {
        let index = match PackIndex::open(&dir, &name) {
            Ok(index) => index,
            Err(e) => {
                report.problems.push(Problem::BadPack {
                    name,
                    error: chain(&e),
                });
                continue;
            }
        };
        let pack = match std::fs::File::open(index.pack_path()) {
            // SAFETY: store files are immutable once named; the index was checked against
            // the pack's length, and every slice below is bounds-checked anyway.
            Ok(f) => unsafe { memmap2::Mmap::map(&f) },
            Err(e) => Err(e),
        };
        let pack = match pack {
            Ok(map) => map,
            Err(e) => {
                report.problems.push(Problem::BadPack {
                    name,
                    error: e.to_string(),
                });
                continue;
            }
        };
        let entries: Vec<(ObjectId, u64, u64)> = index.entries().collect();
        let corrupt: Vec<Problem> = entries
            .par_iter()
            .filter_map(|&(id, offset, len)| {
                let bytes = pack.get(offset as usize..(offset + len) as usize)?;
                let actual = ObjectId::of(bytes);
                (actual != id).then(|| Problem::CorruptPackedObject {
                    pack: name.clone(),
                    id,
                    actual,
                })
            })
            .collect();
        report.packed_objects += entries.len();
        for &(id, _, len) in &entries {
            if let std::collections::hash_map::Entry::Vacant(e) = sizes.entry(id) {
                e.insert(len);
                report.objects += 1;
                report.object_bytes += len;
            }
        }
        report.problems.extend(corrupt);
    }
    Ok(())
}

/// An object's actual hash and length, or why it could not be read.
type HashResult = Result<(ObjectId, u64), String>;

#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub objects: usize,
    pub object_bytes: u64,
    /// Objects checked in packs (`objects` counts each object once, loose or packed).
    pub packed_objects: usize,
    pub outboards: usize,
    pub trees: usize,
    pub images: usize,
    pub problems: Vec<Problem>,
}

/// Check the whole store; problems are reported, not returned as errors.
pub fn verify(store: &Store) -> Result<VerifyReport, StoreError> {
    let _lock = store.lock(false)?;
    let mut report = VerifyReport::default();
    let (objects, strays) = store.list(Area::Object)?;
    report
        .problems
        .extend(strays.into_iter().map(|path| Problem::StrayFile { path }));
    let hashed: Vec<(ObjectId, HashResult)> = objects
        .par_iter()
        .map(|id| {
            let path = store.object_path(id);
            let mut hasher = blake3::Hasher::new();
            let result = hasher
                .update_mmap(&path)
                .map(|h| (ObjectId::from(h.finalize()), h.count()))
                .map_err(|e| e.to_string());
            (*id, result)
        })
        .collect();
    let mut sizes = HashMap::new();
    for (id, result) in hashed {
        match result {
            Ok((actual, len)) => {
                if actual != id {
                    report.problems.push(Problem::CorruptObject { id, actual });
                }
                report.object_bytes += len;
                sizes.insert(id, len);
            }
            Err(error) => report
                .problems
                .push(Problem::UnreadableObject { id, error }),
        }
    }
    report.objects = objects.len();
    // Packed objects count as present, whether or not a loose copy is left.
    verify_packs(store, &mut report, &mut sizes)?;

    let (outboards, strays) = store.list(Area::Outboard)?;
    report
        .problems
        .extend(strays.into_iter().map(|path| Problem::StrayFile { path }));
    report.outboards = outboards.len();
    let outboard_problems: Vec<Option<Problem>> = outboards
        .par_iter()
        .map(|id| {
            if objects.binary_search(id).is_err() && !sizes.contains_key(id) {
                return Some(Problem::OrphanOutboard { id: *id });
            }
            store.read_outboard(id).err().map(|e| Problem::BadOutboard {
                id: *id,
                error: chain(&e),
            })
        })
        .collect();
    report
        .problems
        .extend(outboard_problems.into_iter().flatten());

    let (trees, strays) = store.list(Area::Tree)?;
    report
        .problems
        .extend(strays.into_iter().map(|path| Problem::StrayFile { path }));
    report.trees = trees.len();
    let tree_problems: Vec<Vec<Problem>> = trees
        .par_iter()
        .map(|id| verify_tree(store, id, &sizes))
        .collect();
    report.problems.extend(tree_problems.into_iter().flatten());

    let tree_set: HashSet<ObjectId> = trees.into_iter().collect();
    let images = store.list_images()?;
    report.images = images.len();
    for name in images {
        let record = store
            .read_image_bytes(&name)
            .map_err(image::ImageError::from)
            .and_then(|bytes| image::parse_record(store, &name, &bytes));
        match record {
            Err(e) => report.problems.push(Problem::BadImage {
                name,
                error: chain(&e),
            }),
            Ok(record) => {
                for tree in record.trees {
                    if !tree_set.contains(&tree) {
                        report.problems.push(Problem::MissingTree {
                            image: name.clone(),
                            tree,
                        });
                    }
                }
            }
        }
    }
    Ok(report)
}

fn verify_tree(store: &Store, id: &ObjectId, sizes: &HashMap<ObjectId, u64>) -> Vec<Problem> {
    let bytes = match store.read_tree_bytes(id) {
        Ok(b) => b,
        Err(e) => {
            return vec![Problem::BadTree {
                id: *id,
                error: chain(&e),
            }]
        }
    };
    let actual = ObjectId::of(&bytes);
    if actual != *id {
        return vec![Problem::CorruptTree { id: *id, actual }];
    }
    let manifest = match Manifest::from_bytes(&bytes) {
        Ok(m) => m,
        Err(e) => {
            return vec![Problem::BadTree {
                id: *id,
                error: chain(&e),
            }]
        }
    };
    let mut problems = Vec::new();
    for e in manifest
        .entries
        .iter()
        .filter(|e| e.kind == tree::Kind::File)
    {
        let object = e.object.expect("validated: files have an object");
        let need = e.data_len();
        match sizes.get(&object) {
            None if !store.has_object(&object) => problems.push(Problem::MissingObject {
                tree: *id,
                path: e.path.clone(),
                object,
            }),
            // Present but unreadable: already reported with the objects.
            None => {}
            Some(&have) if have != need => problems.push(Problem::WrongObjectSize {
                tree: *id,
                path: e.path.clone(),
                object,
                have,
                need,
            }),
            Some(_) => {}
        }
    }
    problems
}
