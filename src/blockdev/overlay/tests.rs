use std::sync::Arc;

use tessera_nbd::{Device, Extent, MemDevice, ZeroFlags};

use super::named::{self, OverlayError};
use super::Overlay;

fn base(size: usize) -> Arc<dyn Device> {
    Arc::new(MemDevice::new(
        (0..size).map(|i| (i * 31 % 251) as u8).collect(),
        false,
    ))
}

fn read_all(d: &dyn Device) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// Random operations against the overlay and a plain buffer; they must always agree.
#[test]
fn overlay_matches_a_model_under_random_writes_zeroes_and_trims() {
    let size = 1 << 20;
    let b = base(size + 1000); // not a multiple of 4096: the last block is partial
    let mut model = read_all(&*b);
    let dir = tempfile::tempdir().unwrap();
    let ov = Overlay::ephemeral(b.clone(), dir.path()).unwrap();
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = |m: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % m
    };
    for i in 0..2000 {
        let off = next(model.len() as u64);
        let len = 1 + next((model.len() as u64 - off).min(20_000));
        let (o, l) = (off as usize, len as usize);
        match next(5) {
            0 | 1 => {
                let data: Vec<u8> = (0..l).map(|k| (i + k) as u8).collect();
                ov.write_at(&data, off, next(4) == 0).unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
            2 => {
                ov.write_zeroes(
                    off,
                    len,
                    ZeroFlags {
                        may_trim: next(2) == 0,
                        fast: false,
                        fua: false,
                    },
                )
                .unwrap();
                model[o..o + l].fill(0);
            }
            3 => {
                ov.trim(off, len, false).unwrap();
                model[o..o + l].fill(0);
            }
            _ => ov.flush().unwrap(),
        }
        let mut got = vec![0u8; l];
        ov.read_at(&mut got, off).unwrap();
        assert_eq!(got, model[o..o + l], "op {i} at {off}+{len}");
    }
    assert_eq!(read_all(&ov), model);
    // The base never changes.
    assert_eq!(read_all(&*b), read_all(&*base(size + 1000)));
    // Extents cover the device and zero runs really read as zeros.
    let mut pos = 0;
    while pos < ov.size() {
        let ex = ov.extents(pos, ov.size() - pos).unwrap();
        let (len, kind) = ex[0];
        assert!(len > 0);
        if kind != Extent::Data {
            assert!(
                model[pos as usize..(pos + len) as usize]
                    .iter()
                    .all(|&x| x == 0),
                "zero extent at {pos}"
            );
        }
        pos += len;
    }
}

#[test]
fn ephemeral_overlays_start_clean_and_vanish() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(64 << 10);
    let ov = Overlay::ephemeral(b.clone(), dir.path()).unwrap();
    ov.write_at(&[1; 10], 5, true).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    drop(ov);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "temporary overlay removed"
    );
    let again = Overlay::ephemeral(b.clone(), dir.path()).unwrap();
    assert_eq!(read_all(&again), read_all(&*b));
}

#[test]
fn persistent_overlay_keeps_flushed_writes_and_refuses_a_second_client() {
    let store = tempfile::tempdir().unwrap();
    let b = base(256 << 10);
    let ov = named::attach(store.path(), "vm1", "img", "fp1", b.clone(), true).unwrap();
    ov.write_at(b"persisted", 4096 * 3 + 7, false).unwrap();
    ov.write_zeroes(0, 8192, ZeroFlags::default()).unwrap();
    let busy = named::attach(store.path(), "vm1", "img", "fp1", b.clone(), true)
        .err()
        .unwrap();
    assert!(matches!(busy, OverlayError::Busy(_)), "{busy}");
    ov.flush().unwrap();
    ov.write_at(b"not flushed", 4096 * 10, false).unwrap();
    let info = named::info(store.path(), "vm1").unwrap();
    assert!(info.attached);
    assert_eq!(info.changed_blocks, 3);
    // As after a crash: the in-memory state is gone unflushed, and the durable map on disk
    // has the flushed write but not the later one.
    std::mem::forget(ov);
    let map = super::BlockMap::load(
        &store.path().join("overlays/vm1/map"),
        (256u64 << 10) / 4096,
    )
    .unwrap();
    assert_eq!(map.get(3), super::State::Data);
    assert_eq!(
        map.get(10),
        super::State::Base,
        "unflushed write is not in the durable map"
    );
}

#[test]
fn persistent_overlay_reattaches_and_refuses_another_image() {
    let store = tempfile::tempdir().unwrap();
    let b = base(128 << 10);
    {
        let ov = named::attach(store.path(), "keep", "img", "fp1", b.clone(), true).unwrap();
        ov.write_at(b"hello", 100, true).unwrap();
    }
    let ov = named::attach(store.path(), "keep", "img", "fp1", b.clone(), true).unwrap();
    let mut buf = [0u8; 5];
    ov.read_at(&mut buf, 100).unwrap();
    assert_eq!(&buf, b"hello");
    drop(ov);
    let err = named::attach(store.path(), "keep", "img", "fp2", b.clone(), true)
        .err()
        .unwrap();
    assert!(matches!(err, OverlayError::WrongImage { .. }), "{err}");
    assert!(err.to_string().contains("belongs to image"));
    assert_eq!(named::list(store.path()).unwrap().len(), 1);
    named::remove(store.path(), "keep").unwrap();
    assert!(matches!(
        named::info(store.path(), "keep"),
        Err(OverlayError::NotFound(_))
    ));
    assert!(matches!(
        named::attach(store.path(), "../x", "img", "fp", b, true),
        Err(OverlayError::BadName(_))
    ));
}

/// Regression: a client that disconnected without flushing (nbdcopy does not flush by
/// default) lost every write, because only FLUSH saved the block map.
#[test]
fn persistent_overlay_keeps_unflushed_writes_on_a_clean_close() {
    let store = tempfile::tempdir().unwrap();
    let b = base(128 << 10);
    let ov = named::attach(store.path(), "closed", "img", "fp1", b.clone(), true).unwrap();
    ov.write_at(b"never flushed", 4096 * 5 + 3, false).unwrap();
    drop(ov);
    let ov = named::attach(store.path(), "closed", "img", "fp1", b.clone(), true).unwrap();
    let mut buf = [0u8; 13];
    ov.read_at(&mut buf, 4096 * 5 + 3).unwrap();
    assert_eq!(&buf, b"never flushed");
}
