//! Listing a directory without touching its access time.
//!
//! `std::fs::read_dir` cannot pass `O_NOATIME`, and reading a directory updates its atime
//! (under `relatime`, the first time after a change), so a second import of an unchanged
//! tree would record different atimes and yield a different tree id.

use std::ffi::{CStr, CString, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

/// Open `path` with `flags | O_NOATIME`, retrying without `O_NOATIME` when we may not use it
/// (it needs ownership of the file or CAP_FOWNER).
pub(crate) fn open_noatime(path: &Path, flags: libc::c_int) -> io::Result<libc::c_int> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    for extra in [libc::O_NOATIME, 0] {
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
        let fd = unsafe { libc::open(c.as_ptr(), flags | extra | libc::O_CLOEXEC) };
        if fd >= 0 {
            return Ok(fd);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EPERM) || extra == 0 {
            return Err(err);
        }
    }
    unreachable!("the loop returns on its last iteration")
}

/// The names in directory `path`, without `.` and `..`.
pub(crate) fn read_dir_names(path: &Path) -> io::Result<Vec<OsString>> {
    let fd = open_noatime(path, libc::O_RDONLY | libc::O_DIRECTORY)?;
    // SAFETY: `fd` is an open directory descriptor we own; on success the DIR takes it over.
    let dir = unsafe { libc::fdopendir(fd) };
    if dir.is_null() {
        let err = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `fd` is still ours to close.
        unsafe { libc::close(fd) };
        return Err(err);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; clearing it lets us tell end-of-directory from error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `dir` is a valid DIR* until closedir below.
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            let err = io::Error::last_os_error();
            break if err.raw_os_error() == Some(0) {
                Ok(())
            } else {
                Err(err)
            };
        }
        // SAFETY: readdir returned a valid entry whose d_name is NUL-terminated; we copy it
        // before the next readdir call invalidates it.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    };
    // SAFETY: `dir` is valid and closed exactly once.
    unsafe { libc::closedir(dir) };
    result.map(|()| names)
}
