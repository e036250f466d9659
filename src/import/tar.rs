//! `tessera import tar`: a tarball, streamed into the store without unpacking it anywhere.
//!
//! The compression (none, gzip, zstd, xz) is recognized by its magic number. Each member's
//! data is hashed and staged as it streams by (`object`); the tree is built in archive
//! order with `tar -x`'s rules and the checks listed in `layer`; header decoding (PAX
//! times and xattrs, GNU sparse files, devices) is in `header`. Objects are committed
//! only once the whole archive has been read without error, and the tree last, so an
//! interrupted or failed import leaves nothing that anything refers to.
//!
//! The same reader imports OCI layers (with whiteouts, see [`super::oci`]) and the data
//! archives of Debian packages ([`super::deb`]). A plain tarball has no whiteouts: its
//! `.wh.*` members are ordinary files.
//!
//! Limits: bzip2 and lzma are refused by name; PAX global headers are skipped (their
//! records do not apply to later members); PAX-encoded sparse files are refused; members
//! larger than 8 MiB are spilled to an unlinked file in the store's `tmp/` while hashed and
//! then copied into the object, because the store names an object only by its hash.

pub(crate) mod decompress;
mod header;
pub(crate) mod layer;
pub(crate) mod object;

use std::io::{self, Read};

use indicatif::ProgressBar;

use self::header::Member;
use self::layer::{normalize, Layer, Tree};
use self::object::{ObjectSink, SinkError};
use super::{ImportError, ImportSummary, PackSummary, Packing};
use crate::store::Store;
use crate::tree::Bytes;

pub use self::decompress::Compression;

/// Why an archive (a tarball, an OCI layout or a `.deb`) cannot be imported.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{archive}: entry {entry:?}: {why}")]
    Entry {
        archive: String,
        entry: Bytes,
        why: String,
    },
    #[error("{archive}: {why}")]
    Archive { archive: String, why: String },
    #[error("{archive}: {what}")]
    Read {
        archive: String,
        what: String,
        #[source]
        source: io::Error,
    },
}

/// Called with every decompressed chunk.
pub(crate) type Tap<'a> = &'a dyn Fn(&[u8]);

/// How to read one archive.
#[derive(Default, Clone, Copy)]
pub(crate) struct ReadOptions<'a> {
    /// Interpret OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) instead of storing them.
    pub whiteouts: bool,
    /// The tree this archive goes over (an OCI layer's lower layers).
    pub lower: Option<&'a Tree>,
    /// Sees every decompressed byte (an OCI layer's diff id is their sha256).
    pub tap: Option<Tap<'a>>,
}

/// Shows every byte read through it to a tap.
struct Tapped<'a, R> {
    inner: R,
    tap: Option<Tap<'a>>,
}

impl<R: Read> Read for Tapped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(tap) = self.tap {
            tap(&buf[..n]);
        }
        Ok(n)
    }
}

/// Counts the bytes read through it on a progress bar.
pub(crate) struct Counted<'a, R> {
    pub inner: R,
    pub bar: &'a ProgressBar,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// Import the tarball read from `input` (named `label` in errors) as one tree, packing its
/// new small objects as `packing` says. Progress counts bytes of `input`; the caller sets
/// its length when it knows it.
pub fn import_tar(
    store: &Store,
    input: impl Read,
    label: &str,
    packing: Packing,
    progress: &ProgressBar,
) -> Result<ImportSummary, ImportError> {
    let _lock = store.lock(false)?;
    let mut sink = ObjectSink::new(store, packing)?;
    let input = Counted {
        inner: input,
        bar: progress,
    };
    let (layer, mut rest) = read_archive(label, input, &mut sink, ReadOptions::default())?;
    drain(label, &mut rest)?;
    progress.finish_and_clear();
    let manifest = layer.into_manifest();
    checked(label, &manifest)?;
    let (files, data_bytes, new_bytes) = (sink.files, sink.data_bytes, sink.new_bytes);
    // Objects get their names only once the whole archive was read, then the tree.
    let finished = sink.intake.finish(&[&manifest])?;
    Ok(ImportSummary {
        tree: finished.trees[0],
        entries: manifest.entries.len(),
        files,
        data_bytes,
        new_bytes,
        pack: finished.pack.as_ref().map(PackSummary::of),
    })
}

