//! Server tokens the way admins get them: real `.p7m` files made here (a generated key and
//! certificate, CMS encryption through OpenSSL) in every cipher, encoding and armour Apple
//! may use; `token keygen | import | list | forget`; `GET /account` and the same-server
//! guard; expiry warnings; a renewed token picked up without a restart; and no secret in
//! logs or `Debug` output.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use adesync::syncer::{run_token, SyncError};
use adesync::token::admin::{keygen, KeyPair};
use adesync::token::p7m::P7mError;
use adesync::token::{ServerToken, TokenError};
use adesync_mock::{Credentials, Endpoint, MockConfig};
use base64::Engine as _;
use openssl::cms::{CMSOptions, CmsContentInfo};
use openssl::stack::Stack;
use openssl::symm::Cipher;
use openssl::x509::X509;

use crate::common::{write_token, Env};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/apple/");

/// Secret values that must never be printed; the consumer key is not secret.
const SECRETS: [&str; 3] = [
    "CS_topsecret0123456789abcdef",
    "AT_topsecret0123456789abcdef",
    "AS_topsecret0123456789abcdef",
];

fn token_json(consumer_key: &str, days: i64) -> String {
    let expiry = (chrono::Utc::now() + chrono::Duration::days(days))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    format!(
        r#"{{"consumer_key":"{consumer_key}","consumer_secret":"{}","access_token":"{}","access_secret":"{}","access_token_expiry":"{expiry}"}}"#,
        SECRETS[0], SECRETS[1], SECRETS[2]
    )
}

/// The decrypted text forms Apple's file may hold (docs/apple-dep-api.md §2.3).
#[derive(Clone, Copy, Debug)]
enum Payload {
    /// The JSON alone.
    Json,
    /// Apple's documentation sample: MIME headers, JSON hard-wrapped at 78 columns.
    Wrapped,
    /// Production tokens: MIME headers, JSON between BEGIN/END MESSAGE lines.
    Markers,
}

fn payload(json: &str, form: Payload) -> String {
    const HEADERS: &str =
        "Content-Type: text/plain;charset=UTF-8\nContent-Transfer-Encoding: 7bit\n\n";
    match form {
        Payload::Json => json.to_owned(),
        Payload::Wrapped => {
            let lines: Vec<String> = json
                .as_bytes()
                .chunks(78)
                .map(|c| String::from_utf8(c.to_vec()).unwrap())
                .collect();
            format!("{HEADERS}{}\n", lines.join("\n"))
        }
        Payload::Markers => {
            format!("{HEADERS}-----BEGIN MESSAGE-----\n{json}\n-----END MESSAGE-----\n")
        }
    }
}

/// How the CMS bytes are laid out.
#[derive(Clone, Copy, Debug)]
enum Armour {
    /// Apple's file: the MIME header block, a blank line, base64 in 76-column lines.
    Apple,
    /// Base64 only.
    Base64,
    /// The bytes themselves.
    Binary,
}

fn armour(cms: &[u8], how: Armour) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(cms);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    match how {
        Armour::Apple => format!(
            "Content-Type: application/pkcs7-mime; name=\"smime.p7m\"; smime-type=enveloped-data\n\
             Content-Transfer-Encoding: base64\n\
             Content-Disposition: attachment; filename=\"smime.p7m\"\n\
             Content-Description: S/MIME Encrypted Message\n\n{}\n",
            lines.join("\n")
        )
        .into_bytes(),
        Armour::Base64 => format!("{}\r\n", lines.join("\r\n")).into_bytes(),
        Armour::Binary => cms.to_vec(),
    }
}

/// CMS EnvelopedData of `plaintext` for `cert`, DER.
fn encrypt(cert: &Path, plaintext: &[u8], cipher: Cipher, key_id: bool) -> Vec<u8> {
    let cert = X509::from_pem(&std::fs::read(cert).unwrap()).unwrap();
    let mut certs = Stack::new().unwrap();
    certs.push(cert).unwrap();
    let mut flags = CMSOptions::BINARY;
    if key_id {
        flags |= CMSOptions::USE_KEYID;
    }
    CmsContentInfo::encrypt(&certs, plaintext, cipher, flags)
        .unwrap()
        .to_der()
        .unwrap()
}

