use super::*;

fn entry(path: &str, kind: Kind) -> Entry {
    Entry {
        path: Bytes(path.as_bytes().to_vec()),
        kind,
        mode: 0o4755,
        uid: 1000,
        gid: 100,
        atime: Time(1, 2),
        mtime: Time(-5, 999_999_999),
        ctime: Time(4_102_444_800, 7),
        crtime: None,
        xattrs: vec![],
        size: None,
        object: None,
        segments: None,
        link: None,
        target: None,
        rdev: None,
        opaque: false,
    }
}

/// One of every kind and optional field.
fn sample() -> Manifest {
    let mut file = entry("d/f", Kind::File);
    file.size = Some(10 << 20);
    file.object = Some(ObjectId::of(b"data"));
    file.segments = Some(vec![Segment(0, 4096), Segment(1 << 20, 4096)]);
    file.link = Some(7);
    file.crtime = Some(Time(9, 10));
    file.xattrs = vec![
        Xattr {
            name: Bytes(b"security.capability".to_vec()),
            value: Bytes(vec![1, 0, 0, 2, 0xff]),
        },
        Xattr {
            name: Bytes(b"user.empty".to_vec()),
            value: Bytes(vec![]),
        },
    ];
    let mut sparse_empty = entry("d/g", Kind::File);
    sparse_empty.size = Some(8192);
    sparse_empty.object = Some(ObjectId::of(b""));
    sparse_empty.segments = Some(vec![]);
    let mut dense = entry("d/h", Kind::File);
    dense.size = Some(3);
    dense.object = Some(ObjectId::of(b"abc"));
    let mut sym = entry("\u{e9}t\u{e9}", Kind::Symlink);
    sym.target = Some(Bytes(vec![b'x', 0xfe]));
    let mut dev = entry("null", Kind::Chardev);
    dev.rdev = Some((1, 3));
    let mut blk = entry("sda", Kind::Blockdev);
    blk.rdev = Some((u32::MAX, 0));
    let mut opaque = entry("o", Kind::Dir);
    opaque.opaque = true;
    Manifest::new(vec![
        entry("", Kind::Dir),
        entry("d", Kind::Dir),
        entry("d-x", Kind::Fifo),
        entry("d/e", Kind::Dir),
        entry("d/e/s", Kind::Socket),
        file,
        sparse_empty,
        dense,
        sym,
        dev,
        blk,
        opaque,
        entry("o/w", Kind::Whiteout),
    ])
}

fn view(bytes: Vec<u8>) -> Result<TreeView, BinaryError> {
    TreeView::new(Arc::new(bytes))
}

#[test]
fn round_trips_every_field() {
    let m = sample();
    m.validate().unwrap();
    let id = ObjectId::of(&m.to_bytes());
    let v = view(encode(&m, &id).unwrap()).unwrap();
    assert_eq!(v.tree(), &id);
    assert_eq!(v.to_manifest(), m);
    let f = v.entry(5);
    assert_eq!(
        (f.path(), f.name(), f.parent()),
        (&b"d/f"[..], &b"f"[..], 1)
    );
    assert_eq!(v.entry(4).parent(), 3);
}

#[test]
fn encoding_is_deterministic_and_every_section_is_aligned() {
    let m = sample();
    let id = ObjectId::of(&m.to_bytes());
    let a = encode(&m, &id).unwrap();
    assert_eq!(a, encode(&m, &id).unwrap());
    let v = view(a).unwrap();
    for at in [v.objects_at, v.segments_at, v.xattrs_at, v.heap_at] {
        assert_eq!(at % 8, 0);
    }
}

#[test]
fn rejects_other_versions_and_bad_lengths() {
    let m = sample();
    let good = encode(&m, &ObjectId::of(b"x")).unwrap();
    let mut v2 = good.clone();
    v2[8] = 2;
    assert_eq!(view(v2).unwrap_err(), BinaryError::Version(2));
    assert_eq!(view(good[..40].to_vec()).unwrap_err(), BinaryError::Magic);
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(
        view(long).unwrap_err(),
        BinaryError::Length { .. }
    ));
}

#[test]
fn damaged_bytes_are_refused_or_read_without_panicking() {
    // Flip every byte of the header and the records in turn: the view either refuses the
    // bytes or reads every field of every entry without panicking.
    let good = encode(&sample(), &ObjectId::of(b"x")).unwrap();
    for at in 0..good.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = good.clone();
            bad[at] ^= flip;
            if let Ok(v) = view(bad) {
                let _ = v.to_manifest();
            }
        }
    }
}

/// A small deterministic generator (xorshift), so the test needs no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random valid manifest: nested directories, every kind, optional fields, odd bytes.
fn random_manifest(rng: &mut Rng) -> Manifest {
    let mut entries = vec![entry("", Kind::Dir)];
    let mut dirs = vec![String::new()];
    for i in 0..rng.below(60) {
        let parent = dirs[rng.below(dirs.len() as u64) as usize].clone();
        let name = format!("{}{i}", ["a", "\u{e9}", "z-", "b.c"][rng.below(4) as usize]);
        let path = if parent.is_empty() {
            name
        } else {
            format!("{parent}/{name}")
        };
        let kinds = [
            Kind::File,
            Kind::Dir,
            Kind::Symlink,
            Kind::Chardev,
            Kind::Fifo,
            Kind::Whiteout,
        ];
        let mut e = entry(&path, kinds[rng.below(kinds.len() as u64) as usize]);
        e.mode = rng.below(0o10000) as u16;
        e.atime = Time(rng.next() as i64, rng.below(1_000_000_000) as u32);
        if rng.below(3) == 0 {
            e.crtime = Some(Time(-(rng.below(1000) as i64), 0));
        }
        match e.kind {
            Kind::File => {
                let size = rng.below(1 << 24);
                e.size = Some(size);
                e.object = Some(ObjectId::of(&rng.next().to_le_bytes()));
                if size >= 8192 && rng.below(2) == 0 {
                    e.segments = Some(vec![Segment(4096, 4096)]);
                }
                if rng.below(4) == 0 {
                    e.link = Some(rng.below(3));
                }
            }
            Kind::Dir => {
                e.opaque = rng.below(4) == 0;
                dirs.push(path.clone());
            }
            Kind::Symlink => {
                e.target = Some(Bytes(
                    vec![0xff, b'x'][..1 + rng.below(2) as usize].to_vec(),
                ))
            }
            Kind::Chardev => e.rdev = Some((rng.next() as u32, rng.next() as u32)),
            _ => {}
        }
        if e.kind != Kind::Whiteout && rng.below(5) == 0 {
            e.xattrs.push(Xattr {
                name: Bytes(b"user.k".to_vec()),
                value: Bytes(rng.next().to_le_bytes().to_vec()),
            });
        }
        entries.push(e);
    }
    // Hardlinks of one group must share a kind: keep groups on files only (set above).
    Manifest::new(entries)
}

#[test]
fn random_manifests_round_trip_exactly() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..300 {
        let m = random_manifest(&mut rng);
        m.validate().unwrap();
        let id = ObjectId::of(&m.to_bytes());
        let v = view(encode(&m, &id).unwrap()).unwrap();
        assert_eq!(v.to_manifest(), m);
    }
}
