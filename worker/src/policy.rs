//! Running one event through an agent: panics caught, failures handled by the
//! agent's [`ErrorPolicy`], time and outcome counted.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use tokio::time::Instant;

use strom_client::consumer::{ConsumerRecord, TopicPartition};
use strom_client::producer::ProducerRecord;
use strom_client::Header;
use tracing::{error, warn};

use crate::error::WorkerError;
use crate::metrics::{Counter, EventMeters};
use crate::processor::{AgentError, Context, DecodeError, ErrorPolicy, ProcessFuture, Processor};

/// Counts an event done when dropped.
struct Done<'a>(&'a Counter);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.inc();
    }
}

/// Processes `record` with `p` under `policy`, counting its time from
/// `started`; returns when it ended. `Err` when the policy is
/// [`ErrorPolicy::Stop`], or when a call of the framework failed for good (a
/// send, a table write, the dead letter itself): the worker stops and the
/// event is not committed.
pub(crate) async fn handle(
    p: &dyn Processor,
    policy: &ErrorPolicy,
    ctx: &Context,
    record: ConsumerRecord,
    meters: &EventMeters,
    started: Instant,
) -> Result<Instant, WorkerError> {
    meters.events_in.inc();
    // Counted done however this ends: processed, skipped, dead-lettered,
    // failed, panicked or cancelled.
    let _done = Done(&meters.events_done);
    let (topic, partition, offset) = (&*meters.topic, record.partition, record.offset);
    // The record itself is needed after a failure only to retry or
    // dead-letter it: copy it (cheap handles) only then.
    let keep = matches!(
        policy,
        ErrorPolicy::Retry { .. } | ErrorPolicy::DeadLetter(_)
    );
    let spare = keep.then(|| record.clone());
    let mut attempt = 0u32;
    let mut this = record;
    let error = loop {
        let outcome = guarded(p, ctx.clone(), this).await;
        // A framework call that failed for good is not the agent's error,
        // whatever the agent made of it: the event stays uncommitted.
        if let Some(failure) = ctx.take_failure() {
            return Err(failure);
        }
        let Err(e) = outcome else {
            let ended = Instant::now();
            meters.processing.observe((ended - started).as_secs_f64());
            return Ok(ended);
        };
        let undecodable = e.is::<DecodeError>();
        if undecodable {
            meters.decode_errors.inc();
        } else {
            meters.agent_errors.inc();
        }
        match (policy, &spare) {
            (ErrorPolicy::Retry { attempts, backoff }, Some(spare))
                if !undecodable && attempt < *attempts =>
            {
                let wait = backoff.saturating_mul(1 << attempt.min(16));
                attempt += 1;
                warn!(%topic, partition, offset, error = %e, attempt, ?wait,
                    "agent failed on an event; retrying");
                tokio::time::sleep(wait).await;
                this = spare.clone();
            }
            _ => break e,
        }
    };
    match (policy, spare) {
        (ErrorPolicy::Stop, _) => Err(WorkerError::Agent {
            topic: topic.to_owned(),
            partition,
            offset,
            error: error.to_string(),
        }),
        (ErrorPolicy::DeadLetter(to), Some(record)) => {
            let mut headers = record.headers.clone();
            headers.extend([
                Header::new("strom.error.topic", topic.to_owned()),
                Header::new("strom.error.partition", partition.to_string()),
                Header::new("strom.error.offset", offset.to_string()),
                Header::new("strom.error.message", error.to_string()),
            ]);
            let mut letter = ProducerRecord::to(to);
            letter.key = record.key.as_deref();
            letter.value = record.value.as_deref();
            letter.headers = &headers;
            letter.timestamp = Some(record.timestamp);
            ctx.send(letter).await?;
            meters.dead_lettered.inc();
            warn!(topic, partition, offset, error = %error, dead_letter_topic = %to, "event sent to the dead-letter topic");
            Ok(Instant::now())
        }
        _ => {
            warn!(topic, partition, offset, error = %error, "event skipped");
            Ok(Instant::now())
        }
    }
}

