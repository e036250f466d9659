//! systemd socket activation: serving on listening sockets the service manager bound and
//! passed through `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` (sd_listen_fds(3)), as
//! nbdkit and qemu-nbd accept them.
//!
//! When `LISTEN_PID` is our pid, fds 3 .. 3 + `LISTEN_FDS` are listening stream sockets, Unix
//! or TCP (told apart by `getsockname`), and tessera serves on all of them instead of binding
//! `--listen`'s default. Inherited sockets together with `--listen` are refused, as qemu-nbd
//! refuses them, rather than served side by side: a unit that sets both most likely meant
//! one, and the socket unit is where systemd expects the addresses to be.
//!
//! The variables are unset whether or not they were meant for us, so no process we start
//! inherits them, and the sockets get `FD_CLOEXEC`. Inherited Unix socket files are left in
//! place on exit: they belong to the socket unit, which keeps listening and starts the
//! service again on the next connection.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use tessera_nbd::Listener;

use super::ListenAddr;

/// The first inherited descriptor (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// Why inherited sockets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_{var}={value:?} is not a number")]
    BadVariable { var: &'static str, value: String },
    #[error(
        "the service manager passed {count} listening socket(s) and --listen was given too: \
         configure the addresses in the socket unit, or drop LISTEN_FDS to use --listen"
    )]
    ListenToo { count: usize },
    #[error("inherited fd {fd} ({name}) cannot be used")]
    Fd {
        fd: RawFd,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("inherited fd {fd} ({name}) is {what}, not a listening Unix or TCP stream socket")]
    NotListening {
        fd: RawFd,
        name: String,
        what: &'static str,
    },
}

/// A socket the service manager bound.
#[derive(Debug)]
enum Inherited {
    Unix(UnixListener),
    Tcp(std::net::TcpListener),
}

/// Where the server listens: sockets inherited from the service manager, or the `--listen`
/// addresses (else the default) that it binds itself.
#[derive(Debug)]
pub struct Listening {
    addrs: Vec<ListenAddr>,
    /// Empty when we bind `addrs` ourselves; taken by [`Listening::open`].
    inherited: Vec<Inherited>,
    activated: bool,
}

impl Listening {
    /// Takes the inherited sockets, if any were passed to this process, else plans to bind
    /// `listen` (or `default` when it is empty).
    ///
    /// Call it before the process starts threads: it unsets the activation variables, and
    /// `setenv`/`unsetenv` race with `getenv` on other threads.
    pub fn new(listen: &[ListenAddr], default: ListenAddr) -> Result<Listening, ActivationError> {
        let vars = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"].map(std::env::var_os);
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
        let [pid, fds, names] = vars;
        let count = passed_count(std::process::id(), pid, fds)?;
        if count == 0 {
            let addrs = if listen.is_empty() {
                vec![default]
            } else {
                listen.to_vec()
            };
            return Ok(Listening {
                addrs,
                inherited: Vec::new(),
                activated: false,
            });
        }
        if !listen.is_empty() {
            return Err(ActivationError::ListenToo { count });
        }
        let names = fd_names(names, count);
        let mut addrs = Vec::with_capacity(count);
        let mut inherited = Vec::with_capacity(count);
        for (i, name) in names.into_iter().enumerate() {
            let fd = FIRST_FD + i as RawFd;
            // SAFETY: under the sd_listen_fds protocol (LISTEN_PID is our pid) fds 3 .. 3 +
            // LISTEN_FDS are open and ours; nothing else in the process refers to them, and
            // each is wrapped exactly once, here, since the variables are now unset.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let (addr, sock) = adopt(owned, &name)?;
            eprintln!("socket activation: fd {fd} ({name}) is {addr}");
            addrs.push(addr);
            inherited.push(sock);
        }
        Ok(Listening {
            addrs,
            inherited,
            activated: true,
        })
    }

    /// The addresses served on, for the banner.
    pub fn addrs(&self) -> &[ListenAddr] {
        &self.addrs
    }

