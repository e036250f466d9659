//! The server against real NBD clients: libnbd's tools and Python bindings,
//! and qemu's. Tests skip loudly when a tool is missing, or fail if
//! TESSERA_REQUIRE_PEERS=1.

mod support;

use std::process::Command;
use std::sync::Arc;

use support::*;
use tessera_nbd::{Config, Device, ExportMap, Extent, FileDevice, MemDevice};

const SIZE: usize = 8 << 20;

/// Serves the pattern image three ways: `mem` (read-only, in memory),
/// `file` (read-only raw file, sparse), `rw` (writable copy in memory).
fn setup() -> (Server, Vec<u8>, std::path::PathBuf) {
    let data = pattern_image(SIZE);
    let dir = tempfile::tempdir().unwrap().keep();
    let img = write_file(&dir, "disk.img", &data);
    // Punch the zero windows out of the file so SEEK_HOLE finds them.
    Command::new("fallocate")
        .args(["--dig-holes"])
        .arg(&img)
        .status()
        .ok();
    let mut exports = ExportMap::new();
    exports.insert(
        "mem",
        Arc::new(MemDevice::new(data.clone(), false).with_description("pattern in memory")),
    );
    exports.insert("file", Arc::new(FileDevice::open(&img, false).unwrap()));
    exports.insert("rw", Arc::new(MemDevice::new(data.clone(), true)));
    (Server::start(exports, Config::default()), data, img)
}

#[test]
fn nbdinfo_json_describes_the_export() {
    if !have("nbdinfo") {
        return;
    }
    let (server, data, _) = setup();
    let out = run(Command::new("nbdinfo").arg("--json").arg(server.uri("mem")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "mem");
    assert_eq!(e["description"], "pattern in memory");
    assert_eq!(e["export-size"], data.len() as u64);
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["can_df"], true);
    assert_eq!(e["can_flush"], false);
    assert_eq!(e["can_trim"], false);
    assert_eq!(e["can_zero"], false);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 64 << 20);
    assert_eq!(e["contexts"], serde_json::json!(["base:allocation"]));

    let out = run(Command::new("nbdinfo").arg("--json").arg(server.uri("rw")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["is_read_only"], false);
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
    ] {
        assert_eq!(e[cap], true, "{cap}");
    }
}

#[test]
fn nbdinfo_list_names_every_export() {
    if !have("nbdinfo") {
        return;
    }
    let (server, _, _) = setup();
    let out = run(Command::new("nbdinfo").arg("--list").arg(server.uri("")));
    for name in ["export=\"mem\"", "export=\"file\"", "export=\"rw\""] {
        assert!(out.contains(name), "{name} missing from:\n{out}");
    }
    assert!(out.contains("pattern in memory"));
}

