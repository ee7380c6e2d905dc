//! State commits, off the consumer thread: a thread that owns a transactional producer and
//! commits each staged commit in one Kafka transaction: its changelog records, its input
//! offsets (`send_offsets_to_transaction`, with the consumer group generation of the moment it
//! was handed over) and, exactly-once, the outputs of its interval. Then it writes the commit
//! to the tasks' RocksDB databases with the changelog checkpoints it reached.
//!
//! Delivery invariant. Exactly-once, a commit's outputs are in its transaction, so they become
//! visible to read_committed readers together with its state and offsets, or not at all.
//! At-least-once, the pipeline hands a commit over only once every output sent before it is
//! acknowledged, so a committed changelog transaction never stands for outputs that could
//! still be lost. The transaction makes the commit atomic (a restore never sees part of one)
//! and fences a zombie: once its partitions belong to a newer group generation, its offsets,
//! and with them its changelog records and outputs, cannot commit (KIP-447). Jobs are
//! committed in the order they are submitted; after a failure every later job is skipped
//! until [`StateCommitter::reset`], because each builds on the state of the one before. A
//! local write that fails stops the thread's work for good: a later commit written over the
//! gap would claim a checkpoint the database does not reflect.

use super::output::{checkpoint_of, Outputs, TxnError};
use super::sink::{Batch, OutputTopics};
use super::KafkaError;
use crate::engine::StoreError;
use crate::store::{Change, StateWriter};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::TopicPartitionList;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One task's part of a staged commit.
pub struct TaskCommit {
    pub partition: i32,
    /// Its changelog records, in order.
    pub changes: Vec<Change>,
    /// Writes them to the task's database once they have committed.
    pub writer: StateWriter,
}

/// One staged commit: its part of each task, the input offsets it reaches and (exactly-once)
/// its outputs.
pub struct Job {
    pub tasks: Vec<TaskCommit>,
    pub offsets: TopicPartitionList,
    pub outputs: Batch,
    /// The consumer group generation when the commit was handed over.
    pub group: ConsumerGroupMetadata,
    /// How long to spread its changelog records over (zero: all at once), [`PACE_SLICE`] at a
    /// time: a commit's records in one burst, and the brokers' work on them, compete for the
    /// CPU with the records flowing meanwhile.
    pub pace: Duration,
}

/// Changelog records sent at once when a job's records are spread over time (see
/// [`Job::pace`]).
pub const PACE_SLICE: usize = 500;

/// What became of a job.
#[derive(Debug)]
pub enum JobOutcome {
    /// Committed (the transaction took `took`), and written to each task's database with
    /// its changelog checkpoint (next offset), listed in `checkpoints`.
    Committed {
        checkpoints: Vec<(i32, i64)>,
        took: Duration,
    },
    /// Committed, but writing it to the database of task `partition` failed.
    NotWritten { partition: i32, error: StoreError },
    /// The transaction failed (and was aborted where that is possible).
    Failed(TxnError),
    /// Not attempted: an earlier job failed.
    Skipped,
}

enum Msg {
    Job(Box<Job>),
    Reset { new_producer: bool },
}

/// Attempts at registering a replacement producer (each bounded by the transaction API
/// timeout) before [`StateCommitter::reset`] gives up.
const REPLACE_ATTEMPTS: u32 = 3;

/// The committing thread and the channels to it.
pub struct StateCommitter {
    tx: Option<Sender<Msg>>,
    rx: Receiver<JobOutcome>,
    /// The end of each [`Msg::Reset`]: whether the producer is usable again.
    resets: Receiver<Result<(), String>>,
    /// Set by [`Self::detach`]: the thread no longer writes to the databases.
    left_behind: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Jobs submitted whose outcome has not been taken yet.
    outstanding: usize,
}

