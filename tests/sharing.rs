//! Many different images from overlapping trees on one server (the small-N version of
//! tools/bench-sharing): every export's bytes are right, and a file shared by several
//! images is served from one store object in all of them.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::process::Command;

use common::served::Served;
use common::Env;
use tessera::image;
use tessera_ext4::Piece;

#[test]
fn overlapping_images_are_served_right_from_shared_objects() {
    if !common::can_run("overlapping_images_are_served_right", false, &["nbdcopy"]) {
        return;
    }
    let env = Env::new();
    let base = env.path("base");
    fs::create_dir_all(base.join("usr/lib")).unwrap();
    fs::write(
        base.join("usr/lib/libshared.so"),
        common::fixture::pseudo_random(300_000),
    )
    .unwrap();
    fs::write(base.join("usr/lib/small"), "shared small file\n").unwrap();
    let base_tree = env.import(&base);
    let mut pkgs = Vec::new();
    for p in 0..4 {
        let d = env.path(&format!("pkg{p}"));
        fs::create_dir_all(d.join(format!("opt/pkg{p}"))).unwrap();
        fs::write(
            d.join(format!("opt/pkg{p}/data")),
            vec![p as u8 + 1; 50_000 + p * 4096],
        )
        .unwrap();
        pkgs.push(env.import(&d));
    }
    let names: Vec<String> = (0..5).map(|i| format!("img{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let own = env.path(&format!("own{i}"));
        fs::create_dir_all(own.join("etc")).unwrap();
        fs::write(own.join("etc/hostname"), format!("{name}\n")).unwrap();
        let own_tree = env.import(&own);
        let mut args = vec![
            "image".to_owned(),
            "create".into(),
            name.clone(),
            "--tree".into(),
            base_tree.clone(),
        ];
        for (p, t) in pkgs.iter().enumerate() {
            if (i + p) % 2 == 0 {
                args.extend(["--tree".into(), t.clone()]);
            }
        }
        args.extend(["--tree".into(), own_tree]);
        env.ok(&args);
    }

    let copy = |served: &Served, name: &str, round: usize| {
        let got = env.path(&format!("{name}.got"));
        let o = Command::new("nbdcopy")
            .arg(served.uri(name))
            .arg(&got)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "nbdcopy {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            fs::read(&got).unwrap() == fs::read(env.path(&format!("{name}.want"))).unwrap(),
            "{name}, round {round}: served bytes differ from the export"
        );
    };
    let served = Served::start(&env, &[]);
    for name in &names {
        let want = env.path(&format!("{name}.want"));
        env.ok(&[
            "image".as_ref(),
            "export".as_ref(),
            name.as_ref(),
            want.as_os_str(),
        ]);
        copy(&served, name, 0);
    }
    drop(served);

    // A server whose metadata budget holds less than one image: every image read after
    // another drops that one's metadata, and reading it again generates it again. nbdcopy
    // reads with several connections at once, so generation races reads on others.
    // SAFETY: this file's only test, before any thread of its own reads the environment.
    unsafe { std::env::set_var("RUST_LOG", "tessera=debug") };
    let log = env.path("tight.log");
    let tight = Served::start_logged(&env, "tight.sock", &log, &["--metadata-memory", "1"]);
    for round in 1..3 {
        for name in &names {
            copy(&tight, name, round);
        }
    }
    drop(tight);
    let log = fs::read_to_string(&log).unwrap();
    let regenerated = log.matches("generated dropped metadata again").count();
    assert!(
        regenerated >= names.len(),
        "each image's metadata is generated again in round 2 ({regenerated} times):\n{log}"
    );

    // The base tree's objects back data blocks of every image: one object, many images.
    let store = env.open_store();
    let mut users: HashMap<String, BTreeSet<String>> = HashMap::new();
    for name in &names {
        let record = image::load(&store, name).unwrap();
        let built = image::build(&store, &record).unwrap();
        for piece in built.layout.pieces(0, built.layout.size()) {
            if let Piece::Data { handle, .. } = piece {
                users
                    .entry(built.objects[handle.0 as usize].to_string())
                    .or_default()
                    .insert(name.clone());
            }
        }
    }
    let shared = users
        .values()
        .filter(|imgs| imgs.len() == names.len())
        .count();
    assert!(
        shared >= 2,
        "the base tree's two files should back all five images: {users:?}"
    );
}
