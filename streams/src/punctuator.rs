//! Partition timers (Kafka Streams' punctuators): a function run in each
//! partition's task on a schedule of the wall clock or of the partition's
//! stream time, with that partition's tables, like an agent's handler.
//!
//! It runs in the task that processes the partition's events, between
//! them (alongside events in flight of an agent whose concurrency is above
//! 1), so what it writes and sends commits with the partition's offsets (in
//! their transaction under exactly-once). Runs are not replayed: one whose
//! writes a failed transaction aborted, or one due just before the worker
//! stopped or the partition moved, is not run again. An error it returns is
//! logged and counted in `strom_agent_errors_total` and the timer goes on;
//! a failed framework call (a send, a table write) stops the worker as
//! anywhere else.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strom_client::consumer::ConsumerRecord;
use strom_worker::{AgentError, Context, ErrorPolicy, ProcessFuture, Processor};
use tokio::time::Instant;

use crate::context::Ctx;

/// When a [partition timer](crate::App::partition_timer) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Punctuation {
    /// Every interval of the wall clock, in each partition's task; the first
    /// time one interval after the task starts on the partition. One that
    /// falls due while the task is busy runs as soon as it is free; missed
    /// ones are not made up.
    WallClock(Duration),
    /// Each time the partition's stream time reaches the next multiple of
    /// the interval (counted from the epoch): it follows the events, so it
    /// does not run while none come, and runs once for a jump over several
    /// multiples. Its [`Ctx::event_time`] is the stream time.
    StreamTime(Duration),
}

/// The function of a partition timer.
pub(crate) type PunctuateFn =
    Arc<dyn Fn(Ctx) -> Pin<Box<dyn Future<Output = Result<(), AgentError>> + Send>> + Send + Sync>;

/// A partition timer as a processor of its topic: it takes the topic's
/// events only to follow their time, and runs as the task flushes it.
pub(crate) struct Punctuator {
    topic: Arc<str>,
    when: Punctuation,
    /// Whether the topic's events carry their time in their record
    /// timestamp (no extractor), so this may observe it itself.
    record_time: bool,
    f: PunctuateFn,
    /// Per partition: the next wall-clock time it runs.
    next_wall: Mutex<HashMap<i32, Instant>>,
    /// Per partition: the stream time it next runs at (`None` until the
    /// first event).
    next_stream: Mutex<HashMap<i32, i64>>,
}

impl Punctuator {
    /// A timer of `topic`'s partitions; an interval under a millisecond
    /// counts as one.
    pub(crate) fn new(
        topic: Arc<str>,
        when: Punctuation,
        record_time: bool,
        f: PunctuateFn,
    ) -> Punctuator {
        let at_least = |d: Duration| d.max(Duration::from_millis(1));
        let when = match when {
            Punctuation::WallClock(d) => Punctuation::WallClock(at_least(d)),
            Punctuation::StreamTime(d) => Punctuation::StreamTime(at_least(d)),
        };
        Punctuator {
            topic,
            when,
            record_time,
            f,
            next_wall: Mutex::default(),
            next_stream: Mutex::default(),
        }
    }

    /// Runs the function in `ctx`'s partition with `event_time`.
    fn run(&self, ctx: Context, event_time: Option<i64>) -> ProcessFuture<'_> {
        let ctx = Ctx {
            inner: ctx,
            event_time,
            source: None,
        };
        (self.f)(ctx)
    }
}

/// The first multiple of `step` (ms) after `time`.
fn next_multiple(time: i64, step: i64) -> i64 {
    time.div_euclid(step).saturating_add(1).saturating_mul(step)
}

impl Processor for Punctuator {
    fn topic(&self) -> &str {
        &self.topic
    }

    /// A run that fails is skipped (logged and counted), whatever the
    /// app's policy: it has no event of its own to dead-letter or retry.
    fn error_policy(&self) -> Option<&ErrorPolicy> {
        Some(&ErrorPolicy::Skip)
    }

    fn process(&self, ctx: Context, record: ConsumerRecord) -> ProcessFuture<'_> {
        let Punctuation::StreamTime(every) = self.when else {
            return Box::pin(async { Ok(()) });
        };
        // Agents of the topic observed the event's time already (a
        // partition timer's processor comes after them); without an
        // extractor it is the record's.
        let now = match self.record_time && record.timestamp >= 0 {
            true => Some(ctx.observe_event_time(record.timestamp)),
            false => ctx.stream_time(),
        };
        let Some(now) = now else {
            return Box::pin(async { Ok(()) });
        };
        let step = i64::try_from(every.as_millis()).unwrap_or(i64::MAX).max(1);
        let partition = ctx.partition();
        let due = {
            let mut next = self.next_stream.lock().unwrap_or_else(|e| e.into_inner());
            let at = next
                .entry(partition)
                .or_insert_with(|| next_multiple(now, step));
            if now < *at {
                false
            } else {
                *at = next_multiple(now, step);
                true
            }
        };
        match due {
            true => self.run(ctx, Some(now)),
            false => Box::pin(async { Ok(()) }),
        }
    }

    fn deadline(&self, partition: i32) -> Option<Instant> {
        let Punctuation::WallClock(every) = self.when else {
            return None;
        };
        let mut next = self.next_wall.lock().unwrap_or_else(|e| e.into_inner());
        Some(
            *next
                .entry(partition)
                .or_insert_with(|| Instant::now() + every),
        )
    }

    /// Runs the function if it is due: the task flushes every processor at
    /// a close too, which is not a tick.
    fn flush(&self, ctx: Context) -> ProcessFuture<'_> {
        let Punctuation::WallClock(every) = self.when else {
            return Box::pin(async { Ok(()) });
        };
        let now = Instant::now();
        let due = {
            let mut next = self.next_wall.lock().unwrap_or_else(|e| e.into_inner());
            match next.get_mut(&ctx.partition()) {
                Some(at) if *at <= now => {
                    *at += every;
                    if *at <= now {
                        *at = now + every; // missed ones are not made up
                    }
                    true
                }
                _ => false,
            }
        };
        match due {
            true => self.run(ctx, None),
            false => Box::pin(async { Ok(()) }),
        }
    }

    /// A worker that starts on a partition starts its timer afresh.
    fn reset(&self, partition: i32) {
        (self.next_wall.lock().unwrap_or_else(|e| e.into_inner())).remove(&partition);
        (self.next_stream.lock().unwrap_or_else(|e| e.into_inner())).remove(&partition);
    }
}

#[cfg(test)]
mod tests {
    use super::next_multiple;

    #[test]
    fn the_next_multiple_is_after_the_time() {
        assert_eq!(next_multiple(0, 10), 10);
        assert_eq!(next_multiple(9, 10), 10);
        assert_eq!(next_multiple(10, 10), 20);
        assert_eq!(next_multiple(-1, 10), 0);
        assert_eq!(next_multiple(i64::MAX - 1, 10), i64::MAX);
    }
}
