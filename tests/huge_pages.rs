//! `image create` backs its heap with transparent huge pages where the kernel offers them
//! (`src/alloc`): sizing a large tree then takes a fraction of the page faults it takes in
//! 4 KiB pages (`TESSERA_SMALL_PAGES`), for the same image.

mod common;
use common::*;

use std::process::{Command, Stdio};

/// Runs `cmd` to completion and returns its minor page faults (`wait4`'s rusage).
// The child is reaped by `wait4`, which `Child::wait` cannot replace: it gives no rusage.
#[allow(clippy::zombie_processes)]
fn minor_faults(mut cmd: Command) -> u64 {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tessera");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child's pid, writing into the two locals passed.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "tessera failed: {status:#x}"
    );
    usage.ru_minflt as u64
}

fn huge_pages_offered() -> bool {
    let mode =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if mode.contains("[always]") || mode.contains("[madvise]") {
        return true;
    }
    skip(
        "image_create_faults_its_heap_in_huge_pages: needs transparent huge pages \
         (always or madvise)",
    );
    false
}

#[test]
fn image_create_faults_its_heap_in_huge_pages() {
    if !huge_pages_offered() {
        return;
    }
    let env = Env::new();
    // 12 000 files in 16 directories: some 8 MB of small blocks while sizing.
    let src = env.path("src");
    for d in 0..16 {
        let dir = src.join(format!("directory-{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..750 {
            std::fs::write(
                dir.join(format!("file-number-{f:04}.txt")),
                format!("{d} {f}"),
            )
            .unwrap();
        }
    }
    let tree = env.import(&src);
    let create = |name: &str, small: bool| {
        let mut cmd = env.command();
        cmd.args(["image", "create", name, "--tree", &tree]);
        if small {
            cmd.env("TESSERA_SMALL_PAGES", "1");
        }
        minor_faults(cmd)
    };
    // What any command costs (the binary's own pages, the store), not the sizing.
    let base = minor_faults({
        let mut cmd = env.command();
        cmd.args(["image", "list"]);
        cmd
    });
    let small = create("small", true).saturating_sub(base);
    let huge = create("huge", false).saturating_sub(base);
    eprintln!(
        "page faults beyond `image list`'s {base}: {small} in 4 KiB pages, {huge} in huge pages"
    );
    assert!(
        huge * 2 < small,
        "{huge} page faults with huge pages, {small} without (beyond {base})"
    );
    // Both are the same image but for the name's uuid and seeds.
    let show = |name: &str| {
        env.ok(&["image", "show", name])
            .lines()
            .filter(|l| l.trim_start().starts_with("size:") || l.contains("blocks:"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(show("small"), show("huge"));
}
