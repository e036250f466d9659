use super::*;

fn entry(path: &str, kind: Kind) -> Entry {
    Entry {
        path: Bytes(path.as_bytes().to_vec()),
        kind,
        mode: 0o644,
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

fn sample() -> Manifest {
    let mut file = entry("d/f", Kind::File);
    file.size = Some(10 << 20);
    file.object = Some(ObjectId::of(b"data"));
    file.segments = Some(vec![Segment(0, 4096), Segment(1 << 20, 4096)]);
    file.link = Some(0);
    file.xattrs = vec![Xattr {
        name: Bytes(b"security.capability".to_vec()),
        value: Bytes(vec![1, 0, 0, 2, 0xff]),
    }];
    let mut sym = entry("\u{e9}t\u{e9}", Kind::Symlink);
    sym.target = Some(Bytes(vec![b'x', 0xfe]));
    let mut dev = entry("null", Kind::Chardev);
    dev.rdev = Some((1, 3));
    Manifest::new(vec![
        entry("", Kind::Dir),
        entry("d", Kind::Dir),
        file,
        sym,
        dev,
    ])
}

#[test]
fn round_trips_through_json() {
    let m = sample();
    m.validate().unwrap();
    let bytes = m.to_bytes();
    assert_eq!(Manifest::from_bytes(&bytes).unwrap(), m);
    // Serialization is canonical: the same manifest is always the same bytes (tree ids).
    assert_eq!(Manifest::from_bytes(&bytes).unwrap().to_bytes(), bytes);
}

#[test]
fn rejects_other_formats() {
    let text = String::from_utf8(sample().to_bytes())
        .unwrap()
        .replace("\"format\":1", "\"format\":2");
    assert!(matches!(
        Manifest::from_bytes(text.as_bytes()),
        Err(TreeError::Format(2))
    ));
}

fn invalid(m: Manifest) -> &'static str {
    match m.validate() {
        Err(TreeError::Invalid { why, .. }) => why,
        other => panic!("expected invalid, got {other:?}"),
    }
}

#[test]
fn rejects_broken_invariants() {
    assert!(invalid(Manifest::new(vec![entry("a", Kind::Dir)])).contains("root"));
    assert!(invalid(Manifest::new(vec![
        entry("", Kind::Dir),
        entry("a/b", Kind::Fifo)
    ]))
    .contains("parent"));
    assert!(invalid(Manifest::new(vec![
        entry("", Kind::Dir),
        entry("a", Kind::Fifo),
        entry("a/b", Kind::Fifo)
    ]))
    .contains("parent"));
    assert!(invalid(Manifest::new(vec![
        entry("", Kind::Dir),
        entry("a", Kind::File)
    ]))
    .contains("object"));
    assert!(invalid(Manifest::new(vec![
        entry("", Kind::Dir),
        entry("a/../b", Kind::Fifo)
    ]))
    .contains("component"));

    let mut m = sample();
    m.entries[2].segments = Some(vec![Segment(100, 4096)]);
    assert!(invalid(m).contains("aligned"));
    let mut m = sample();
    m.entries[2].segments = Some(vec![Segment(0, 100)]);
    assert!(invalid(m).contains("partial"));
    let mut m = sample();
    m.entries[2].xattrs[0].name = Bytes(b"user.a\0b".to_vec());
    assert!(invalid(m).contains("xattr name"));
    let mut m = sample();
    m.entries[4].target = Some(Bytes(vec![]));
    assert!(invalid(m).contains("symlink target"));
    let mut m = sample();
    m.entries[1].crtime = Some(Time(0, 1_000_000_000));
    assert!(invalid(m).contains("nanoseconds"));
    let mut m = sample();
    m.entries[4].link = Some(0);
    assert!(invalid(m).contains("same kind"));
}

#[test]
fn parent_and_name() {
    let e = entry("a/b/c", Kind::Fifo);
    assert_eq!(e.parent(), Some(&b"a/b"[..]));
    assert_eq!(e.name(), b"c");
    assert_eq!(entry("a", Kind::Fifo).parent(), Some(&b""[..]));
    assert_eq!(entry("", Kind::Dir).parent(), None);
}

#[test]
fn manifests_without_deletions_serialize_as_before() {
    let old = br#"{"format":1,"entries":[{"path":"","kind":"dir","mode":493,"uid":0,"gid":0,"atime":[1,0],"mtime":[2,0],"ctime":[3,0]}]}"#;
    let m = Manifest::from_bytes(old).unwrap();
    assert!(!m.entries[0].opaque);
    assert_eq!(
        m.to_bytes(),
        old.to_vec(),
        "bytes (and so tree ids) unchanged"
    );
}

#[test]
fn whiteouts_and_opaque_dirs_round_trip_and_are_checked() {
    let mut d = entry("d", Kind::Dir);
    d.opaque = true;
    let m = Manifest::new(vec![entry("", Kind::Dir), d, entry("gone", Kind::Whiteout)]);
    m.validate().unwrap();
    let text = String::from_utf8(m.to_bytes()).unwrap();
    assert!(
        text.contains(r#""kind":"whiteout""#) && text.contains(r#""opaque":true"#),
        "{text}"
    );
    assert_eq!(Manifest::from_bytes(text.as_bytes()).unwrap(), m);

    let mut f = entry("f", Kind::Fifo);
    f.opaque = true;
    let err = Manifest::new(vec![entry("", Kind::Dir), f])
        .validate()
        .unwrap_err();
    assert!(
        err.to_string().contains("only directories are opaque"),
        "{err}"
    );
    let mut w = entry("w", Kind::Whiteout);
    w.link = Some(1);
    assert!(Manifest::new(vec![entry("", Kind::Dir), w])
        .validate()
        .is_err());
    let below = Manifest::new(vec![
        entry("", Kind::Dir),
        entry("w", Kind::Whiteout),
        entry("w/x", Kind::Fifo),
    ]);
    assert!(below.validate().is_err(), "a whiteout has no children");
}
