//! Named images: an ordered list of trees plus the filesystem options, and the step that
//! turns them into an ext4 [`Layout`](tessera_ext4::Layout).
//!
//! Composing an image reads only tree manifests, never file contents: the synthesizer sees
//! each file as a [`DataHandle`](tessera_ext4::DataHandle) into the image's object table.

mod compose;
mod record;
mod size;
pub mod views;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

pub use compose::{
    build, build_on_demand, compose, plan, read_order, read_order_of, Built, Composed, Planned,
};
pub use record::{derive_identity, format_uuid, ImageRecord, Runtime, FORMAT};
pub use size::{parse_size, SizeError};

use crate::store::{ObjectId, Store, StoreError};
use crate::tree::binary::{self, TreeView};
use crate::tree::{merge, Bytes, Manifest, TreeError};

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("tree {id}")]
    Tree {
        id: ObjectId,
        #[source]
        source: TreeError,
    },
    #[error("invalid image record {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("image record {path} has format {format}; this tessera reads format {FORMAT}")]
    RecordFormat { path: PathBuf, format: u32 },
    #[error("invalid image name {name:?}: use 1-128 of A-Z a-z 0-9 . _ - , not starting with '.'")]
    BadName { name: String },
    #[error("an image named {name:?} already exists (remove it first)")]
    Exists { name: String },
    #[error("an image needs at least one tree")]
    NoTrees,
    #[error("image {name:?}: entry {path:?}")]
    Entry {
        name: String,
        path: Bytes,
        #[source]
        source: tessera_ext4::Error,
    },
    #[error("image {name:?} cannot be laid out as ext4")]
    Ext4 {
        name: String,
        #[source]
        source: tessera_ext4::Error,
    },
}

/// Options of `image create` besides the name and trees.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub size: Option<u64>,
    pub inodes: Option<u32>,
    /// Defaults to the image name, truncated to 16 bytes.
    pub label: Option<String>,
}

pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadName {
            name: name.to_owned(),
        })
    }
}

/// The binary form of tree `id`, read in place: from the store's tree cache, else derived
/// from the manifest (validated) and cached for next time. A cache that is damaged, of
/// another version or of another tree is rebuilt; failing to write the cache (a read-only
/// store) only costs the next load a parse.
pub fn load_tree_view(store: &Store, id: &ObjectId) -> Result<TreeView, ImageError> {
    if let Some(view) = views::get(store.root(), id) {
        return Ok(view);
    }
    let view = load_tree_view_anew(store, id)?;
    views::put(store.root(), id, &view);
    Ok(view)
}

/// [`load_tree_view`] without the views a server keeps.
fn load_tree_view_anew(store: &Store, id: &ObjectId) -> Result<TreeView, ImageError> {
    let tree_err = |source| ImageError::Tree { id: *id, source };
    if let Some(map) = store.map_tree_cache(id)? {
        match TreeView::new(Arc::new(map)) {
            Ok(view) if view.tree() == id => return Ok(view),
            Ok(_) => tracing::warn!(tree = %id, "tree cache names another tree; rebuilding"),
            Err(e) => tracing::warn!(tree = %id, error = %e, "unusable tree cache; rebuilding"),
        }
    }
    let manifest = load_tree(store, id)?;
    let bytes = binary::encode(&manifest, id).map_err(|e| tree_err(e.into()))?;
    if let Err(e) = store.put_tree_cache(id, &bytes) {
        tracing::warn!(tree = %id, error = %e, "cannot write the tree cache");
    }
    TreeView::new(Arc::new(bytes)).map_err(|e| tree_err(e.into()))
}

/// Store a validated manifest (its JSON names it) together with its binary form, so the
/// first image made of it needs no parse. Only failing to store the JSON is an error.
pub fn put_tree(store: &Store, manifest: &Manifest) -> Result<ObjectId, StoreError> {
    put_encoded(store, &EncodedTree::new(manifest))
}

/// A validated manifest serialized and named, not yet stored, with its binary form made
/// when first needed (re-importing a tree whose cache exists needs none).
pub struct EncodedTree<'m> {
    pub id: ObjectId,
    manifest: &'m Manifest,
    json: Vec<u8>,
    binary: OnceLock<Option<Arc<Vec<u8>>>>,
}

