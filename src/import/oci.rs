//! `tessera import oci DIR[:TAG|@DIGEST]`: an OCI image layout, layer by layer.
//!
//! # One tree per layer, with the layers below already applied
//!
//! Layer *k* becomes the tree of layers 1..*k* merged with the OCI rules (like an OCI
//! ChainID): `.wh.NAME` deletes NAME and everything below it from the lower layers,
//! `.wh..wh..opq` hides a directory's lower contents, and neither marker appears in the
//! tree. The image is made of the top tree alone. So:
//!
//! - a tree never holds a whiteout, and `image create --tree …` keeps its plain "later
//!   trees win" meaning: any chain tree can be used alone or under other trees;
//! - images sharing base layers share those layers' trees (a chain tree depends only on
//!   the layers up to it), and file objects are shared whatever the layers;
//! - the cost is manifests: each chain tree lists every entry of the layers below it.
//!
//! Rules beyond the OCI spec's: a whiteout in the first layer, or naming nothing, is
//! ignored; a directory an entry needs but the layer lacks keeps the lower layer's
//! metadata; a hardlink to a lower layer's file becomes a copy of it (hardlink groups do
//! not span trees); the path rules of `tar::layer` apply to every layer.
//!
//! Every blob is checked against its descriptor's size and sha256 digest, and each layer's
//! uncompressed content against the config's `rootfs.diff_ids`. Objects are committed only
//! after every layer verified, and the trees after them.

mod layout;

use std::cell::RefCell;
use std::fs::File;
use std::io::Read;

use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

use self::layout::{check_digest, is_layer, parse_reference, Layout};
use super::tar::layer::{manifest, remove_below, Layer, Tree};
use super::tar::object::ObjectSink;
use super::tar::{checked, drain, read_archive, ArchiveError, Counted, ReadOptions};
use super::{ImportError, ImportSummary, PackSummary, Packing};
use crate::image::{self, ImageError, Runtime};
use crate::store::{ObjectId, Store};
use crate::tree::{Bytes, Kind};

/// One imported layer: its blob digest and the tree of it and the layers below.
#[derive(Debug, Clone)]
pub struct LayerTree {
    pub digest: String,
    pub tree: ObjectId,
}

/// What `import oci` made: the summary names the top tree (the whole image).
#[derive(Debug, Clone)]
pub struct ImportedOci {
    pub summary: ImportSummary,
    pub layers: Vec<LayerTree>,
    pub runtime: Runtime,
}

/// Import the image `reference` (`DIR`, `DIR:TAG` or `DIR@sha256:…`), packing its new
/// small objects as `packing` says.
pub fn import_oci(
    store: &Store,
    reference: &str,
    packing: Packing,
    progress: &ProgressBar,
) -> Result<ImportedOci, ImportError> {
    let _lock = store.lock(false)?;
    let (dir, selector) = parse_reference(reference);
    let fail = |why: String| ArchiveError::Archive {
        archive: dir.display().to_string(),
        why,
    };
    let layout = Layout::open(&dir).map_err(fail)?;
    let (chosen, m) = layout.manifest(&selector).map_err(fail)?;
    let config = layout.config(&m.config).map_err(fail)?;
    if config.rootfs.diff_ids.len() != m.layers.len() {
        return Err(fail(format!(
            "manifest {} has {} layers, its config lists {} diff_ids",
            chosen.digest,
            m.layers.len(),
            config.rootfs.diff_ids.len()
        ))
        .into());
    }
    progress.set_length(m.layers.iter().map(|l| l.size).sum());

    let mut sink = ObjectSink::new(store, packing)?;
    let mut chain = Tree::new();
    let mut manifests = Vec::new();
    for (d, diff_id) in m.layers.iter().zip(&config.rootfs.diff_ids) {
        let label = format!("{} layer {}", dir.display(), d.digest);
        let fail = |why: String| ArchiveError::Archive {
            archive: label.clone(),
            why,
        };
        if !is_layer(&d.media_type) {
            return Err(fail(format!("unsupported layer media type {:?}", d.media_type)).into());
        }
        let file = layout.open_blob(d).map_err(fail)?;
        let layer = read_layer(
            &label, &file, &chain, diff_id, &d.digest, &mut sink, progress,
        )?;
        apply(&mut chain, layer).map_err(|(entry, why)| ArchiveError::Entry {
            archive: label.clone(),
            entry: Bytes(entry),
            why,
        })?;
        let mut mf = manifest(chain.clone());
        if mf.entries.first().is_none_or(|e| !e.path.0.is_empty()) {
            mf.entries
                .insert(0, super::tar::layer::implicit_dir(b"", Default::default()));
        }
        checked(&label, &mf)?;
        // Continue from the renumbered entries, so a chain tree does not depend on how the
        // layers below it numbered their hardlink groups.
        chain = mf
            .entries
            .iter()
            .map(|e| (e.path.0.clone(), e.clone()))
            .collect();
        manifests.push((d.digest.clone(), mf));
    }
    if manifests.is_empty() {
        return Err(fail(format!("manifest {} has no layers", chosen.digest)).into());
    }
    progress.finish_and_clear();

    let (files, data_bytes, new_bytes) = (sink.files, sink.data_bytes, sink.new_bytes);
    // The top layer's image is what boots, so its order is the one to pack in; the lower
    // layers add only objects it no longer shows.
    let top_first: Vec<_> = manifests.iter().rev().map(|(_, mf)| mf).collect();
    let finished = sink.intake.finish_ordered_by(&top_first, 1)?;
    let layers: Vec<LayerTree> = manifests
        .iter()
        .zip(finished.trees.iter().rev())
        .map(|((digest, _), tree)| LayerTree {
            digest: digest.clone(),
            tree: *tree,
        })
        .collect();
    let top = layers.last().expect("at least one layer").tree;
    let c = config.config.unwrap_or_default();
    Ok(ImportedOci {
        summary: ImportSummary {
            tree: top,
            entries: manifests
                .last()
                .expect("at least one layer")
                .1
                .entries
                .len(),
            files,
            data_bytes,
            new_bytes,
            pack: finished.pack.as_ref().map(PackSummary::of),
        },
        layers,
        runtime: Runtime {
            user: c.user.filter(|u| !u.is_empty()),
            env: c.env.unwrap_or_default(),
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            working_dir: c.working_dir.filter(|w| !w.is_empty()),
        },
    })
}

