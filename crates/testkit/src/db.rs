//! A fresh database per test: a uniquely named PostgreSQL database on the shared server, or a
//! SQLite file in its own temporary directory. Both are removed when the [`TestDb`] drops
//! (best effort), so tests run in parallel without seeing each other's rows.

use std::path::PathBuf;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};

use crate::services::postgres_server_url;

/// One test's database.
#[derive(Debug)]
pub struct TestDb {
    url: String,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Postgres { name: String },
    Sqlite { dir: PathBuf },
}

fn admin_url() -> String {
    // Loopback PostgreSQL on Debian has ssl=on, and sqlx's default `prefer` would use TLS.
    format!("{}/postgres?sslmode=disable", postgres_server_url())
}

async fn admin() -> DatabaseConnection {
    let mut opt = ConnectOptions::new(admin_url());
    opt.max_connections(1).sqlx_logging(false);
    Database::connect(opt)
        .await
        .expect("connect to the PostgreSQL server as postgres")
}

impl TestDb {
    /// Creates `enrichd_t_<random>` on the shared PostgreSQL server. Call
    /// [`crate::services::require_postgres`] first.
    ///
    /// # Panics
    /// When the server refuses the connection or the `CREATE DATABASE`.
    pub async fn postgres() -> Self {
        let name = format!("enrichd_t_{}", uuid::Uuid::new_v4().simple());
        let db = admin().await;
        db.execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        let _ = db.close().await;
        Self {
            url: format!("{}/{name}?sslmode=disable", postgres_server_url()),
            kind: Kind::Postgres { name },
        }
    }

    /// A SQLite file in a fresh temporary directory (`sqlite://<path>?mode=rwc`).
    ///
    /// # Panics
    /// When the temporary directory cannot be created.
    pub fn sqlite() -> Self {
        let dir = std::env::temp_dir().join(format!("enrichd-t-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        let path = dir.join("enrichd.db");
        Self {
            url: format!("sqlite://{}?mode=rwc", path.display()),
            kind: Kind::Sqlite { dir },
        }
    }

    /// The database URL to hand to the code under test.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether this is the PostgreSQL flavour.
    pub fn is_postgres(&self) -> bool {
        matches!(self.kind, Kind::Postgres { .. })
    }

    /// A short label for assertion messages (`postgres` / `sqlite`).
    pub fn label(&self) -> &'static str {
        if self.is_postgres() {
            "postgres"
        } else {
            "sqlite"
        }
    }

    /// A plain connection for a test's own setup and assertions (raw SQL).
    ///
    /// # Panics
    /// When the database cannot be reached.
    pub async fn connect(&self) -> DatabaseConnection {
        let mut opt = ConnectOptions::new(self.url.clone());
        opt.max_connections(2).sqlx_logging(false);
        Database::connect(opt)
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match &self.kind {
            Kind::Sqlite { dir } => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Kind::Postgres { name } => {
                let name = name.clone();
                // Drop may run inside a runtime, which must not be blocked on; a thread with its
                // own small runtime does the work and we wait for it.
                let dropper = std::thread::spawn(move || {
                    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    else {
                        return;
                    };
                    rt.block_on(async {
                        let db = admin().await;
                        let _ = db
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .await;
                        let _ = db.close().await;
                    });
                });
                let _ = dropper.join();
            }
        }
    }
}
