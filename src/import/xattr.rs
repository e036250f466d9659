//! Extended attributes of a path, without following symlinks.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::tree::{Bytes, Xattr};

/// All xattrs of `path` (`llistxattr` + `lgetxattr`), sorted by name.
pub(crate) fn read(path: &Path) -> io::Result<Vec<Xattr>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: `c` is a valid C string; the buffer pointer and length describe `buf`.
    let names =
        fill(|buf| unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("split on NUL");
        // SAFETY: as above; `cname` is a valid C string.
        let value = fill(|buf| unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        });
        match value {
            Ok(value) => out.push(Xattr {
                name: Bytes(name.to_vec()),
                value: Bytes(value),
            }),
            // Removed between list and get.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Call a size-probing xattr syscall: first into a small buffer, which holds nearly every
/// name list and value (one syscall); on `ERANGE`, ask for the size and retry, again if
/// the value grew in between.
fn fill(mut call: impl FnMut(&mut [u8]) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        let got = call(&mut buf);
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Filesystems without xattr support have none.
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Some(libc::ERANGE) => {}
            _ => return Err(err),
        }
        let size = call(&mut []);
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        buf = vec![0u8; size as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_larger_than_the_first_guess() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        let big = vec![7u8; 3000];
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        let name = CString::new("user.big").unwrap();
        // SAFETY: valid C strings; pointer and length describe `big`.
        let rc = unsafe {
            libc::lsetxattr(c.as_ptr(), name.as_ptr(), big.as_ptr().cast(), big.len(), 0)
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let got = read(&path).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name.0, b"user.big");
        assert_eq!(got[0].value.0, big);
    }
}