impl StateCommitter {
    /// Creates the transactional producer of `config`, registers its transactional id
    /// (fencing an older producer with the same id) and starts the thread, which produces
    /// changelog records to `changelog` and outputs to `topics`.
    pub fn start(
        config: ClientConfig,
        changelog: String,
        topics: OutputTopics,
    ) -> Result<Self, KafkaError> {
        let outputs = transactional(&config)?;
        let (tx, jobs) = mpsc::channel();
        let (done, rx) = mpsc::channel();
        let (reset_done, resets) = mpsc::channel();
        let left_behind = Arc::new(AtomicBool::new(false));
        let stop = left_behind.clone();
        let topics = Topics {
            changelog,
            outputs: topics,
        };
        let thread = std::thread::Builder::new()
            .name("state commits".into())
            .spawn(move || {
                serve(
                    config,
                    topics,
                    outputs,
                    jobs,
                    Replies {
                        outcomes: done,
                        resets: reset_done,
                    },
                    &stop,
                )
            })
            .map_err(|e| KafkaError::Changelog(format!("cannot start a thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            rx,
            resets,
            left_behind,
            thread: Some(thread),
            outstanding: 0,
        })
    }

    pub fn submit(&mut self, job: Job) -> Result<(), KafkaError> {
        self.send(Msg::Job(Box::new(job)))?;
        self.outstanding += 1;
        Ok(())
    }

    /// After a failure, once every outstanding outcome is taken: jobs are committed again,
    /// with a new producer if `new_producer` (the old one was fenced or is unusable, or its
    /// abort failed). Returns once that is done, and fails if no producer could be registered.
    ///
    /// Waiting matters: until a new producer has registered the transactional id, the failed
    /// transaction may still be open, or committing (a commit whose reply was lost when a
    /// broker died). A restore that read the changelog meanwhile would stop before it (a
    /// read_committed reader stops at the first open transaction) and miss it if it then
    /// commits: the task would go on from an older state while the changelog, and any later
    /// restore, has that commit. Registering the id makes the coordinator finish that
    /// transaction first (commit or abort, markers written).
    pub fn reset(&mut self, new_producer: bool) -> Result<(), KafkaError> {
        self.send(Msg::Reset { new_producer })?;
        match self.resets.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(KafkaError::Changelog(format!(
                "cannot replace the state producer: {e}"
            ))),
            Err(_) => Err(KafkaError::Changelog(
                "the state commit thread has stopped".into(),
            )),
        }
    }

