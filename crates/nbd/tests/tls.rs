//! STARTTLS with X.509 credentials, against libnbd (GnuTLS) as the client.
//! Certificates come from the `openssl` CLI; without it the tests skip.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use support::*;
use tessera_nbd::proto::*;
use tessera_nbd::{tls, Config, ExportMap, MemDevice, TlsMode};

/// A CA and a server certificate for `localhost`, laid out the way libnbd's
/// `tls-certificates=DIR` expects (`ca-cert.pem`).
fn make_pki(dir: &Path) -> bool {
    if !have("openssl") {
        return false;
    }
    let sh = format!(
        r#"set -e; cd {d}
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem \
            -days 2 -subj "/CN=tessera test CA" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr \
            -subj "/CN=localhost" 2>/dev/null
        printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' > ext.cnf
        openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem \
            -CAcreateserial -out server-cert.pem -days 2 -extfile ext.cnf 2>/dev/null"#,
        d = dir.display()
    );
    run(Command::new("sh").arg("-c").arg(sh));
    true
}

fn start(mode: &str) -> Option<(Server, tempfile::TempDir, Vec<u8>)> {
    let pki = tempfile::tempdir().unwrap();
    if !make_pki(pki.path()) {
        return None;
    }
    let acceptor = tls::load_acceptor(
        &pki.path().join("server-cert.pem"),
        &pki.path().join("server-key.pem"),
    )
    .unwrap();
    let tls = match mode {
        "on" => TlsMode::On(acceptor),
        _ => TlsMode::Require(acceptor),
    };
    let data = pattern_image(2 << 20);
    let mut exports = ExportMap::new();
    exports.insert("mem", Arc::new(MemDevice::new(data.clone(), false)));
    let config = Config {
        tls,
        ..Config::default()
    };
    Some((Server::start(exports, config), pki, data))
}

fn tls_uri(server: &Server, pki: &Path) -> String {
    format!(
        "nbds+unix:///mem?socket={}&tls-certificates={}",
        server.sock.display(),
        pki.display()
    )
}

#[test]
fn require_refuses_plain_clients() {
    let Some((server, _pki, _)) = start("require") else {
        return;
    };
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
        let out = Command::new("nbdinfo")
            .arg(server.uri("mem"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "plain nbdinfo must fail");
    }
}

#[test]
fn require_serves_tls_clients() {
    let Some((server, pki, data)) = start("require") else {
        return;
    };
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let uri = tls_uri(&server, pki.path());
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
    let Some((server, pki, _)) = start("on") else {
        return;
    };
    if !have("nbdinfo") {
        return;
    }
    let out = run(Command::new("nbdinfo").arg("--json").arg(server.uri("mem")));
    assert!(out.contains("\"TLS\": false"), "{out}");
    let out = run(Command::new("nbdinfo")
        .arg("--json")
        .arg(tls_uri(&server, pki.path())));
    assert!(out.contains("\"TLS\": true"), "{out}");
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
}