/// Read one layer blob over `lower`, verifying the blob's digest and the diff id.
fn read_layer(
    label: &str,
    file: &File,
    lower: &Tree,
    diff_id: &str,
    digest: &str,
    sink: &mut ObjectSink<'_>,
    progress: &ProgressBar,
) -> Result<Layer, ImportError> {
    let fail = |why: String| ArchiveError::Archive {
        archive: label.to_owned(),
        why,
    };
    let blob_hash = RefCell::new(Sha256::new());
    let diff_hash = RefCell::new(Sha256::new());
    let tap = |b: &[u8]| diff_hash.borrow_mut().update(b);
    let hashing = Hashing {
        inner: Counted {
            inner: file,
            bar: progress,
        },
        hash: &blob_hash,
    };
    let opts = ReadOptions {
        whiteouts: true,
        lower: Some(lower),
        tap: Some(&tap),
    };
    let read = read_archive(label, hashing, sink, opts).and_then(|(layer, mut rest)| {
        drain(label, &mut rest)?;
        Ok(layer)
    });
    let layer = match read {
        Ok(layer) => layer,
        // A blob that does not match its digest explains any error reading it.
        Err(e) => {
            let mut whole = Sha256::new();
            let mut reader = file;
            return match std::io::Seek::rewind(&mut reader)
                .and_then(|()| std::io::copy(&mut reader, &mut Wrap(&mut whole)))
            {
                Ok(_) => match check_digest(digest, &whole.finalize()) {
                    Err(why) => Err(fail(why).into()),
                    Ok(()) => Err(e),
                },
                Err(_) => Err(e),
            };
        }
    };
    // Whatever the decompressor did not need still belongs to the blob.
    let mut tail = Hashing {
        inner: file,
        hash: &blob_hash,
    };
    std::io::copy(&mut tail, &mut std::io::sink()).map_err(|e| fail(e.to_string()))?;
    check_digest(digest, &blob_hash.into_inner().finalize()).map_err(&fail)?;
    check_digest(diff_id, &diff_hash.into_inner().finalize())
        .map_err(|e| fail(format!("uncompressed content (diff_id): {e}")))?;
    Ok(layer)
}

/// A sha256 as an `io::Write` sink.
struct Wrap<'a>(&'a mut Sha256);

impl std::io::Write for Wrap<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Hashing<'a, R> {
    inner: R,
    hash: &'a RefCell<Sha256>,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.borrow_mut().update(&buf[..n]);
        Ok(n)
    }
}

/// Apply `layer` to `lower` with the OCI rules (module documentation). Errors name the
/// entry.
fn apply(lower: &mut Tree, layer: Layer) -> Result<(), (Vec<u8>, String)> {
    for w in &layer.whiteouts {
        lower.remove(w);
        remove_below(lower, w);
    }
    for dir in &layer.opaque {
        remove_below(lower, dir);
    }
    // Hardlink groups are numbered per layer: move this layer's above the lower ones.
    let offset = lower
        .values()
        .filter_map(|e| e.link)
        .max()
        .map_or(0, |m| m + 1);
    for (path, mut entry) in layer.entries {
        let below = lower.get(&path);
        if layer.implicit.contains(&path) {
            match below {
                Some(b) if b.kind == Kind::Dir => continue,
                Some(b) => {
                    return Err((
                        path,
                        format!(
                            "is needed as a directory by this layer's entries, but is {:?} \
                             in a lower layer (entries may not be written through a symlink)",
                            b.kind
                        ),
                    ))
                }
                None => {}
            }
        }
        if below.is_some_and(|b| b.kind == Kind::Dir) && entry.kind != Kind::Dir {
            remove_below(lower, &path);
        }
        entry.link = entry.link.map(|l| l + offset);
        lower.insert(path, entry);
    }
    Ok(())
}

/// Record `runtime` in the existing image `name`'s record (written atomically).
pub fn set_runtime(store: &Store, name: &str, runtime: &Runtime) -> Result<(), ImageError> {
    let mut record = image::load(store, name)?;
    record.runtime = Some(runtime.clone());
    let json = serde_json::to_vec_pretty(&record).expect("a record always serializes");
    store.write_image_bytes(name, &json)?;
    Ok(())
}