/// A batch of a source partition that does not decode however often it is
/// fetched, but whose header is intact, so its offsets are known.
#[derive(Debug, Clone)]
pub(crate) struct Undecodable {
    pub tp: TopicPartition,
    /// Its first offset at or after the position.
    pub from: i64,
    /// The offset after its last record.
    pub to: i64,
    /// How often it was fetched.
    pub attempts: u32,
    /// What is wrong with it.
    pub what: String,
}

/// Applies the policies of the agents reading `batch`'s topic to it: `Err`
/// if one of them is [`ErrorPolicy::Stop`]; else a dead letter (no key, no
/// value, the batch's coordinates in headers, `strom.error.last_offset`
/// among them) to each dead-letter topic, and the batch is stepped over.
pub(crate) async fn undecodable(
    policies: &[&ErrorPolicy],
    ctx: &Context,
    batch: &Undecodable,
    meters: &EventMeters,
) -> Result<(), WorkerError> {
    let (topic, partition, offset) = (&*batch.tp.topic, batch.tp.partition, batch.from);
    let last = batch.to - 1;
    if policies.iter().any(|p| matches!(p, ErrorPolicy::Stop)) {
        return Err(WorkerError::CorruptBatch {
            topic: topic.to_owned(),
            partition,
            offset,
            attempts: batch.attempts,
            what: batch.what.clone(),
        });
    }
    let mut letters: Vec<&str> = policies
        .iter()
        .filter_map(|p| match p {
            ErrorPolicy::DeadLetter(to) => Some(to.as_str()),
            _ => None,
        })
        .collect();
    letters.dedup();
    let headers = [
        Header::new("strom.error.topic", topic.to_owned()),
        Header::new("strom.error.partition", partition.to_string()),
        Header::new("strom.error.offset", offset.to_string()),
        Header::new("strom.error.last_offset", last.to_string()),
        Header::new(
            "strom.error.message",
            format!("record batch does not decode: {}", batch.what),
        ),
    ];
    for to in &letters {
        let mut letter = ProducerRecord::to(to);
        letter.headers = &headers;
        ctx.send(letter).await?;
        meters.dead_lettered.inc();
    }
    error!(
        topic, partition, offset, last_offset = last, what = %batch.what, dead_letter_topics = ?letters,
        "a record batch that does not decode was stepped over: its records are not processed"
    );
    Ok(())
}

/// Runs `p` on `record`, turning a panic (while building the future or while
/// polling it) into an error.
async fn guarded(
    p: &dyn Processor,
    ctx: Context,
    record: ConsumerRecord,
) -> Result<(), AgentError> {
    // AssertUnwindSafe: after a panic the future is dropped and the event
    // counts as failed; what the agent shares across events (tables behind a
    // tokio Mutex, which does not poison) holds only completed writes, since
    // each table write is applied whole or not at all.
    match catch_unwind(AssertUnwindSafe(|| p.process(ctx, record))) {
        Ok(future) => CatchUnwind(future).await,
        Err(panic) => Err(panicked(panic)),
    }
}

/// Hands on what `p` holds back for `ctx`'s partition (the agent's code runs
/// there too), turning a panic into an error.
pub(crate) async fn guarded_flush(p: &dyn Processor, ctx: Context) -> Result<(), AgentError> {
    // AssertUnwindSafe: as in `guarded`.
    match catch_unwind(AssertUnwindSafe(|| p.flush(ctx))) {
        Ok(future) => CatchUnwind(future).await,
        Err(panic) => Err(panicked(panic)),
    }
}

/// A processing future whose panics become errors.
struct CatchUnwind<'a>(ProcessFuture<'a>);

impl Future for CatchUnwind<'_> {
    type Output = Result<(), AgentError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let future = &mut self.get_mut().0;
        // AssertUnwindSafe: as in `guarded`; a panicked future is never polled
        // again (this returns Ready and the caller drops it).
        match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => Poll::Ready(Err(panicked(panic))),
        }
    }
}

fn panicked(panic: Box<dyn Any + Send>) -> AgentError {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    format!("agent panicked: {what}").into()
}
