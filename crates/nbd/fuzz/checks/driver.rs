//! Fuzzing on the stable toolchain: replay a corpus, then feed a check mutated and random
//! inputs from a seeded generator for a bounded time. No coverage guidance (that is what
//! the cargo-fuzz targets add on nightly), but the same checks run in every `cargo test`.
//!
//! - `corpus/NAME/*`: past crashers and interesting inputs, replayed first, every run.
//! - `TESSERA_FUZZ_SECS` (default 3): the time budget per target after the corpus;
//!   `TESSERA_FUZZ_SEED` picks another input sequence (default: fixed, so CI repeats).
//! - A failing input is written to `CARGO_TARGET_TMPDIR` (else the temp dir) `/fuzz-failures/`
//!   and named in the panic: copy it into the corpus as the regression test.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A xorshift64* generator: deterministic, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Bytes that decoders treat specially: boundaries of lengths, magic-ish values.
const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xfe, 0xff, b'/', b'.'];

/// A few random edits of `input`: bit flips, interesting bytes, big-endian length words,
/// inserted, deleted or duplicated ranges, truncation, splicing with `other`.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 if len >= 4 => {
                let i = rng.below(len - 3);
                let words = [0u32, 1, 0x7fff_ffff, 0xffff_ffff, 4096, 1 << 25];
                let w = words[rng.below(words.len())];
                v[i..i + 4].copy_from_slice(&w.to_be_bytes());
            }
            3 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let ins = rng.bytes(n);
                v.splice(at..at, ins);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                v.drain(at..at + n);
            }
            5 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                let copy = v[at..at + n].to_vec();
                let to = rng.below(len + 1);
                v.splice(to..to, copy);
            }
            6 if len > 0 => v.truncate(rng.below(len)),
            7 if !other.is_empty() => {
                let at = rng.below(len + 1);
                let from = rng.below(other.len());
                let n = 1 + rng.below((other.len() - from).min(512));
                v.truncate(at);
                v.extend_from_slice(&other[from..from + n]);
            }
            _ => {}
        }
    }
    v.truncate(max_len);
    v
}

/// The files of `dir`, sorted by name (none if it does not exist).
pub fn corpus(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// Replay `corpus_dir`, then run `check` on generated inputs (mutations of the corpus and
/// of `seeds`, and random bytes) until the budget is spent. Returns how many inputs ran.
pub fn run(
    name: &str,
    corpus_dir: &Path,
    seeds: &[Vec<u8>],
    max_len: usize,
    check: impl Fn(&[u8]),
) -> usize {
    let replay = corpus(corpus_dir);
    for (path, bytes) in &replay {
        guarded(
            name,
            bytes,
            &check,
            &format!("corpus file {}", path.display()),
        );
    }
    let mut pool: Vec<Vec<u8>> = seeds.to_vec();
    pool.extend(replay.into_iter().map(|(_, b)| b));
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    let secs = std::env::var("TESSERA_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    let seed = std::env::var("TESSERA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0x7e55_e7a0);
    let mut rng = Rng::new(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut count = 0usize;
    while Instant::now() < deadline {
        let input = if rng.below(8) == 0 {
            let n = rng.below(max_len.min(256) + 1);
            rng.bytes(n)
        } else {
            let a = &pool[rng.below(pool.len())];
            let b = &pool[rng.below(pool.len())];
            mutate(&mut rng, a, b, max_len)
        };
        guarded(
            name,
            &input,
            &check,
            &format!("generated input #{count} of seed {seed}"),
        );
        count += 1;
    }
    count
}

fn guarded(name: &str, input: &[u8], check: &impl Fn(&[u8]), what: &str) {
    if catch_unwind(AssertUnwindSafe(|| check(input))).is_ok() {
        return;
    }
    let dir = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let hash: u64 = input.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("{name}-{hash:016x}"));
    std::fs::write(&path, input).unwrap();
    panic!(
        "fuzz target {name} failed on {what} ({} bytes, saved as {}): add it to the corpus \
         as a regression test once fixed",
        input.len(),
        path.display()
    );
}
