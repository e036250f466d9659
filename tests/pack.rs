//! `tessera store pack` through the CLI and a real client: packing removes the loose copies
//! of packed objects, a packed image serves the same bytes (nbdcopy against `image export`,
//! e2fsck on the copy), imports and pushes find packed objects, `store verify` checks packed
//! copies, and `store gc` drops packs of garbage and rewrites packs holding some.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::served::Served;
use common::Env;
use tessera::image;

/// Small loose object files (the packed ones had their loose copy removed).
fn small_loose(env: &Env) -> usize {
    env.files("objects")
        .iter()
        .filter(|p| fs::metadata(p).unwrap().len() < 256 << 10)
        .count()
}

#[test]
fn a_packed_image_is_served_verified_and_collected() {
    if !common::can_run("a_packed_image_is_served", false, &["nbdcopy", "e2fsck"]) {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    common::fixture::build(&src, false);
    // Loose at first, as `import --no-pack` (or an older tessera) leaves them.
    let tree = env.import_loose(&src);
    env.ok(&["image", "create", "sink", "--tree", &tree]);
    // "two" names two objects no other image has at first; "four" shares one of them.
    let other = env.path("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(
        other.join("only-here"),
        b"an object only the second image names",
    )
    .unwrap();
    fs::write(
        other.join("shared-later"),
        b"an object a fourth image names too",
    )
    .unwrap();
    let other_tree = env.import_loose(&other);
    env.ok(&[
        "image",
        "create",
        "two",
        "--tree",
        &tree,
        "--tree",
        &other_tree,
    ]);
    let want = env.export("sink");
    let loose_before = small_loose(&env);

    let out = env.ok(&["store", "pack", "sink"]);
    assert!(out.starts_with("packed "), "{out}");
    assert!(out.contains("removed "), "loose copies go: {out}");
    let packed: usize = out["packed ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(packed > 100, "{out}");
    // Objects no layout reads (an empty file's) are not packed and stay.
    let unread = loose_before - packed - 2;
    assert_eq!(
        small_loose(&env),
        unread + 2,
        "every packed object's loose copy is gone, the two of \"two\" stay"
    );
    let out = env.ok(&["store", "pack", "two"]);
    assert!(
        out.starts_with("packed 2 of "),
        "only the new objects: {out}"
    );
    assert_eq!(small_loose(&env), unread);
    assert!(env.ok(&["store", "pack"]).starts_with("nothing to pack"));
    let packs = env.files("packs");
    assert_eq!(packs.len(), 4, "two packs and their indexes: {packs:?}");

    // Importing the same files again writes no loose copy of what a pack holds.
    assert_eq!(env.import(&src), tree);
    assert_eq!(
        small_loose(&env),
        unread,
        "an import wrote packed objects again"
    );

    let served = Served::start(&env, &[]);
    let got = env.path("sink.got");
    assert!(
        served.nbdcopy("sink", &got) == want,
        "a packed image served other bytes than its export"
    );
    common::e2fsck_clean(&got);
    drop(served);

    let stats = env.ok(&["store", "stats"]);
    let objects = env
        .open_store()
        .packs()
        .packs()
        .iter()
        .map(|p| p.len())
        .sum::<usize>();
    assert!(
        stats.contains(&format!(
            "objects:      {}",
            objects + env.files("objects").len()
        )),
        "every object counted once, loose or packed: {stats}"
    );
    assert!(stats.contains("packs:        2 holding "), "{stats}");
    let verify = env.ok(&["store", "verify"]);
    assert!(verify.is_empty(), "{verify}");

    // Pushed to a remote and pulled into another store, packed objects are whole objects.
    let remote = format!("file://{}", env.path("remote").display());
    fs::create_dir_all(env.path("remote")).unwrap();
    env.ok(&["store", "push", "sink", "--to", &remote]);
    let elsewhere = Env::new();
    elsewhere.ok(&["store", "pull", "sink", "--from", &remote]);
    assert!(elsewhere.export("sink") == want, "pulled image differs");

    // "four" shares one of the objects of "two". Removing "two" leaves its pack with one
    // live object and one dead: gc writes the live one into a new pack and drops the old.
    let four = env.path("four");
    fs::create_dir_all(&four).unwrap();
    fs::write(four.join("same"), b"an object a fourth image names too").unwrap();
    let four_tree = env.import(&four);
    env.ok(&["image", "create", "four", "--tree", &four_tree]);
    let four_want = env.export("four");
    assert_eq!(
        small_loose(&env),
        unread,
        "\"four\" wrote a packed object again"
    );
    env.ok(&["image", "rm", "two"]);
    let packs_before = env.files("packs");
    let dry: serde_json::Value =
        serde_json::from_str(&env.ok(&["store", "gc", "--dry-run", "--json"])).unwrap();
    assert_eq!(
        (&dry["packs"], &dry["repacked"], &dry["loose_copies"]),
        (&1.into(), &1.into(), &0.into()),
        "{dry}"
    );
    assert_eq!(env.files("packs"), packs_before, "a dry run rewrote a pack");
    let gc = env.ok(&["store", "gc"]);
    assert!(gc.contains(", 1 packs ("), "{gc}");
    assert!(gc.contains("rewrote 1 packs"), "{gc}");
    assert_eq!(env.files("packs").len(), 4, "sink's pack and the new one");
    let rewritten = env
        .open_store()
        .packs()
        .packs()
        .iter()
        .map(|p| p.len())
        .min()
        .unwrap();
    assert_eq!(rewritten, 1, "the new pack holds the live object only");
    let verify = env.ok(&["store", "verify"]);
    assert!(verify.is_empty(), "{verify}");
    let served = Served::start(&env, &[]);
    assert!(served.nbdcopy("sink", &got) == want);
    let four_got = env.path("four.got");
    assert!(served.nbdcopy("four", &four_got) == four_want);
    drop(served);

    // Once nothing names them, packs go whole.
    env.ok(&["image", "rm", "four"]);
    let gc = env.ok(&["store", "gc"]);
    assert!(gc.contains(", 1 packs ("), "{gc}");
    assert!(!gc.contains("rewrote"), "{gc}");

    // A damaged packed copy is reported by verify, named by pack and object.
    let pack = env
        .files("packs")
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "pack"))
        .unwrap();
    let f = fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.write_all_at(b"!", 0).unwrap();
    let out = env.fails(&["store", "verify"]);
    assert!(out.contains("holds a corrupt copy of object"), "{out}");
    // ... and refused by a server that verifies reads, never served.
    let served = Served::start(&env, &["--verify"]);
    let o = Command::new("nbdcopy")
        .arg(served.uri("sink"))
        .arg(&got)
        .output()
        .unwrap();
    assert!(!o.status.success(), "a corrupt packed object was served");
}

