//! cargo-fuzz target; the property lives in `checks/option.rs`, which the stable
//! test `crates/nbd/tests/fuzz_stable.rs` runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks/option.rs"]
mod check;

fuzz_target!(|data: &[u8]| check::check(data));
