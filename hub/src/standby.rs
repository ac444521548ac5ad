//! A warm standby: a hub that does not hold the lease keeps a decider loaded and follows the
//! active hub's commits, so taking over reads only the last moments instead of every record.
//!
//! Every commit on PostgreSQL also appends its records to `record_log` (kept for a few seconds,
//! trimmed by the writer). A standby loads every table once from one snapshot, noting where the
//! log stood, then reads the log after that point every [`POLL`]. One hub writes at a time
//! (the lease), so the log's order is the commit order. A standby that falls behind the trimmed
//! log loads the tables again. On takeover, the lease is taken first, so nothing more is
//! committed by the old owner; the new owner then reads the rest of the log and the stores' rows
//! (the admin writes some of their columns directly), and rebuilds the indexes once.
//!
//! A standby follows one partition: its rows and its part of the log (each partition has its own
//! writer, so each part of the log is in that partition's commit order).

use std::time::Duration;

use shelfsync_hub_core::{Loader, Partition, Record};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::engine::EngineOptions;
use crate::storage::{StorageError, StorageResult};

/// How often a standby reads the record log.
pub const POLL: Duration = Duration::from_millis(250);

/// A decider loaded up to a point of the record log.
pub struct Warm {
    /// The partition it follows.
    pub(crate) partition: Partition,
    pub(crate) loader: Loader,
    /// The last record-log row loaded (or read into `pending`).
    pub(crate) cursor: i64,
    /// Records read but not loaded yet.
    pub(crate) pending: Vec<Record>,
    /// Feed events kept in memory (for a reload from the tables).
    pub(crate) feed_retain: usize,
}

impl Warm {
    /// Records loaded so far.
    pub fn records(&self) -> usize {
        self.loader.records()
    }

    /// The partition it follows.
    pub fn partition(&self) -> Partition {
        self.partition
    }

    /// Loads what was read (CPU work: off the runtime's threads).
    pub(crate) async fn settle(mut self) -> StorageResult<Warm> {
        if self.pending.is_empty() {
            return Ok(self);
        }
        tokio::task::spawn_blocking(move || {
            let pending = std::mem::take(&mut self.pending);
            self.loader.load(pending).map_err(|e| StorageError::Corrupt(format!("loading the decider: {e}")))?;
            Ok(self)
        })
        .await
        .map_err(|e| StorageError::Backend(format!("loading the decider: {e}")))?
    }
}

/// How far a standby's decider is: the last record-log row loaded and the records loaded (None:
/// not loaded, or dropped to load again).
pub type Progress = Option<(i64, usize)>;

/// The task that keeps a [`Warm`] decider up to date.
pub struct Follower {
    stop: watch::Sender<bool>,
    progress: watch::Receiver<Progress>,
    task: JoinHandle<Option<Warm>>,
}

impl Follower {
    /// Starts following partition 0 of the database at `url`.
    pub fn start(url: String, opts: EngineOptions) -> Follower {
        Self::start_partition(url, opts, 0)
    }

    /// Starts following `partition` of the database at `url`.
    pub fn start_partition(url: String, opts: EngineOptions, partition: Partition) -> Follower {
        Self::start_reporting(url, opts, partition, watch::channel(None).0)
    }

    /// [`Follower::start_partition`], publishing its progress on `progress` too (a hub's
    /// `/healthz`).
    pub fn start_reporting(
        url: String,
        opts: EngineOptions,
        partition: Partition,
        progress: watch::Sender<Progress>,
    ) -> Follower {
        let (stop, stopped) = watch::channel(false);
        let rx = progress.subscribe();
        Follower { stop, progress: rx, task: tokio::spawn(follow(url, opts, partition, stopped, progress)) }
    }

    /// The last record-log row loaded (None: not loaded yet).
    pub fn cursor(&self) -> Option<i64> {
        self.progress.borrow().map(|(cursor, _)| cursor)
    }

    /// Stops following and hands over the decider (None: it never loaded, or could not).
    pub async fn stop(self) -> Option<Warm> {
        let _ = self.stop.send(true);
        self.task.await.ok().flatten()
    }
}

async fn follow(
    url: String,
    opts: EngineOptions,
    partition: Partition,
    mut stopped: watch::Receiver<bool>,
    progress: watch::Sender<Progress>,
) -> Option<Warm> {
    let mut client = None;
    let mut warm: Option<Warm> = None;
    loop {
        if *stopped.borrow() {
            return warm;
        }
        let step = async {
            if client.is_none() {
                client = Some(crate::postgres::connect(&url).await?);
            }
            let c = client.as_ref().expect("connected");
            match warm.take() {
                None => {
                    let started = std::time::Instant::now();
                    let (records, writer, cursor) =
                        crate::postgres::warm_snapshot(c, partition, opts.feed_retain).await?;
                    let loader = Loader::new(opts.decider_config(writer), rand::random::<u128>());
                    let w = Warm { partition, loader, cursor, pending: records, feed_retain: opts.feed_retain }
                        .settle()
                        .await?;
                    tracing::info!(
                        partition,
                        records = w.records(),
                        ms = started.elapsed().as_millis() as u64,
                        "standing by warm: loaded the decider, following the active hub's commits"
                    );
                    Ok::<_, StorageError>(Some(w))
                }
                Some(mut w) => match crate::postgres::catch_up(c, partition, &mut w).await {
                    Ok(true) => Ok(Some(w.settle().await?)),
                    Ok(false) => {
                        tracing::warn!("the warm standby fell behind the record log; loading every record again");
                        Ok(None)
                    }
                    Err(e) => {
                        // Keep what is loaded: the next read goes on from the same point.
                        warm = Some(w);
                        Err(e)
                    }
                },
            }
        };
        match step.await {
            Ok(w) => {
                progress.send_replace(w.as_ref().map(|w| (w.cursor, w.records())));
                warm = w;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the warm standby cannot read the database; trying again");
                client = None;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stopped.changed() => {}
        }
    }
}
