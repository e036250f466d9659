use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::*;
use crate::store::outboard::OUTBOARD_MIN;
use crate::store::Outboard;

fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u8
        })
        .collect()
}

/// A remote (a directory) holding each of `objects` with its outboard.
fn remote_with(dir: &Path, objects: &[&[u8]]) -> (Arc<Remote>, PathBuf) {
    let remote_dir = dir.join("remote");
    let remote = Arc::new(Remote::open(&format!("file://{}", remote_dir.display()), None).unwrap());
    for data in objects {
        let id = ObjectId::of(data);
        remote
            .put_content(Kind::Object, &id, bytes::Bytes::copy_from_slice(data))
            .unwrap();
        if let Some(o) = Outboard::compute(data).filter(|_| data.len() as u64 > OUTBOARD_MIN) {
            remote
                .put_content(Kind::Outboard, &id, bytes::Bytes::from(o.encode()))
                .unwrap();
        }
    }
    (remote, remote_dir)
}

/// A remote holding `data`, and an empty local store caching it.
fn setup(dir: &Path, data: &[u8]) -> (Arc<RemoteCache>, ObjectId, PathBuf) {
    let (remote, remote_dir) = remote_with(dir, &[data]);
    let id = ObjectId::of(data);
    let hex = id.to_hex();
    let remote_path = remote_dir.join("objects").join(&hex[..2]).join(&hex[2..]);
    let local = Store::open(&dir.join("local")).unwrap().with_remote(remote);
    (local.remote_cache().unwrap().clone(), id, remote_path)
}

fn handle(cache: &Arc<RemoteCache>, id: ObjectId) -> Arc<Partial> {
    match cache.open(id).unwrap() {
        Fetched::Partial(p) => p,
        Fetched::Local => panic!("an object from the remote is read through the cache"),
    }
}

#[test]
fn chunks_survive_a_restart_are_rechecked_and_complete_into_an_object() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(3 * CHUNK as usize + 777, 1);
    let (cache, id, _) = setup(dir.path(), &data);
    let p = handle(&cache, id);
    let mut out = vec![0u8; 100];
    p.read(&mut out, 2 * CHUNK + 5).unwrap();
    assert_eq!(out, data[2 * CHUNK as usize + 5..][..100]);
    let path = cache.partial_path(&id);
    assert_eq!(fs::read(map_path(&path)).unwrap(), [0, 0, 1, 0]);
    assert_eq!(cache.stats.bytes_fetched.load(Ordering::Relaxed), CHUNK);
    drop(p);

    // A restart, with the kept chunk damaged on disk: it is checked and fetched again.
    let local = cache.local.root().to_path_buf();
    let remote = cache.remote.clone();
    drop(cache);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"garbage", 2 * CHUNK + 5).unwrap();
    let store = Store::open(&local).unwrap().with_remote(remote);
    let cache = store.remote_cache().unwrap().clone();
    let p = handle(&cache, id);
    p.read(&mut out, 2 * CHUNK + 5).unwrap();
    assert_eq!(out, data[2 * CHUNK as usize + 5..][..100]);

    // Reading the rest (two neighbouring chunks in one request) completes the object.
    let mut all = vec![0u8; data.len()];
    p.read(&mut all, 0).unwrap();
    assert_eq!(all, data);
    assert!(store.has_object(&id));
    assert!(!path.exists() && !map_path(&path).exists());
    assert_eq!(
        fs::read(store.object_path(&id)).unwrap(),
        data,
        "the completed object is the object"
    );
    assert_eq!(
        origin::of(&store.object_path(&id)).as_deref(),
        Some(cache.remote.url()),
        "marked as fetched"
    );
    assert_eq!(cache.usage().0, data.len() as u64);

    // Deleted under the handle (gc, another server's eviction): fetched again on read.
    fs::remove_file(store.object_path(&id)).unwrap();
    p.read(&mut out, CHUNK + 1).unwrap();
    assert_eq!(out, data[CHUNK as usize + 1..][..100]);
    p.read(&mut all, 0).unwrap();
    assert_eq!(all, data);
    assert_eq!(fs::read(store.object_path(&id)).unwrap(), data);
}

#[test]
fn a_damaged_remote_chunk_fails_only_its_reads() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(2 * CHUNK as usize + 10, 2);
    let (cache, id, remote_path) = setup(dir.path(), &data);
    let mut bad = data.clone();
    bad[CHUNK as usize + 3] ^= 1;
    fs::write(&remote_path, &bad).unwrap();
    let p = handle(&cache, id);
    let mut out = vec![0u8; 10];
    let err = p.read(&mut out, CHUNK).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains(&id.to_hex()), "{err}");
    assert_eq!(
        cache.stats.mismatches.load(Ordering::Relaxed),
        2,
        "refetched once"
    );
    p.read(&mut out, 0).unwrap();
    assert_eq!(out, data[..10]);
    p.read(&mut out, 2 * CHUNK).unwrap();
    assert_eq!(out, data[2 * CHUNK as usize..]);
}