/// Re-encodes DER as BER the way Apple's file is: every constructed element with an
/// indefinite length, and long octet strings (the content) as constructed chunks.
fn to_indefinite_ber(der: &[u8]) -> Vec<u8> {
    fn split(input: &[u8]) -> (u8, &[u8], &[u8]) {
        let tag = input[0];
        let (len, start) = match input[1] {
            l if l < 0x80 => (l as usize, 2),
            l => {
                let n = (l & 0x7f) as usize;
                let len = input[2..2 + n]
                    .iter()
                    .fold(0usize, |a, &b| (a << 8) | b as usize);
                (len, 2 + n)
            }
        };
        (tag, &input[start..start + len], &input[start + len..])
    }
    fn push_len(out: &mut Vec<u8>, len: usize) {
        if len < 0x80 {
            out.push(len as u8);
        } else {
            out.extend([0x82, (len >> 8) as u8, len as u8]);
        }
    }
    fn rewrite(mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            let (tag, body, rest) = split(input);
            if tag & 0x20 != 0 {
                out.extend([tag, 0x80]);
                rewrite(body, out);
                out.extend([0, 0]);
            } else if (tag == 0x04 || tag == 0x80) && body.len() > 32 {
                out.extend([tag | 0x20, 0x80]);
                for chunk in body.chunks(100) {
                    out.push(0x04);
                    push_len(out, chunk.len());
                    out.extend(chunk);
                }
                out.extend([0, 0]);
            } else {
                out.push(tag);
                push_len(out, body.len());
                out.extend(body);
            }
            input = rest;
        }
    }
    let mut out = Vec::new();
    rewrite(der, &mut out);
    out
}

fn pair(dir: &Path, name: &str) -> KeyPair {
    keygen(name, dir, 2, false).unwrap()
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_owned()
}

fn decrypt_error(err: TokenError) -> P7mError {
    match err {
        TokenError::Decrypt { reason, .. } => reason,
        other => panic!("expected a decryption error, got: {other}"),
    }
}

#[test]
fn p7m_tokens_decrypt_in_every_cipher_encoding_armour_and_payload_form() {
    let dir = tempfile::tempdir().unwrap();
    let keys = pair(dir.path(), "acme");
    let json = token_json("CK_matrix", 200);
    let mut payloads: Vec<(String, String)> = [Payload::Json, Payload::Wrapped, Payload::Markers]
        .iter()
        .map(|&f| (format!("{f:?}"), payload(&json, f)))
        .collect();
    // Apple's documentation sample and the marker form, byte for byte.
    for f in [
        "apple-doc-token-decrypted-sample.txt",
        "synthetic-decrypted-token-with-markers.txt",
    ] {
        payloads.push((
            f.to_owned(),
            std::fs::read_to_string(format!("{FIXTURES}{f}")).unwrap(),
        ));
    }
    let ciphers = [
        ("AES-128", Cipher::aes_128_cbc()),
        ("AES-256", Cipher::aes_256_cbc()),
        ("3DES", Cipher::des_ede3_cbc()),
    ];
    let mut checked = 0;
    for (label, text) in &payloads {
        let want = ServerToken::parse(text).unwrap();
        for (cipher_name, cipher) in ciphers {
            for key_id in [false, true] {
                let der = encrypt(&keys.cert, text.as_bytes(), cipher, key_id);
                for (encoding, cms) in [("DER", der.clone()), ("BER", to_indefinite_ber(&der))] {
                    for how in [Armour::Apple, Armour::Base64, Armour::Binary] {
                        let case =
                            format!("{label} {cipher_name} key_id={key_id} {encoding} {how:?}");
                        let file = write(&dir.path().join("t.p7m"), &armour(&cms, how));
                        let got = ServerToken::load_with_key(&file, Some(&keys.key))
                            .unwrap_or_else(|e| panic!("{case}: {e}"));
                        assert_eq!(got.consumer_key, want.consumer_key, "{case}");
                        assert_eq!(
                            got.access_secret.expose(),
                            want.access_secret.expose(),
                            "{case}"
                        );
                        assert_eq!(got.access_token_expiry, want.access_token_expiry, "{case}");
                        checked += 1;
                    }
                }
            }
        }
    }
    assert_eq!(checked, 5 * 3 * 2 * 2 * 3);
}

