//! STARTTLS with X.509 credentials, against libnbd (GnuTLS) and qemu as
//! clients: server keys of every kind OpenSSL makes, client certificates
//! verified against a CA, per-export allow-lists, and reloading.
//! Certificates come from the `openssl` CLI; without it the tests skip.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use support::*;
use tessera_nbd::proto::*;
use tessera_nbd::{
    tls, ClientAllowList, Config, ExportMap, MemDevice, TlsConfigError, TlsFiles, TlsMode,
    TlsServer,
};

/// Signed client certificates: (name, `openssl genpkey` arguments).
const CLIENTS: &[(&str, &str)] = &[
    ("rsa2048", "-algorithm RSA -pkeyopt rsa_keygen_bits:2048"),
    ("rsa2432", "-algorithm RSA -pkeyopt rsa_keygen_bits:2432"),
    ("rsa4096", "-algorithm RSA -pkeyopt rsa_keygen_bits:4096"),
    ("p256", "-algorithm EC -pkeyopt ec_paramgen_curve:P-256"),
    ("ed25519", "-algorithm ED25519"),
];

/// A test PKI made with openssl in `dir`:
/// - `ca-*.pem`: the CA; `other-ca-*.pem`: an unrelated CA;
/// - `server-cert.pem`/`server-key.pem`: `localhost`, a 2432-bit RSA key
///   (refused by rustls' `ring` provider);
/// - `clients/NAME/{ca-cert,client-cert,client-key}.pem`, the layout libnbd's
///   `tls-certificates=DIR` and qemu's `tls-creds-x509,dir=DIR` read, for
///   each of [`CLIENTS`] (CN `client-NAME`, signed by the CA) and for
///   `selfsigned`, `expired` (signed by the CA, valid only in 2020),
///   `otherca` (signed by the other CA) and `nocert` (the CA only).
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn make() -> Option<Pki> {
        if !have("openssl") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut sh = String::from(
            r#"set -e
            ca() { openssl req -x509 -newkey rsa:2048 -nodes -keyout $1-key.pem -out $1-cert.pem \
                -days 2 -subj "/CN=$2" 2>/dev/null; }
            ca ca "tessera test CA"
            ca other-ca "another CA"
            # Signs $1.csr with CA $2 into $1-cert.pem, extensions from $3.
            sign() { openssl x509 -req -in $1.csr -CA $2-cert.pem -CAkey $2-key.pem \
                -CAcreateserial -out $1-cert.pem -days 2 -extfile $3 2>/dev/null; }
            printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
            openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2432 -out server-key.pem 2>/dev/null
            openssl req -new -key server-key.pem -out server.csr -subj "/CN=localhost"
            sign server ca server.ext
            # client NAME CA GENPKEY-ARGS
            client() {
                mkdir -p clients/$1
                openssl genpkey $3 -out clients/$1/client-key.pem 2>/dev/null
                printf 'subjectAltName=DNS:%s.clients.test\nextendedKeyUsage=clientAuth\n' $1 > $1.ext
                openssl req -new -key clients/$1/client-key.pem -out $1.csr -subj "/CN=client-$1"
                sign $1 $2 $1.ext
                mv $1-cert.pem clients/$1/client-cert.pem
                cp ca-cert.pem clients/$1/ca-cert.pem
            }
            "#,
        );
        for (name, args) in CLIENTS {
            sh.push_str(&format!("client {name} ca '{args}'\n"));
        }
        sh.push_str(
            r#"client otherca other-ca "-algorithm EC -pkeyopt ec_paramgen_curve:P-256"
            mkdir -p clients/selfsigned clients/nocert clients/expired
            cp ca-cert.pem clients/nocert/ca-cert.pem
            cp ca-cert.pem clients/selfsigned/ca-cert.pem
            openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                -keyout clients/selfsigned/client-key.pem -out clients/selfsigned/client-cert.pem \
                -days 2 -subj "/CN=client-selfsigned" 2>/dev/null
            # Expired: `openssl ca` takes explicit start and end dates.
            mkdir -p db/new && touch db/index.txt && echo 1000 > db/serial
            cat > db/ca.cnf <<EOF
[ca]
default_ca = d
[d]
database = db/index.txt
new_certs_dir = db/new
serial = db/serial
default_md = sha256
policy = p
[p]
commonName = supplied
EOF
            openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
                -out clients/expired/client-key.pem 2>/dev/null
            openssl req -new -key clients/expired/client-key.pem -out expired.csr \
                -subj "/CN=client-expired"
            printf 'extendedKeyUsage=clientAuth\n' > expired.ext
            openssl ca -batch -config db/ca.cnf -cert ca-cert.pem -keyfile ca-key.pem \
                -in expired.csr -out clients/expired/client-cert.pem -notext \
                -startdate 20200101000000Z -enddate 20200102000000Z -extfile expired.ext 2>/dev/null
            cp ca-cert.pem clients/expired/ca-cert.pem
            "#,
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(&sh)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "making the PKI failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Pki { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn client(&self, name: &str) -> PathBuf {
        self.dir.path().join("clients").join(name)
    }

    fn files(&self, verify_peer: bool) -> TlsFiles {
        TlsFiles {
            cert: self.path("server-cert.pem"),
            key: self.path("server-key.pem"),
            client_ca: verify_peer.then(|| self.path("ca-cert.pem")),
        }
    }
}

