//! SQLite on its own threads: one writer thread that group-commits, and reader threads on their
//! own connections (WAL readers never block the writer). Used by the agent's ledger and the hub.
//!
//! The writer takes every job waiting in its queue, runs each inside its own SAVEPOINT (a failing
//! job rolls back alone), commits once, and only then answers every caller: one fsync for a whole
//! burst of requests. No tokio worker ever waits on SQLite.
//!
//! A job that panics leaves a transaction in an unknown state: the thread rolls it back, answers
//! nothing more, and fails the process stop ([`crate::fatal`]) instead of answering errors forever.

use std::sync::{Arc, Mutex};
use std::thread;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

/// Storage failure of a group commit, shared by every job in the group.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SqliteError {
    /// SQLite said no.
    #[error("database error: {0}")]
    Sqlite(String),
    /// The storage threads have stopped.
    #[error("the storage thread has stopped")]
    Closed,
}

impl From<rusqlite::Error> for SqliteError {
    fn from(e: rusqlite::Error) -> Self {
        SqliteError::Sqlite(e.to_string())
    }
}

type Finisher = Box<dyn FnOnce(Option<&SqliteError>) + Send>;

type RunFn = Box<dyn FnOnce(&Connection) -> (bool, Finisher) + Send>;

/// A write: `run` inside the group's transaction, or `abort` when no transaction could start.
struct WriteJob {
    run: RunFn,
    abort: Box<dyn FnOnce(&SqliteError) + Send>,
}
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// Called on the writer thread after every successful commit, before the group's callers are
/// answered (e.g. to publish new heads).
pub type AfterCommit = Box<dyn FnMut(&Connection) + Send>;

/// Handle to the storage threads. Cheap to clone; the threads stop when every handle is dropped.
#[derive(Clone)]
pub struct SqliteThreads {
    writer: mpsc::Sender<WriteJob>,
    reader: mpsc::Sender<ReadJob>,
    /// Seconds each group `COMMIT` took (the fsync, with `synchronous=FULL`).
    pub commit_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl SqliteThreads {
    /// Starts the writer on `write_conn` and one reader per connection in `read_conns`.
    pub fn spawn(
        name: &str,
        write_conn: Connection,
        read_conns: Vec<Connection>,
        group_commit_max: usize,
        after_commit: AfterCommit,
    ) -> std::io::Result<Self> {
        let (wtx, wrx) = mpsc::channel::<WriteJob>(4096);
        let (rtx, rrx) = mpsc::channel::<ReadJob>(4096);
        let max = group_commit_max.max(1);
        let commit_seconds = prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 18),
        );
        let timer = commit_seconds.clone();
        thread::Builder::new()
            .name(format!("{name}-db-writer"))
            .spawn(move || writer_loop(write_conn, wrx, max, after_commit, timer))?;
        let rrx = Arc::new(Mutex::new(rrx));
        for (i, conn) in read_conns.into_iter().enumerate() {
            let rrx = rrx.clone();
            thread::Builder::new().name(format!("{name}-db-reader-{i}")).spawn(move || reader_loop(conn, rrx))?;
        }
        Ok(SqliteThreads { writer: wtx, reader: rtx, commit_seconds })
    }

    /// Runs `f` inside the next group commit; answers only after the commit is durable.
    /// If `f` fails, only its own changes are rolled back.
    pub async fn write<R, E>(&self, f: impl FnOnce(&Connection) -> Result<R, E> + Send + 'static) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<SqliteError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<R, E>>();
        let job = write_job(f, move |r| {
            let _ = tx.send(r);
        });
        self.writer.send(job).await.map_err(|_| E::from(SqliteError::Closed))?;
        rx.await.map_err(|_| E::from(SqliteError::Closed))?
    }

    /// Queues `f` for the next group commit without waiting (from a plain thread: it blocks while
    /// the queue is full). `done` runs on the writer thread once the commit is durable (`Ok`) or
    /// failed; a failing `f` is rolled back alone and `done` gets its error.
    pub fn submit(
        &self,
        f: impl FnOnce(&Connection) -> Result<(), SqliteError> + Send + 'static,
        done: impl FnOnce(Result<(), SqliteError>) + Send + 'static,
    ) -> Result<(), SqliteError> {
        self.writer.blocking_send(write_job(f, done)).map_err(|_| SqliteError::Closed)
    }

    /// Runs `f` on a reader connection.
    pub async fn read<R, E>(&self, f: impl FnOnce(&Connection) -> Result<R, E> + Send + 'static) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<SqliteError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn| {
            let _ = tx.send(f(conn));
        });
        self.reader.send(job).await.map_err(|_| E::from(SqliteError::Closed))?;
        rx.await.map_err(|_| E::from(SqliteError::Closed))?
    }
}