/// Read every member of the (possibly compressed) tar stream `input` into a [`Layer`],
/// staging file data in `sink`. Returns the decompressed stream positioned after the
/// end-of-archive marker, for callers that hash or drain what follows.
pub(crate) fn read_archive<'r>(
    label: &str,
    input: impl Read + 'r,
    sink: &mut ObjectSink<'_>,
    opts: ReadOptions<'r>,
) -> Result<(Layer, Box<dyn Read + 'r>), ImportError> {
    let read_err = |what: &str, source: io::Error| ArchiveError::Read {
        archive: label.to_owned(),
        what: what.to_owned(),
        source,
    };
    let (_, stream) = decompress::open(input).map_err(|e| read_err("cannot read", e))?;
    let mut archive = ::tar::Archive::new(Tapped {
        inner: stream,
        tap: opts.tap,
    });
    let mut layer = Layer::default();
    let mut last = None::<Vec<u8>>;
    let entries = archive
        .entries()
        .map_err(|e| read_err("not a tar archive", e))?;
    for member in entries {
        let after = || match &last {
            Some(p) => format!("reading the member after {:?}", String::from_utf8_lossy(p)),
            None => "reading the first member".to_owned(),
        };
        let mut e = member.map_err(|e| read_err(&after(), e))?;
        let raw = e.path_bytes().into_owned();
        let bad = |why: String| ArchiveError::Entry {
            archive: label.to_owned(),
            entry: Bytes(raw.clone()),
            why,
        };
        let path = normalize(&raw).map_err(&bad)?;
        last = Some(raw.clone());

        if opts.whiteouts {
            if let Some(done) = whiteout(&mut layer, &path) {
                done.map_err(&bad)?;
                continue;
            }
        }
        match header::member(&mut e, path).map_err(&bad)? {
            Member::Skip => {}
            Member::Hardlink { entry, target } => {
                let target = normalize(&target).map_err(|why| bad(format!("hardlink: {why}")))?;
                layer
                    .add_hardlink(entry.path.0, &target, opts.lower)
                    .map_err(&bad)?;
            }
            Member::Entry {
                mut entry,
                size,
                sparse,
            } => {
                if entry.size.is_some() {
                    let (object, segments) =
                        sink.store(&mut e, size, sparse).map_err(|err| match err {
                            SinkError::Read(source) => ImportError::from(ArchiveError::Read {
                                archive: label.to_owned(),
                                what: format!(
                                    "entry {:?}: cannot read its data",
                                    String::from_utf8_lossy(&raw)
                                ),
                                source,
                            }),
                            SinkError::Store(s) => s.into(),
                        })?;
                    entry.object = Some(object);
                    entry.segments = segments;
                }
                layer.add(entry, opts.lower).map_err(&bad)?;
            }
        }
    }
    Ok((layer, Box::new(archive.into_inner())))
}

/// Handle `path` if it is an OCI whiteout: `Some` with the outcome, `None` if it is not.
/// Names starting `.wh..wh.` other than the opaque marker are aufs bookkeeping (hard link
/// directories) and are skipped.
fn whiteout(layer: &mut Layer, path: &[u8]) -> Option<Result<(), String>> {
    let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&b""[..], path),
    };
    let hidden = name.strip_prefix(b".wh.")?;
    if hidden == b".wh..opq" {
        layer.opaque(dir.to_vec());
    } else if hidden.starts_with(b".wh.") {
    } else if hidden.is_empty() {
        return Some(Err("a whiteout without a name".into()));
    } else {
        let mut p = dir.to_vec();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(hidden);
        layer.whiteout(p);
    }
    Some(Ok(()))
}

/// Refuse to store a manifest the tree format rejects (the checks above should make this
/// unreachable; a tree that cannot be loaded must never be written).
pub(crate) fn checked(label: &str, manifest: &crate::tree::Manifest) -> Result<(), ArchiveError> {
    manifest.validate().map_err(|e| ArchiveError::Archive {
        archive: label.to_owned(),
        why: format!("the resulting tree is invalid: {e}"),
    })
}

/// Read `rest` to its end: the padding after the end-of-archive marker, and for a
/// compressed stream its trailer, whose checksum the decoder checks only there.
pub(crate) fn drain(label: &str, rest: &mut dyn Read) -> Result<(), ArchiveError> {
    io::copy(rest, &mut io::sink())
        .map(|_| ())
        .map_err(|source| ArchiveError::Read {
            archive: label.to_owned(),
            what: "after the end-of-archive marker".to_owned(),
            source,
        })
}
