//! Which storage backend the hub of the current test uses (SQLite in its data dir, or a PostgreSQL
//! database from [`crate::pg`]), and [`both_backends!`](crate::both_backends) to run one test body
//! against each.
//!
//! The choice is a tokio task-local: it holds inside the test's own task (where `Cluster::start`
//! runs), not in tasks that test spawns.

use std::future::Future;

/// A storage backend of the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite files in the hub's data dir (the default).
    Sqlite,
    /// A fresh PostgreSQL database per cluster, passed in `SHELFSYNC_HUB_DATABASE_URL`.
    Postgres,
}

impl Backend {
    /// Lower-case name, as in the generated test names (`sqlite`, `postgres`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

tokio::task_local! {
    static CURRENT: Backend;
}

/// The backend of the running test: the one set by [`with`], else [`Backend::Sqlite`].
pub fn current() -> Backend {
    CURRENT.try_with(|b| *b).unwrap_or(Backend::Sqlite)
}

/// Runs `f` with [`current`] returning `backend`.
pub async fn with<F: Future>(backend: Backend, f: F) -> F::Output {
    CURRENT.scope(backend, f).await
}

/// Turns each `async fn name() { ... }` into two tests, `name_sqlite` and `name_postgres`, that run
/// the same body with [`current`] set to each backend (on a multi-threaded runtime with 4
/// workers, like the other end-to-end tests). Doc comments and other attributes are kept on both
/// tests; a `-> T` return type is allowed (e.g. a `Result`). Several fns may be given at once.
///
/// The body itself stays a plain `async fn name()` next to the tests, compiled once. The crate
/// using the macro needs `tokio` as a dependency (for `#[tokio::test]`).
///
/// ```text
/// shelfsync_tests::both_backends! {
///     /// A reservation holds units until it expires.
///     async fn a_reservation_holds_units() {
///         let c = Cluster::start(1).await; // SQLite or PostgreSQL, per variant
///         // ...
///     }
/// }
/// ```
#[macro_export]
macro_rules! both_backends {
    ($( $(#[$meta:meta])* async fn $name:ident() $(-> $ret:ty)? $body:block )*) => {
        $(
            $(#[$meta])*
            async fn $name() $(-> $ret)? $body

            $crate::__private::paste::paste! {
                $(#[$meta])*
                #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn [<$name _sqlite>]() $(-> $ret)? {
                    $crate::backend::with($crate::backend::Backend::Sqlite, $name()).await
                }

                $(#[$meta])*
                #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn [<$name _postgres>]() $(-> $ret)? {
                    $crate::backend::with($crate::backend::Backend::Postgres, $name()).await
                }
            }
        )*
    };
}