#[test]
fn small_objects_are_fetched_whole_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(5000, 3);
    let (cache, id, remote_path) = setup(dir.path(), &data);
    fs::write(&remote_path, b"not the object").unwrap();
    let p = handle(&cache, id);
    let mut out = vec![0u8; 10];
    let err = p.read(&mut out, 0).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(!cache.local.has_object(&id));
    fs::write(&remote_path, &data).unwrap();
    p.read(&mut out, 100).unwrap();
    assert_eq!(out, data[100..110]);
    assert_eq!(fs::read(cache.local.object_path(&id)).unwrap(), data);
}

#[test]
fn a_bounded_cache_evicts_the_least_recently_used_but_nothing_in_use_or_local() {
    let dir = tempfile::tempdir().unwrap();
    // Four small objects of 200 KiB and a large one of 3 MiB + a bit.
    let small: Vec<Vec<u8>> = (0..4).map(|i| pseudo_random(200 << 10, 10 + i)).collect();
    let large = pseudo_random(3 * CHUNK as usize + 99, 20);
    let mut all: Vec<&[u8]> = small.iter().map(Vec::as_slice).collect();
    all.push(&large);
    let (remote, _) = remote_with(dir.path(), &all);
    let root = dir.path().join("local");
    // An object imported here, also on the remote: never evicted.
    let plain = Store::open(&root).unwrap();
    plain.put_object_bytes(&small[3]).unwrap();
    let store = plain.with_remote(remote);
    let cache = store.remote_cache().unwrap().clone();
    cache.bound(1 << 20).unwrap();
    assert!(matches!(
        cache.open(ObjectId::of(&small[3])).unwrap(),
        Fetched::Local
    ));

    let ids: Vec<ObjectId> = all.iter().map(|d| ObjectId::of(d)).collect();
    let read = |i: usize, at: u64, len: usize| {
        let mut out = vec![0u8; len];
        handle(&cache, ids[i]).read(&mut out, at).unwrap();
        assert!(out == all[i][at as usize..at as usize + len], "object {i}");
    };
    read(0, 0, 1000);
    read(1, 0, 1000);
    read(2, 0, 1000);
    assert_eq!(cache.usage().0, 600 << 10, "under the bound: all kept");
    // Two chunks of the large object: 2.6 MiB fetched, so every older object goes, and
    // the large one, read last and not in use any more, too.
    read(4, CHUNK - 10, 20);
    let (used, _) = cache.usage();
    assert!(used <= 1 << 20, "{used} bytes kept");
    for (i, id) in ids.iter().enumerate().take(3) {
        assert!(!store.has_object(id), "object {i} evicted");
    }
    assert!(store.has_object(&ids[3]), "the local object stays");
    assert!(!cache.partial_path(&ids[4]).exists());
    assert_eq!(cache.stats.evictions.load(Ordering::Relaxed), 4);

    // Evicted objects are fetched again on their next read, and still right.
    let fetched = cache.stats.bytes_fetched.load(Ordering::Relaxed);
    read(0, 500, 1000);
    read(4, 3 * CHUNK, 99);
    assert!(cache.stats.bytes_fetched.load(Ordering::Relaxed) > fetched);

    // An object being read is not evicted: hold the pin as a read does.
    let held = handle(&cache, ids[1]);
    let pin = held.pin.read().unwrap();
    read(1, 0, 10);
    read(2, 0, 10);
    read(0, 0, 10);
    read(4, 0, 10);
    assert!(store.has_object(&ids[1]), "in use, so kept");
    drop(pin);
    // Nothing is deleted while an import (the store lock, shared) is under way.
    let import = store.lock(false).unwrap();
    read(4, 2 * CHUNK, 10);
    assert!(store.has_object(&ids[1]), "evicted under an import");
    drop(import);
    read(4, 2 * CHUNK, 10);
    assert!(!store.has_object(&ids[1]), "evicted once not in use");
}

#[test]
fn a_restart_counts_what_earlier_runs_fetched_and_evicts_the_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let objs: Vec<Vec<u8>> = (0..3).map(|i| pseudo_random(100 << 10, 30 + i)).collect();
    let all: Vec<&[u8]> = objs.iter().map(Vec::as_slice).collect();
    let (remote, _) = remote_with(dir.path(), &all);
    let root = dir.path().join("local");
    let ids: Vec<ObjectId> = all.iter().map(|d| ObjectId::of(d)).collect();
    {
        let store = Store::open(&root).unwrap().with_remote(remote.clone());
        let cache = store.remote_cache().unwrap().clone();
        for (i, id) in ids.iter().enumerate() {
            let mut out = [0u8; 4];
            handle(&cache, *id).read(&mut out, 0).unwrap();
            // Distinct modification times order them after the restart.
            let t = std::time::SystemTime::UNIX_EPOCH
                + std::time::Duration::from_secs(1000 * (i as u64 + 1));
            set_mtime(&store.object_path(id), t);
        }
    }
    let store = Store::open(&root).unwrap().with_remote(remote);
    let cache = store.remote_cache().unwrap().clone();
    cache.bound(250 << 10).unwrap();
    assert_eq!(cache.usage().0, 200 << 10);
    assert!(!store.has_object(&ids[0]), "the oldest went at start");
    assert!(store.has_object(&ids[1]) && store.has_object(&ids[2]));
}

