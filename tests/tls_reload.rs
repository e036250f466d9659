//! `tessera serve --tls require --tls-verify-peer`: SIGHUP to the running binary re-reads
//! the certificate, key and client CA; new handshakes use them and an open TLS connection
//! keeps reading. Certificates come from the `openssl` CLI; clients are libnbd. A whole
//! image read over TLS (nbdcopy) has the exported bytes.

mod common;
#[path = "../crates/nbd/tests/support/mod.rs"]
mod nbd_support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::served::Served;
use common::Env;

const PY: &str = "/usr/bin/python3";

/// CA `ca` and `other-ca`, a `localhost` server certificate signed by `ca`, and client
/// directories in libnbd's layout: `ours/` (a client of `ca`) and `theirs/` (of `other-ca`).
fn pki(dir: &Path) {
    let script = r#"set -e
    ca() { openssl req -x509 -newkey rsa:2048 -nodes -keyout $1-key.pem -out $1-cert.pem \
        -days 2 -subj "/CN=$1" 2>/dev/null; }
    sign() { openssl x509 -req -in $1.csr -CA $2-cert.pem -CAkey $2-key.pem \
        -CAcreateserial -out $1-cert.pem -days 2 -extfile $3 2>/dev/null; }
    ca ca; ca other-ca
    printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
    printf 'extendedKeyUsage=clientAuth\n' > client.ext
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server-key.pem 2>/dev/null
    openssl req -new -key server-key.pem -out server.csr -subj "/CN=localhost"
    sign server ca server.ext
    for who in ours:ca theirs:other-ca; do
        name=${who%%:*}; issuer=${who#*:}
        mkdir $name
        openssl genpkey -algorithm ED25519 -out $name/client-key.pem 2>/dev/null
        openssl req -new -key $name/client-key.pem -out $name.csr -subj "/CN=$name"
        sign $name $issuer client.ext
        mv $name-cert.pem $name/client-cert.pem
        # libnbd checks the server's certificate against this CA, which is always ours.
        cp ca-cert.pem $name/ca-cert.pem
    done
    "#;
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn uri(sock: &Path, certs: &Path) -> String {
    format!(
        "nbds+unix:///img?socket={}&tls-certificates={}",
        sock.display(),
        certs.display()
    )
}

fn nbdinfo_ok(uri: &str) -> bool {
    Command::new("nbdinfo")
        .arg("--size")
        .arg(uri)
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn sighup_reloads_the_client_ca_and_keeps_open_connections() {
    if !common::can_run(
        "sighup_reloads_the_client_ca",
        false,
        &["openssl", "nbdinfo", "nbdcopy", PY],
    ) {
        return;
    }
    let env = Env::new();
    let pki_dir = env.path("pki");
    std::fs::create_dir_all(&pki_dir).unwrap();
    pki(&pki_dir);
    let live = env.path("live");
    std::fs::create_dir_all(&live).unwrap();
    for f in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(pki_dir.join(f), live.join(f)).unwrap();
    }
    std::fs::copy(pki_dir.join("ca-cert.pem"), live.join("client-ca.pem")).unwrap();

    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello"), "hello\n").unwrap();
    // Large enough for reads that a plain connection would splice (`splice.rs`): a TLS
    // connection must encrypt them instead.
    std::fs::write(src.join("big"), common::fixture::pseudo_random(3 << 20)).unwrap();
    let tree = env.import(&src);
    env.ok(&["image", "create", "img", "--tree", &tree]);
    let cert = live.join("server-cert.pem");
    let key = live.join("server-key.pem");
    let ca = live.join("client-ca.pem");
    let served = Served::start(
        &env,
        &[
            "--tls",
            "require",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-verify-peer",
            "--tls-ca",
            ca.to_str().unwrap(),
        ],
    );
    let ours = pki_dir.join("ours");
    let theirs = pki_dir.join("theirs");
    assert!(nbdinfo_ok(&uri(&served.sock, &ours)));
    assert!(!nbdinfo_ok(&uri(&served.sock, &theirs)));
    let (raw, copy) = (env.path("img.raw"), env.path("copy.raw"));
    env.ok(&["image", "export", "img", raw.to_str().unwrap()]);
    nbd_support::run(
        Command::new("nbdcopy")
            .arg(uri(&served.sock, &ours))
            .arg(&copy),
    );
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&raw).unwrap(),
        "the image read over TLS differs"
    );

    // A TLS connection held open across the reload.
    let mut held = Command::new(PY)
        .arg("-c")
        .arg(
            "import nbd, sys\nh = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri(sys.argv[1])\n\
             for line in sys.stdin:\n    print(len(h.pread(4096, 0)), flush=True)\n",
        )
        .arg(uri(&served.sock, &ours))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(held.stdout.take().unwrap());
    let mut read = |held: &mut std::process::Child| {
        held.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        l.trim().to_owned()
    };
    assert_eq!(read(&mut held), "4096");

    // Trust the other CA's clients instead, and tell the server.
    std::fs::copy(pki_dir.join("other-ca-cert.pem"), &ca).unwrap();
    let pid = served.child.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let start = Instant::now();
    while !nbdinfo_ok(&uri(&served.sock, &theirs)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "SIGHUP did not switch the client CA"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !nbdinfo_ok(&uri(&served.sock, &ours)),
        "the old CA is no longer trusted"
    );
    assert_eq!(read(&mut held), "4096", "the open connection still reads");
    drop(held.stdin.take());
    held.wait().unwrap();
}