const SIZE: usize = 2 << 20;

/// Serves `mem` (read-only pattern) and `secret` (its bytes reversed).
fn start(mode: &str, files: TlsFiles, allow: ClientAllowList) -> (Server, TlsServer, Vec<u8>) {
    let server = TlsServer::load(files).unwrap();
    let tls = match mode {
        "on" => TlsMode::On(server.clone()),
        _ => TlsMode::Require(server.clone()),
    };
    let data = pattern_image(SIZE);
    let mut secret = data.clone();
    secret.reverse();
    let mut exports = ExportMap::new();
    exports.insert("mem", Arc::new(MemDevice::new(data.clone(), false)));
    exports.insert("secret", Arc::new(MemDevice::new(secret, false)));
    let config = Config {
        tls,
        tls_allow: allow,
        ..Config::default()
    };
    (Server::start(exports, config), server, data)
}

fn tls_uri(server: &Server, export: &str, certs: &Path) -> String {
    format!(
        "nbds+unix:///{export}?socket={}&tls-certificates={}",
        server.sock.display(),
        certs.display()
    )
}

fn nbdinfo(args: &[&str]) -> std::process::Output {
    Command::new("nbdinfo").args(args).output().unwrap()
}

#[test]
fn require_refuses_plain_clients() {
    let Some(pki) = Pki::make() else { return };
    let (server, _, _) = start("require", pki.files(true), ClientAllowList::default());
    let mut s = server.connect();
    greet(&mut s);
    for (code, data) in [
        (OPT_GO, go_payload("mem")),
        (OPT_LIST, vec![]),
        (OPT_STRUCTURED_REPLY, vec![]),
    ] {
        send_option(&mut s, code, &data);
        assert_eq!(
            read_option_reply(&mut s).1,
            REP_ERR_TLS_REQD,
            "option {code}"
        );
    }
    // EXPORT_NAME cannot carry an error: the session ends.
    send_option(&mut s, OPT_EXPORT_NAME, b"mem");
    assert!(is_closed(&mut s));
    if have("nbdinfo") {
        let out = nbdinfo(&["--list", &server.uri("")]);
        assert!(!out.status.success(), "plain nbdinfo must fail");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("mem"));
    }
}

#[test]
fn require_serves_tls_clients_with_a_2432_bit_rsa_server_key() {
    let Some(pki) = Pki::make() else { return };
    let (server, _, data) = start("require", pki.files(false), ClientAllowList::default());
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let uri = tls_uri(&server, "mem", &pki.client("nocert"));
    let out = run(Command::new("nbdinfo").arg("--json").arg(&uri));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["TLS"], true);
    assert_eq!(v["structured"], true);
    assert_eq!(v["exports"][0]["export-size"], data.len() as u64);
    let copy = server.dir.path().join("copy.img");
    run(Command::new("nbdcopy").arg(&uri).arg(&copy));
    assert!(std::fs::read(&copy).unwrap() == data);
}