fn set_mtime(path: &Path, t: std::time::SystemTime) {
    let f = fs::File::open(path).unwrap();
    f.set_modified(t).unwrap();
}

#[test]
fn an_eviction_cut_short_by_a_crash_leaves_nothing_wrong_to_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(2 * CHUNK as usize + 5, 40);
    let (cache, id, _) = setup(dir.path(), &data);
    let mut out = vec![0u8; 64];
    handle(&cache, id).read(&mut out, 10).unwrap();
    let path = cache.partial_path(&id);
    let local = cache.local.root().to_path_buf();
    let remote = cache.remote.clone();
    drop(cache);

    // The map went first and the crash came before the file: chunks without marks.
    fs::remove_file(map_path(&path)).unwrap();
    let store = Store::open(&local).unwrap().with_remote(remote.clone());
    let cache = store.remote_cache().unwrap().clone();
    let p = handle(&cache, id);
    p.read(&mut out, 10).unwrap();
    assert_eq!(out, data[10..74]);
    assert_eq!(
        cache.stats.bytes_fetched.load(Ordering::Relaxed),
        CHUNK,
        "an unmarked chunk is fetched again, not trusted"
    );
    drop((p, cache, store));

    // Had the order been the other way round: marks over a recreated, empty file. The
    // check after a restart still refuses them.
    fs::remove_file(&path).unwrap();
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .unwrap();
    let store = Store::open(&local).unwrap().with_remote(remote);
    let cache = store.remote_cache().unwrap().clone();
    handle(&cache, id).read(&mut out, 10).unwrap();
    assert_eq!(out, data[10..74]);
}

#[test]
fn an_object_imported_after_it_was_fetched_is_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (pseudo_random(200 << 10, 30), pseudo_random(200 << 10, 31));
    let (remote, _) = remote_with(dir.path(), &[&a, &b]);
    let store = Store::open(&dir.path().join("local"))
        .unwrap()
        .with_remote(remote);
    let cache = store.remote_cache().unwrap().clone();
    cache.bound(300 << 10).unwrap();
    let (ia, ib) = (ObjectId::of(&a), ObjectId::of(&b));
    let mut out = vec![0u8; 100];
    handle(&cache, ia).read(&mut out, 0).unwrap();
    assert_eq!(
        origin::of(&store.object_path(&ia)).as_deref(),
        Some(cache.remote.url())
    );

    // An import of the same bytes, as `import dir` stores a file: its image now names the
    // object, which must stay here whatever the cache does.
    let lock = store.lock(false).unwrap();
    assert!(
        !store.has_kept_object(&ia),
        "a fetched object is the cache's"
    );
    store.put_object_bytes(&a).unwrap();
    assert!(store.has_kept_object(&ia));
    drop(lock);

    // Over the bound: the oldest, the imported object, would go first.
    handle(&cache, ib).read(&mut out, 0).unwrap();
    assert!(store.has_object(&ia), "an imported object was evicted");
    assert_eq!(cache.stats.evictions.load(Ordering::Relaxed), 0);
    assert_eq!(cache.usage().0, 200 << 10, "only b counts as fetched");
    assert!(
        matches!(cache.open(ia).unwrap(), Fetched::Local),
        "read like any local object from now on"
    );
    assert!(fs::read(store.object_path(&ia)).unwrap() == a);
}

#[test]
fn an_object_a_read_takes_while_it_is_being_evicted_keeps_all_its_bytes_counted() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(3 * CHUNK as usize + 5, 40);
    let (cache, id, _) = setup(dir.path(), &data);
    let p = handle(&cache, id);
    let mut out = vec![0u8; 10];
    p.read(&mut out, 0).unwrap();
    assert_eq!(cache.usage().0, CHUNK);

    // Picked for eviction; before it is deleted, a read pins it and fetches one more chunk.
    let picked = cache.pick(0);
    assert_eq!(picked.len(), 1);
    let pin = p.pin.read().unwrap();
    p.prefetch(1..2).unwrap();
    assert!(!cache.evict_picked(&picked[0].0, picked[0].1), "in use");
    drop(pin);
    assert_eq!(
        cache.usage().0,
        2 * CHUNK,
        "both chunks here are counted against the bound"
    );
    assert_eq!(
        fs::read(map_path(&cache.partial_path(&id))).unwrap(),
        [1, 1, 0, 0]
    );
}