    fn send(&self, m: Msg) -> Result<(), KafkaError> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(m).ok())
            .ok_or_else(|| KafkaError::Changelog("the state commit thread has stopped".into()))
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Leaves the thread to finish on its own (shutdown gave up on it): dropping this no
    /// longer waits for it.
    /// A job it is still committing is not written locally: the process is on its way out,
    /// and the local checkpoint simply stays behind (the changelog has the commit).
    pub fn detach(&mut self) {
        self.left_behind.store(true, Ordering::Relaxed);
        self.tx.take();
        self.thread.take();
    }

    /// The next outcome, in submission order, once one is ready, waiting at most `wait`
    /// (`Duration::ZERO`: only if one is ready now).
    pub fn outcome(&mut self, wait: Duration) -> Result<Option<JobOutcome>, KafkaError> {
        if self.outstanding == 0 {
            return Ok(None);
        }
        let received = if wait.is_zero() {
            // No clock read: this runs after every record.
            self.rx.try_recv().map_err(|e| match e {
                TryRecvError::Empty => RecvTimeoutError::Timeout,
                TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        } else {
            self.rx.recv_timeout(wait)
        };
        match received {
            Ok(o) => {
                self.outstanding -= 1;
                Ok(Some(o))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(KafkaError::Changelog(
                "the state commit thread has stopped".into(),
            )),
        }
    }
}

impl Drop for StateCommitter {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn transactional(config: &ClientConfig) -> Result<Outputs, KafkaError> {
    let outputs = Outputs::new(config)?;
    outputs
        .init_transactions()
        .map_err(|e| KafkaError::Changelog(format!("state producer: {e:?}")))?;
    Ok(outputs)
}

/// Where a job's records go.
struct Topics {
    changelog: String,
    outputs: OutputTopics,
}

/// Where the thread answers.
struct Replies {
    outcomes: Sender<JobOutcome>,
    resets: Sender<Result<(), String>>,
}

fn serve(
    config: ClientConfig,
    topics: Topics,
    mut outputs: Outputs,
    jobs: Receiver<Msg>,
    replies: Replies,
    left_behind: &AtomicBool,
) {
    let mut failed = false;
    let mut unusable = false;
    let mut unwritable = false;
    for m in jobs {
        let outcome = match m {
            Msg::Reset { new_producer } => {
                failed = unwritable;
                let mut reply = Ok(());
                if new_producer || unusable {
                    match replace(&config) {
                        Ok(o) => {
                            outputs = o;
                            unusable = false;
                        }
                        Err(e) => {
                            // Every job fails until a later reset manages it.
                            failed = true;
                            unusable = true;
                            reply = Err(e.to_string());
                        }
                    }
                }
                if replies.resets.send(reply).is_err() {
                    return;
                }
                continue;
            }
            Msg::Job(job) if failed => {
                // Dropped before its outcome is sent: its writers hold the databases open,
                // and the pipeline reopens them once it has every outcome.
                drop(job);
                JobOutcome::Skipped
            }
            Msg::Job(job) => match commit(&mut outputs, &topics, *job, left_behind) {
                Ok(Ok((checkpoints, took))) => JobOutcome::Committed { checkpoints, took },
                Ok(Err((partition, error))) => {
                    failed = true;
                    unwritable = true;
                    JobOutcome::NotWritten { partition, error }
                }
                Err(e) => {
                    failed = true;
                    // Read before the abort, which forgets it.
                    let undeliverable = outputs.undeliverable();
                    let (e, usable) = abort_after(&outputs, e);
                    unusable |= !usable;
                    JobOutcome::Failed(match (e, undeliverable) {
                        (TxnError::Fenced(e), _) => TxnError::Fenced(e),
                        (_, Some(u)) => TxnError::Undeliverable(u),
                        (e, None) => e,
                    })
                }
            },
        };
        if replies.outcomes.send(outcome).is_err() {
            return;
        }
    }
}

/// A new transactional producer for `config`, in up to [`REPLACE_ATTEMPTS`] attempts.
fn replace(config: &ClientConfig) -> Result<Outputs, KafkaError> {
    let mut attempt = 1;
    loop {
        match transactional(config) {
            Ok(o) => return Ok(o),
            Err(e) if attempt < REPLACE_ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "cannot replace the state producer yet");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// After a failed transaction: aborts it if it can be aborted. Returns the error to report and
/// whether the producer is still usable. An abort that is fenced reports the fencing: another
/// producer has the id, and the pipeline must know (this instance may be the zombie).
fn abort_after(outputs: &Outputs, e: TxnError) -> (TxnError, bool) {
    let TxnError::Abortable(e) = e else {
        return (e, false);
    };
    match outputs.abort() {
        Ok(()) => (TxnError::Abortable(e), true),
        Err(a) => {
            tracing::warn!(error = ?a, "aborting the state transaction failed");
            let reported = match a {
                TxnError::Fenced(a) => TxnError::Fenced(format!("{e}; {a}")),
                TxnError::Fatal(a)
                | TxnError::Abortable(a)
                | TxnError::Undeliverable(super::output::Undeliverable { message: a, .. }) => {
                    TxnError::Fatal(format!("{e}; {a}"))
                }
            };
            (reported, false)
        }
    }
}

/// Commits a job's transaction, then writes each task's part locally: the checkpoints and how
/// long the transaction took, or the task whose write failed.
type Written = Result<(Vec<(i32, i64)>, Duration), (i32, StoreError)>;

fn commit(
    outputs: &mut Outputs,
    topics: &Topics,
    job: Job,
    left_behind: &AtomicBool,
) -> Result<Written, TxnError> {
    let Job {
        tasks,
        offsets,
        outputs: batch,
        group,
        pace,
    } = job;
    let started = Instant::now();
    let abortable = |e: KafkaError| TxnError::Abortable(e.to_string());
    outputs.keep_brokers();
    outputs.begin()?;
    batch.produce(outputs, &topics.outputs).map_err(abortable)?;
    let total: usize = tasks.iter().map(|t| t.changes.len()).sum();
    let mut sent = 0;
    for t in &tasks {
        for slice in t.changes.chunks(PACE_SLICE) {
            if !pace.is_zero() && sent > 0 {
                // Rate limiting: the slice is due its share of the time.
                let due = started + pace.mul_f64(sent as f64 / total as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            outputs
                .send_changes(&topics.changelog, t.partition, slice)
                .map_err(abortable)?;
            sent += slice.len();
        }
    }
    let checkpoints = outputs.commit_epoch(&offsets, group, tasks.iter().map(|t| t.partition))?;
    let took = started.elapsed();
    if left_behind.load(Ordering::Relaxed) {
        return Ok(Ok((checkpoints, took)));
    }
    for t in &tasks {
        if let Err(e) = t
            .writer
            .write(&t.changes, checkpoint_of(&checkpoints, t.partition))
        {
            return Ok(Err((t.partition, e)));
        }
    }
    Ok(Ok((checkpoints, took)))
}
