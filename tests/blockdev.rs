//! The shared read path: `ImageDevice::read_at` and `extents` against the exported file.

mod common;

use common::Env;
use tessera::blockdev::ImageDevice;
use tessera::image::{self, CreateOptions};

fn demo_device(env: &Env) -> (ImageDevice, Vec<u8>) {
    let store = env.open_store();
    let tree = tessera::demo::store_demo_tree(&store).unwrap();
    image::create(&store, "demo", &[tree], &CreateOptions::default()).unwrap();
    let out = env.path("demo.img");
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        "demo".as_ref(),
        out.as_os_str(),
    ]);
    (
        ImageDevice::open(&store, "demo").unwrap(),
        std::fs::read(out).unwrap(),
    )
}

#[test]
fn reads_at_odd_offsets_match_the_export() {
    let env = Env::new();
    let (dev, bytes) = demo_device(&env);
    assert_eq!(dev.size(), bytes.len() as u64);
    // Chunk sizes that straddle blocks, pieces and regions.
    let mut pos = 0usize;
    for (i, len) in [1usize, 511, 4097, 65_537, 1 << 20, 3]
        .iter()
        .cycle()
        .enumerate()
    {
        if pos >= bytes.len() {
            break;
        }
        let len = (*len).min(bytes.len() - pos);
        let mut buf = vec![0xeeu8; len];
        dev.read_at(&mut buf, pos as u64).unwrap();
        assert!(
            buf == bytes[pos..pos + len],
            "read {i} of {len} bytes at {pos} differs"
        );
        pos += len;
    }
}

#[test]
fn reads_past_the_end_are_errors() {
    let env = Env::new();
    let (dev, _) = demo_device(&env);
    let size = dev.size();
    let mut buf = [0u8; 2];
    assert!(dev.read_at(&mut buf, size - 1).is_err());
    assert!(dev.read_at(&mut buf, size).is_err());
    assert!(dev.read_at(&mut buf, u64::MAX).is_err());
    assert!(
        dev.read_at(&mut [], size).is_ok(),
        "an empty read at the end is fine"
    );
    assert!(dev.extents(size - 1, 2).is_err());
    dev.read_at(&mut buf, size - 2).unwrap();
}

#[test]
fn extents_tile_the_range_and_zero_extents_read_as_zeros() {
    let env = Env::new();
    let (dev, bytes) = demo_device(&env);
    let extents = dev.extents(0, dev.size()).unwrap();
    let mut pos = 0;
    for (i, e) in extents.iter().enumerate() {
        assert_eq!(e.offset, pos, "extents are contiguous");
        assert!(e.len > 0);
        if i > 0 {
            assert_ne!(
                e.zero,
                extents[i - 1].zero,
                "adjacent extents of one kind are merged"
            );
        }
        if e.zero {
            let range = &bytes[e.offset as usize..(e.offset + e.len) as usize];
            assert!(
                range.iter().all(|&b| b == 0),
                "zero extent at {} has data",
                e.offset
            );
        }
        pos += e.len;
    }
    assert_eq!(pos, dev.size());
    let data: u64 = extents.iter().filter(|e| !e.zero).map(|e| e.len).sum();
    assert!(data < dev.size() / 2, "most of a fresh image is zeros");

    let part = dev.extents(4095, 10_000).unwrap();
    assert_eq!(part.first().unwrap().offset, 4095);
    assert_eq!(part.iter().map(|e| e.len).sum::<u64>(), 10_000);
}

#[test]
fn a_truncated_object_is_an_io_error_not_a_crash() {
    let env = Env::new();
    let (_, _) = demo_device(&env);
    let store = env.open_store();
    let record = image::load(&store, "demo").unwrap();
    let built = image::build(&store, &record).unwrap();
    // Replace the biggest object (the 1 MiB random file) with a short one.
    let victim = built
        .objects
        .iter()
        .max_by_key(|id| std::fs::metadata(store.object_path(id)).unwrap().len())
        .unwrap();
    let path = store.object_path(victim);
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"short").unwrap();
    let dev = ImageDevice::new(&store, built.layout, &built.objects);
    let mut buf = vec![0u8; 1 << 20];
    let failures = (0..dev.size())
        .step_by(1 << 20)
        .filter(|&off| {
            dev.read_at(&mut buf[..(dev.size() - off).min(1 << 20) as usize], off)
                .is_err()
        })
        .count();
    assert!(failures > 0, "reading the damaged file's blocks must fail");
}

/// Zeros are skipped, not written: on anything but a regular file they would keep stale
/// bytes, so export refuses.
#[test]
fn export_refuses_a_non_regular_output() {
    let env = Env::new();
    let (_, _) = demo_device(&env);
    let err = env.fails(&["image", "export", "demo", "/dev/null"]);
    assert!(err.contains("regular files only"), "{err}");
}