#[test]
fn imports_pack_their_small_objects_and_no_pack_leaves_them_loose() {
    if !common::can_run("imports_pack", false, &["nbdcopy", "e2fsck", "tar"]) {
        return;
    }
    let src = Env::new().path("src");
    common::fixture::build(&src, false);

    let loose = Env::new();
    let tree = loose.import_loose(&src);
    loose.ok(&["image", "create", "img", "--tree", &tree]);
    let want = loose.export("img");
    assert!(loose.files("packs").is_empty(), "--no-pack wrote a pack");

    // `import dir --name`: its new small objects go straight into one pack, in the image's
    // order, and never into a loose file.
    let env = Env::new();
    let o = env
        .command()
        .args(["import", "dir", "--name", "img"])
        .arg(&src)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        tree,
        "stdout is the tree id"
    );
    let line = stderr
        .lines()
        .find(|l| l.starts_with("packed "))
        .unwrap_or_else(|| panic!("no packing reported: {stderr}"));
    let packed: usize = line.split(' ').nth(1).unwrap().parse().unwrap();
    assert_eq!(env.files("packs").len(), 2);
    assert_eq!(packed, small_loose(&loose), "{line}");
    assert_eq!(small_loose(&env), 0, "small objects were written loose");
    assert_eq!(
        env.files("objects").len(),
        loose.files("objects").len() - packed,
        "large objects stay loose"
    );
    let store = tessera::store::Store::open(&env.store).unwrap();
    let built = image::build(&store, &image::load(&store, "img").unwrap()).unwrap();
    let read_order: Vec<_> = image::read_order(&built.layout, &built.objects)
        .into_iter()
        .filter_map(|id| store.packs().find(&id).map(|p| p.offset))
        .collect();
    // Empty files have no blocks: their object is packed, but last.
    assert_eq!(read_order.len(), packed - 1);
    assert!(
        read_order.is_sorted(),
        "the pack is not in the order the image reads it"
    );
    // The same record (its creation time included) over the packed store: the same bytes.
    fs::copy(
        loose.store.join("images/img.json"),
        env.store.join("images/img.json"),
    )
    .unwrap();
    assert!(
        env.export("img") == want,
        "a packed import lays out other bytes"
    );
    let served = Served::start(&env, &[]);
    let got = env.path("img.got");
    assert!(served.nbdcopy("img", &got) == want);
    common::e2fsck_clean(&got);
    drop(served);
    let verify = env.ok(&["store", "verify"]);
    assert!(verify.is_empty(), "{verify}");

    // A tarball of the same files: nothing new, so no second pack.
    let tar = env.path("src.tar");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    env.ok(&["import".as_ref(), "tar".as_ref(), tar.as_os_str()]);
    assert_eq!(env.files("packs").len(), 2, "a second pack of nothing new");

    // New small files in a tarball: packed too.
    let more = env.path("more");
    fs::create_dir_all(&more).unwrap();
    fs::write(more.join("a"), b"first new file").unwrap();
    fs::write(more.join("b"), b"second new file").unwrap();
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&more)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let o = env
        .command()
        .args(["import", "tar"])
        .arg(&tar)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("packed 2 small objects"),
        "the tarball's objects: {stderr}"
    );
    assert_eq!(env.files("packs").len(), 4);
}

