//! Timers: functions a worker runs on a schedule — every interval or on a cron
//! pattern in a time zone — on every worker, or on the group's leader only.
//!
//! The leader, for timers, is the worker that processes partition number 0:
//! exactly one worker once the group is settled, and when it leaves, the
//! worker that takes partition 0 over runs the leader's timers from then on.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use strom_client::producer::{Producer, ProducerRecord};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::assignor::Placement;
use crate::error::WorkerError;
use crate::processor::AgentError;

/// When a timer fires.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Every interval, the first time one interval after the worker starts.
    Every(Duration),
    /// At the times a cron pattern matches in a time zone.
    Cron {
        /// The parsed pattern.
        cron: Box<croner::Cron>,
        /// Where the pattern's hours and days are counted.
        zone: chrono_tz::Tz,
    },
}

impl Schedule {
    /// A cron schedule: five fields (minute hour day month weekday) or six
    /// with seconds first, in IANA time zone `zone` (e.g. `Europe/Berlin`,
    /// `UTC`).
    ///
    /// ```
    /// use strom_worker::timer::Schedule;
    /// assert!(Schedule::cron("0 * * * *", "Asia/Kolkata").is_ok());
    /// assert!(Schedule::cron("61 * * * *", "UTC").is_err());
    /// assert!(Schedule::cron("0 * * * *", "Mars/Olympus").is_err());
    /// ```
    pub fn cron(pattern: &str, zone: &str) -> Result<Schedule, WorkerError> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(pattern)
            .map_err(|e| WorkerError::Config(format!("cron pattern {pattern:?}: {e}")))?;
        let zone = chrono_tz::Tz::from_str(zone)
            .map_err(|e| WorkerError::Config(format!("time zone {zone:?}: {e}")))?;
        Ok(Schedule::Cron {
            cron: Box::new(cron),
            zone,
        })
    }

    /// For a cron schedule, how long after `now` it next fires.
    pub fn next_after(&self, now: DateTime<Utc>) -> Option<Duration> {
        match self {
            Schedule::Every(every) => Some(*every),
            Schedule::Cron { cron, zone } => {
                let local = now.with_timezone(zone);
                let next = cron.find_next_occurrence(&local, false).ok()?;
                (next.with_timezone(&Utc) - now).to_std().ok()
            }
        }
    }
}

/// Where cron timers read the time of day.
///
/// ```
/// use strom_worker::timer::WallClock;
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let clock = WallClock::Tokio { start: 1_700_000_000_000, at: tokio::time::Instant::now() };
/// assert!(clock.now().timestamp() >= 1_700_000_000);
/// # });
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WallClock {
    /// The system's clock.
    #[default]
    System,
    /// `start` at tokio's instant `at`, moving with tokio's clock: with the
    /// clock paused (the test driver), cron timers follow the virtual time.
    Tokio {
        /// The wall time at `at`, in ms since the epoch.
        start: i64,
        /// The tokio instant of `start`.
        at: tokio::time::Instant,
    },
}

impl WallClock {
    /// The time now.
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            WallClock::System => Utc::now(),
            WallClock::Tokio { start, at } => {
                let elapsed = at.elapsed().as_millis() as i64;
                DateTime::from_timestamp_millis(start.saturating_add(elapsed)).unwrap_or_default()
            }
        }
    }
}

/// The future of one run of a timer.
pub type TimerFuture = Pin<Box<dyn Future<Output = Result<(), AgentError>> + Send>>;

/// A timer's function.
pub type TimerFn = Arc<dyn Fn(TimerContext) -> TimerFuture + Send + Sync>;

/// A function run on a schedule.
#[derive(Clone)]
pub struct Timer {
    /// For logs.
    pub name: String,
    /// When it runs.
    pub schedule: Schedule,
    /// Only on the group's leader (the worker of partition number 0).
    pub on_leader: bool,
    /// What it runs.
    pub run: TimerFn,
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer")
            .field("name", &self.name)
            .field("schedule", &self.schedule)
            .field("on_leader", &self.on_leader)
            .finish()
    }
}

/// How a timer's records go out.
#[derive(Debug, Clone)]
pub(crate) enum Sender {
    /// At least once: the worker's producer.
    Plain(Producer),
    /// Exactly once: in the worker's open transaction.
    Transactional(Arc<crate::eos::Transactions>),
}

/// What a timer's function can do: send records (each acknowledged, or under
/// exactly-once committed, before `send` returns).
#[derive(Debug, Clone)]
pub struct TimerContext {
    sender: Sender,
    leader: bool,
    clock: WallClock,
}

