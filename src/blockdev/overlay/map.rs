//! The overlay's block map: one state byte per 4 KiB block of the device.
//!
//! On disk (`map` in a persistent overlay's directory), little-endian:
//!
//! ```text
//! 0   8  magic "TSRAMAP1"
//! 8   8  number of blocks
//! 16  8  generation (incremented by every save)
//! 24  4  CRC32C of the states
//! 28  4  zero
//! 32  n  states, one byte per block: 0 = image, 1 = overlay data, 2 = zeros
//! ```
//!
//! A save writes `map.tmp`, fsyncs it, renames it over `map` and fsyncs the directory, so
//! after a crash `map` is either the previous or the new map, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

const MAGIC: &[u8; 8] = b"TSRAMAP1";
const HEADER: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Read from the image below.
    Base = 0,
    /// Read from the overlay's data file.
    Data = 1,
    /// Reads as zeros (trimmed or zero-written).
    Zero = 2,
}

impl State {
    fn from_byte(b: u8) -> Option<State> {
        match b {
            0 => Some(State::Base),
            1 => Some(State::Data),
            2 => Some(State::Zero),
            _ => None,
        }
    }
}

/// Blocks per chunk of the in-memory map: a chunk is allocated only once one of its blocks
/// leaves the image, so a guest that wrote a few files holds a few KiB of map, not a byte
/// per block of its disk (256 KiB for 1 GiB, times a thousand guests).
const CHUNK: u64 = 4096;

#[derive(Debug, Clone)]
pub struct BlockMap {
    blocks: u64,
    /// One entry per `CHUNK` blocks; `None` means every block reads from the image.
    chunks: Vec<Option<Box<[u8]>>>,
    generation: u64,
}

impl BlockMap {
    pub fn new(blocks: u64) -> BlockMap {
        BlockMap {
            blocks,
            chunks: vec![None; blocks.div_ceil(CHUNK) as usize],
            generation: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.blocks
    }

    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }

    /// Blocks in chunk `c` (the last one may be short).
    fn chunk_len(&self, c: usize) -> usize {
        (self.blocks - c as u64 * CHUNK).min(CHUNK) as usize
    }

    pub fn get(&self, block: u64) -> State {
        assert!(block < self.blocks, "block {block} past the map");
        match &self.chunks[(block / CHUNK) as usize] {
            None => State::Base,
            Some(c) => State::from_byte(c[(block % CHUNK) as usize]).expect("validated on load"),
        }
    }

    pub fn set(&mut self, block: u64, state: State) {
        assert!(block < self.blocks, "block {block} past the map");
        let c = (block / CHUNK) as usize;
        if self.chunks[c].is_none() {
            if state == State::Base {
                return;
            }
            self.chunks[c] = Some(vec![State::Base as u8; self.chunk_len(c)].into_boxed_slice());
        }
        let chunk = self.chunks[c].as_mut().expect("allocated above");
        chunk[(block % CHUNK) as usize] = state as u8;
    }

    /// Generation of the saved map this was loaded from (0 for a new map).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Blocks holding overlay data or zeros.
    pub fn changed_blocks(&self) -> u64 {
        self.chunks
            .iter()
            .flatten()
            .map(|c| c.iter().filter(|&&s| s != State::Base as u8).count() as u64)
            .sum()
    }

    /// Number of consecutive blocks from `block` (at most `max`) sharing its state.
    pub fn run(&self, block: u64, max: u64) -> (State, u64) {
        let state = self.get(block);
        let end = block.saturating_add(max).min(self.len());
        let mut at = block;
        while at < end {
            let c = (at / CHUNK) as usize;
            let chunk_end = ((c as u64 + 1) * CHUNK).min(end);
            match &self.chunks[c] {
                None if state == State::Base => at = chunk_end,
                None => break,
                Some(bytes) => {
                    let from = (at % CHUNK) as usize;
                    let to = from + (chunk_end - at) as usize;
                    let same = bytes[from..to]
                        .iter()
                        .take_while(|&&x| x == state as u8)
                        .count();
                    at += same as u64;
                    if from + same < to {
                        break;
                    }
                }
            }
        }
        (state, at - block)
    }