#[test]
fn a_token_encrypted_for_another_key_is_refused_as_wrong_key_naming_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ours = pair(dir.path(), "acme");
    let theirs = pair(dir.path(), "other");
    let json = token_json("CK_wrongkey", 200);
    let cms = encrypt(
        &theirs.cert,
        payload(&json, Payload::Markers).as_bytes(),
        Cipher::aes_256_cbc(),
        false,
    );
    let file = write(&dir.path().join("t.p7m"), &armour(&cms, Armour::Apple));
    let err = ServerToken::load_with_key(&file, Some(&ours.key)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("wrong key for this token"), "{msg}");
    assert!(
        msg.contains("CN=adesync-other"),
        "names the certificate: {msg}"
    );
    assert!(matches!(decrypt_error(err), P7mError::WrongKey { .. }));
    for s in SECRETS {
        assert!(!msg.contains(s));
    }
    // The right key works on the same file.
    assert!(ServerToken::load_with_key(&file, Some(&theirs.key)).is_ok());
}

#[test]
fn apples_sample_p7m_parses_but_is_refused_as_wrong_key() {
    let dir = tempfile::tempdir().unwrap();
    let ours = pair(dir.path(), "acme");
    let sample = Path::new(FIXTURES).join("apple-doc-token-smime-sample.p7m");
    let err = ServerToken::load_with_key(&sample, Some(&ours.key)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("wrong key for this token") && msg.contains("Profile Manager S/MIME Identity"),
        "{msg}"
    );
    // Without a key, the file is recognised and the fix named.
    let err = ServerToken::load_with_key(&sample, None).unwrap_err();
    assert!(matches!(err, TokenError::KeyRequired { .. }));
    assert!(err.to_string().contains("private_key_file"), "{err}");
}

#[test]
fn truncated_files_non_cms_files_and_missing_fields_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let keys = pair(dir.path(), "acme");
    let json = token_json("CK_cut", 200);
    let der = encrypt(&keys.cert, json.as_bytes(), Cipher::aes_128_cbc(), false);

    // Truncated: binary cut short, BER cut short, and Apple's file cut at a line end.
    for (label, bytes) in [
        ("DER", der[..der.len() - 40].to_vec()),
        ("BER", to_indefinite_ber(&der)[..300].to_vec()),
        ("Apple", {
            let full = String::from_utf8(armour(&to_indefinite_ber(&der), Armour::Apple)).unwrap();
            let lines: Vec<&str> = full.lines().collect();
            lines[..lines.len() / 2].join("\n").into_bytes()
        }),
    ] {
        let file = write(&dir.path().join("cut.p7m"), &bytes);
        let err = ServerToken::load_with_key(&file, Some(&keys.key)).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(decrypt_error(err), P7mError::Truncated(_)),
            "{label}: {msg}"
        );
        assert!(
            msg.contains("truncated") && msg.contains("download the token again"),
            "{msg}"
        );
    }

    // Not CMS: Apple's headers over random bytes.
    let file = write(
        &dir.path().join("junk.p7m"),
        &armour(&[0x30, 0x03, 0x02, 0x01, 0x00], Armour::Apple),
    );
    let err = ServerToken::load_with_key(&file, Some(&keys.key)).unwrap_err();
    assert!(err.to_string().contains("not a CMS file"), "{err}");

    // Signed, not encrypted.
    let signed = {
        use openssl::cms::CmsContentInfo;
        let key = adesync::token::p7m::load_private_key(&keys.key).unwrap();
        let cert = X509::from_pem(&std::fs::read(&keys.cert).unwrap()).unwrap();
        CmsContentInfo::sign(
            Some(&cert),
            Some(&key),
            None,
            Some(b"x"),
            CMSOptions::BINARY,
        )
        .unwrap()
        .to_der()
        .unwrap()
    };
    let file = write(&dir.path().join("signed.p7m"), &signed);
    let err = ServerToken::load_with_key(&file, Some(&keys.key)).unwrap_err();
    assert!(err.to_string().contains("not an encrypted one"), "{err}");

    // Decrypts, but the JSON lacks fields: they are named, the secrets are not.
    let partial = format!(
        r#"{{"consumer_key":"CK_1","consumer_secret":"{}"}}"#,
        SECRETS[0]
    );
    let cms = encrypt(&keys.cert, partial.as_bytes(), Cipher::aes_128_cbc(), false);
    let file = write(
        &dir.path().join("partial.p7m"),
        &armour(&cms, Armour::Apple),
    );
    let err = ServerToken::load_with_key(&file, Some(&keys.key)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TokenError::Content { .. }), "{msg}");
    assert!(
        msg.contains("missing field(s): access_token, access_secret, access_token_expiry"),
        "{msg}"
    );
    assert!(!msg.contains(SECRETS[0]), "{msg}");
}