/// A write job that hands `f`'s result, or the commit's failure, to `done` exactly once: after
/// the group commits, or when no transaction could start.
fn write_job<R, E>(
    f: impl FnOnce(&Connection) -> Result<R, E> + Send + 'static,
    done: impl FnOnce(Result<R, E>) + Send + 'static,
) -> WriteJob
where
    R: Send + 'static,
    E: From<SqliteError> + Send + 'static,
{
    let done = Arc::new(Mutex::new(Some(done)));
    let take = |d: &Mutex<Option<_>>| d.lock().ok().and_then(|mut d| d.take());
    let on_abort = done.clone();
    WriteJob {
        run: Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let finish: Finisher = Box::new(move |commit_error| {
                if let Some(done) = take(&done) {
                    done(match commit_error {
                        Some(e) if ok => Err(E::from(e.clone())),
                        _ => result,
                    })
                }
            });
            (ok, finish)
        }),
        abort: Box::new(move |e| {
            if let Some(done) = take(&on_abort) {
                done(Err(E::from(e.clone())))
            }
        }),
    }
}

fn writer_loop(
    conn: Connection,
    mut rx: mpsc::Receiver<WriteJob>,
    max: usize,
    mut after_commit: AfterCommit,
    commit_seconds: prometheus_client::metrics::histogram::Histogram,
) {
    let mut batch: Vec<WriteJob> = Vec::with_capacity(max);
    let mut finishers: Vec<Finisher> = Vec::with_capacity(max);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            tracing::error!(error = %e, jobs = batch.len(), "cannot begin a transaction; refusing the batch");
            let e = SqliteError::from(e);
            for job in batch.drain(..) {
                (job.abort)(&e);
            }
            continue;
        }
        for job in batch.drain(..) {
            if let Err(e) = conn.execute_batch("SAVEPOINT job") {
                tracing::error!(error = %e, "cannot open a savepoint");
                (job.abort)(&SqliteError::from(e));
                continue;
            }
            let run = job.run;
            let (ok, finish) = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&conn))) {
                Ok(r) => r,
                Err(_) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    crate::fatal::stop("a storage write job panicked");
                    // Dropping the remaining jobs answers their callers with `Closed`.
                    return;
                }
            };
            let end =
                if ok { conn.execute_batch("RELEASE job") } else { conn.execute_batch("ROLLBACK TO job; RELEASE job") };
            if let Err(e) = end {
                tracing::error!(error = %e, "cannot close a savepoint");
            }
            finishers.push(finish);
        }
        let started = std::time::Instant::now();
        let committed = conn.execute_batch("COMMIT").map_err(SqliteError::from);
        commit_seconds.observe(started.elapsed().as_secs_f64());
        if let Err(e) = &committed {
            tracing::error!(error = %e, jobs = finishers.len(), "group commit failed; every request in it is refused");
            let _ = conn.execute_batch("ROLLBACK");
        }
        // Publish first, then answer: a caller that reads what `after_commit` publishes (heads)
        // right after its answer sees its own commit.
        if committed.is_ok() {
            after_commit(&conn);
        }
        for finish in finishers.drain(..) {
            finish(committed.as_ref().err());
        }
    }
}

fn reader_loop(conn: Connection, rx: Arc<Mutex<mpsc::Receiver<ReadJob>>>) {
    loop {
        let job = {
            let mut rx = match rx.lock() {
                Ok(rx) => rx,
                Err(poisoned) => poisoned.into_inner(),
            };
            rx.blocking_recv()
        };
        match job {
            Some(job) => {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&conn))).is_err() {
                    crate::fatal::stop("a storage read job panicked");
                    return;
                }
            }
            None => return,
        }
    }
}