impl TimerContext {
    /// Sends a record and waits for the broker's acknowledgement; under
    /// exactly-once, until the transaction holding it has committed (an
    /// aborted one is an error). Without a timestamp of its own it carries
    /// the time the timer ran (of the worker's [`WallClock`]).
    pub async fn send(&self, mut record: ProducerRecord<'_>) -> Result<(), WorkerError> {
        if record.timestamp.is_none() {
            record.timestamp = Some(self.clock.now().timestamp_millis());
        }
        match &self.sender {
            Sender::Plain(producer) => {
                producer.send(record).await?.await?;
            }
            Sender::Transactional(txn) => txn.send_and_commit(record).await?,
        }
        Ok(())
    }

    /// Whether this worker is the group's leader (for timers) right now.
    pub fn is_leader(&self) -> bool {
        self.leader
    }
}

impl Placement {
    /// Whether this worker leads the group for timers: it processes partition
    /// number 0.
    pub fn is_leader(&self) -> bool {
        self.owner(0).is_some_and(|m| m.member_id == self.me)
    }
}

/// Runs `timer` until the task is aborted.
pub(crate) fn spawn(
    timer: Timer,
    sender: Sender,
    placement: watch::Receiver<Placement>,
    clock: WallClock,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut due = Instant::now();
        loop {
            let now = Instant::now();
            due = match &timer.schedule {
                Schedule::Every(every) => next_on_grid(due, *every, now),
                cron => match cron.next_after(clock.now()) {
                    Some(wait) => now + wait,
                    None => {
                        warn!(timer = %timer.name, "schedule has no next time; the timer stops");
                        return;
                    }
                },
            };
            tokio::time::sleep_until(due).await;
            let leader = placement.borrow().is_leader();
            if timer.on_leader && !leader {
                debug!(timer = %timer.name, "not the leader; skipped");
                continue;
            }
            let ctx = TimerContext {
                sender: sender.clone(),
                leader,
                clock,
            };
            if let Err(e) = (timer.run)(ctx).await {
                warn!(timer = %timer.name, error = %e, "timer failed");
            }
        }
    })
}

/// When an interval timer last due at `last` runs next: one interval
/// later, so runs keep their grid however long each takes; a run that took
/// longer than the interval skips the runs it missed, and runs at the first
/// grid time not already past. An interval under a millisecond counts as
/// one (a zero interval would spin).
fn next_on_grid(last: Instant, every: Duration, now: Instant) -> Instant {
    let every = every.max(Duration::from_millis(1));
    let Some(next) = last.checked_add(every) else {
        return far_future(now);
    };
    if next >= now {
        return next;
    }
    let missed = (now - next).as_nanos().div_ceil(every.as_nanos());
    u32::try_from(missed)
        .ok()
        .and_then(|n| every.checked_mul(n))
        .and_then(|skipped| next.checked_add(skipped))
        .unwrap_or_else(|| far_future(now))
}

/// A time that never comes (about 30 years on), as tokio's own sleeps use.
fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(86_400 * 365 * 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_runs_keep_their_grid_and_skip_what_they_missed() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        assert_eq!(next_on_grid(t, s, t), t + s);
        assert_eq!(next_on_grid(t, s, t + s / 2), t + s, "a short run");
        assert_eq!(next_on_grid(t, s, t + s), t + s, "due now: now");
        assert_eq!(next_on_grid(t, s, t + s * 7 / 2), t + 4 * s, "2 missed");
        assert_eq!(
            next_on_grid(t, s, t + 3 * s),
            t + 3 * s,
            "1 missed, due now"
        );
        let ms = Duration::from_millis(1);
        assert_eq!(next_on_grid(t, Duration::ZERO, t), t + ms, "zero spins");
        assert!(
            next_on_grid(t, Duration::MAX, t) > t + 1_000 * s,
            "no overflow"
        );
    }

    /// A cron pattern counts hours in its own zone: "at minute 0" in India
    /// (UTC+5:30) is at half past in UTC.
    #[test]
    fn cron_fires_at_the_zones_hour() {
        let schedule = Schedule::cron("0 * * * *", "Asia/Kolkata").unwrap();
        let now: DateTime<Utc> = "2026-11-27T04:10:00Z".parse().unwrap();
        assert_eq!(schedule.next_after(now), Some(Duration::from_secs(20 * 60)));
        let utc = Schedule::cron("0 * * * *", "UTC").unwrap();
        assert_eq!(utc.next_after(now), Some(Duration::from_secs(50 * 60)));
        let seconds = Schedule::cron("*/15 * * * * *", "UTC").unwrap();
        let now: DateTime<Utc> = "2026-11-27T04:10:07Z".parse().unwrap();
        assert_eq!(seconds.next_after(now), Some(Duration::from_secs(8)));
    }
}