    /// The listeners, in the order of [`Listening::addrs`]. Needs the tokio runtime.
    pub async fn open(&mut self) -> anyhow::Result<Vec<Listener>> {
        if !self.activated {
            let mut out = Vec::with_capacity(self.addrs.len());
            for addr in &self.addrs {
                out.push(addr.bind().await?);
            }
            return Ok(out);
        }
        let mut out = Vec::with_capacity(self.inherited.len());
        for (sock, addr) in self.inherited.drain(..).zip(&self.addrs) {
            let l: Listener = match sock {
                Inherited::Unix(l) => tokio::net::UnixListener::from_std(l)
                    .map(Into::into)
                    .map_err(|e| anyhow::anyhow!("cannot serve on inherited {addr}: {e}"))?,
                Inherited::Tcp(l) => tokio::net::TcpListener::from_std(l)
                    .map(Into::into)
                    .map_err(|e| anyhow::anyhow!("cannot serve on inherited {addr}: {e}"))?,
            };
            out.push(l);
        }
        Ok(out)
    }

    /// Removes the Unix socket files we bound; inherited ones stay with the socket unit.
    pub fn cleanup(&self) {
        if !self.activated {
            for addr in &self.addrs {
                addr.cleanup();
            }
        }
    }
}

/// How many sockets were passed to process `me` (sd_listen_fds: 0 unless `LISTEN_PID` is
/// `me`).
fn passed_count(
    me: u32,
    pid: Option<OsString>,
    fds: Option<OsString>,
) -> Result<usize, ActivationError> {
    let number = |var: &'static str, value: OsString| {
        let value = value.to_string_lossy().into_owned();
        value
            .trim()
            .parse::<u64>()
            .map_err(|_| ActivationError::BadVariable { var, value })
    };
    let Some(pid) = pid else { return Ok(0) };
    // Meant for another process (a parent that did not unset them): not ours to use.
    if number("PID", pid)? != u64::from(me) {
        return Ok(0);
    }
    let Some(fds) = fds else { return Ok(0) };
    let n = number("FDS", fds)?;
    // Descriptors are ints; more than that many cannot have been passed.
    usize::try_from(n)
        .ok()
        .filter(|&n| n <= (RawFd::MAX - FIRST_FD) as usize)
        .ok_or(ActivationError::BadVariable {
            var: "FDS",
            value: n.to_string(),
        })
}

/// The name of each passed socket: `LISTEN_FDNAMES` (colon-separated) when it names every
/// one, else `fd N`. systemd names them after the socket unit or its `FileDescriptorName=`.
fn fd_names(names: Option<OsString>, count: usize) -> Vec<String> {
    let given: Vec<String> = names
        .map(|n| n.to_string_lossy().split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    if given.len() == count && given.iter().all(|n| !n.is_empty()) {
        given
    } else {
        (0..count)
            .map(|i| format!("fd {}", FIRST_FD + i as RawFd))
            .collect()
    }
}

/// Checks that `fd` is a listening Unix or TCP stream socket, makes it close-on-exec and
/// nonblocking (tokio needs that), and returns its address.
fn adopt(fd: OwnedFd, name: &str) -> Result<(ListenAddr, Inherited), ActivationError> {
    let raw = fd.as_raw_fd();
    let err = |source: io::Error| ActivationError::Fd {
        fd: raw,
        name: name.to_owned(),
        source,
    };
    let not = |what: &'static str| ActivationError::NotListening {
        fd: raw,
        name: name.to_owned(),
        what,
    };
    // SAFETY: an all-zero sockaddr_storage is a valid value of this plain C struct.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `ss` is writable for `len` bytes and `len` is its size; `raw` is open (owned).
    let rc = unsafe { libc::getsockname(raw, (&raw mut ss).cast(), &mut len) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ENOTSOCK) {
            not("not a socket")
        } else {
            err(e)
        });
    }
    let family = libc::c_int::from(ss.ss_family);
    if ![libc::AF_UNIX, libc::AF_INET, libc::AF_INET6].contains(&family) {
        return Err(not("a socket of another family"));
    }
    if sockopt(raw, libc::SO_TYPE).map_err(err)? != libc::SOCK_STREAM {
        return Err(not("a datagram or seqpacket socket"));
    }
    if sockopt(raw, libc::SO_ACCEPTCONN).map_err(err)? == 0 {
        return Err(not("a stream socket that is not listening"));
    }
    set_flags(raw).map_err(err)?;
    if family == libc::AF_UNIX {
        let l = UnixListener::from(fd);
        let local = l.local_addr().map_err(err)?;
        let path = if let Some(p) = local.as_pathname() {
            p.to_path_buf()
        } else {
            use std::os::linux::net::SocketAddrExt;
            // libnbd and qemu write abstract sockets with a leading '@'.
            match local.as_abstract_name() {
                Some(n) => PathBuf::from(format!("@{}", String::from_utf8_lossy(n))),
                None => return Err(not("an unnamed Unix socket")),
            }
        };
        Ok((ListenAddr::Unix(path), Inherited::Unix(l)))
    } else {
        let l = std::net::TcpListener::from(fd);
        let local = l.local_addr().map_err(err)?;
        // SocketAddr prints IPv6 hosts in brackets, as `tcp:[::1]:10809` wants them.
        Ok((ListenAddr::Tcp(local.to_string()), Inherited::Tcp(l)))
    }
}

