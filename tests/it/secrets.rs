//! The secret store end to end: values go in through the CLI (standard input, a file, a `.env`
//! import) and the API, are encrypted in the real SQLite file, and never come back out through
//! the API, the audit log or the controller's log; rotation keeps every version readable, under
//! load and when resumed after an interruption.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{bin, Controller, ControllerOpts};

const PLANTED: &str = "planted-Secret-Value-7d1f2e";

/// `nebula ARGS` with `input` on standard input.
fn cli_stdin(c: &Controller, args: &[&str], input: &str) -> std::process::Output {
    let mut child = Command::new(bin("nebula"))
        .args(args)
        .env("NEBULA_CONTROLLER", c.url(""))
        .env("NEBULA_TOKEN", &c.admin_token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nebula");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every byte the controller keeps in its data dir, as text.
fn data_dir_bytes(c: &Controller) -> String {
    let mut all = Vec::new();
    for entry in walk(&c.dir.path().join("data")) {
        all.extend(std::fs::read(entry).unwrap_or_default());
    }
    String::from_utf8_lossy(&all).into_owned()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn key_ids(c: &Controller) -> Vec<String> {
    std::fs::read_to_string(c.dir.path().join("data/secret.key"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .collect()
}

/// Run SQL on the controller's SQLite file (Python's sqlite3: the test edits rows behind the
/// controller's back to stand for an interrupted rotation).
fn sql(c: &Controller, statement: &str) -> String {
    let db = c.dir.path().join("data/nebula.db");
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3,sys; d=sqlite3.connect(sys.argv[1]); r=d.execute(sys.argv[2]).fetchall(); d.commit(); print(r)",
        )
        .arg(db)
        .arg(statement)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_write_only_encrypted_at_rest_and_rotation_keeps_them_readable() {
    let mut c = Controller::start(ControllerOpts::default()).await;
    // Printed once, at first start (the dashboard part below comes after restarts).
    let password = crate::dashboard_http::first_admin_password(&c).await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(c.dir.path().join("data/secret.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key file is the owner's only");
        let data = c.dir.path().join("data");
        let mode = std::fs::metadata(&data).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "the data dir is the owner's only");
        let mode = std::fs::metadata(data.join("nebula.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the database is the owner's only");
    }
    // From standard input (the trailing newline dropped), then from a file as it is.
    let out = cli_stdin(
        &c,
        &["secret", "set", "db_password"],
        &format!("{PLANTED}\n"),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("db_password version 1"),
        "{}",
        text(&out)
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{PLANTED}-2")).unwrap();
    let out = c.cli(&[
        "secret",
        "set",
        "db_password",
        "--from-file",
        &file.path().display().to_string(),
    ]);
    assert!(text(&out).contains("version 2"), "{}", text(&out));

    // Names, versions, who and when; never a value.
    let list = c.get("/api/v1/secrets").await;
    assert_eq!(list[0]["name"], "db_password", "{list}");
    assert_eq!(list[0]["latest"], 2);
    assert_eq!(list[0]["versions"].as_array().unwrap().len(), 2);
    assert_eq!(list[0]["updated_by"], "admin");
    let one = c.get("/api/v1/secrets/db_password").await;
    let out = c.cli(&["secret", "show", "db_password"]);
    assert_eq!(
        text(&out).lines().count(),
        3,
        "a header and two versions: {}",
        text(&out)
    );

    // Bad input changes nothing.
    for (name, body, why) in [
        ("9lives", json!({ "value": "x" }), "not a secret name"),
        ("ok_name", json!({ "value": "" }), "1 byte"),
        ("ok_name", json!({ "value": "x", "extra": 1 }), "extra"),
        ("rekey", json!({ "value": "x" }), ""),
    ] {
        let (status, answer) = c
            .api(Method::PUT, &format!("/api/v1/secrets/{name}"), Some(body))
            .await;
        assert!((400..500).contains(&status), "{name}: {status} {answer}");
        assert!(answer.to_string().contains(why), "{answer}");
    }
    assert_eq!(c.get("/api/v1/secrets").await.as_array().unwrap().len(), 1);
    // A viewer reads neither names nor values, and writes nothing.
    let (code, viewer) = c
        .api(
            Method::POST,
            "/api/v1/api-tokens",
            Some(json!({ "name": "peek", "role": "viewer" })),
        )
        .await;
    assert_eq!(code, 201, "{viewer}");
    let viewer = viewer["token"].as_str().unwrap().to_owned();
    for (method, path) in [
        (Method::GET, "/api/v1/secrets"),
        (Method::PUT, "/api/v1/secrets/db_password"),
    ] {
        let r = c
            .client
            .request(method, c.url(path))
            .bearer_auth(&viewer)
            .json(&json!({ "value": "x" }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{path}");
    }

    // Import a .env file: new names stored, equal values skipped, bad lines named.
    let env = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        env.path(),
        format!("# the seed's .env\ndb_password={PLANTED}-2\nexport API_KEY='sk-{PLANTED}'\nbroken line\n"),
    )
    .unwrap();
    let out = c.cli(&["secret", "import", &env.path().display().to_string()]);
    let said = text(&out);
    assert!(
        !out.status.success(),
        "a refused line fails the command: {said}"
    );
    assert!(said.contains("unchanged db_password"), "{said}");
    assert!(said.contains("set API_KEY version 1"), "{said}");
    assert!(said.contains("line 4"), "{said}");

    // The value is nowhere but sealed: not in answers, the audit log, the data dir, the log.
    let audit = c.get("/api/v1/audit?action=secret.set").await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 3, "{audit}");
    let answers = format!("{list}{one}{audit}{}", c.get("/api/v1/audit").await);
    assert!(!answers.contains(PLANTED), "an API answer holds the value");
    assert!(
        !data_dir_bytes(&c).contains(PLANTED),
        "the data dir holds the value"
    );
    assert!(
        !c.proc.output().contains(PLANTED),
        "the log holds the value"
    );

    // Rotation under load: values written while every version is sealed again.
    let before = key_ids(&c);
    assert_eq!(before.len(), 1);
    let writer = {
        let (url, token) = (c.url("/api/v1/secrets/load"), c.admin_token.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 1..=20 {
                let r = client
                    .put(&url)
                    .bearer_auth(&token)
                    .json(&json!({ "value": format!("load-{i}") }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201);
            }
        })
    };
    let out = c.cli(&["secret", "rekey"]);
    assert!(out.status.success(), "{}", text(&out));
    writer.await.unwrap();
    let out = c.cli(&["secret", "rekey"]);
    assert!(out.status.success(), "{}", text(&out));
    let after = key_ids(&c);
    assert_eq!(after.len(), 1, "one key left: {after:?}");
    assert!(!after.contains(&before[0]), "the old key is gone");
    let keys_used = sql(&c, "SELECT DISTINCT key_id FROM secrets");
    assert!(
        keys_used.contains(&after[0]) && !keys_used.contains(&before[0]),
        "{keys_used}"
    );

    // Everything still opens after a restart: an import of the latest values changes nothing.
    c.restart_hard().await;
    std::fs::write(
        env.path(),
        format!("db_password={PLANTED}-2\nAPI_KEY=sk-{PLANTED}\nload=load-20\n"),
    )
    .unwrap();
    let out = c.cli(&["secret", "import", &env.path().display().to_string()]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert_eq!(said.matches("unchanged").count(), 3, "{said}");

    // An interrupted rotation (one version still under the old key) is resumed.
    let old_row = sql(
        &c,
        "SELECT key_id, sealed FROM secrets WHERE name = 'API_KEY'",
    );
    let key_file = c.dir.path().join("data/secret.key");
    let old_keys = std::fs::read_to_string(&key_file).unwrap();
    let out = c.cli(&["secret", "rekey"]);
    assert!(out.status.success(), "{}", text(&out));
    let newest = key_ids(&c)[0].clone();
    let parsed: Value = serde_json::from_str(
        &old_row
            .replace("[(", "[[")
            .replace(")]", "]]")
            .replace('\'', "\""),
    )
    .unwrap();
    let (old_key, old_sealed) = (
        parsed[0][0].as_str().unwrap(),
        parsed[0][1].as_str().unwrap(),
    );
    sql(
        &c,
        &format!("UPDATE secrets SET key_id = '{old_key}', sealed = '{old_sealed}' WHERE name = 'API_KEY'"),
    );
    let mut keys = std::fs::read_to_string(&key_file).unwrap();
    keys.push_str(&old_keys);
    std::fs::write(&key_file, keys).unwrap();
    c.restart_hard().await;
    let out = c.cli(&["--json", "secret", "rekey"]);
    let done: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        done["key_id"],
        newest.as_str(),
        "resumed under the same key: {done}"
    );
    assert_eq!(done["reencrypted"], 1, "{done}");
    assert_eq!(done["removed_keys"], json!([old_key]), "{done}");
    let out = c.cli(&["secret", "import", &env.path().display().to_string()]);
    assert_eq!(text(&out).matches("unchanged").count(), 3, "{}", text(&out));

    // The dashboard: names and versions, a form that stores a value it never shows again.
    {
        use crate::dashboard_http::{client, session_pair, sign_in};
        let cookie = session_pair(&sign_in(&c, "admin", &password, false).await.unwrap());
        let http = client();
        let page = |http: reqwest::Client, cookie: String| {
            let url = c.url("/ui/secrets");
            async move {
                let r = http.get(url).header("cookie", cookie).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.text().await.unwrap()
            }
        };
        let html = page(http.clone(), cookie.clone()).await;
        assert!(
            html.contains("secret-db_password") && html.contains("secret-form"),
            "{html}"
        );
        let csrf = html
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap()
            .to_owned();
        let r = http
            .post(c.url("/ui/secrets"))
            .header("cookie", cookie.clone())
            .form(&[
                ("csrf", csrf.as_str()),
                ("name", "smtp_password"),
                ("value", PLANTED),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303);
        let html = page(http.clone(), cookie.clone()).await;
        assert!(html.contains("secret-smtp_password"), "{html}");
        assert!(!html.contains(PLANTED), "the page shows no value");
        let r = http
            .post(c.url("/ui/secrets/smtp_password/remove"))
            .header("cookie", cookie.clone())
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303);
        assert!(!page(http, cookie).await.contains("secret-smtp_password"));
        assert!(
            !data_dir_bytes(&c).contains(PLANTED),
            "the data dir holds the value"
        );
    }

    // Removed with every version.
    let out = c.cli(&["secret", "rm", "API_KEY"]);
    assert!(out.status.success(), "{}", text(&out));
    let (status, _) = c.api(Method::GET, "/api/v1/secrets/API_KEY", None).await;
    assert_eq!(status, 404);
    // Set again after `rm`: the numbering goes on (a version never names two values).
    let out = cli_stdin(&c, &["secret", "set", "API_KEY"], "sk-new-value");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("API_KEY version 2"), "{}", text(&out));
    tokio::time::sleep(Duration::from_millis(10)).await;
}
