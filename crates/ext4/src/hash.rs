//! The htree directory hash, half-MD4 with unsigned chars (kernel `fs/ext4/hash.c`,
//! e2fsprogs `lib/ext2fs/dirhash.c`). We always set `EXT2_FLAGS_UNSIGNED_HASH`.

const K2: u32 = 0o13240474631;
const K3: u32 = 0o15666365641;

fn f(x: u32, y: u32, z: u32) -> u32 {
    z ^ (x & (y ^ z))
}
fn g(x: u32, y: u32, z: u32) -> u32 {
    (x & y).wrapping_add((x ^ y) & z)
}
fn h(x: u32, y: u32, z: u32) -> u32 {
    x ^ y ^ z
}

fn half_md4_transform(buf: &mut [u32; 4], inp: &[u32; 8]) {
    let [mut a, mut b, mut c, mut d] = *buf;
    macro_rules! round {
        ($f:ident, $a:ident, $b:ident, $c:ident, $d:ident, $x:expr, $s:expr) => {
            $a = $a
                .wrapping_add($f($b, $c, $d))
                .wrapping_add($x)
                .rotate_left($s);
        };
    }
    round!(f, a, b, c, d, inp[0], 3);
    round!(f, d, a, b, c, inp[1], 7);
    round!(f, c, d, a, b, inp[2], 11);
    round!(f, b, c, d, a, inp[3], 19);
    round!(f, a, b, c, d, inp[4], 3);
    round!(f, d, a, b, c, inp[5], 7);
    round!(f, c, d, a, b, inp[6], 11);
    round!(f, b, c, d, a, inp[7], 19);

    round!(g, a, b, c, d, inp[1].wrapping_add(K2), 3);
    round!(g, d, a, b, c, inp[3].wrapping_add(K2), 5);
    round!(g, c, d, a, b, inp[5].wrapping_add(K2), 9);
    round!(g, b, c, d, a, inp[7].wrapping_add(K2), 13);
    round!(g, a, b, c, d, inp[0].wrapping_add(K2), 3);
    round!(g, d, a, b, c, inp[2].wrapping_add(K2), 5);
    round!(g, c, d, a, b, inp[4].wrapping_add(K2), 9);
    round!(g, b, c, d, a, inp[6].wrapping_add(K2), 13);

    round!(h, a, b, c, d, inp[3].wrapping_add(K3), 3);
    round!(h, d, a, b, c, inp[7].wrapping_add(K3), 9);
    round!(h, c, d, a, b, inp[2].wrapping_add(K3), 11);
    round!(h, b, c, d, a, inp[6].wrapping_add(K3), 15);
    round!(h, a, b, c, d, inp[1].wrapping_add(K3), 3);
    round!(h, d, a, b, c, inp[5].wrapping_add(K3), 9);
    round!(h, c, d, a, b, inp[0].wrapping_add(K3), 11);
    round!(h, b, c, d, a, inp[4].wrapping_add(K3), 15);

    buf[0] = buf[0].wrapping_add(a);
    buf[1] = buf[1].wrapping_add(b);
    buf[2] = buf[2].wrapping_add(c);
    buf[3] = buf[3].wrapping_add(d);
}

/// `str2hashbuf_unsigned`: pack up to 32 bytes of the name into 8 words, padded with the length.
///
/// The kernel shifts bytes into a word that starts as the padding, one at a time: after
/// four bytes the padding is shifted out, so a whole word is the four bytes big-endian,
/// and only the last, partial word keeps padding above its bytes. Word at a time here:
/// sizing an image hashes every name of its large directories.
fn str2hashbuf(msg: &[u8], out: &mut [u32; 8]) {
    let len = msg.len() as u32;
    let mut pad = len | (len << 8);
    pad |= pad << 16;
    let take = &msg[..msg.len().min(32)];
    let mut words = take.chunks_exact(4);
    let mut n = 0;
    for w in &mut words {
        out[n] = u32::from_be_bytes([w[0], w[1], w[2], w[3]]);
        n += 1;
    }
    if n < 8 {
        // Fewer than four bytes: the padding's low bytes are shifted out for them.
        out[n] = words
            .remainder()
            .iter()
            .fold(pad, |val, &b| (val << 8) | b as u32);
        n += 1;
    }
    for w in &mut out[n..] {
        *w = pad;
    }
}

/// The (major, minor) half-MD4 hash of a name with the filesystem's `s_hash_seed`.
pub(crate) fn half_md4(name: &[u8], seed: &[u32; 4]) -> (u32, u32) {
    let mut buf = if seed.iter().any(|&w| w != 0) {
        *seed
    } else {
        [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476]
    };
    let mut inp = [0u32; 8];
    let mut p = name;
    loop {
        str2hashbuf(p, &mut inp);
        half_md4_transform(&mut buf, &inp);
        if p.len() <= 32 {
            break;
        }
        p = &p[32..];
    }
    let mut hash = buf[1] & !1;
    // 0x7fffffff << 1 is reserved as the end-of-directory marker for 32-bit hash cookies.
    if hash == 0x7FFF_FFFF << 1 {
        hash = 0x7FFF_FFFE << 1;
    }
    (hash, buf[2])
}

