//! Recognizing a compressed stream by its first bytes, never by a file name.

use std::io::{self, BufRead, BufReader, Read};

/// The compressions `import tar` (and OCI layers, and `.deb` members) understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    Xz,
}

impl Compression {
    /// What the magic number at the start of `head` says. Anything unknown is taken as an
    /// uncompressed tar, whose own header checks then decide.
    pub fn sniff(head: &[u8]) -> Result<Compression, &'static str> {
        Ok(if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Compression::Xz
        } else if head.starts_with(b"BZh") {
            return Err("bzip2 compression is not supported (recompress with gzip, zstd or xz)");
        } else if head.starts_with(&[0x5d, 0x00, 0x00]) {
            return Err("lzma (not xz) compression is not supported");
        } else {
            Compression::None
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
        }
    }
}

/// Wrap `input` in the decoder its first bytes call for.
pub fn open<'a, R: Read + 'a>(mut input: R) -> io::Result<(Compression, Box<dyn Read + 'a>)> {
    // Pipes may return fewer bytes per read; six bytes decide every magic above.
    let mut head = [0u8; 6];
    let n = read_up_to(&mut input, &mut head)?;
    let kind = Compression::sniff(&head[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e))?;
    let whole = io::Cursor::new(head[..n].to_vec()).chain(input);
    Ok((
        kind,
        decoder(kind, BufReader::with_capacity(1 << 16, whole))?,
    ))
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn decoder<'a, R: BufRead + 'a>(kind: Compression, input: R) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match kind {
        Compression::None => Box::new(input),
        // Concatenated gzip members are one stream, as gzip -d reads them.
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(input)?),
        Compression::Xz => Box::new(xz2::bufread::XzDecoder::new_multi_decoder(input)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn round_trip(kind: Compression, compressed: Vec<u8>) {
        // Feed one byte per read, like a slow pipe, to exercise the short-peek path.
        struct Slow(io::Cursor<Vec<u8>>);
        impl Read for Slow {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(1);
                self.0.read(&mut buf[..n])
            }
        }
        for slow in [false, true] {
            let input: Box<dyn Read> = if slow {
                Box::new(Slow(io::Cursor::new(compressed.clone())))
            } else {
                Box::new(io::Cursor::new(compressed.clone()))
            };
            let (got, mut r) = open(input).unwrap();
            assert_eq!(got, kind);
            let mut out = Vec::new();
            r.read_to_end(&mut out).unwrap();
            assert_eq!(out, b"hello tar");
        }
    }

    #[test]
    fn every_compression_by_magic() {
        round_trip(Compression::None, b"hello tar".to_vec());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"hello tar").unwrap();
        round_trip(Compression::Gzip, gz.finish().unwrap());
        round_trip(
            Compression::Zstd,
            zstd::encode_all(&b"hello tar"[..], 1).unwrap(),
        );
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(b"hello tar").unwrap();
        round_trip(Compression::Xz, xz.finish().unwrap());
    }

    #[test]
    fn bzip2_is_named() {
        let err = open(&b"BZh91AY&SY"[..]).err().unwrap();
        assert!(err.to_string().contains("bzip2"), "{err}");
    }
}
