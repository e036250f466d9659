//! `--json` output: one JSON document on stdout per command, built from the view structs
//! below. Their field names are the schema scripts rely on, so they are kept stable: a field
//! may be added, never renamed or removed without a note in the README.
//!
//! Conventions: names are snake_case; sizes and offsets are integers in bytes (fields ending
//! in `_bytes`, or `size`); counts are integers; times are integers, seconds since the Unix
//! epoch; ids are lowercase hex strings; a value the synthesizer picks is `null` in a record.
//!
//! | command | document |
//! | --- | --- |
//! | `image list` | array of [`ImageView`] |
//! | `image show NAME` | [`ImageDetailView`] |
//! | `overlay list` | array of [`OverlayView`] |
//! | `overlay show NAME` | [`OverlayView`] |
//! | `store stats` | [`StatsView`] |
//! | `store verify` | [`VerifyView`] (exit status 1 when `problems` is not empty) |
//! | `store gc` | [`GcView`] |

use anyhow::Context;
use serde::Serialize;

use crate::blockdev::overlay::named::OverlayInfo;
use crate::image::{format_uuid, Built, ImageRecord, Runtime};
use crate::store::remote::counters::Counts;
use crate::store::ObjectId;
use crate::upkeep::{GcReport, Problem, RepairReport, StoreStats, VerifyReport};

/// Writes `value` as one pretty-printed JSON document and a newline on stdout.
pub(super) fn print<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value).context("cannot write JSON to stdout")?;
    writeln!(out).context("cannot write JSON to stdout")?;
    Ok(())
}

/// An image's record, as `image list` gives it (no layout is computed).
#[derive(Debug, Serialize)]
pub(super) struct ImageView<'a> {
    pub name: &'a str,
    /// Tree ids, merged in this order (later trees win).
    pub trees: &'a [ObjectId],
    /// Device size asked for at creation; `null`: picked by the synthesizer (see `layout.size`
    /// in `image show`).
    pub size: Option<u64>,
    /// Inode count asked for at creation; `null`: picked by the synthesizer.
    pub inodes: Option<u32>,
    pub label: &'a str,
    /// The filesystem's timestamps, seconds since the epoch.
    pub created: i64,
}

impl<'a> From<&'a ImageRecord> for ImageView<'a> {
    fn from(r: &'a ImageRecord) -> Self {
        ImageView {
            name: &r.name,
            trees: &r.trees,
            size: r.size,
            inodes: r.inodes,
            label: &r.label,
            created: r.created,
        }
    }
}

/// `image show`: the record plus the synthesized filesystem's geometry.
#[derive(Debug, Serialize)]
pub(super) struct ImageDetailView<'a> {
    #[serde(flatten)]
    pub record: ImageView<'a>,
    /// Filesystem UUID, `8-4-4-4-12` hex digits.
    pub uuid: String,
    /// The OCI run configuration recorded by `import oci`; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<&'a Runtime>,
    /// Store objects the image's files point at.
    pub objects: usize,
    pub layout: LayoutView,
}

/// The ext4 geometry of a synthesized image.
#[derive(Debug, Serialize)]
pub(super) struct LayoutView {
    /// Device size in bytes.
    pub size: u64,
    pub block_size: u64,
    pub blocks: u64,
    pub free_blocks: u64,
    /// Blocks mapped onto store objects.
    pub data_blocks: u64,
    pub inodes: u64,
    pub free_inodes: u64,
    pub groups: u64,
    /// Generated metadata (inode tables, directories, bitmaps…).
    pub metadata_bytes: u64,
    /// Heap memory the layout holds while served, metadata included.
    pub memory_bytes: u64,
    /// Of it, the block map: what a served image keeps when its metadata is dropped
    /// (`serve --metadata-memory`).
    pub block_map_bytes: u64,
}