/// Parses `nbdinfo --map` lines: offset, length, type.
fn parse_map(out: &str) -> Vec<(u64, u64, u32)> {
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

/// The map `nbdinfo` must show: per MiB, data / hole at [256K,512K) / data /
/// hole at [900K,912K) / data, with adjacent equal runs merged.
fn expected_map(size: u64) -> Vec<(u64, u64, u32)> {
    let mut runs: Vec<(u64, u64, u32)> = Vec::new();
    let mut push = |off: u64, len: u64, t: u32| match runs.last_mut() {
        Some(r) if r.2 == t && r.0 + r.1 == off => r.1 += len,
        _ => runs.push((off, len, t)),
    };
    for mib in 0..size >> 20 {
        let b = mib << 20;
        push(b, 256 << 10, 0);
        push(b + (256 << 10), 256 << 10, 3);
        push(b + (512 << 10), 388 << 10, 0);
        push(b + (900 << 10), 12 << 10, 3);
        push(b + (912 << 10), 112 << 10, 0);
    }
    runs
}

#[test]
fn nbdinfo_map_matches_the_device() {
    if !have("nbdinfo") {
        return;
    }
    let (server, data, img) = setup();
    let out = run(Command::new("nbdinfo").arg("--map").arg(server.uri("mem")));
    assert_eq!(parse_map(&out), expected_map(data.len() as u64));

    // The file export reports what SEEK_HOLE sees, whatever the filesystem
    // made of the punched holes: compare with the device's own extents.
    let dev = FileDevice::open(&img, false).unwrap();
    let mut want: Vec<(u64, u64, u32)> = Vec::new();
    let mut off = 0;
    for (len, kind) in dev.extents(0, dev.size()).unwrap() {
        let t = kind.status_flags();
        match want.last_mut() {
            Some(r) if r.2 == t => r.1 += len,
            _ => want.push((off, len, t)),
        }
        off += len;
    }
    let out = run(Command::new("nbdinfo").arg("--map").arg(server.uri("file")));
    assert_eq!(parse_map(&out), want);
    assert!(want
        .iter()
        .all(|r| r.2 == 0 || r.2 == Extent::Hole.status_flags()));
}

#[test]
fn nbdcopy_copies_exact_bytes() {
    if !have("nbdcopy") {
        return;
    }
    let (server, data, _) = setup();
    for (export, extra) in [
        ("mem", vec![]),
        ("file", vec!["--connections=4", "--requests=64"]),
        ("mem", vec!["--no-extents", "--request-size=4194304"]),
    ] {
        let out = server.dir.path().join(format!("copy-{export}.img"));
        run(Command::new("nbdcopy")
            .args(&extra)
            .arg(server.uri(export))
            .arg(&out));
        assert!(std::fs::read(&out).unwrap() == data, "{export} {extra:?}");
    }
}

#[test]
fn qemu_img_compare_and_qemu_io_reads() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let (server, _, img) = setup();
    for export in ["mem", "file"] {
        let out = run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&img)
            .arg(server.uri(export)));
        assert!(out.contains("identical"), "{out}");
    }
    // Zero windows read as zeroes; odd offsets and lengths read fine.
    let out = run(Command::new("qemu-io")
        .args(["-r", "-f", "raw"])
        .args(["-c", "read -P 0 262144 262144"])
        .args(["-c", "read -P 0 1310720 262144"])
        .args(["-c", "read -P 0 921600 12288"])
        .args(["-c", "read 1 1"])
        .args(["-c", "read 12345 67891"])
        .args(["-c", "read 8388607 1"])
        .arg(server.uri("mem")));
    assert!(!out.contains("fail") && !out.contains("error"), "{out}");
    // Writes through qemu-io on the writable export.
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(["-c", "write -P 0xab 1000 3000"])
        .args(["-c", "read -P 0xab 1000 3000"])
        .args(["-c", "write -z 4096 65536"])
        .args(["-c", "read -P 0 4096 65536"])
        .args(["-c", "flush"])
        .arg(server.uri("rw")));
    assert!(!out.contains("fail") && !out.contains("error"), "{out}");
}

#[test]
fn python_exact_requests() {
    let Some(py) = python_nbd() else { return };
    let (server, _, img) = setup();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/scripts/exact_requests.py"
    );
    let out = run(Command::new(py)
        .arg(script)
        .arg(server.uri("mem"))
        .arg(server.uri("rw"))
        .arg(&img));
    assert_eq!(out.trim(), "ok");
}

#[test]
fn sixty_four_concurrent_clients_read_right_bytes() {
    let (server, data, _) = setup();
    let server = Arc::new(server);
    let data = Arc::new(data);
    let threads: Vec<_> = (0..64u64)
        .map(|t| {
            let server = server.clone();
            let data = data.clone();
            std::thread::spawn(move || {
                let export = if t % 2 == 0 { "mem" } else { "file" };
                let (mut s, size, _) = open(&server, export);
                let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                // Pipeline 16 requests at a time, check every reply by cookie.
                for _round in 0..8 {
                    let mut want = std::collections::HashMap::new();
                    let mut batch = Vec::new();
                    for i in 0..16u64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let len = 1 + x % (300 << 10);
                        let off = (x >> 20) % (size - len);
                        batch.extend(request(0, 0, i, off, len as u32));
                        want.insert(i, (off as usize, len as usize));
                    }
                    use std::io::Write;
                    s.write_all(&batch).unwrap();
                    for _ in 0..16 {
                        let (err, cookie) = simple_reply(&mut s);
                        assert_eq!(err, 0);
                        let (off, len) = want.remove(&cookie).expect("known cookie");
                        assert!(read_exact(&mut s, len) == data[off..off + len]);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