#[test]
fn expiry_is_refused_at_the_boundary_with_the_renewal_steps() {
    let t = ServerToken::parse(&token_json("CK_1", 10)).unwrap();
    let exp = t.access_token_expiry;
    let p = Path::new("/etc/adesync/acme.p7m");
    assert!(t
        .check_not_expired("acme", p, exp - chrono::Duration::seconds(1))
        .is_ok());
    let err = t.check_not_expired("acme", p, exp).unwrap_err().to_string();
    assert!(
        err.contains("Download Token") && err.contains("adesync token import --name acme"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// The binary.

fn adesync(config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_adesync"));
    c.arg("--config").arg(config).env("RUST_LOG", "warn");
    c
}

/// Runs the binary off the async runtime (the simulator lives on it).
async fn output(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn keygen_then_import_installs_the_token_0600_and_guards_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    // Not configured yet: keygen and import work without a config file.
    let out = output({
        let mut c = adesync(&config);
        c.args(["token", "keygen", "--name", "acme"]);
        c
    })
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let key = dir.path().join("acme.key");
    let cert = dir.path().join("acme.cert.pem");
    assert_eq!(mode(&key), 0o600);
    assert!(
        stdout.contains("Your MDM Servers")
            && stdout.contains(&cert.display().to_string())
            && stdout.contains("token import --name acme"),
        "{stdout}"
    );
    // Never overwritten without --force.
    let before = std::fs::read(&key).unwrap();
    let out = output({
        let mut c = adesync(&config);
        c.args(["token", "keygen", "--name", "acme"]);
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("--force"), "{}", text(&out).1);
    assert_eq!(std::fs::read(&key).unwrap(), before);

    // The admin uploads the certificate and downloads Apple's file.
    let download = |ck: &str, days: i64, name: &str| {
        let cms = to_indefinite_ber(&encrypt(
            &cert,
            payload(&token_json(ck, days), Payload::Markers).as_bytes(),
            Cipher::aes_128_cbc(),
            false,
        ));
        write(&dir.path().join(name), &armour(&cms, Armour::Apple))
    };
    let first = download("CK_server_one", 300, "one_Token_smime.p7m");
    let out = output({
        let mut c = adesync(&config);
        c.args(["token", "import", "--name", "acme"]).arg(&first);
        c
    })
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let installed = dir.path().join("acme.p7m");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(&first).unwrap()
    );
    assert_eq!(mode(&installed), 0o600);
    // It prints the config entry to add.
    assert!(
        stdout.contains("[[tokens]]") && stdout.contains("private_key_file"),
        "{stdout}"
    );
    std::fs::write(
        &config,
        "database = \"adesync.db\"\n[[tokens]]\nname = \"acme\"\ntoken_file = \"acme.p7m\"\nprivate_key_file = \"acme.key\"\n",
    )
    .unwrap();
    let out = output({
        let mut c = adesync(&config);
        c.arg("check-config");
        c
    })
    .await;
    assert!(out.status.success(), "{}", text(&out).1);

    // A token of another server is refused, and the installed one kept.
    let other = download("CK_server_two", 300, "two_Token_smime.p7m");
    let out = output({
        let mut c = adesync(&config);
        c.args(["token", "import", "--name", "acme"]).arg(&other);
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains("another MDM server"),
        "{}",
        text(&out).1
    );
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(&first).unwrap()
    );

    // An older download of the same server is refused too.
    let older = download("CK_server_one", 100, "old_Token_smime.p7m");
    let out = output({
        let mut c = adesync(&config);
        c.args(["token", "import", "--name", "acme"]).arg(&older);
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("older"), "{}", text(&out).1);

    // An expired one, always.
    let expired = download("CK_server_one", -1, "expired_Token_smime.p7m");
    let out = output({
        let mut c = adesync(&config);
        c.args(["token", "import", "--name", "acme", "--force"])
            .arg(&expired);
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("expired"), "{}", text(&out).1);

    // The renewal of the same server is installed; --force switches servers.
    let renewal = download("CK_server_one", 365, "renewed_Token_smime.p7m");
    let out = output({
        let mut c = adesync(&config);
        c.args(["token", "import", "--name", "acme"]).arg(&renewal);
        c
    })
    .await;
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(&renewal).unwrap()
    );
    let out = output({
        let mut c = adesync(&config);
        c.args(["token", "import", "--name", "acme", "--force"])
            .arg(&other);
        c
    })
    .await;
    assert!(out.status.success(), "{}", text(&out).1);

    // A key that is not this token's: the wrong-key message, nothing installed.
    let stranger = pair(&dir.path().join("elsewhere"), "stranger");
    let out = output({
        let mut c = adesync(&config);
        c.args(["token", "import", "--name", "acme", "--key"])
            .arg(&stranger.key)
            .arg(&renewal);
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("wrong key"), "{}", text(&out).1);
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(&other).unwrap()
    );
}

#[tokio::test]
async fn importing_into_a_json_token_file_writes_the_decrypted_token_keeping_its_mode() {
    let env = Env::new(0, 100).await;
    let json = env.path("acme.json");
    // Installed for the service's group, world-readable by mistake: the group may keep
    // reading it, everyone else loses access.
    std::fs::set_permissions(&json, std::fs::Permissions::from_mode(0o644)).unwrap();
    let keys = pair(env.dir.path(), "acme");
    let cms = encrypt(
        &keys.cert,
        payload(
            &Credentials::depsim().token_json(chrono::Utc::now() + chrono::Duration::days(400)),
            Payload::Wrapped,
        )
        .as_bytes(),
        Cipher::aes_256_cbc(),
        false,
    );
    let file = write(&env.path("download.p7m"), &armour(&cms, Armour::Apple));
    let out = output({
        let mut c = adesync(&env.config_path);
        c.args(["token", "import", "--name", "acme"]).arg(&file);
        c
    })
    .await;
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!(mode(&json), 0o640);
    let t = ServerToken::load(&json).unwrap();
    assert_eq!(t.consumer_key, Credentials::depsim().consumer_key);
}

/// A config with the given `[[tokens]]` entries (name, token_file, private_key_file).
fn write_config(env: &Env, tokens: &[(&str, &str, Option<&str>)]) {
    let mut text = String::from(
        "database = \"adesync.db\"\n[retry]\nmax_attempts = 2\ninitial_delay = \"100ms\"\nmax_delay = \"100ms\"\n",
    );
    for (name, file, key) in tokens {
        text.push_str(&format!(
            "[[tokens]]\nname = \"{name}\"\ntoken_file = \"{file}\"\napi_url = \"{}\"\npage_size = 100\n",
            env.mock.base_url()
        ));
        if let Some(k) = key {
            text.push_str(&format!("private_key_file = \"{k}\"\n"));
        }
    }
    std::fs::write(&env.config_path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p7m_token_syncs_end_to_end_and_no_secret_reaches_logs_or_output() {
    let env = Env::new(120, 100).await;
    let keys = pair(env.dir.path(), "acme");
    let creds = Credentials::depsim();
    let json = creds.token_json(chrono::Utc::now() + chrono::Duration::days(20));
    let cms = to_indefinite_ber(&encrypt(
        &keys.cert,
        payload(&json, Payload::Markers).as_bytes(),
        Cipher::aes_128_cbc(),
        false,
    ));
    write(&env.path("acme.p7m"), &armour(&cms, Armour::Apple));
    write_config(&env, &[("acme", "acme.p7m", Some("acme.key"))]);

    let mut everything = String::new();
    for args in [
        vec!["run", "--once"],
        vec!["check-config"],
        vec!["token", "list"],
        vec!["token", "list", "--format", "json"],
        vec!["account"],
        vec!["status"],
    ] {
        let out = output({
            let mut c = adesync(&env.config_path);
            c.env("RUST_LOG", "debug").args(&args);
            c
        })
        .await;
        let (stdout, stderr) = text(&out);
        if args[0] == "run" {
            assert!(out.status.success(), "{stderr}");
            assert!(
                stderr.contains("expires in 19 days"),
                "expiry warning: {stderr}"
            );
        }
        everything.push_str(&stdout);
        everything.push_str(&stderr);
    }
    assert_eq!(env.store().device_counts("acme").unwrap().0, 120);
    let key_pem = std::fs::read_to_string(&keys.key).unwrap();
    let key_line = key_pem.lines().nth(3).unwrap();
    for secret in [
        creds.consumer_secret.as_str(),
        creds.access_token.as_str(),
        creds.access_secret.as_str(),
        key_line,
    ] {
        assert!(!everything.contains(secret), "a secret was printed");
    }
    // Debug output of the loaded config and token redacts them too.
    let config = env.config();
    let debug = format!("{config:?} {:?}", config.tokens[0].load_token().unwrap());
    for secret in [
        &creds.consumer_secret,
        &creds.access_token,
        &creds.access_secret,
    ] {
        assert!(!debug.contains(secret.as_str()), "{debug}");
    }
}

#[tokio::test]
async fn account_is_stored_shown_and_caps_the_page_size() {
    let env = Env::with(
        MockConfig {
            devices: 130,
            max_limit: 40,
            server_name: "Acme School MDM".into(),
            org_type: "edu".into(),
            ..Default::default()
        },
        100,
        "",
    )
    .await;
    let config = env.config();
    let s = run_token(&config, &config.tokens[0], None).await.unwrap();
    assert_eq!(s.stats.added, 130);
    assert_eq!(env.mock.count_requests(Endpoint::Account), 1);
    let limits: Vec<String> = env
        .mock
        .requests()
        .into_iter()
        .filter(|r| matches!(r.endpoint, Endpoint::FetchDevices | Endpoint::SyncDevices))
        .map(|r| r.body)
        .collect();
    assert!(!limits.is_empty());
    for body in &limits {
        assert!(body.contains("\"limit\":40"), "page size capped: {body}");
    }
    let a = env.store().account("acme").unwrap().unwrap();
    assert_eq!(a.server_name.as_deref(), Some("Acme School MDM"));
    assert_eq!(
        a.server_uuid.as_deref(),
        Some(env.mock.config().server_uuid.as_str())
    );
    assert_eq!(a.page_limit_max, Some(40));

    let out = output({
        let mut c = adesync(&env.config_path);
        c.args(["account", "--format", "json"]);
        c
    })
    .await;
    assert!(out.status.success(), "{}", text(&out).1);
    let v: serde_json::Value = serde_json::from_str(text(&out).0.trim()).unwrap();
    assert_eq!(v["token"], "acme");
    assert_eq!(v["server_name"], "Acme School MDM");
    assert_eq!(v["program"], "Apple School Manager");
    assert_eq!(v["admin_id"], "it-admin@example.com");
    let out = output({
        let mut c = adesync(&env.config_path);
        c.args(["account", "--token", "nope"]);
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn a_token_of_another_server_stops_the_sync_until_the_old_data_is_forgotten() {
    let env = Env::new(50, 100).await;
    let config = env.config();
    run_token(&config, &config.tokens[0], None).await.unwrap();
    let events_before = env.store().event_count(Some("acme")).unwrap();

    // The same name now points at another server (another simulator, another UUID).
    let other = adesync_mock::start(MockConfig {
        devices: 7,
        server_name: "Other MDM".into(),
        server_uuid: "677cab70-fe18-11e2-b778-0800200c9a66".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let text_cfg = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace(&env.mock.base_url(), &other.base_url());
    std::fs::write(&env.config_path, text_cfg).unwrap();
    let config = env.config();
    let err = run_token(&config, &config.tokens[0], None)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::ServerChanged { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("Other MDM")
            && msg.contains("adesync-mock")
            && msg.contains("adesync token forget acme --purge"),
        "{msg}"
    );
    assert!(err.needs_admin());
    assert_eq!(
        other.count_requests(Endpoint::FetchDevices),
        0,
        "nothing fetched"
    );
    let store = env.store();
    assert_eq!(store.device_counts("acme").unwrap().0, 50, "untouched");
    assert_eq!(store.event_count(Some("acme")).unwrap(), events_before);
    assert_eq!(
        store
            .account("acme")
            .unwrap()
            .unwrap()
            .server_name
            .as_deref(),
        Some("adesync-mock"),
        "the stored server is kept"
    );
    // `status` says a person must act (the daemon parks this token), not that it is
    // retried automatically.
    let out = output({
        let mut c = adesync(&env.config_path);
        c.arg("status");
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(1));
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("parked until an administrator acts")
            && !stdout.contains("retried automatically"),
        "{stdout}"
    );

    // The admin forgets the old server's data; the next run mirrors the new one.
    let out = output({
        let mut c = adesync(&env.config_path);
        c.args(["token", "forget", "acme", "--purge"]);
        c
    })
    .await;
    assert!(out.status.success(), "{}", text(&out).1);
    let s = run_token(&config, &config.tokens[0], None).await.unwrap();
    assert_eq!(s.stats.added, 7);
    assert_eq!(env.store().device_counts("acme").unwrap().0, 7);
}

#[tokio::test]
async fn a_renewed_token_file_is_used_at_the_next_run_keeping_cursor_and_devices() {
    let env = Env::new(60, 100).await;
    let config = env.config(); // loaded once, like the daemon
    let token = &config.tokens[0];
    run_token(&config, token, None).await.unwrap();

    // The token file expires under the running process: refused, with the steps.
    write_token(&env.path("acme.json"), &Credentials::depsim(), -1);
    let err = run_token(&config, token, None).await.unwrap_err();
    assert!(
        matches!(err, SyncError::Token(TokenError::Expired { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains("token import --name acme"),
        "{err}"
    );

    // The admin installs the renewal; the same config object picks it up.
    write_token(&env.path("acme.json"), &Credentials::depsim(), 365);
    env.mock.add_devices(2);
    env.mock.clear_requests();
    let s = run_token(&config, token, None).await.unwrap();
    assert_eq!(s.stats.added, 2);
    assert!(!s.fetched, "the cursor was kept: no full re-fetch");
    assert_eq!(env.mock.count_requests(Endpoint::FetchDevices), 0);
    assert_eq!(env.store().device_counts("acme").unwrap().0, 62);
}

#[tokio::test]
async fn expiry_warnings_are_logged_once_per_threshold() {
    let env = Env::new(3, 100).await;
    let run = || {
        let mut c = adesync(&env.config_path);
        c.args(["run", "--once"]);
        output(c)
    };
    write_token(&env.path("acme.json"), &Credentials::depsim(), 10);
    let (_, first) = text(&run().await);
    assert!(
        first.contains("expires in 9 days") && first.contains("token import --name acme"),
        "{first}"
    );
    // Mentioning the server by the name Apple reported, once it is known.
    let (_, second) = text(&run().await);
    assert!(!second.contains("expires in"), "not again: {second}");
    write_token(&env.path("acme.json"), &Credentials::depsim(), 2);
    let (_, third) = text(&run().await);
    assert!(
        third.contains("expires in 1 day") && third.contains("\"adesync-mock\""),
        "{third}"
    );
    // A renewed token: silence.
    write_token(&env.path("acme.json"), &Credentials::depsim(), 365);
    let (_, fourth) = text(&run().await);
    assert!(!fourth.contains("expires in"), "{fourth}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_purges_one_token_and_leaves_the_others_intact() {
    let env = Env::new(30, 100).await;
    write_token(&env.path("beta.json"), &Credentials::depsim(), 365);
    write_config(
        &env,
        &[("acme", "acme.json", None), ("beta", "beta.json", None)],
    );
    let out = output({
        let mut c = adesync(&env.config_path);
        c.args(["run", "--once"]);
        c
    })
    .await;
    assert!(out.status.success(), "{}", text(&out).1);
    let store = env.store();
    let acme = store.token_footprint("acme").unwrap();
    let beta = store.token_footprint("beta").unwrap();
    assert_eq!(
        (acme.devices, acme.events, acme.sync_state, acme.account),
        (30, 30, 1, 1)
    );

    // Without --purge: says what would go, deletes nothing.
    let out = output({
        let mut c = adesync(&env.config_path);
        c.args(["token", "forget", "acme"]);
        c
    })
    .await;
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(
        stdout.contains("30 devices, 30 events, 1 sync state row, 1 account row")
            && stdout.contains("--purge"),
        "{stdout}"
    );
    assert_eq!(store.token_footprint("acme").unwrap(), acme);

    let out = output({
        let mut c = adesync(&env.config_path);
        c.args(["token", "forget", "acme", "--purge"]);
        c
    })
    .await;
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(
        stdout.contains(
            "Deleted for \"acme\": 30 devices, 30 events, 1 sync state row, 1 account row"
        ) && stdout.contains("Apple Business/School Manager"),
        "{stdout}"
    );
    assert!(store.token_footprint("acme").unwrap().is_empty());
    assert_eq!(
        store.token_footprint("beta").unwrap(),
        beta,
        "beta untouched"
    );
    assert_eq!(store.stored_token_names().unwrap(), vec!["beta"]);
}

#[tokio::test]
async fn token_list_shows_expiry_and_days_left_and_fails_on_an_expired_token() {
    let env = Env::new(0, 100).await;
    write_token(&env.path("acme.json"), &Credentials::depsim(), 100);
    write_token(&env.path("beta.json"), &Credentials::depsim(), 20);
    write_token(&env.path("gone.json"), &Credentials::depsim(), -3);
    write_config(
        &env,
        &[
            ("acme", "acme.json", None),
            ("beta", "beta.json", None),
            ("gone", "gone.json", None),
            ("lost", "missing.p7m", Some("missing.key")),
        ],
    );
    let out = output({
        let mut c = adesync(&env.config_path);
        c.args(["token", "list", "--format", "json"]);
        c
    })
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "an expired token fails the check"
    );
    let (stdout, stderr) = text(&out);
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by = |n: &str| rows.iter().find(|r| r["token"] == n).unwrap().clone();
    assert_eq!(
        (
            by("acme")["status"].clone(),
            by("acme")["days_left"].clone()
        ),
        ("ok".into(), 99.into())
    );
    assert_eq!(by("beta")["status"], "expires soon");
    assert_eq!(by("gone")["status"], "expired");
    assert_eq!(by("lost")["status"], "unreadable");
    assert!(
        stderr.contains("token \"gone\" has expired") && stderr.contains("Download Token"),
        "{stderr}"
    );

    // The boundary, with a fixed clock.
    let cfg = adesync::config::LenientConfig::read(&env.config_path, true).unwrap();
    let exp = ServerToken::load(&env.path("acme.json"))
        .unwrap()
        .access_token_expiry;
    let at = |now| adesync::token::admin::token_statuses(&cfg, now)[0].status;
    assert_eq!(
        at(exp - chrono::Duration::days(30) - chrono::Duration::seconds(1)),
        "ok"
    );
    assert_eq!(at(exp - chrono::Duration::days(30)), "expires soon");
    assert_eq!(at(exp - chrono::Duration::seconds(1)), "expires soon");
    assert_eq!(at(exp), "expired");
}
