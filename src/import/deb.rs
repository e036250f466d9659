//! `tessera import deb FILE.deb…`: each package's `data.tar.*` becomes its own tree, so
//! images composed of packages share them.
//!
//! A `.deb` is an `ar` archive: `debian-binary` (`2.0`), `control.tar.*` (metadata and
//! maintainer scripts) and `data.tar.*` (the files; none, gzip, xz or zstd). Maintainer
//! scripts are never run: the packages that have any (`preinst`, `postinst`, `prerm`,
//! `postrm`) are listed so the user knows what was skipped.
//!
//! Composing packages (`--name`) merges their trees in the order given, under this rule:
//! directories may be shipped by several packages (the later package's metadata wins, as
//! the last unpacked does with dpkg); any other path shipped by two packages must be the
//! same entry in both (kind, content, mode, owner, target, device, xattrs; times may
//! differ), else the import fails naming the path and both packages (dpkg would refuse
//! the second package too, unless it declared `Replaces`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use super::tar::object::ObjectSink;
use super::tar::{checked, decompress, drain, read_archive, ArchiveError, Counted, ReadOptions};
use super::{ImportError, ImportSummary, PackSummary, Packing};
use crate::image;
use crate::store::Store;
use crate::tree::{Entry, Kind, Manifest};

const SCRIPTS: [&str; 4] = ["preinst", "postinst", "prerm", "postrm"];

/// One imported package.
#[derive(Debug, Clone)]
pub struct Package {
    /// `NAME_VERSION_ARCH` from its control file.
    pub package: String,
    pub file: PathBuf,
    pub summary: ImportSummary,
    /// Maintainer scripts it has, which were not run.
    pub scripts: Vec<String>,
}

/// What [`import_debs`] imported.
#[derive(Debug, Clone)]
pub struct ImportedDebs {
    pub packages: Vec<Package>,
    /// The one pack of every package's new small objects.
    pub pack: Option<PackSummary>,
}

/// Import each of `files`, packing their new small objects as `packing` says; nothing is
/// committed unless every package reads cleanly.
pub fn import_debs(
    store: &Store,
    files: &[PathBuf],
    packing: Packing,
    progress: &ProgressBar,
) -> Result<ImportedDebs, ImportError> {
    let _lock = store.lock(false)?;
    let mut total = 0;
    for f in files {
        total += std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
    }
    progress.set_length(total);
    let mut sink = ObjectSink::new(store, packing)?;
    let mut read = Vec::new();
    for file in files {
        let before = (sink.files, sink.data_bytes, sink.new_bytes);
        let (control, manifest) = read_deb(file, &mut sink, progress)?;
        read.push((file, control, manifest, before));
    }
    progress.finish_and_clear();
    let end = (sink.files, sink.data_bytes, sink.new_bytes);
    let manifests: Vec<_> = read.iter().map(|r| &r.2).collect();
    let finished = sink.intake.finish(&manifests)?;
    let mut out = Vec::new();
    for (i, (file, control, manifest, before)) in read.iter().enumerate() {
        let after = read.get(i + 1).map_or(end, |r| r.3);
        let tree = finished.trees[i];
        out.push(Package {
            package: control.id(file),
            file: file.to_path_buf(),
            summary: ImportSummary {
                tree,
                entries: manifest.entries.len(),
                files: after.0 - before.0,
                data_bytes: after.1 - before.1,
                new_bytes: after.2 - before.2,
                pack: None,
            },
            scripts: control.scripts.clone(),
        });
    }
    Ok(ImportedDebs {
        packages: out,
        pack: finished.pack.as_ref().map(PackSummary::of),
    })
}

#[derive(Default)]
struct Control {
    fields: BTreeMap<String, String>,
    scripts: Vec<String>,
}

impl Control {
    fn id(&self, file: &Path) -> String {
        let get = |k: &str| self.fields.get(k).map(String::as_str);
        match (get("Package"), get("Version"), get("Architecture")) {
            (Some(p), Some(v), Some(a)) => format!("{p}_{v}_{a}"),
            (Some(p), _, _) => p.to_owned(),
            _ => file.display().to_string(),
        }
    }
}