impl<'a> ImageDetailView<'a> {
    pub fn new(record: &'a ImageRecord, built: &Built) -> Self {
        let s = built.layout.stats();
        ImageDetailView {
            record: record.into(),
            uuid: format_uuid(&record.uuid),
            runtime: record.runtime.as_ref(),
            objects: built.objects.len(),
            layout: LayoutView {
                size: built.layout.size(),
                block_size: tessera_ext4::BLOCK_SIZE,
                blocks: s.blocks,
                free_blocks: s.free_blocks,
                data_blocks: s.data_blocks,
                inodes: s.inodes,
                free_inodes: s.free_inodes,
                groups: s.groups,
                metadata_bytes: s.metadata_bytes,
                memory_bytes: built.layout.memory_bytes() as u64,
                block_map_bytes: built.layout.block_map_bytes() as u64,
            },
        }
    }
}

/// A persistent overlay (`overlay list` and `overlay show`).
#[derive(Debug, Serialize)]
pub(super) struct OverlayView<'a> {
    pub name: &'a str,
    /// The image the overlay was made on.
    pub image: &'a str,
    /// Identity of that image's bytes; a re-created image no longer matches.
    pub image_fingerprint: &'a str,
    /// Device size in bytes.
    pub size: u64,
    pub created: i64,
    /// 4 KiB blocks that differ from the image, as of the last flush.
    pub changed_blocks: u64,
    /// `changed_blocks` in bytes.
    pub changed_bytes: u64,
    /// Disk space the overlay's data file occupies.
    pub data_bytes: u64,
    /// Whether a server holds the overlay open for a client now.
    pub attached: bool,
}

impl<'a> From<&'a OverlayInfo> for OverlayView<'a> {
    fn from(o: &'a OverlayInfo) -> Self {
        let r = &o.record;
        OverlayView {
            name: &r.name,
            image: &r.image,
            image_fingerprint: &r.image_fingerprint,
            size: r.size,
            created: r.created,
            changed_blocks: o.changed_blocks,
            changed_bytes: o.changed_blocks * tessera_ext4::BLOCK_SIZE,
            data_bytes: o.data_bytes,
            attached: o.attached,
        }
    }
}

/// `store stats`.
#[derive(Debug, Serialize)]
pub(super) struct StatsView<'a> {
    /// The store directory.
    pub store: &'a std::path::Path,
    pub objects: usize,
    /// Bytes held by objects.
    pub object_bytes: u64,
    pub trees: usize,
    pub images: usize,
    /// Bytes the images' file data would take without deduplication.
    pub image_bytes: u64,
    /// `image_bytes / object_bytes`; `null` when the store holds no data.
    pub dedup_ratio: Option<f64>,
    /// Bytes of objects imported or written here.
    pub local_bytes: u64,
    /// Objects (and their bytes) fetched from a remote store, whole or by `serve --remote`.
    pub fetched_objects: usize,
    pub fetched_bytes: u64,
    /// Objects being fetched from a remote (`partial/`), and the disk their chunks take.
    pub partial_objects: u64,
    pub partial_bytes: u64,
    /// Packs (`store pack`), the objects they hold, and their bytes (`objects` counts each
    /// object once, loose or packed).
    pub packs: usize,
    pub packed_objects: usize,
    pub pack_bytes: u64,
    /// What `serve --remote` caches did on this store, all servers summed; `null` if none
    /// ran. Fields: `hits`, `misses` (reads that fetched), `bytes_fetched`, `mismatches`,
    /// `evictions`, `bytes_evicted`.
    pub remote_cache: Option<Counts>,
}

impl<'a> StatsView<'a> {
    pub fn new(store: &'a std::path::Path, s: &StoreStats) -> Self {
        StatsView {
            store,
            objects: s.objects,
            object_bytes: s.object_bytes,
            trees: s.trees,
            images: s.images,
            image_bytes: s.image_bytes,
            dedup_ratio: s.dedup_ratio(),
            local_bytes: s.object_bytes - s.fetched_bytes,
            fetched_objects: s.fetched_objects,
            fetched_bytes: s.fetched_bytes,
            partial_objects: s.partial_objects,
            partial_bytes: s.partial_bytes,
            packs: s.packs,
            packed_objects: s.packed_objects,
            pack_bytes: s.pack_bytes,
            remote_cache: s.cache,
        }
    }
}

/// `store verify`.
#[derive(Debug, Serialize)]
pub(super) struct VerifyView {
    /// What was checked.
    pub objects: usize,
    pub object_bytes: u64,
    /// Copies of objects checked in packs (`store pack`).
    pub packed_objects: usize,
    pub trees: usize,
    pub images: usize,
    pub problems: Vec<ProblemView>,
    /// With `--repair`: the corrupt copies removed afterwards.
    pub repair: Option<RepairView>,
}

