//! Shared helpers for the integration tests: a temporary store driven through the built
//! binary, a fixture tree with every kind of entry, and snapshots of trees to compare.
#![allow(dead_code)]

pub mod ext4view;
pub mod fixture;
pub mod served;
pub mod snapshot;

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tessera::store::{ObjectId, Store};
use tessera::tree::Manifest;

/// A temporary directory holding a store (`store/`) and scratch space.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store");
        Env { dir, store }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
        cmd.arg("--store").arg(&self.store);
        cmd
    }

    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.command().args(args).output().expect("run tessera")
    }

    /// Run and expect success; returns stdout.
    pub fn ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tessera {:?} failed: {}\n{}",
            args.iter()
                .map(|a| a.as_ref().to_owned())
                .collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Run and expect failure; returns stderr and stdout together.
    pub fn fails<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "tessera {:?} unexpectedly succeeded",
            args.iter()
                .map(|a| a.as_ref().to_owned())
                .collect::<Vec<_>>()
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )
    }

    /// `import dir`, returning the tree id. Small objects are packed (the default).
    pub fn import(&self, dir: &Path) -> String {
        let out = self.ok(&[OsStr::new("import"), OsStr::new("dir"), dir.as_os_str()]);
        out.trim().to_owned()
    }

    /// `import dir --no-pack`: every object a loose file; returns the tree id.
    #[allow(dead_code)] // not every test binary uses it
    pub fn import_loose(&self, dir: &Path) -> String {
        let out = self.ok(&[
            OsStr::new("import"),
            OsStr::new("dir"),
            OsStr::new("--no-pack"),
            dir.as_os_str(),
        ]);
        out.trim().to_owned()
    }

    /// `image export IMAGE` to a file beside the store; returns its bytes.
    #[allow(dead_code)] // not every test binary uses it
    pub fn export(&self, image: &str) -> Vec<u8> {
        let to = self.path(&format!("{image}.export"));
        self.ok(&[
            OsStr::new("image"),
            OsStr::new("export"),
            OsStr::new(image),
            to.as_os_str(),
        ]);
        std::fs::read(&to).unwrap()
    }

    pub fn open_store(&self) -> Store {
        Store::open(&self.store).expect("open store")
    }

    pub fn manifest(&self, tree: &str) -> Manifest {
        let id: ObjectId = tree.parse().expect("tree id");
        let bytes = self.open_store().read_tree_bytes(&id).expect("read tree");
        Manifest::from_bytes(&bytes).expect("parse tree")
    }

    /// Files under `sub` of the store (recursively), sorted.
    pub fn files(&self, sub: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.store.join(sub)];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten() {
                let p = e.expect("dir entry").path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether a test needing `what` can run. Without it the test is skipped loudly, unless
/// `TESSERA_REQUIRE_PEERS=1` (CI), where a missing peer fails the test.
pub fn can_run(test: &str, needs_root: bool, tools: &[&str]) -> bool {
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|t| !have(t))
        .map(|t| format!("`{t}`"))
        .collect();
    if needs_root && !is_root() {
        missing.push("root".to_owned());
    }
    if missing.is_empty() {
        return true;
    }
    skip(&format!("{test}: needs {}", missing.join(", ")));
    false
}

/// Says loudly that a test is skipped for `why`, or fails it under
/// `TESSERA_REQUIRE_PEERS=1` (CI), where nothing may be skipped.
pub fn skip(why: &str) {
    if std::env::var_os("TESSERA_REQUIRE_PEERS").is_some_and(|v| v == "1") {
        panic!("{why} (TESSERA_REQUIRE_PEERS=1)");
    }
    // Written to the stderr handle, not with eprintln!, which the test harness captures.
    let _ = writeln!(std::io::stderr(), "SKIPPED {why}");
}

/// A loop mount that is unmounted on drop.
pub struct LoopMount {
    pub dir: PathBuf,
}

impl LoopMount {
    pub fn new(image: &Path, dir: &Path, options: &str) -> LoopMount {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .arg("-o")
            .arg(format!("loop,{options}"))
            .arg(image)
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        LoopMount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// Run `e2fsck -fn` on `image`; panics unless it exits 0 and reports no problem lines.
pub fn e2fsck_clean(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .expect("run e2fsck");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A clean run prints the version, the five pass headers and a summary line.
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.starts_with("e2fsck ")
                && !l.starts_with("Pass ")
                && !l.contains(" files (")
                && !l.trim().is_empty()
        })
        .collect();
    assert!(
        out.status.success() && problems.is_empty(),
        "e2fsck -fn {}:\n{text}",
        image.display()
    );
}