/// A corrupt packed copy blocks neither gc nor its own replacement: gc keeps the pack that
/// holds it, `store verify --repair` rewrites the pack without it, and importing the source
/// again restores the object.
#[test]
fn a_corrupt_packed_copy_is_dropped_by_repair_and_restored_by_an_import() {
    if !common::can_run("a_corrupt_packed_copy", false, &["nbdcopy", "e2fsck"]) {
        return;
    }
    let env = Env::new();
    let a = b"the object that goes bad".repeat(100);
    let both = env.path("both");
    fs::create_dir_all(&both).unwrap();
    fs::write(both.join("a"), &a).unwrap();
    fs::write(both.join("b"), b"an object that becomes garbage").unwrap();
    env.ok(&[
        "import".as_ref(),
        "dir".as_ref(),
        both.as_os_str(),
        "--name".as_ref(),
        "two".as_ref(),
    ]);
    let only_a = env.path("only-a");
    fs::create_dir_all(&only_a).unwrap();
    fs::write(only_a.join("a"), &a).unwrap();
    let tree = env.import(&only_a);
    env.ok(&["image", "create", "img", "--tree", &tree]);
    let want = env.export("img");
    env.ok(&["image", "rm", "two"]);
    assert_eq!(env.files("packs").len(), 2, "one pack holds a and b");

    let id = tessera::store::ObjectId::of(&a);
    let at = env.open_store().packs().find(&id).expect("a is packed");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(at.index.pack_path())
        .unwrap();
    f.write_all_at(b"!", at.offset).unwrap();
    drop(f);
    let out = env.fails(&["store", "verify"]);
    assert!(
        out.contains(&format!("holds a corrupt copy of object {id}")),
        "{out}"
    );
    // The pack holds garbage (b) and a live object it cannot copy: gc keeps it and goes on.
    let gc = env.ok(&["store", "gc"]);
    assert!(gc.contains("kept 1 packs with garbage"), "{gc}");
    // An import finds the object present and writes nothing.
    env.import(&only_a);
    assert!(env.fails(&["store", "verify"]).contains("corrupt copy"));

    let repair = env.fails(&["store", "verify", "--repair"]);
    assert!(
        repair.contains(&format!("object {id} has no good copy left")),
        "{repair}"
    );
    let out = env.fails(&["store", "verify"]);
    assert!(out.contains(&format!("names missing object {id}")), "{out}");
    assert!(!out.contains("corrupt"), "{out}");
    let o = env.run(&["store", "verify", "--repair", "--json"]);
    assert!(!o.status.success(), "a missing object is still a problem");
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        json["repair"]["packed"], 0,
        "nothing corrupt is left: {json}"
    );

    // Importing the source again restores it, and the image reads as before.
    env.import(&only_a);
    let verify = env.ok(&["store", "verify"]);
    assert!(verify.is_empty(), "{verify}");
    assert!(env.export("img") == want);
    let served = Served::start(&env, &["--verify"]);
    let got = env.path("img.got");
    assert!(served.nbdcopy("img", &got) == want);
    common::e2fsck_clean(&got);
    drop(served);
    // The rewritten pack holds only b, now garbage, and goes whole.
    let gc = env.ok(&["store", "gc"]);
    assert!(gc.contains(", 1 packs ("), "{gc}");
    assert!(!gc.contains("kept"), "{gc}");

    // A corrupt loose object goes the same way.
    let c = env.path("c");
    fs::create_dir_all(&c).unwrap();
    fs::write(c.join("c"), b"a loose object that goes bad").unwrap();
    let tree = env.import_loose(&c);
    env.ok(&["image", "create", "c", "--tree", &tree]);
    let id = tessera::store::ObjectId::of(b"a loose object that goes bad");
    let path = env.open_store().object_path(&id);
    fs::write(&path, b"a loose object that went bad").unwrap();
    let repair = env.fails(&["store", "verify", "--repair"]);
    assert!(
        repair.contains(&format!("object {id} is corrupt")),
        "{repair}"
    );
    assert!(
        repair.contains("removed 1 corrupt loose objects"),
        "{repair}"
    );
    assert!(!path.exists());
    env.import_loose(&c);
    let verify = env.ok(&["store", "verify"]);
    assert!(verify.is_empty(), "{verify}");
}