/// `store verify --repair`: corrupt loose files removed, packs rewritten without their
/// corrupt copies, and the objects left with no good copy (to import or pull again).
#[derive(Debug, Serialize)]
pub(super) struct RepairView {
    pub loose: usize,
    pub packs: usize,
    pub packed: usize,
    pub missing: Vec<ObjectId>,
}

impl From<&RepairReport> for RepairView {
    fn from(r: &RepairReport) -> Self {
        RepairView {
            loose: r.loose,
            packs: r.packs,
            packed: r.packed,
            missing: r.missing.clone(),
        }
    }
}

/// One problem `store verify` found.
#[derive(Debug, Serialize)]
pub(super) struct ProblemView {
    /// `corrupt_object`, `unreadable_object`, `corrupt_tree`, `bad_tree`, `bad_image`,
    /// `missing_tree`, `missing_object`, `wrong_object_size`, `stray_file`, `bad_outboard`,
    /// `orphan_outboard`, `bad_pack` or `corrupt_packed_object`.
    pub kind: &'static str,
    /// The same sentence the text output prints.
    pub message: String,
}

impl VerifyView {
    pub fn new(r: &VerifyReport, repair: Option<&RepairReport>) -> Self {
        VerifyView {
            objects: r.objects,
            object_bytes: r.object_bytes,
            packed_objects: r.packed_objects,
            trees: r.trees,
            images: r.images,
            problems: r
                .problems
                .iter()
                .map(|p| ProblemView {
                    kind: problem_kind(p),
                    message: p.to_string(),
                })
                .collect(),
            repair: repair.map(RepairView::from),
        }
    }
}

fn problem_kind(p: &Problem) -> &'static str {
    match p {
        Problem::CorruptObject { .. } => "corrupt_object",
        Problem::UnreadableObject { .. } => "unreadable_object",
        Problem::CorruptTree { .. } => "corrupt_tree",
        Problem::BadTree { .. } => "bad_tree",
        Problem::BadImage { .. } => "bad_image",
        Problem::MissingTree { .. } => "missing_tree",
        Problem::MissingObject { .. } => "missing_object",
        Problem::WrongObjectSize { .. } => "wrong_object_size",
        Problem::StrayFile { .. } => "stray_file",
        Problem::BadOutboard { .. } => "bad_outboard",
        Problem::OrphanOutboard { .. } => "orphan_outboard",
        Problem::BadPack { .. } => "bad_pack",
        Problem::CorruptPackedObject { .. } => "corrupt_packed_object",
    }
}

/// `store gc`: what was removed, or with `dry_run` what would be.
#[derive(Debug, Serialize)]
pub(super) struct GcView {
    pub dry_run: bool,
    pub objects: usize,
    pub object_bytes: u64,
    pub trees: usize,
    pub tmp_files: usize,
    /// Partial objects (being fetched from a remote) removed, and the disk they took.
    pub partial_objects: usize,
    pub partial_bytes: u64,
    /// Packs removed (see `store pack`), and the disk they took.
    pub packs: usize,
    pub pack_bytes: u64,
    /// Packs written anew without the garbage of old ones.
    pub repacked: usize,
    /// Loose copies of packed objects removed, and their bytes.
    pub loose_copies: usize,
    pub loose_copy_bytes: u64,
    /// Packs holding garbage kept because a live object in them is corrupt.
    pub kept_corrupt: usize,
}

impl GcView {
    pub fn new(dry_run: bool, r: &GcReport) -> Self {
        GcView {
            dry_run,
            objects: r.objects,
            object_bytes: r.object_bytes,
            trees: r.trees,
            tmp_files: r.tmp_files,
            partial_objects: r.partial_objects,
            partial_bytes: r.partial_bytes,
            packs: r.packs,
            pack_bytes: r.pack_bytes,
            repacked: r.repacked,
            loose_copies: r.loose_copies,
            loose_copy_bytes: r.loose_copy_bytes,
            kept_corrupt: r.kept_corrupt,
        }
    }
}
