//! A `tessera serve` child process for tests, and an nbdfuse mount of one of its exports.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::Env;

/// `tessera serve` on a private Unix socket; SIGTERM (then SIGKILL) on drop.
pub struct Served {
    pub child: Option<Child>,
    pub sock: PathBuf,
    pub banner: String,
}

impl Served {
    pub fn start(env: &Env, extra: &[&str]) -> Served {
        Served::spawn(env, "nbd.sock", extra, &[], Stdio::inherit())
    }

    /// Like `start`, on socket `sock` (a name in the test's directory), with the server's
    /// log (stderr) going to `log` for the test to read.
    pub fn start_logged(env: &Env, sock: &str, log: &Path, extra: &[&str]) -> Served {
        Served::start_logged_with(env, sock, log, extra, &[])
    }

    /// Like `start_logged`, with `vars` set in the server's environment (`RUST_LOG`).
    pub fn start_logged_with(
        env: &Env,
        sock: &str,
        log: &Path,
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> Served {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the server log");
        Served::spawn(env, sock, extra, vars, Stdio::from(file))
    }

    /// `serve` on socket `sock` by `tessera`, a command that runs the binary with its
    /// store given (`Env::command`, or a wrapper around a copy of it, such as `setpriv` to
    /// run it as another user), with the server's log going to `log`.
    pub fn start_command(tessera: Command, sock: PathBuf, log: &Path) -> Served {
        let file = std::fs::File::create(log).expect("create the server log");
        Served::spawn_command(tessera, sock, &[], Stdio::from(file))
    }

    fn spawn(
        env: &Env,
        sock: &str,
        extra: &[&str],
        vars: &[(&str, &str)],
        stderr: Stdio,
    ) -> Served {
        let mut tessera = env.command();
        tessera.envs(vars.iter().copied());
        Served::spawn_command(tessera, env.path(sock), extra, stderr)
    }

    fn spawn_command(mut tessera: Command, sock: PathBuf, extra: &[&str], stderr: Stdio) -> Served {
        let mut child = tessera
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn tessera serve");
        // The banner goes out once every listener is bound.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            banner.push_str(&line);
            banner.push('\n');
            if line.starts_with("ready: ") {
                break;
            }
        }
        assert!(banner.contains("listening on"), "banner: {banner}");
        std::thread::spawn(move || for _ in lines {});
        Served {
            child: Some(child),
            sock,
            banner,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    /// The whole of `export`, read by `nbdcopy` (libnbd) into `to`; panics on failure.
    #[allow(dead_code)] // not every test binary uses it
    pub fn nbdcopy(&self, export: &str, to: &std::path::Path) -> Vec<u8> {
        let o = Command::new("nbdcopy")
            .arg(self.uri(export))
            .arg(to)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "nbdcopy {export}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::read(to).unwrap()
    }

    /// SIGTERM, then the exit status (within `limit`).
    pub fn stop(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > limit {
                child.kill().ok();
                panic!("tessera serve did not stop within {limit:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash, with no chance to flush anything.
    pub fn crash(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(5) {
                    child.kill().ok();
                    child.wait().ok();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// An export exposed as a file by nbdfuse; unmounted on drop.
pub struct Fuse {
    pub dir: PathBuf,
    pub file: PathBuf,
    child: Child,
}

impl Fuse {
    pub fn new(dir: &Path, uri: &str, read_only: bool) -> Fuse {
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join("disk.img");
        let mut cmd = Command::new("nbdfuse");
        if read_only {
            cmd.arg("-r");
        }
        let child = cmd.arg(&file).arg(uri).spawn().expect("spawn nbdfuse");
        let start = Instant::now();
        while !file.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nbdfuse did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Fuse {
            dir: dir.to_path_buf(),
            file,
            child,
        }
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status();
        let _ = self.child.wait();
    }
}
