//! Connection health: process-wide counts of connections made, connection
//! attempts that failed, connections lost and requests that timed out, for
//! `/metrics`; and the bookkeeping that logs each incident once (the first
//! failed attempt at WARN, the recovery at INFO), not once per retry.
//!
//! ```
//! let before = strom_client::health::stats();
//! assert!(strom_client::health::stats().connects >= before.connects);
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tracing::{info, warn};

use crate::error::Error;

static CONNECTS: AtomicU64 = AtomicU64::new(0);
static CONNECT_FAILURES: AtomicU64 = AtomicU64::new(0);
static LOST: AtomicU64 = AtomicU64::new(0);
static REQUEST_TIMEOUTS: AtomicU64 = AtomicU64::new(0);

/// Counts since the process started, over every client in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Connections opened (TCP, TLS and SASL done).
    pub connects: u64,
    /// Attempts to open a connection that failed.
    pub connect_failures: u64,
    /// Open connections that failed (reset, closed by the broker, a write
    /// error), request timeouts not included.
    pub lost: u64,
    /// Requests that got no answer within the request timeout (their
    /// connection is closed too).
    pub request_timeouts: u64,
}

/// The counts so far.
pub fn stats() -> ConnectionStats {
    ConnectionStats {
        connects: CONNECTS.load(Ordering::Relaxed),
        connect_failures: CONNECT_FAILURES.load(Ordering::Relaxed),
        lost: LOST.load(Ordering::Relaxed),
        request_timeouts: REQUEST_TIMEOUTS.load(Ordering::Relaxed),
    }
}

/// An open connection to `broker` ended with `error` while `waiting`
/// requests were in flight: logged at WARN when that loses requests (or a
/// request timed out), at INFO when the connection was idle (brokers close
/// idle connections).
pub(crate) fn connection_ended(broker: &str, error: &Error, waiting: usize) {
    let timed_out = matches!(error, Error::RequestTimeout { .. });
    if timed_out {
        REQUEST_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
    } else {
        LOST.fetch_add(1, Ordering::Relaxed);
    }
    if timed_out || waiting > 0 {
        warn!(%broker, %error, in_flight = waiting, "connection to the broker lost; requests are retried on a new one");
    } else {
        info!(%broker, %error, "idle connection to the broker closed");
    }
}

/// Per broker address, the attempts to connect that failed in a row.
#[derive(Debug, Default)]
pub(crate) struct Incidents {
    failing: Mutex<HashMap<String, u32>>,
}

impl Incidents {
    /// A connection to `broker` opened: the end of an incident, if any.
    pub(crate) fn connected(&self, broker: &str) {
        CONNECTS.fetch_add(1, Ordering::Relaxed);
        let failed = self.lock().remove(broker);
        if let Some(attempts) = failed {
            info!(%broker, failed_attempts = attempts, "connected to the broker again");
        }
    }

    /// An attempt to connect to `broker` failed: logged when it starts an
    /// incident.
    pub(crate) fn failed(&self, broker: &str, error: &Error) {
        CONNECT_FAILURES.fetch_add(1, Ordering::Relaxed);
        let mut failing = self.lock();
        let attempts = failing.entry(broker.to_owned()).or_default();
        *attempts += 1;
        if *attempts == 1 {
            warn!(%broker, %error, "cannot connect to the broker; retrying (logged again when it answers)");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failing.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Log {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A broker that cannot be reached three times in a row, then answers:
    /// one WARN when the incident starts, one INFO when it ends, and every
    /// attempt counted.
    #[test]
    fn an_incident_is_logged_once_and_every_attempt_counted() {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let before = stats();
        tracing::subscriber::with_default(subscriber, || {
            let incidents = Incidents::default();
            let refused = Error::Disconnected {
                broker: "b:9092".into(),
                reason: "connection refused".into(),
            };
            for _ in 0..3 {
                incidents.failed("b:9092", &refused);
            }
            incidents.connected("b:9092");
            connection_ended(
                "b:9092",
                &Error::RequestTimeout {
                    broker: "b:9092".into(),
                    api: kafka_protocol::messages::ApiKey::Fetch,
                    after: std::time::Duration::from_secs(30),
                },
                2,
            );
        });
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text.matches("cannot connect to the broker").count(),
            1,
            "{text}"
        );
        assert!(text.contains("WARN"), "{text}");
        assert!(
            text.contains("connected to the broker again") && text.contains("failed_attempts=3"),
            "{text}"
        );
        assert!(
            text.contains("connection to the broker lost") && text.contains("in_flight=2"),
            "{text}"
        );
        let after = stats();
        // Other tests of this process count too: at least ours.
        assert!(after.connect_failures >= before.connect_failures + 3);
        assert!(after.connects > before.connects);
        assert!(after.request_timeouts > before.request_timeouts);
    }
}
