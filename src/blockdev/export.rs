//! Materialize a device as a sparse raw file, through the same read path a server uses.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::ImageDevice;

/// Bytes read per step.
const CHUNK: u64 = 4 << 20;

/// Write `dev` to `out` (created or truncated). Zero ranges are not written, so `out` is
/// sparse; its length is the device size. `out` must be a regular file: on a block device
/// the skipped ranges would keep their old contents.
pub fn export(dev: &ImageDevice, out: &Path, mut progress: impl FnMut(u64)) -> io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "export writes regular files only (zeros are left as holes, not written)",
        ));
    }
    file.set_len(dev.size())?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < dev.size() {
        let len = CHUNK.min(dev.size() - pos);
        for ext in dev.extents(pos, len)? {
            if ext.zero {
                continue;
            }
            let chunk = &mut buf[..ext.len as usize];
            dev.read_at(chunk, ext.offset)?;
            file.write_all_at(chunk, ext.offset)?;
        }
        pos += len;
        progress(pos);
    }
    file.sync_all()?;
    Ok(())
}