impl<'m> EncodedTree<'m> {
    pub fn new(manifest: &'m Manifest) -> EncodedTree<'m> {
        let json = manifest.to_bytes();
        EncodedTree {
            id: ObjectId::of(&json),
            manifest,
            json,
            binary: OnceLock::new(),
        }
    }

    fn binary(&self) -> Option<&Arc<Vec<u8>>> {
        self.binary
            .get_or_init(|| {
                binary::encode(self.manifest, &self.id)
                    .inspect_err(|e| tracing::warn!(tree = %self.id, error = %e, "no binary form for this tree"))
                    .ok()
                    .map(Arc::new)
            })
            .as_ref()
    }

    /// The tree read in place, as [`load_tree_view`] would give it once stored.
    pub fn view(&self) -> Option<TreeView> {
        TreeView::new(self.binary()?.clone()).ok()
    }
}

/// Store an encoded tree: [`put_tree`] with the encoding done.
pub fn put_encoded(store: &Store, tree: &EncodedTree) -> Result<ObjectId, StoreError> {
    let id = store.put_tree_bytes(&tree.json)?;
    debug_assert_eq!(id, tree.id);
    if !store.tree_cache_path(&id).exists() {
        if let Some(bytes) = tree.binary() {
            if let Err(e) = store.put_tree_cache(&id, bytes) {
                tracing::warn!(tree = %id, error = %e, "cannot write the tree cache");
            }
        }
    }
    Ok(id)
}

/// Load and validate the manifest of tree `id`.
pub fn load_tree(store: &Store, id: &ObjectId) -> Result<Manifest, ImageError> {
    let bytes = store.read_tree_bytes(id)?;
    Manifest::from_bytes(&bytes).map_err(|source| ImageError::Tree { id: *id, source })
}

/// Create the image `name` from `trees`, checking that the merged tree lays out as ext4.
/// Reads manifests only, and sizes the image without synthesizing it ([`plan`]): the
/// metadata is generated by whoever first reads the image.
pub fn create(
    store: &Store,
    name: &str,
    trees: &[ObjectId],
    opts: &CreateOptions,
) -> Result<(ImageRecord, Planned), ImageError> {
    validate_name(name)?;
    if trees.is_empty() {
        return Err(ImageError::NoTrees);
    }
    let _lock = store.lock(false)?;
    if store.image_path(name).exists() {
        return Err(ImageError::Exists {
            name: name.to_owned(),
        });
    }
    let record = record(name, trees, opts);
    let planned = plan(store, &record)?;
    let record = ImageRecord {
        device_size: Some(planned.summary.size),
        ..record
    };
    let json = serde_json::to_vec_pretty(&record).expect("a record always serializes");
    store.write_image_bytes(name, &json)?;
    Ok((record, planned))
}

/// The record `create` would write for an image `name` of `trees`, not stored: what
/// `import` lays out to pack a tree's objects in the order an image of it reads them.
pub fn record(name: &str, trees: &[ObjectId], opts: &CreateOptions) -> ImageRecord {
    let (uuid, hash_seed, checksum_seed) = derive_identity(name, trees);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let label = opts.label.clone().unwrap_or_else(|| truncate(name, 16));
    ImageRecord {
        format: FORMAT,
        name: name.to_owned(),
        trees: trees.to_vec(),
        size: opts.size,
        inodes: opts.inodes,
        label,
        created,
        uuid,
        hash_seed,
        checksum_seed,
        device_size: None,
        runtime: None,
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Read the record of image `name`.
pub fn load(store: &Store, name: &str) -> Result<ImageRecord, ImageError> {
    validate_name(name)?;
    let bytes = store.read_image_bytes(name)?;
    parse_record(store, name, &bytes)
}

pub(crate) fn parse_record(
    store: &Store,
    name: &str,
    bytes: &[u8],
) -> Result<ImageRecord, ImageError> {
    let path = store.image_path(name);
    let record: ImageRecord =
        serde_json::from_slice(bytes).map_err(|source| ImageError::Record {
            path: path.clone(),
            source,
        })?;
    if record.format != FORMAT {
        return Err(ImageError::RecordFormat {
            path,
            format: record.format,
        });
    }
    Ok(record)
}

/// Merge the trees of `record` in order.
pub fn merged_entries(
    store: &Store,
    record: &ImageRecord,
) -> Result<Vec<merge::Layered>, ImageError> {
    let layers = record
        .trees
        .iter()
        .map(|id| load_tree(store, id))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(merge::merge(layers))
}

pub fn remove(store: &Store, name: &str) -> Result<(), ImageError> {
    validate_name(name)?;
    Ok(store.remove_image(name)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_views_are_cached_rebuilt_when_damaged_and_collected_with_their_tree() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tree = crate::demo::store_demo_tree(&store).unwrap();
        let view = load_tree_view(&store, &tree).unwrap();
        assert_eq!(view.to_manifest(), load_tree(&store, &tree).unwrap());
        let cache = store.tree_cache_path(&tree);
        assert!(cache.exists(), "the first load writes the cache");

        // A damaged cache is rebuilt from the manifest.
        std::fs::remove_file(&cache).unwrap();
        std::fs::write(&cache, b"tsrtree\nrubbish").unwrap();
        let again = load_tree_view(&store, &tree).unwrap();
        assert_eq!(again.to_manifest(), view.to_manifest());
        assert_eq!(std::fs::read(&cache).unwrap()[..8], *b"tsrtree\n");

        // No image names the tree: gc removes it and its cache.
        crate::upkeep::gc(&store, false).unwrap();
        assert!(!store.has_tree(&tree) && !cache.exists());
    }
}
