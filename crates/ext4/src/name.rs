//! A directory entry's name: its bytes held in the entry itself when they are few.
//!
//! A tree gets one entry per file, and most names are short (96% of the 6 359 names under
//! `/usr/share/doc` have at most 22 bytes, 55% of the 53 188 under `/usr/share`): a `Vec`
//! per name was an allocation and a free per entry, and a page fault per 4 KiB of names,
//! for every image composed. Same size as the `Vec` it replaces (24 bytes).

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

/// Names of up to this many bytes are held inline.
const INLINE: usize = 22;

/// A directory entry's name (any bytes; [`crate::FsTree::link`] checks they make a valid
/// one). Dereferences to its bytes.
#[derive(Clone)]
pub struct Name(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl Name {
    pub fn new(bytes: &[u8]) -> Name {
        if bytes.len() <= INLINE {
            let mut inline = [0u8; INLINE];
            inline[..bytes.len()].copy_from_slice(bytes);
            Name(Repr::Inline {
                len: bytes.len() as u8,
                bytes: inline,
            })
        } else {
            Name(Repr::Heap(bytes.into()))
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..*len as usize],
            Repr::Heap(b) => b,
        }
    }
}

impl Deref for Name {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl AsRef<[u8]> for Name {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Borrow<[u8]> for Name {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl From<&[u8]> for Name {
    fn from(bytes: &[u8]) -> Name {
        Name::new(bytes)
    }
}

impl From<Vec<u8>> for Name {
    fn from(bytes: Vec<u8>) -> Name {
        if bytes.len() <= INLINE {
            Name::new(&bytes)
        } else {
            Name(Repr::Heap(bytes.into_boxed_slice()))
        }
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name::new(s.as_bytes())
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Name {}

impl PartialEq<[u8]> for Name {
    fn eq(&self, other: &[u8]) -> bool {
        self.as_bytes() == other
    }
}

impl PartialEq<&[u8]> for Name {
    fn eq(&self, other: &&[u8]) -> bool {
        self.as_bytes() == *other
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Name) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Name) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&String::from_utf8_lossy(self.as_bytes()), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_as_small_as_a_vec_and_keeps_its_bytes() {
        assert_eq!(std::mem::size_of::<Name>(), std::mem::size_of::<Vec<u8>>());
        for len in [0, 1, INLINE - 1, INLINE, INLINE + 1, 255, 300] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let a = Name::new(&bytes);
            let b = Name::from(bytes.clone());
            assert_eq!(&*a, &bytes[..], "{len}");
            assert_eq!(a, b);
            assert!(a == bytes[..]);
            assert_eq!(a.clone().as_bytes(), &bytes[..]);
        }
        // Inline and heap names order by their bytes, as byte strings do.
        let short = Name::from("b");
        let long = Name::from("a".repeat(40).as_str());
        assert!(long < short);
        assert!(Name::from("ab") > Name::from("a"));
    }
}
