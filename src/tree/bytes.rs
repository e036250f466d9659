//! Binary-safe byte strings in JSON: a plain string when the bytes are UTF-8 (the common
//! case, readable in the manifest), else `{"hex": "…"}`.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bytes(pub Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl From<&[u8]> for Bytes {
    fn from(b: &[u8]) -> Self {
        Bytes(b.to_vec())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("hex", &hex::encode(&self.0))?;
                map.end()
            }
        }
    }
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Bytes;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(r#"a string or {"hex": "..."}"#)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Bytes, E> {
        Ok(Bytes(v.as_bytes().to_vec()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Bytes, A::Error> {
        let Some((key, value)) =
            map.next_entry::<std::borrow::Cow<'de, str>, std::borrow::Cow<'de, str>>()?
        else {
            return Err(de::Error::custom(r#"expected {"hex": "..."}"#));
        };
        if key != "hex" || map.next_key::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::custom(r#"expected {"hex": "..."}"#));
        }
        hex::decode(value.as_ref())
            .map(Bytes)
            .map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BytesVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(b: &[u8]) -> String {
        let json = serde_json::to_string(&Bytes(b.to_vec())).unwrap();
        assert_eq!(serde_json::from_str::<Bytes>(&json).unwrap().0, b);
        json
    }

    #[test]
    fn utf8_is_a_plain_string() {
        assert_eq!(round_trip("héllo\0".as_bytes()), "\"héllo\\u0000\"");
    }

    #[test]
    fn binary_is_hex() {
        assert_eq!(round_trip(&[0xff, 0x00, 0x41]), r#"{"hex":"ff0041"}"#);
    }
}
