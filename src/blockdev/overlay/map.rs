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

#[derive(Debug, Clone)]
pub struct BlockMap {
    states: Vec<u8>,
    generation: u64,
}

impl BlockMap {
    pub fn new(blocks: u64) -> BlockMap {
        BlockMap {
            states: vec![State::Base as u8; blocks as usize],
            generation: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.states.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    pub fn get(&self, block: u64) -> State {
        State::from_byte(self.states[block as usize]).expect("validated on load")
    }

    pub fn set(&mut self, block: u64, state: State) {
        self.states[block as usize] = state as u8;
    }

    /// Generation of the saved map this was loaded from (0 for a new map).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Blocks holding overlay data or zeros.
    pub fn changed_blocks(&self) -> u64 {
        self.states
            .iter()
            .filter(|&&s| s != State::Base as u8)
            .count() as u64
    }

    /// Number of consecutive blocks from `block` (at most `max`) sharing its state.
    pub fn run(&self, block: u64, max: u64) -> (State, u64) {
        let s = self.states[block as usize];
        let end = (block + max).min(self.len());
        let n = self.states[block as usize..end as usize]
            .iter()
            .take_while(|&&x| x == s)
            .count();
        (State::from_byte(s).expect("validated"), n as u64)
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
        let states = bytes[HEADER..].to_vec();
        if crc32c::crc32c(&states) != crc {
            return Err(bad("checksum mismatch"));
        }
        if states.iter().any(|&b| State::from_byte(b).is_none()) {
            return Err(bad("unknown block state"));
        }
        Ok(BlockMap { states, generation })
    }

    /// Atomically replace `dir/map` with this map.
    pub fn save(&self, dir: &Path, generation: u64) -> io::Result<()> {
        let tmp = dir.join("map.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&self.len().to_le_bytes());
        header[16..24].copy_from_slice(&generation.to_le_bytes());
        header[24..28].copy_from_slice(&crc32c::crc32c(&self.states).to_le_bytes());
        f.write_all(&header)?;
        f.write_all(&self.states)?;
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