/// Two imports that run at once may both pack an object; gc keeps the copy readers use (the
/// first pack by name) and drops the other.
#[test]
fn gc_drops_a_second_packed_copy_of_an_object() {
    if !common::can_run("gc_drops_a_second_packed_copy", false, &["nbdcopy"]) {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    common::fixture::build(&src, false);
    env.ok(&[
        "import".as_ref(),
        "dir".as_ref(),
        src.as_os_str(),
        "--name".as_ref(),
        "img".as_ref(),
    ]);
    let want = env.export("img");
    let original = env.open_store().packs().packs()[0].name().to_owned();
    // The same objects again, in a pack whose name sorts first: readers move to it.
    let dir = env.store.join("packs");
    let copy = "0".repeat(64);
    for ext in ["pack", "idx"] {
        fs::copy(
            dir.join(format!("{original}.{ext}")),
            dir.join(format!("{copy}.{ext}")),
        )
        .unwrap();
    }
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["store", "gc", "--json"])).unwrap();
    assert_eq!(
        (&json["packs"], &json["repacked"]),
        (&1.into(), &0.into()),
        "{json}"
    );
    let names = env.open_store().pack_names().unwrap();
    assert_eq!(names, [copy], "the copy readers use stays");
    let verify = env.ok(&["store", "verify"]);
    assert!(verify.is_empty(), "{verify}");
    let served = Served::start(&env, &[]);
    let got = env.path("img.got");
    assert!(served.nbdcopy("img", &got) == want);
}