/// An integer `SOL_SOCKET` option.
fn sockopt(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` is writable for `len` bytes, the size of the int the option returns.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut len) };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `FD_CLOEXEC` (sd_listen_fds sets it too) and `O_NONBLOCK`.
fn set_flags(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an open descriptor we own, with flag arguments only.
    let ok = unsafe {
        let fdflags = libc::fcntl(fd, libc::F_GETFD);
        let flflags = libc::fcntl(fd, libc::F_GETFL);
        fdflags >= 0
            && flflags >= 0
            && libc::fcntl(fd, libc::F_SETFD, fdflags | libc::FD_CLOEXEC) == 0
            && libc::fcntl(fd, libc::F_SETFL, flflags | libc::O_NONBLOCK) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(s.into())
    }

    #[test]
    fn only_our_pid_counts() {
        assert_eq!(passed_count(42, None, None).unwrap(), 0);
        assert_eq!(passed_count(42, os("42"), os("2")).unwrap(), 2);
        assert_eq!(passed_count(42, os("43"), os("2")).unwrap(), 0);
        assert_eq!(passed_count(42, None, os("2")).unwrap(), 0);
        assert_eq!(passed_count(42, os("42"), None).unwrap(), 0);
        assert_eq!(passed_count(42, os("42"), os("0")).unwrap(), 0);
        assert!(matches!(
            passed_count(42, os("42"), os("two")),
            Err(ActivationError::BadVariable { var: "FDS", .. })
        ));
        assert!(matches!(
            passed_count(42, os("x"), os("1")),
            Err(ActivationError::BadVariable { var: "PID", .. })
        ));
    }

    #[test]
    fn names_when_complete_else_fd_numbers() {
        assert_eq!(fd_names(os("nbd:tcp"), 2), ["nbd", "tcp"]);
        assert_eq!(fd_names(os(""), 1), ["fd 3"]);
        assert_eq!(fd_names(os("nbd"), 2), ["fd 3", "fd 4"]);
        assert_eq!(fd_names(None, 1), ["fd 3"]);
    }

    #[test]
    fn adopts_listening_unix_and_tcp_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let unix = UnixListener::bind(&path).unwrap();
        let (addr, sock) = adopt(unix.into(), "nbd").unwrap();
        assert_eq!(addr, ListenAddr::Unix(path));
        let Inherited::Unix(l) = sock else {
            panic!("not unix")
        };
        // Nonblocking: accept with no client waiting returns at once.
        assert_eq!(l.accept().unwrap_err().kind(), io::ErrorKind::WouldBlock);

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let (addr, _) = adopt(tcp.into(), "tcp").unwrap();
        assert_eq!(addr, ListenAddr::Tcp(format!("127.0.0.1:{port}")));
    }

    #[test]
    fn refuses_what_is_not_a_listening_stream_socket() {
        let file = tempfile::tempfile().unwrap();
        let e = adopt(file.into(), "f").unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = adopt(udp.into(), "u").unwrap_err();
        assert!(e.to_string().contains("datagram"), "{e}");

        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = adopt(a.into(), "pair").unwrap_err();
        assert!(e.to_string().contains("not listening"), "{e}");
    }
}
