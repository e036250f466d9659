//! `--json` output of the listing and show commands, parsed and checked against the store's
//! real state (files on disk, a raw export, an overlay written through a served export).
//! Imports use `--no-pack`, so that object counts and bytes can be read off `objects/`.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::served::Served;
use common::Env;
use serde_json::Value;

/// Debian's Python, which has libnbd's `nbd` module (python3-libnbd).
const PY: &str = "/usr/bin/python3";

/// Runs tessera, expects success and parses stdout as exactly one JSON document.
fn json(env: &Env, args: &[&str]) -> Value {
    let out = env.ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("tessera {args:?}: {e}:\n{out}"))
}

/// Three files, two of them identical: 3 objects of 1000 + 5000 + 3000 bytes, 10 000 bytes
/// of file data per image.
fn tree(env: &Env) -> String {
    let src = env.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("a"), vec![1u8; 1000]).unwrap();
    fs::write(src.join("b"), vec![1u8; 1000]).unwrap();
    fs::write(
        src.join("c"),
        (0..5000u32).map(|i| i as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    fs::write(src.join("sub/d"), vec![9u8; 3000]).unwrap();
    env.import_loose(&src)
}

fn bytes_on_disk(env: &Env, area: &str) -> u64 {
    env.files(area)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

#[test]
fn image_list_and_show_describe_the_records_and_the_layout() {
    let env = Env::new();
    let id = tree(&env);
    env.ok(&["image", "create", "sized", "--tree", &id, "--size", "64M"]);
    env.ok(&["image", "create", "auto", "--tree", &id, "--label", "lbl"]);

    let list = json(&env, &["image", "list", "--json"]);
    let list = list.as_array().expect("image list --json is an array");
    let names: Vec<&str> = list.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["auto", "sized"]);
    for image in list {
        assert_eq!(image["trees"], serde_json::json!([id]));
        assert!(
            image["created"].as_i64().unwrap() > 1_600_000_000,
            "{image}"
        );
    }
    assert_eq!(list[1]["size"], 64 << 20);
    assert_eq!(list[0]["size"], Value::Null, "a size the synthesizer picks");
    assert_eq!(list[0]["label"], "lbl");
    assert_eq!(list[1]["label"], "sized");

    let show = json(&env, &["image", "show", "auto", "--json"]);
    assert_eq!(show["name"], "auto");
    assert_eq!(show["trees"], serde_json::json!([id]));
    assert_eq!(show["created"], list[0]["created"]);
    assert_eq!(show["objects"], 3, "{show}");
    let layout = &show["layout"];
    let raw = env.path("auto.raw");
    env.ok(&["image", "export", "auto", raw.to_str().unwrap()]);
    let size = fs::metadata(&raw).unwrap().len();
    assert_eq!(
        layout["size"], size,
        "layout.size is the exported device's size"
    );
    assert_eq!(layout["block_size"], 4096);
    assert_eq!(layout["blocks"].as_u64().unwrap() * 4096, size);
    // 1000 + 5000 + 3000 bytes in 4 KiB blocks; the two identical files share one object,
    // but each inode maps its own blocks.
    assert_eq!(layout["data_blocks"], 1 + 2 + 1 + 1, "{layout}");
    assert!(layout["free_blocks"].as_u64().unwrap() < layout["blocks"].as_u64().unwrap());
    assert!(layout["free_inodes"].as_u64().unwrap() < layout["inodes"].as_u64().unwrap());
    // The UUID is the one in the superblock (offset 1024 + 0x68).
    let img = fs::read(&raw).unwrap();
    let uuid: String = img[1024 + 0x68..1024 + 0x78]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(show["uuid"].as_str().unwrap().replace('-', ""), uuid);

    let sized = json(&env, &["image", "show", "sized", "--json"]);
    assert_eq!(sized["size"], 64 << 20);
    assert_eq!(sized["layout"]["size"], 64 << 20);

    let err = env.fails(&["image", "show", "missing", "--json"]);
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn store_stats_and_gc_count_what_is_on_disk() {
    let env = Env::new();
    let id = tree(&env);
    env.ok(&["image", "create", "one", "--tree", &id]);
    env.ok(&["image", "create", "two", "--tree", &id]);
    // A second tree sharing `a` and adding 2222 new bytes, used only by image `other`.
    let src2 = env.path("src2");
    fs::create_dir_all(&src2).unwrap();
    fs::write(src2.join("a"), vec![1u8; 1000]).unwrap();
    fs::write(src2.join("x"), vec![7u8; 2222]).unwrap();
    let id2 = env.import_loose(&src2);
    env.ok(&["image", "create", "other", "--tree", &id2]);

    let stats = json(&env, &["store", "stats", "--json"]);
    assert_eq!(stats["store"], env.store.to_str().unwrap());
    assert_eq!(stats["objects"], env.files("objects").len());
    assert_eq!(stats["objects"], 4);
    assert_eq!(stats["object_bytes"], bytes_on_disk(&env, "objects"));
    assert_eq!(stats["object_bytes"], 1000 + 5000 + 3000 + 2222);
    assert_eq!(stats["trees"], env.files("trees").len());
    assert_eq!(stats["trees"], 2);
    assert_eq!(stats["images"], 3);
    assert_eq!(stats["image_bytes"], 2 * 10_000 + 1000 + 2222);
    let ratio = stats["dedup_ratio"].as_f64().unwrap();
    assert!((ratio - 23_222.0 / 11_222.0).abs() < 1e-9, "{ratio}");

    env.ok(&["image", "rm", "other"]);
    let before = env.files("objects");
    let dry = json(&env, &["store", "gc", "--dry-run", "--json"]);
    assert_eq!(
        dry,
        serde_json::json!({"dry_run": true, "objects": 1, "object_bytes": 2222,
                           "trees": 1, "tmp_files": 0, "partial_objects": 0,
                           "partial_bytes": 0, "packs": 0, "pack_bytes": 0,
                           "repacked": 0, "loose_copies": 0, "loose_copy_bytes": 0,
                           "kept_corrupt": 0})
    );
    assert_eq!(env.files("objects"), before, "a dry run removes nothing");
    let gc = json(&env, &["store", "gc", "--json"]);
    assert_eq!(gc["dry_run"], false);
    assert_eq!(
        (&gc["objects"], &gc["object_bytes"]),
        (&dry["objects"], &dry["object_bytes"])
    );
    assert_eq!(gc["trees"], 1);
    assert_eq!(env.files("objects").len(), 3);

    let after = json(&env, &["store", "stats", "--json"]);
    assert_eq!(after["objects"], 3);
    assert_eq!(after["object_bytes"], bytes_on_disk(&env, "objects"));
    assert_eq!(after["trees"], 1);
    assert_eq!(after["images"], 2);

    let empty = Env::new();
    let stats = json(&empty, &["store", "stats", "--json"]);
    assert_eq!(stats["objects"], 0);
    assert_eq!(stats["dedup_ratio"], Value::Null, "no data: no ratio");
}

#[test]
fn store_verify_reports_problems_as_json_and_still_fails() {
    let env = Env::new();
    let id = tree(&env);
    env.ok(&["image", "create", "img", "--tree", &id]);
    let clean = json(&env, &["store", "verify", "--json"]);
    assert_eq!(clean["objects"], 3);
    assert_eq!(clean["object_bytes"], 9000);
    assert_eq!(clean["trees"], 1);
    assert_eq!(clean["images"], 1);
    assert_eq!(clean["problems"], serde_json::json!([]));

    // Flip one object's bytes in place (same length): verify must name it.
    let c: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    let hex = blake3::hash(&c).to_hex().to_string();
    let path = env.store.join("objects").join(&hex[..2]).join(&hex[2..]);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, vec![0u8; 5000]).unwrap();
    let out = env.run(&["store", "verify", "--json"]);
    assert!(
        !out.status.success(),
        "verify must still exit 1 on problems"
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{report}");
    assert_eq!(problems[0]["kind"], "corrupt_object");
    assert!(
        problems[0]["message"].as_str().unwrap().contains(&hex),
        "{report}"
    );
}

/// Writes through a served persistent overlay, holding the connection open until stdin
/// closes; returns once the writes are flushed.
struct Writer(std::process::Child);

impl Writer {
    fn start(uri: &str) -> Writer {
        // 3 whole blocks at 1 MiB and 100 bytes inside the block at 5 MiB: 4 changed blocks.
        let script = format!(
            "import nbd, sys\nh = nbd.NBD()\nh.connect_uri({uri:?})\n\
             h.pwrite(b'\\xab' * 12288, 1 << 20)\nh.pwrite(b'\\xcd' * 100, 5 << 20)\n\
             h.flush()\nprint('flushed', flush=True)\nsys.stdin.read()\n"
        );
        let mut child = Command::new(PY)
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "flushed");
        Writer(child)
    }

    fn finish(mut self) {
        drop(self.0.stdin.take());
        assert!(self.0.wait().unwrap().success());
    }
}

#[test]
fn overlay_list_and_show_report_the_blocks_a_client_wrote() {
    if !common::can_run("overlay_list_and_show_json", false, &[PY]) {
        return;
    }
    let env = Env::new();
    let id = tree(&env);
    env.ok(&["image", "create", "img", "--tree", &id, "--size", "64M"]);
    assert_eq!(
        json(&env, &["overlay", "list", "--json"]),
        serde_json::json!([])
    );

    let served = Served::start(&env, &["--export", "img:persistent=vm1"]);
    let writer = Writer::start(&served.uri("img"));
    let show = json(&env, &["overlay", "show", "vm1", "--json"]);
    assert_eq!(show["name"], "vm1");
    assert_eq!(show["image"], "img");
    assert_eq!(show["size"], 64 << 20);
    assert_eq!(show["attached"], true, "a client holds it: {show}");
    assert_eq!(show["changed_blocks"], 4, "{show}");
    assert_eq!(show["changed_bytes"], 4 * 4096);
    assert!(show["data_bytes"].as_u64().unwrap() >= 4 * 4096, "{show}");
    assert!(show["created"].as_i64().unwrap() > 1_600_000_000);
    assert!(!show["image_fingerprint"].as_str().unwrap().is_empty());
    writer.finish();

    // The server releases the overlay when the client has gone.
    let start = Instant::now();
    let list = loop {
        let list = json(&env, &["overlay", "list", "--json"]);
        if list[0]["attached"] == false || start.elapsed() > Duration::from_secs(10) {
            break list;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["attached"], false, "{list:?}");
    let mut detached = show.clone();
    detached["attached"] = false.into();
    // data_bytes counts allocated blocks, which the filesystem may round differently.
    detached["data_bytes"] = list[0]["data_bytes"].clone();
    assert_eq!(
        list[0], detached,
        "list and show describe an overlay the same way"
    );
    drop(served);

    let err = env.fails(&["overlay", "show", "nope", "--json"]);
    assert!(err.contains("nope"), "{err}");
}
