//! Every synthesized image must pass `e2fsck -fn` with no problem line.

mod common;
use common::*;

#[test]
fn empty_tree() {
    if !have("e2fsck") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("empty.img");
    build_image(&Fixture::new(), &options(None), &img);
    e2fsck_clean(&img);
}

#[test]
fn every_kind_of_node() {
    if !have("e2fsck") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("kinds.img");
    build_image(&kitchen_sink(), &options(None), &img);
    e2fsck_clean(&img);
}