#[test]
fn on_serves_both() {
    let Some(pki) = Pki::make() else { return };
    let (server, _, _) = start("on", pki.files(false), ClientAllowList::default());
    if !have("nbdinfo") {
        return;
    }
    let out = run(Command::new("nbdinfo").arg("--json").arg(server.uri("mem")));
    assert!(out.contains("\"TLS\": false"), "{out}");
    let out = run(Command::new("nbdinfo").arg("--json").arg(tls_uri(
        &server,
        "mem",
        &pki.client("nocert"),
    )));
    assert!(out.contains("\"TLS\": true"), "{out}");
}

#[test]
fn verify_peer_accepts_every_signed_key_type() {
    let Some(pki) = Pki::make() else { return };
    let (server, _, data) = start("require", pki.files(true), ClientAllowList::default());
    if !have("nbdinfo") {
        return;
    }
    for (name, _) in CLIENTS {
        let uri = tls_uri(&server, "", &pki.client(name));
        let out = run(Command::new("nbdinfo").args(["--json", "--list"]).arg(&uri));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["TLS"], true, "{name}");
        let names: Vec<&str> = v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["export-name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["mem", "secret"], "{name}");
        assert_eq!(v["exports"][0]["export-size"], data.len() as u64);
    }
}

#[test]
fn verify_peer_refuses_bad_clients_before_listing() {
    let Some(pki) = Pki::make() else { return };
    let (server, _, _) = start("require", pki.files(true), ClientAllowList::default());
    if !have("nbdinfo") {
        return;
    }
    for name in ["selfsigned", "expired", "otherca", "nocert"] {
        let out = nbdinfo(&["--list", &tls_uri(&server, "", &pki.client(name))]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{name} was served: {stdout}");
        assert!(!stdout.contains("mem"), "{name} saw the export list");
        // Nor can it go straight to an export.
        let out = nbdinfo(&[&tls_uri(&server, "mem", &pki.client(name))]);
        assert!(!out.status.success(), "{name} opened an export");
    }
    // The signed client still gets in afterwards.
    let out = nbdinfo(&["--list", &tls_uri(&server, "", &pki.client("p256"))]);
    assert!(out.status.success());
}

#[test]
fn allow_list_limits_exports_per_client() {
    let Some(pki) = Pki::make() else { return };
    let mut allow = ClientAllowList::default();
    // One by CN, one by subjectAltName DNS name.
    allow.allow("secret", ["client-p256", "ED25519.clients.test"]);
    let (server, _, data) = start("require", pki.files(true), allow);
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let listed = |client: &str| {
        let out = run(Command::new("nbdinfo")
            .args(["--json", "--list"])
            .arg(tls_uri(&server, "", &pki.client(client))));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["export-name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(listed("rsa2048"), ["mem"]);
    assert_eq!(listed("p256"), ["mem", "secret"]);
    assert_eq!(listed("ed25519"), ["mem", "secret"]);

    let out = nbdinfo(&[&tls_uri(&server, "secret", &pki.client("rsa2048"))]);
    assert!(!out.status.success(), "rsa2048 opened secret");

    let copy = server.dir.path().join("secret.img");
    run(Command::new("nbdcopy")
        .arg(tls_uri(&server, "secret", &pki.client("p256")))
        .arg(&copy));
    let mut want = data.clone();
    want.reverse();
    assert!(std::fs::read(&copy).unwrap() == want);

    // A raw client in plain text under --tls on gets NBD_REP_ERR_POLICY.
    drop(server);
    let mut allow = ClientAllowList::default();
    allow.allow("secret", ["client-p256"]);
    let (server, _, _) = start("on", pki.files(true), allow);
    let mut s = server.connect();
    greet(&mut s);
    send_option(&mut s, OPT_GO, &go_payload("secret"));
    let (_, rtype, msg) = read_option_reply(&mut s);
    let msg = String::from_utf8_lossy(&msg);
    assert_eq!(rtype, REP_ERR_POLICY, "{msg}");
    assert!(msg.contains("allow-list"), "{msg}");
    send_option(&mut s, OPT_LIST, &[]);
    let (_, rtype, entry) = read_option_reply(&mut s);
    assert_eq!(rtype, REP_SERVER);
    assert_eq!(&entry[4..], b"mem");
    assert_eq!(read_option_reply(&mut s).1, REP_ACK);
    // Metadata contexts of an export the client may not open are refused like NBD_OPT_GO,
    // not listed: the reply would tell the client the export exists.
    send_option(&mut s, OPT_LIST_META_CONTEXT, &meta_payload("secret", &[]));
    let (_, rtype, msg) = read_option_reply(&mut s);
    let msg = String::from_utf8_lossy(&msg);
    assert_eq!(rtype, REP_ERR_POLICY, "{msg}");
    assert!(msg.contains("allow-list"), "{msg}");
    send_option(&mut s, OPT_LIST_META_CONTEXT, &meta_payload("mem", &[]));
    let (_, rtype, ctx) = read_option_reply(&mut s);
    assert_eq!(rtype, REP_META_CONTEXT);
    assert_eq!(&ctx[4..], b"base:allocation");
    assert_eq!(read_option_reply(&mut s).1, REP_ACK);
}

#[test]
fn qemu_img_presents_a_client_certificate() {
    let Some(pki) = Pki::make() else { return };
    let (server, _, data) = start("require", pki.files(true), ClientAllowList::default());
    if !have("qemu-img") {
        return;
    }
    let info = |client: &str| {
        let json = format!(
            r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"unix","path":"{}"}},"export":"mem","tls-creds":"tls0","tls-hostname":"localhost"}}}}"#,
            server.sock.display()
        );
        Command::new("qemu-img")
            .arg("info")
            .arg("--output=json")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                pki.client(client).display()
            ))
            .arg(json)
            .output()
            .unwrap()
    };
    let out = info("rsa4096");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["virtual-size"], data.len() as u64);
    assert!(!info("otherca").status.success());
}

