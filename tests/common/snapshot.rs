//! Everything observable about a tree through the kernel, for comparing a source directory
//! with a mounted image.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Size of non-directories (directory sizes depend on the filesystem's layout).
    pub size: Option<u64>,
    pub content: Option<String>,
    pub target: Option<Vec<u8>>,
    pub rdev: Option<(u32, u32)>,
    pub nlink: u64,
    /// First path (in sorted order) sharing this inode, for non-directories.
    pub same_inode_as: Option<Vec<u8>>,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    /// Creation time (statx btime), when the filesystem reports it.
    pub crtime: Option<(i64, u32)>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Snapshot every entry below `root`, keyed by relative path (`""` is the root). Leaves all
/// atimes as they were: files are read with `O_NOATIME` and each directory is stat'ed before
/// it is listed.
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Info> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    visit(root, Vec::new(), &mut out, &mut inodes);
    // Resolve hardlink peers in path order.
    let mut first: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for (path, ino) in &inodes {
        first.entry(*ino).or_insert_with(|| path.clone());
    }
    for (path, ino) in inodes {
        out.get_mut(&path).unwrap().same_inode_as = Some(first[&ino].clone());
    }
    out
}

fn visit(
    path: &Path,
    rel: Vec<u8>,
    out: &mut BTreeMap<Vec<u8>, Info>,
    inodes: &mut BTreeMap<Vec<u8>, u64>,
) {
    let (info, meta) = info(path);
    if !meta.is_dir() {
        inodes.insert(rel.clone(), meta.ino());
    }
    out.insert(rel.clone(), info);
    if meta.is_dir() {
        let mut names: Vec<_> = fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            let mut child = rel.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(name.as_bytes());
            visit(&path.join(&name), child, out, inodes);
        }
    }
}

fn info(path: &Path) -> (Info, fs::Metadata) {
    let mut target = None;
    if fs::symlink_metadata(path).unwrap().is_symlink() {
        target = Some(fs::read_link(path).unwrap().as_os_str().as_bytes().to_vec());
    }
    let meta = fs::symlink_metadata(path).unwrap();
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        "file"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_char_device() {
        "chardev"
    } else if ft.is_block_device() {
        "blockdev"
    } else if ft.is_fifo() {
        "fifo"
    } else {
        "socket"
    };
    let content = ft.is_file().then(|| {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOATIME)
            .open(path)
            .unwrap();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        blake3::hash(&data).to_hex().to_string()
    });
    let rdev = (ft.is_char_device() || ft.is_block_device())
        .then(|| (libc::major(meta.rdev()), libc::minor(meta.rdev())));
    let info = Info {
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size: (!ft.is_dir()).then_some(meta.len()),
        content,
        target,
        rdev,
        nlink: meta.nlink(),
        same_inode_as: None,
        atime: (meta.atime(), meta.atime_nsec()),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
        crtime: meta.created().ok().map(|t| {
            let d = t
                .duration_since(std::time::UNIX_EPOCH)
                .expect("created after 1970");
            (d.as_secs() as i64, d.subsec_nanos())
        }),
        xattrs: xattrs(path),
    };
    (info, meta)
}

/// All xattrs of `path`, sorted by name, without following symlinks.
pub fn xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: valid C string; pointer and length describe `names`.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        n >= 0,
        "llistxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        // SAFETY: valid C strings; pointer and length describe `value`.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cn.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(
            n >= 0,
            "lgetxattr {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        value.truncate(n as usize);
        out.push((name.to_vec(), value));
    }
    out.sort();
    out
}

/// Assert two path-keyed views (snapshots, ext4-view listings) are equal, listing every
/// difference.
pub fn assert_same<T: PartialEq + std::fmt::Debug>(
    expected: &BTreeMap<Vec<u8>, T>,
    actual: &BTreeMap<Vec<u8>, T>,
) {
    let mut diffs = Vec::new();
    for (path, e) in expected {
        let shown = String::from_utf8_lossy(path);
        match actual.get(path) {
            None => diffs.push(format!("{shown:?}: missing")),
            Some(a) if a != e => {
                diffs.push(format!("{shown:?}:\n  expected {e:?}\n  actual   {a:?}"))
            }
            Some(_) => {}
        }
    }
    for path in actual.keys().filter(|p| !expected.contains_key(*p)) {
        diffs.push(format!("{:?}: unexpected", String::from_utf8_lossy(path)));
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// A snapshot of `root` without what unpacking tools (tar -x, dpkg-deb, umoci) do not
/// reproduce: atimes, ctimes and crtimes, and directory mtimes and link counts, which move
/// as entries are added. lost+found is dropped.
pub fn as_extracted(root: &Path) -> BTreeMap<Vec<u8>, Info> {
    let mut snap = snapshot(root);
    snap.remove(&b"lost+found"[..]);
    for i in snap.values_mut() {
        i.atime = (0, 0);
        i.ctime = (0, 0);
        i.crtime = None;
        if i.kind == "dir" {
            i.mtime = (0, 0);
            i.nlink = 0;
        }
    }
    snap
}