fn read_deb(
    path: &Path,
    sink: &mut ObjectSink<'_>,
    progress: &ProgressBar,
) -> Result<(Control, Manifest), ImportError> {
    let label = path.display().to_string();
    let fail = |why: String| ArchiveError::Archive {
        archive: label.clone(),
        why,
    };
    let file = File::open(path).map_err(|e| ImportError::io("open", path, e))?;
    let mut ar = ar::Archive::new(Counted {
        inner: file,
        bar: progress,
    });
    let mut control = None;
    let mut data = None;
    let mut first = true;
    while let Some(member) = ar.next_entry() {
        let mut member = member.map_err(|e| fail(format!("not a valid ar archive: {e}")))?;
        let id = member.header().identifier().to_vec();
        let name = String::from_utf8_lossy(id.strip_suffix(b"/").unwrap_or(&id)).into_owned();
        if first {
            let mut version = Vec::new();
            (&mut member)
                .take(64)
                .read_to_end(&mut version)
                .map_err(|e| fail(e.to_string()))?;
            if name != "debian-binary" || !version.starts_with(b"2.") {
                return Err(
                    fail("not a Debian binary package (no debian-binary 2.x)".into()).into(),
                );
            }
            first = false;
            continue;
        }
        let member_label = format!("{label} {name}");
        if name.starts_with("control.tar") {
            control = Some(read_control(&member_label, &mut member)?);
        } else if name.starts_with("data.tar") {
            if data.is_some() {
                return Err(fail("two data.tar members".into()).into());
            }
            let (layer, mut rest) =
                read_archive(&member_label, &mut member, sink, ReadOptions::default())?;
            drain(&member_label, &mut rest)?;
            let manifest = layer.into_manifest();
            checked(&member_label, &manifest)?;
            data = Some(manifest);
        }
    }
    let control = control.ok_or_else(|| fail("no control.tar member".into()))?;
    let data = data.ok_or_else(|| fail("no data.tar member".into()))?;
    Ok((control, data))
}

/// The control file's fields and which maintainer scripts exist.
fn read_control(label: &str, input: &mut dyn Read) -> Result<Control, ImportError> {
    let err = |what: &str, source| ArchiveError::Read {
        archive: label.to_owned(),
        what: what.to_owned(),
        source,
    };
    let (_, stream) = decompress::open(input).map_err(|e| err("cannot read", e))?;
    let mut archive = ::tar::Archive::new(stream);
    let mut control = Control::default();
    for entry in archive.entries().map_err(|e| err("not a tar archive", e))? {
        let mut entry = entry.map_err(|e| err("cannot read a member", e))?;
        let path = entry.path_bytes().into_owned();
        let name = path.strip_prefix(b"./").unwrap_or(&path);
        if let Some(s) = SCRIPTS.iter().find(|s| s.as_bytes() == name) {
            control.scripts.push((*s).to_owned());
        } else if name == b"control" {
            let mut text = String::new();
            (&mut entry)
                .take(1 << 20)
                .read_to_string(&mut text)
                .map_err(|e| err("cannot read the control file", e))?;
            for line in text.lines() {
                if let Some((k, v)) = line.split_once(':') {
                    if !k.starts_with(' ') && !k.starts_with('\t') {
                        control.fields.insert(k.to_owned(), v.trim().to_owned());
                    }
                }
            }
        }
    }
    control
        .scripts
        .sort_by_key(|s| SCRIPTS.iter().position(|x| x == s));
    Ok(control)
}

/// Refuse to compose `packages` if two ship the same non-directory path differently
/// (module documentation).
pub fn check_conflicts(store: &Store, packages: &[Package]) -> Result<(), ImportError> {
    let mut seen: BTreeMap<Vec<u8>, (usize, Entry)> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for (i, p) in packages.iter().enumerate() {
        let m = image::load_tree(store, &p.summary.tree).map_err(|e| ArchiveError::Archive {
            archive: p.file.display().to_string(),
            why: format!("{e}"),
        })?;
        for e in m.entries {
            if let Some((j, old)) = seen.get(&e.path.0) {
                let both_dirs = old.kind == Kind::Dir && e.kind == Kind::Dir;
                if !both_dirs && !same(old, &e) && *j != i {
                    conflicts.push(format!(
                        "{:?} ({} vs {})",
                        String::from_utf8_lossy(&e.path.0),
                        packages[*j].package,
                        p.package
                    ));
                }
            }
            seen.insert(e.path.0.clone(), (i, e));
        }
    }
    if conflicts.is_empty() {
        return Ok(());
    }
    let more = conflicts.len().saturating_sub(20);
    conflicts.truncate(20);
    Err(ArchiveError::Archive {
        archive: "packages".into(),
        why: format!(
            "{} paths are shipped differently by two packages: {}{}",
            conflicts.len() + more,
            conflicts.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ),
    }
    .into())
}

fn same(a: &Entry, b: &Entry) -> bool {
    a.kind == b.kind
        && a.size == b.size
        && a.object == b.object
        && a.segments == b.segments
        && a.mode == b.mode
        && a.uid == b.uid
        && a.gid == b.gid
        && a.target == b.target
        && a.rdev == b.rdev
        && a.xattrs == b.xattrs
}
