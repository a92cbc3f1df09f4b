//! A fresh database on the PostgreSQL server `scripts/test` starts (its URL in
//! `NEBULA_TEST_POSTGRES_URL`), made and dropped with `psql`. Under `CI=true` a missing server
//! fails the test; elsewhere the test is skipped with a line saying so.

use std::process::Command;

pub struct PgDb {
    admin_url: String,
    pub name: String,
    pub url: String,
}

fn psql(url: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .arg(url)
        .args(["-qtAc", sql])
        .output()
        .expect("run psql")
}

impl PgDb {
    pub fn create() -> Option<Self> {
        let Ok(admin_url) = std::env::var("NEBULA_TEST_POSTGRES_URL") else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "NEBULA_TEST_POSTGRES_URL is not set: CI runs this test on PostgreSQL (use scripts/test)"
            );
            eprintln!("NEBULA_TEST_POSTGRES_URL not set: skipping (scripts/test sets it)");
            return None;
        };
        let name = format!("nebula_it_{}", uuid::Uuid::new_v4().simple());
        let out = psql(&admin_url, &format!("CREATE DATABASE {name}"));
        assert!(
            out.status.success(),
            "creating a database: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (base, _) = admin_url.rsplit_once('/').expect("URL has a database part");
        let url = format!("{base}/{name}");
        Some(Self {
            admin_url,
            name,
            url,
        })
    }

    /// One value from a query.
    pub fn query(&self, sql: &str) -> String {
        let out = psql(&self.url, sql);
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let _ = psql(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}