/// A libnbd connection kept open in a child Python: it reads once when
/// started and once more for every line written to it.
struct Held {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Held {
    fn open(py: &str, uri: &str) -> Held {
        let script = r#"
import nbd, sys, hashlib
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
while True:
    print(hashlib.sha256(h.pread(65536, 4096)).hexdigest(), flush=True)
    if not sys.stdin.readline():
        break
"#;
        let mut child = Command::new(py)
            .args(["-c", script, uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut held = Held { child, out };
        held.line();
        held
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        assert!(!l.is_empty(), "the held connection failed");
        l
    }

    fn read_again(&mut self) -> String {
        self.child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
        self.line()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn reload_switches_credentials_and_keeps_connections() {
    let Some(pki) = Pki::make() else { return };
    // Serve from copies of the files so they can be replaced.
    let live = tempfile::tempdir().unwrap();
    let files = TlsFiles {
        cert: live.path().join("cert.pem"),
        key: live.path().join("key.pem"),
        client_ca: Some(live.path().join("ca.pem")),
    };
    let install = |cert: &str, key: &str, ca: &str| {
        std::fs::copy(pki.path(cert), &files.cert).unwrap();
        std::fs::copy(pki.path(key), &files.key).unwrap();
        std::fs::copy(pki.path(ca), files.client_ca.as_ref().unwrap()).unwrap();
    };
    install("server-cert.pem", "server-key.pem", "ca-cert.pem");
    let (server, tls, _) = start("require", files.clone(), ClientAllowList::default());
    if !have("nbdinfo") {
        return;
    }
    let Some(py) = python_nbd() else { return };
    let ok = |client: &str| {
        nbdinfo(&[&tls_uri(&server, "mem", &pki.client(client))])
            .status
            .success()
    };
    assert!(ok("rsa2048"));
    assert!(!ok("otherca"));
    let mut held = Held::open(py, &tls_uri(&server, "mem", &pki.client("rsa2048")));

    // A broken replacement is refused and the old credentials stay.
    std::fs::write(&files.key, b"garbage").unwrap();
    let err = tls.reload().unwrap_err();
    assert!(err.to_string().contains("key.pem"), "{err}");
    assert!(ok("rsa2048"));

    // Now trust the other CA for clients (the server keeps its certificate,
    // which libnbd checks against each client dir's ca-cert.pem).
    install("server-cert.pem", "server-key.pem", "other-ca-cert.pem");
    tls.reload().unwrap();
    assert!(ok("otherca"));
    assert!(!ok("rsa2048"));
    let first = held.read_again();
    assert_eq!(held.read_again(), first, "the open connection still reads");
}

#[test]
fn server_keys_openssl_accepts_load() {
    let Some(pki) = Pki::make() else { return };
    let dir = pki.dir.path();
    // NAME, commands making NAME.key from a CA-signed NAME.pem.
    let sh = r#"set -e
        key() { openssl genpkey $2 -out $1.p8 2>/dev/null; }
        cert() { openssl req -new -key $1.key -out $1.csr -subj "/CN=localhost"
                 openssl x509 -req -in $1.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
                   -out $1.pem -days 2 -extfile server.ext 2>/dev/null; }
        key rsa2432 "-algorithm RSA -pkeyopt rsa_keygen_bits:2432"
        openssl rsa -in rsa2432.p8 -traditional -out rsa2432.key 2>/dev/null   # PKCS#1
        key rsa3000 "-algorithm RSA -pkeyopt rsa_keygen_bits:3000"
        cp rsa3000.p8 rsa3000.key                                              # PKCS#8
        key p256 "-algorithm EC -pkeyopt ec_paramgen_curve:P-256"
        openssl ec -in p256.p8 -out p256.key 2>/dev/null                       # SEC1
        key p384 "-algorithm EC -pkeyopt ec_paramgen_curve:P-384"
        cp p384.p8 p384.key
        key ed25519 "-algorithm ED25519"
        cp ed25519.p8 ed25519.key
        key rsa1024 "-algorithm RSA -pkeyopt rsa_keygen_bits:1024"
        cp rsa1024.p8 rsa1024.key
        for k in rsa2432 rsa3000 p256 p384 ed25519 rsa1024; do cert $k; done
        grep -q 'BEGIN RSA PRIVATE KEY' rsa2432.key
        grep -q 'BEGIN EC PRIVATE KEY' p256.key
    "#;
    let out = Command::new("sh")
        .arg("-c")
        .arg(sh)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["rsa2432", "rsa3000", "p256", "p384", "ed25519"] {
        let files = TlsFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            client_ca: Some(pki.path("ca-cert.pem")),
        };
        if let Err(e) = TlsServer::load(files) {
            panic!("{name}: {e}");
        }
    }
    // Refused: one error naming the file and the reason.
    let err = tls::load_acceptor(&dir.join("rsa1024.pem"), &dir.join("rsa1024.key"))
        .err()
        .unwrap();
    assert!(matches!(err, TlsConfigError::BadKey(..)), "{err:?}");
    assert!(err.to_string().contains("rsa1024.key"), "{err}");
    let err = tls::load_acceptor(&dir.join("p256.pem"), &dir.join("p384.key"))
        .err()
        .unwrap();
    assert!(matches!(err, TlsConfigError::KeyMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("p384.key"), "{err}");
}

#[test]
fn bad_credentials_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cert = write_file(dir.path(), "cert.pem", b"not a certificate");
    let err = tls::load_acceptor(&cert, &cert).err().unwrap();
    assert!(err.to_string().contains("cert.pem"), "{err}");
    let missing = dir.path().join("missing.pem");
    let err = tls::load_acceptor(&missing, &missing).err().unwrap();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    let bad_pem = write_file(
        dir.path(),
        "bad.pem",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let err = tls::load_acceptor(&bad_pem, &bad_pem).err().unwrap();
    assert!(matches!(err, TlsConfigError::BadCertificate(..)), "{err:?}");
    assert!(err.to_string().contains("bad.pem"), "{err}");
}
