//! Content identifiers: the BLAKE3 digest of an object's or a manifest's bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// BLAKE3 digest naming an object or a tree in the store; written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub [u8; 32]);

impl ObjectId {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ObjectId(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<blake3::Hash> for ObjectId {
    fn from(h: blake3::Hash) -> Self {
        ObjectId(*h.as_bytes())
    }
}

/// Why a string is not an object id.
#[derive(Debug, thiserror::Error)]
#[error("invalid object id {text:?}: expected 64 hex digits")]
pub struct ParseIdError {
    pub text: String,
}

impl FromStr for ObjectId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut id = [0u8; 32];
        match hex::decode_to_slice(s, &mut id) {
            Ok(()) if s.bytes().all(|b| !b.is_ascii_uppercase()) => Ok(ObjectId(id)),
            _ => Err(ParseIdError { text: s.to_owned() }),
        }
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

impl Serialize for ObjectId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ObjectId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ObjectId::of(b"hello");
        assert_eq!(id.to_string().parse::<ObjectId>().unwrap(), id);
        assert_eq!(id.to_string().len(), 64);
    }

    #[test]
    fn rejects_uppercase_and_short() {
        let upper = ObjectId::of(b"x").to_string().to_uppercase();
        assert!(upper.parse::<ObjectId>().is_err());
        assert!("abcd".parse::<ObjectId>().is_err());
    }
}