    pub fn load(path: &Path, blocks: u64) -> io::Result<BlockMap> {
        let bytes = fs::read(path)?;
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {why}", path.display()),
            )
        };
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(bad("not an overlay map (bad magic)"));
        }
        let count = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        if count != blocks || bytes.len() as u64 != HEADER as u64 + count {
            return Err(bad(&format!(
                "map covers {count} blocks, the image has {blocks}"
            )));
        }
        let generation = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        let crc = u32::from_le_bytes(bytes[24..28].try_into().unwrap());
        let states = &bytes[HEADER..];
        if crc32c::crc32c(states) != crc {
            return Err(bad("checksum mismatch"));
        }
        if states.iter().any(|&b| State::from_byte(b).is_none()) {
            return Err(bad("unknown block state"));
        }
        let chunks = states
            .chunks(CHUNK as usize)
            .map(|c| {
                c.iter()
                    .any(|&b| b != State::Base as u8)
                    .then(|| c.to_vec().into_boxed_slice())
            })
            .collect();
        Ok(BlockMap {
            blocks,
            chunks,
            generation,
        })
    }

    /// Atomically replace `dir/map` with this map.
    pub fn save(&self, dir: &Path, generation: u64) -> io::Result<()> {
        static BASE: [u8; CHUNK as usize] = [State::Base as u8; CHUNK as usize];
        let part = |c: usize| -> &[u8] {
            match &self.chunks[c] {
                Some(bytes) => bytes,
                None => &BASE[..self.chunk_len(c)],
            }
        };
        let crc = (0..self.chunks.len()).fold(0, |crc, c| crc32c::crc32c_append(crc, part(c)));
        let tmp = dir.join("map.tmp");
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut w = io::BufWriter::new(f);
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&self.len().to_le_bytes());
        header[16..24].copy_from_slice(&generation.to_le_bytes());
        header[24..28].copy_from_slice(&crc.to_le_bytes());
        w.write_all(&header)?;
        for c in 0..self.chunks.len() {
            w.write_all(part(c))?;
        }
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join("map"))?;
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = BlockMap::new(100);
        m.set(3, State::Data);
        m.set(4, State::Zero);
        m.save(dir.path(), 7).unwrap();
        let back = BlockMap::load(&dir.path().join("map"), 100).unwrap();
        assert_eq!(
            (back.get(3), back.get(4), back.get(5)),
            (State::Data, State::Zero, State::Base)
        );
        assert_eq!(back.run(0, 100), (State::Base, 3));
        assert_eq!(back.changed_blocks(), 2);
        assert_eq!(back.generation(), 7);
    }

    /// The chunked map against a plain byte per block, across chunk edges.
    #[test]
    fn chunks_behave_like_one_byte_per_block() {
        let blocks = CHUNK * 3 + 17;
        let mut m = BlockMap::new(blocks);
        let mut model = vec![State::Base; blocks as usize];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x % blocks;
            let s = [State::Base, State::Data, State::Zero][(x >> 40) as usize % 3];
            // Runs across a chunk edge too.
            for i in 0..(x >> 50) % 40 {
                if b + i < blocks {
                    m.set(b + i, s);
                    model[(b + i) as usize] = s;
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path(), 1).unwrap();
        let back = BlockMap::load(&dir.path().join("map"), blocks).unwrap();
        for map in [&m, &back] {
            let mut at = 0;
            while at < blocks {
                let (s, n) = map.run(at, blocks);
                assert!(n > 0);
                for i in at..at + n {
                    assert_eq!(model[i as usize], s, "block {i}");
                }
                if at + n < blocks {
                    assert_ne!(model[(at + n) as usize], s, "run from {at} stops early");
                }
                at += n;
            }
            let changed = model.iter().filter(|&&s| s != State::Base).count() as u64;
            assert_eq!(map.changed_blocks(), changed);
        }
        // The file is the same format as ever: a byte per block after the header.
        let bytes = fs::read(dir.path().join("map")).unwrap();
        assert_eq!(bytes.len() as u64, HEADER as u64 + blocks);
        for (i, s) in model.iter().enumerate() {
            assert_eq!(bytes[HEADER + i], *s as u8);
        }
        // An untouched map holds no chunks.
        assert!(BlockMap::new(blocks).chunks.iter().all(Option::is_none));
    }

    #[test]
    fn corrupt_or_mismatched_maps_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = BlockMap::new(10);
        m.save(dir.path(), 1).unwrap();
        assert!(BlockMap::load(&dir.path().join("map"), 11).is_err());
        let mut bytes = fs::read(dir.path().join("map")).unwrap();
        bytes[HEADER + 1] = 1;
        fs::write(dir.path().join("map"), bytes).unwrap();
        let err = BlockMap::load(&dir.path().join("map"), 10).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}