/// The inline path the server tries first: whatever it answers equals `read_at`, it
/// refuses (None) rather than wait for an unmapped object, and once the image is warm it
/// answers reads of mapped file data too.
#[test]
fn resident_reads_agree_with_read_at() {
    let env = Env::new();
    let (dev, bytes) = demo_device(&env);
    // A block of the demo's 1 MiB file: an object large enough to be memory-mapped.
    let mut pos = 0;
    let mut probe = None;
    for piece in dev.layout().pieces(0, dev.size()) {
        if matches!(piece, tessera_ext4::Piece::Data { len, .. } if len >= 512 << 10) {
            probe = Some(pos);
            break;
        }
        pos += piece.len();
    }
    let probe = probe.expect("the demo tree has a 1 MiB file");
    let mut buf = vec![0u8; 4096];
    let cold = dev.read_at_resident(&mut buf, probe);
    if let Some(r) = cold {
        r.unwrap();
        assert!(buf == bytes[probe as usize..probe as usize + 4096]);
    }
    // Warm everything (maps large objects, fills the page cache), then every answer must
    // match, and the largest run (a mapped object in the demo tree) must be answered.
    dev.read_at(&mut vec![0u8; dev.size() as usize], 0).unwrap();
    let mut answered = 0;
    for (i, pos) in (0..dev.size()).step_by(12_289).enumerate() {
        let len = (1 + i * 977 % 70_000).min((dev.size() - pos) as usize);
        let mut buf = vec![0xeeu8; len];
        if let Some(r) = dev.read_at_resident(&mut buf, pos) {
            r.unwrap();
            assert!(
                buf == bytes[pos as usize..pos as usize + len],
                "resident read at {pos}+{len}"
            );
            answered += 1;
        }
    }
    assert!(answered > 0);
    assert!(
        dev.read_at_resident(&mut buf, probe).is_some(),
        "warm mapped data is answered inline"
    );
    // A small object (read with pread, not mapped) is answered inline too once its
    // descriptor is open and its pages are cached: before, every read of a small file
    // went to an I/O thread and opened the object again.
    let mut pos = 0;
    let mut small = None;
    for piece in dev.layout().pieces(0, dev.size()) {
        if matches!(piece, tessera_ext4::Piece::Data { len, .. } if (8..4096).contains(&len)) {
            small = Some((pos, piece.len() as usize));
            break;
        }
        pos += piece.len();
    }
    let (at, len) = small.expect("the demo tree has small files");
    let mut buf = vec![0u8; len];
    assert!(
        matches!(dev.read_at_resident(&mut buf, at), Some(Ok(()))),
        "warm small-object data is answered inline"
    );
    assert!(buf == bytes[at as usize..at as usize + len]);
    assert!(matches!(
        dev.read_at_resident(&mut [0u8; 2], dev.size() - 1),
        Some(Err(_))
    ));
}

/// `read_resident_shared` (the NBD server's zero-copy path: slices of mapped objects)
/// gives the bytes `read_at` gives, over small objects (mapped through their kept
/// descriptors) and large ones, metadata and zeros between them, at odd offsets.
#[test]
fn shared_slices_match_the_export() {
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir(&src).unwrap();
    let noise = |len: usize, seed: u32| -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    };
    for (i, len) in [1usize, 4095, 5000, 40_000, 300_000, 1 << 20, 12_345]
        .iter()
        .enumerate()
    {
        std::fs::write(src.join(format!("f{i}")), noise(*len, i as u32 + 1)).unwrap();
    }
    let tree = env.import(&src);
    env.ok(&["image", "create", "img", "--tree", &tree]);
    let out = env.path("img.raw");
    env.ok(&[
        "image".as_ref(),
        "export".as_ref(),
        "img".as_ref(),
        out.as_os_str(),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    let dev = ImageDevice::open(&env.open_store(), "img").unwrap();
    // A blocking read of everything opens and maps the objects and brings their pages in.
    let mut all = vec![0u8; bytes.len()];
    dev.read_at(&mut all, 0).unwrap();
    assert!(all == bytes);

    let mut answered = 0;
    let mut pos = 0usize;
    for len in [1usize, 511, 4097, 65_537, 1 << 20, 3, 256 << 10]
        .iter()
        .cycle()
    {
        if pos >= bytes.len() {
            break;
        }
        let len = (*len).min(bytes.len() - pos);
        let mut slices = Vec::new();
        if let Some(r) = dev.read_resident_shared(pos as u64, len as u64, &mut slices) {
            r.unwrap();
            let got: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            assert!(got == bytes[pos..pos + len], "{len} bytes at {pos} differ");
            answered += 1;
        }
        pos += len;
    }
    // The pages were just read: a miss here would be memory pressure, not the rule.
    assert!(answered > 0, "no read was answered from the mappings");
    let mut slices = Vec::new();
    let past = dev.read_resident_shared(bytes.len() as u64 - 1, 2, &mut slices);
    assert!(
        matches!(past, Some(Err(_))),
        "a read past the end is an error"
    );
}
