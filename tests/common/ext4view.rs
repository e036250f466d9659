//! Reading an image with the independent `ext4-view` crate, as a second opinion beside the
//! kernel: it verifies metadata checksums as it goes.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ext4_view::{Ext4, Ext4Read, Metadata};
use tessera::blockdev::ImageDevice;

use super::snapshot::Info;

type BoxedError = Box<dyn std::error::Error + Send + Sync + 'static>;

struct FileReader(std::fs::File);

impl Ext4Read for FileReader {
    fn read(&mut self, start: u64, dst: &mut [u8]) -> Result<(), BoxedError> {
        Ok(self.0.read_exact_at(dst, start)?)
    }
}

struct DeviceReader(ImageDevice);

impl Ext4Read for DeviceReader {
    fn read(&mut self, start: u64, dst: &mut [u8]) -> Result<(), BoxedError> {
        Ok(self.0.read_at(dst, start)?)
    }
}

/// Load a raw image file.
pub fn load_file(path: &Path) -> Ext4 {
    let file = std::fs::File::open(path).expect("open image");
    Ext4::load(Box::new(FileReader(file)))
        .unwrap_or_else(|e| panic!("ext4-view rejects {}: {e}", path.display()))
}

/// Load an image straight from the shared read path, without exporting it.
pub fn load_device(dev: ImageDevice) -> Ext4 {
    Ext4::load(Box::new(DeviceReader(dev)))
        .unwrap_or_else(|e| panic!("ext4-view rejects the device: {e}"))
}

/// What `ext4-view` can tell about an entry (no xattrs, devices numbers or link counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewInfo {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: Option<u64>,
    pub content: Option<String>,
    pub target: Option<Vec<u8>>,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
}

/// Every entry of the filesystem except `lost+found`, keyed like [`super::snapshot::snapshot`].
pub fn snapshot(fs: &Ext4) -> BTreeMap<Vec<u8>, ViewInfo> {
    let mut out = BTreeMap::new();
    let root = fs.symlink_metadata("/").expect("root metadata");
    out.insert(Vec::new(), info(fs, b"/", &root));
    let mut stack = vec![b"/".to_vec()];
    while let Some(dir) = stack.pop() {
        let entries = fs
            .read_dir(dir.as_slice())
            .unwrap_or_else(|e| panic!("read_dir {:?}: {e}", String::from_utf8_lossy(&dir)));
        for entry in entries {
            let entry = entry.expect("dir entry");
            let name = entry.file_name().as_ref().to_vec();
            if name == b"." || name == b".." || (dir == b"/" && name == b"lost+found") {
                continue;
            }
            let path = entry.path().as_ref().to_vec();
            let meta = entry.metadata().expect("entry metadata");
            if meta.is_dir() {
                stack.push(path.clone());
            }
            out.insert(path[1..].to_vec(), info(fs, &path, &meta));
        }
    }
    out
}

fn info(fs: &Ext4, path: &[u8], meta: &Metadata) -> ViewInfo {
    let ft = meta.file_type();
    let kind = if ft.is_regular_file() {
        "file"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_char_dev() {
        "chardev"
    } else if ft.is_block_dev() {
        "blockdev"
    } else if ft.is_fifo() {
        "fifo"
    } else {
        "socket"
    };
    let content = ft.is_regular_file().then(|| {
        blake3::hash(&fs.read(path).expect("read file"))
            .to_hex()
            .to_string()
    });
    let target = ft
        .is_symlink()
        .then(|| fs.read_link(path).expect("read_link").as_ref().to_vec());
    ViewInfo {
        kind,
        mode: u32::from(meta.mode()),
        uid: meta.uid(),
        gid: meta.gid(),
        size: (!ft.is_dir()).then_some(meta.len()),
        content,
        target,
        atime: (
            meta.accessed().seconds(),
            i64::from(meta.accessed().nanoseconds()),
        ),
        mtime: (
            meta.modified().seconds(),
            i64::from(meta.modified().nanoseconds()),
        ),
    }
}

/// The part of a kernel snapshot `ext4-view` can see.
pub fn project(snapshot: &BTreeMap<Vec<u8>, Info>) -> BTreeMap<Vec<u8>, ViewInfo> {
    snapshot
        .iter()
        .map(|(path, i)| {
            let v = ViewInfo {
                kind: i.kind,
                mode: i.mode,
                uid: i.uid,
                gid: i.gid,
                size: i.size,
                content: i.content.clone(),
                target: i.target.clone(),
                atime: i.atime,
                mtime: i.mtime,
            };
            (path.clone(), v)
        })
        .collect()
}