/// Seed words as the kernel reads `s_hash_seed` (four little-endian u32).
pub(crate) fn seed_words(seed: &[u8; 16]) -> [u32; 4] {
    std::array::from_fn(|i| u32::from_le_bytes(seed[i * 4..i * 4 + 4].try_into().unwrap()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's `str2hashbuf_unsigned`, a byte at a time, as written there.
    fn str2hashbuf_bytewise(msg: &[u8], out: &mut [u32; 8]) {
        let len = msg.len() as u32;
        let mut pad = len | (len << 8);
        pad |= pad << 16;
        let mut val = pad;
        let mut n = 0;
        for (i, &byte) in msg[..msg.len().min(32)].iter().enumerate() {
            val = (byte as u32).wrapping_add(val << 8);
            if i % 4 == 3 {
                out[n] = val;
                n += 1;
                val = pad;
            }
        }
        if n < 8 {
            out[n] = val;
            n += 1;
        }
        for w in out.iter_mut().skip(n) {
            *w = pad;
        }
    }

    #[test]
    fn word_packing_matches_the_bytewise_one() {
        let bytes: Vec<u8> = (0..300u32).map(|i| (i * 151 + 7) as u8).collect();
        for len in 0..=255 {
            for start in [0, 1, 13] {
                let msg = &bytes[start..start + len];
                let (mut fast, mut slow) = ([0u32; 8], [0u32; 8]);
                str2hashbuf(msg, &mut fast);
                str2hashbuf_bytewise(msg, &mut slow);
                assert_eq!(fast, slow, "{len} bytes from {start}");
            }
        }
    }

    /// (hash, minor) from e2fsprogs: `debugfs -R "dx_hash -h 4 -s
    /// 01020304-0506-0708-090a-0b0c0d0e0f10 NAME"` (hash 4: half-MD4, unsigned chars).
    #[test]
    fn hashes_match_debugfs() {
        let seed = seed_words(&std::array::from_fn(|i| i as u8 + 1));
        let known: [(&[u8], u32, u32); 20] = [
            (b"a", 0x8d08ec4c, 0x2fbccd78),
            (b"ah", 0xef36aaac, 0x8d7da0b7),
            (b"aho", 0x518e8d8a, 0xa068e9f1),
            (b"ahov", 0xd6807a2a, 0x2877659),
            (b"ahov2", 0xff7886f0, 0xc2b2f245),
            (b"ahov29g", 0xb8cda090, 0x38da86ce),
            (b"ahov29gn", 0x886c4970, 0xd912cf11),
            (b"ahov29gnu", 0x5ea31814, 0x670c0cdc),
            (b"ahov29gnu18fmt0", 0x8438e42a, 0x35718b97),
            (b"ahov29gnu18fmt07", 0x5d9dc93e, 0x5d0c8772),
            (b"ahov29gnu18fmt07e", 0x95b92d9e, 0x4396617f),
            (b"ahov29gnu18fmt07elsz6dkry5cjqx4", 0x8891bae4, 0x90262f69),
            (b"ahov29gnu18fmt07elsz6dkry5cjqx4b", 0xbdea0fde, 0x76821f08),
            (b"ahov29gnu18fmt07elsz6dkry5cjqx4bi", 0x2a88a594, 0x75f18241),
            (
                b"ahov29gnu18fmt07elsz6dkry5cjqx4bipw3ahov29gnu18fmt07elsz6dkry5c",
                0x9a6992f4,
                0x453c56e,
            ),
            (
                b"ahov29gnu18fmt07elsz6dkry5cjqx4bipw3ahov29gnu18fmt07elsz6dkry5cj",
                0x911227c0,
                0x6a1667d3,
            ),
            (
                b"ahov29gnu18fmt07elsz6dkry5cjqx4bipw3ahov29gnu18fmt07elsz6dkry5cjq",
                0xa676862e,
                0x45b04ccc,
            ),
            (
                b"ahov29gnu18fmt07elsz6dkry5cjqx4bipw3ahov29gnu18fmt07elsz6dkry5cjqx4bip",
                0x5699559e,
                0x9b794041,
            ),
            (b"caf\xc3\xa9", 0xaa032ce8, 0x7e4419fc),
            (
                b"\xff\xfe\x80x-\xe9t\xe9-2024.tar.gz",
                0x8d41818c,
                0x5dd3024c,
            ),
        ];
        for (name, hash, minor) in known {
            assert_eq!(
                half_md4(name, &seed),
                (hash, minor),
                "{}",
                String::from_utf8_lossy(name)
            );
        }
    }
}
