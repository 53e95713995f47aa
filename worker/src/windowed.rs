//! Windowed tables in a partition task: which windows an update writes,
//! which close (to be emitted) and which expire (to be deleted) as the
//! partition's stream time moves on. The store layout and the index are
//! strom-state's ([`strom_state::window`]); the writes go through
//! [`Context::update_windows`](crate::Context::update_windows).

use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use strom_state::window::{
    stamp, unstamp, window_key, WindowIndex, WindowKind, Windowing, STREAM_TIME_KEY,
};
use strom_state::{LoggedStore, StateError};

pub use strom_state::window::Window;

use crate::metrics::Counter;

/// What [`Context::update_windows`](crate::Context::update_windows) did.
///
/// Keep it until the closed windows are emitted: at least once, a
/// checkpoint taken meanwhile does not count them as emitted, so a crash
/// before their emission is acknowledged emits them again.
#[derive(Debug)]
pub struct WindowUpdate<R> {
    /// What the update function returned for the event's latest open window
    /// (the one [`Windowing::window_at`] its time gives; of sessions, the
    /// event's session); `None` when every window of the event had closed:
    /// the event was late and dropped.
    pub current: Option<R>,
    /// The windows of any key of this table partition that closed with this
    /// event, in order of end, then key: each is handed out once.
    pub closed: Vec<ClosedWindow>,
    /// Held while `closed` is being emitted.
    pub emitting: Option<Emitting>,
}

/// Counts an update whose closed windows are being emitted, until dropped.
#[derive(Debug)]
pub struct Emitting(Arc<AtomicUsize>);

impl Emitting {
    pub(crate) fn start(count: &Arc<AtomicUsize>) -> Emitting {
        count.fetch_add(1, Ordering::AcqRel);
        Emitting(count.clone())
    }
}

impl Drop for Emitting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A window that closed, with its final value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedWindow {
    /// The table key's bytes.
    pub key: Vec<u8>,
    /// The window.
    pub window: Window,
    /// The value's bytes.
    pub value: Vec<u8>,
}

/// The windowing of one table partition and its index of live windows,
/// built from the store at first use.
///
/// Which windows had closed before a restart is known from the store
/// ([`strom_state::window`] explains how): under exactly-once from the
/// stamps, which commit with what closing windows sent; under at-least-once
/// from the stream-time entry written at each checkpoint, once what was
/// sent before it is acknowledged.
#[derive(Debug)]
pub(crate) struct Windowed {
    pub windowing: Windowing,
    index: Option<WindowIndex>,
    pub late: Counter,
    /// Exactly-once: writes commit with the sends of the same event.
    exactly_once: bool,
    /// At least once: the stream time the stream-time entry last got.
    marked: Option<i64>,
}

/// A change to a windowed table's store.
pub(crate) type Change = (Vec<u8>, Option<Vec<u8>>);

/// The writes of an update ([`Windowed::plan`]).
#[derive(Debug)]
pub(crate) struct Plan<R> {
    /// Each open window of the event, with its stamped new value.
    pub writes: Vec<(Window, Change)>,
    /// Sessions merged into the written one: gone from the index.
    pub merged: Vec<Window>,
    /// The deletes of the merged sessions' entries (those whose key the
    /// written one does not take over).
    pub deletes: Vec<Change>,
    /// What the update function returned for the latest of them.
    pub current: Option<R>,
}

impl<R> Plan<R> {
    /// The plan of a late event: nothing to write.
    fn late() -> Self {
        Plan {
            writes: Vec::new(),
            merged: Vec::new(),
            deletes: Vec::new(),
            current: None,
        }
    }
}

/// Why an update could not be planned.
#[derive(Debug)]
pub(crate) enum PlanError<E> {
    /// The store failed, or holds a value too short to be stamped (a codec
    /// error: damaged state).
    Store(StateError),
    /// The update function failed.
    Update(E),
}

impl Windowed {
    pub fn new(windowing: Windowing, late: Counter, exactly_once: bool) -> Windowed {
        Windowed {
            windowing,
            index: None,
            late,
            exactly_once,
            marked: None,
        }
    }

    /// Builds the index from `store` unless it is built: returns the stream
    /// time the store had seen when it was (a codec error: damaged state).
    pub fn open(&mut self, store: &LoggedStore) -> Result<Option<i64>, StateError> {
        if self.index.is_some() {
            return Ok(None);
        }
        let entries = store.range(Bound::Unbounded, Bound::Unbounded)?;
        let (mut index, stream_time) = WindowIndex::rebuild(entries, &self.windowing)?;
        if !self.exactly_once {
            self.marked = match store.get(STREAM_TIME_KEY)? {
                Some(stored) => Some(unstamp(&stored)?.0),
                None => None,
            };
            index.reopen(self.marked);
        }
        self.index = Some(index);
        Ok(stream_time)
    }

    /// At least once, at a checkpoint once everything sent before is
    /// acknowledged: the write that records the stream time through which
    /// windows were handed out (and what their closing sent acknowledged),
    /// if it moved on since the last one.
    /// The windows the new mark lets expire are deleted with it, so the
    /// last ones go without waiting for another event.
    pub fn checkpoint(&mut self) -> Vec<Change> {
        let Some(t) = self.index.as_ref().and_then(WindowIndex::closed_through) else {
            return Vec::new();
        };
        if self.exactly_once || self.marked >= Some(t) {
            return Vec::new();
        }
        self.marked = Some(t);
        let mut changes = self.expire(t);
        changes.push((STREAM_TIME_KEY.to_vec(), Some(stamp(t, &[]))));
        changes
    }

    /// The deletes of the windows that expire at `stream_time`. At least
    /// once, a window is deleted only once its emission is known to be
    /// acknowledged (it closed by the last mark): else its tombstone could
    /// reach the changelog before the emission, and a crash would lose the
    /// window.
    fn expire(&mut self, stream_time: i64) -> Vec<Change> {
        let Some(index) = &mut self.index else {
            return Vec::new();
        };
        let expire_at = match (self.exactly_once, self.marked) {
            (true, _) => stream_time,
            (false, Some(marked)) => stream_time.min(
                marked
                    .saturating_sub(self.windowing.close_delay())
                    .saturating_add(self.windowing.retention()),
            ),
            (false, None) => i64::MIN,
        };
        index
            .expire(&self.windowing, expire_at)
            .into_iter()
            .map(|(key, window)| (window_key(&key, window.start), None))
            .collect()
    }

    /// Forgets the index (the writes it reflects were discarded): the next
    /// use builds it from the store again.
    pub fn forget(&mut self) {
        self.index = None;
    }

    /// The writes of an update of `key` by an event of time `event_time`
    /// at `stream_time`: `f` of each open window's old value, stamped.
    /// Nothing when the event is late. Of sessions: the open sessions the
    /// event falls in or near are merged (`merge` of their values, in time
    /// order) into one, which gets `f` of the merged value.
    pub fn plan<R, E>(
        &self,
        store: &LoggedStore,
        key: &[u8],
        event_time: i64,
        stream_time: i64,
        mut f: impl FnMut(Option<&[u8]>) -> Result<(Vec<u8>, R), E>,
        merge: impl FnMut(&[u8], &[u8]) -> Result<Vec<u8>, E>,
    ) -> Result<Plan<R>, PlanError<E>> {
        if self.windowing.is_session() {
            return self.plan_session(store, key, event_time, stream_time, f, merge);
        }
        if let Some(difference) = self.windowing.sliding_difference() {
            let at = (event_time, stream_time);
            return self.plan_sliding(store, key, difference, at, f);
        }
        let mut writes = Vec::new();
        let mut current = None;
        for window in self.windowing.windows_of(event_time) {
            if self.windowing.is_closed(window, Some(stream_time)) {
                continue;
            }
            let store_key = window_key(key, window.start);
            let old = store.get(&store_key).map_err(PlanError::Store)?;
            let old = match &old {
                Some(stored) => Some(unstamp(stored).map_err(PlanError::Store)?.1),
                None => None,
            };
            let (new, r) = f(old).map_err(PlanError::Update)?;
            writes.push((window, (store_key, Some(stamp(stream_time, &new)))));
            current = Some(r);
        }
        Ok(Plan {
            writes,
            merged: Vec::new(),
            deletes: Vec::new(),
            current,
        })
    }

    /// [`Windowed::plan`] of a session table. Closed sessions are final: an
    /// event within one is late, and one near one only is in a session of
    /// its own.
    fn plan_session<R, E>(
        &self,
        store: &LoggedStore,
        key: &[u8],
        event_time: i64,
        stream_time: i64,
        mut f: impl FnMut(Option<&[u8]>) -> Result<(Vec<u8>, R), E>,
        mut merge: impl FnMut(&[u8], &[u8]) -> Result<Vec<u8>, E>,
    ) -> Result<Plan<R>, PlanError<E>> {
        let windowing = &self.windowing;
        let mut session = Window {
            start: event_time,
            end: event_time.saturating_add(1),
        };
        let mut merged = Vec::new();
        let mut value: Option<Vec<u8>> = None;
        let sessions = windows_of_key(store, windowing, key).map_err(PlanError::Store)?;
        for (old, stored) in sessions {
            if windowing.is_closed(old, Some(stream_time)) {
                if old.start <= event_time && event_time < old.end {
                    // Handed out already: no session may take its place.
                    return Ok(Plan::late());
                }
                continue;
            }
            if !windowing.merges(old, event_time) {
                continue;
            }
            session.start = session.start.min(old.start);
            session.end = session.end.max(old.end);
            value = Some(match value {
                None => stored,
                Some(acc) => merge(&acc, &stored).map_err(PlanError::Update)?,
            });
            merged.push(old);
        }
        if windowing.is_closed(session, Some(stream_time)) {
            return Ok(Plan::late());
        }
        let (new, r) = f(value.as_deref()).map_err(PlanError::Update)?;
        let deletes = merged
            .iter()
            .filter(|old| old.start != session.start)
            .map(|old| (window_key(key, old.start), None))
            .collect();
        let stored = stamp(stream_time, &windowing.entry_value(session, 0, &new));
        Ok(Plan {
            writes: vec![(session, (window_key(key, session.start), Some(stored)))],
            merged,
            deletes,
            current: Some(r),
        })
    }

    /// [`Windowed::plan`] of a sliding table (Kafka Streams' sliding
    /// aggregation): every open window that holds the event gets `f` of its
    /// value; the event's own window (ending at it) is made if it is
    /// missing, from the window that holds exactly the events before it
    /// within the difference; and the windows starting just after the
    /// previous event and just after this one are made where events fall
    /// in them. `at` is (event time, stream time).
    fn plan_sliding<R, E>(
        &self,
        store: &LoggedStore,
        key: &[u8],
        difference: i64,
        (t, stream_time): (i64, i64),
        mut f: impl FnMut(Option<&[u8]>) -> Result<(Vec<u8>, R), E>,
    ) -> Result<Plan<R>, PlanError<E>> {
        let windowing = &self.windowing;
        let is_open = |w: Window| !windowing.is_closed(w, Some(stream_time));
        let own = windowing.window_at(t);
        let next = windowing.window_at(t.saturating_add(1).saturating_add(difference));
        // The latest window the event can be in starts at it.
        if !is_open(windowing.window_at(t.saturating_add(difference))) {
            return Ok(Plan::late());
        }
        let from = t.saturating_sub(difference.saturating_mul(2));
        let nearby =
            windows_between(store, windowing, key, from, next.start).map_err(PlanError::Store)?;
        let mut writes = Vec::new();
        let mut write = |window: Window, latest: i64, value: &[u8]| {
            let stored = stamp(stream_time, &windowing.entry_value(window, latest, value));
            writes.push((window, (window_key(key, window.start), Some(stored))));
        };
        // The latest-starting window wholly before the event (its value and
        // latest event), the latest event before it, whether the windows
        // ending at it and starting just after it exist, and the
        // latest-starting window that holds it (its old value and latest
        // event).
        let mut before: Option<(&[u8], i64)> = None;
        let mut previous = None;
        let (mut own_exists, mut next_exists) = (false, false);
        let mut after: Option<(&[u8], i64)> = None;
        let (mut own_r, mut other_r) = (None, None);
        for (window, latest, value) in &nearby {
            let (window, latest) = (*window, *latest);
            if window.end.saturating_sub(1) < t {
                before = Some((value, latest));
                previous = Some(latest);
                continue;
            }
            if window.start > t {
                next_exists |= window == next;
                continue;
            }
            if window == own {
                own_exists = true;
                previous = previous.max(Some(latest).filter(|&l| l < t));
            }
            after = Some((value, latest));
            if is_open(window) {
                let (new, r) = f(Some(value)).map_err(PlanError::Update)?;
                if window == own {
                    own_r = Some(r);
                } else if other_r.is_none() {
                    other_r = Some(r);
                }
                write(window, latest.max(t), &new);
            }
        }
        // The previous event's window after it, now that this one falls in
        // it (starting where this one's starts, it is this one's).
        if let Some(p) = previous {
            let window = windowing.window_at(p.saturating_add(1).saturating_add(difference));
            let exists = nearby.iter().any(|(w, _, _)| *w == window);
            if window.start > own.start && !exists && is_open(window) {
                let (new, r) = f(None).map_err(PlanError::Update)?;
                other_r = other_r.or(Some(r));
                write(window, t, &new);
            }
        }
        // The event's own window: the events before it within the
        // difference are those of the window wholly before it, if its
        // latest event is among them.
        if !own_exists && is_open(own) {
            let old = before.filter(|(_, latest)| *latest >= own.start);
            let (new, r) = f(old.map(|(v, _)| v)).map_err(PlanError::Update)?;
            own_r = Some(r);
            write(own, t, &new);
        }
        // The window just after the event holds what the latest window
        // holding it holds after it, if anything.
        if let Some((value, latest)) = after.filter(|(_, latest)| *latest > t) {
            if !next_exists {
                write(next, latest, value);
            }
        }
        Ok(Plan {
            writes,
            merged: Vec::new(),
            deletes: Vec::new(),
            current: own_r.or(other_r),
        })
    }

    /// Notes that `key` has an entry for `window` (written by a plan).
    pub fn written(&mut self, key: &[u8], window: Window) {
        if let Some(index) = &mut self.index {
            index.insert(key, window);
        }
    }

    /// Notes that `key`'s session `window` merged into another (a plan's).
    pub fn merged(&mut self, key: &[u8], window: Window) {
        if let Some(index) = &mut self.index {
            index.remove(key, window);
        }
    }

    /// The windows that close at `stream_time` with their values, and the
    /// deletes of those that expire; plus, under exactly-once when either
    /// happened, the write that records `stream_time` for a restart.
    pub fn close(
        &mut self,
        store: &LoggedStore,
        stream_time: i64,
    ) -> Result<(Vec<ClosedWindow>, Vec<Change>), StateError> {
        let Some(index) = &mut self.index else {
            return Ok((Vec::new(), Vec::new()));
        };
        let mut closed = Vec::new();
        for (key, window) in index.close(&self.windowing, stream_time) {
            // An entry the index has is in the store (or pending): one that
            // is not would be a window lost unsent, so damaged state.
            let Some(stored) = store.get(&window_key(&key, window.start))? else {
                return Err(StateError::Codec {
                    what: format!(
                        "window [{}, {}) of key {:?} closed but is not in the store",
                        window.start,
                        window.end,
                        String::from_utf8_lossy(&key)
                    ),
                });
            };
            let value = self.windowing.entry(window.start, unstamp(&stored)?.1)?.1;
            let value = value.to_vec();
            closed.push(ClosedWindow { key, window, value });
        }
        let mut changes = self.expire(stream_time);
        if self.exactly_once && (!closed.is_empty() || !changes.is_empty()) {
            changes.push((STREAM_TIME_KEY.to_vec(), Some(stamp(stream_time, &[]))));
        }
        Ok((closed, changes))
    }
}

/// The value of `key` at `time` (see
/// [`Context::value_at`](crate::Context::value_at)).
pub(crate) fn value_at(
    store: &LoggedStore,
    windowing: &Windowing,
    key: &[u8],
    time: i64,
) -> Result<Option<Vec<u8>>, StateError> {
    // The windows that may be the one: of sliding windows, those ending by
    // `time` with an event within the difference before it (so starting no
    // earlier than twice that); of sessions, those starting by `time`.
    let (from, to) = match windowing.kind() {
        WindowKind::Sliding { difference } => (
            time.saturating_sub(difference.saturating_mul(2)),
            time.saturating_sub(difference),
        ),
        WindowKind::Session { .. } => (i64::MIN, time),
        _ => {
            let window = windowing.window_at(time);
            let Some(stored) = store.get(&window_key(key, window.start))? else {
                return Ok(None);
            };
            let value = windowing.entry(window.start, unstamp(&stored)?.1)?.1;
            return Ok(Some(value.to_vec()));
        }
    };
    let mut windows = windows_between(store, windowing, key, from, to)?;
    let spans: Vec<(Window, i64)> = windows.iter().map(|(w, l, _)| (*w, *l)).collect();
    Ok(windowing
        .holding(&spans, time)
        .map(|i| windows.swap_remove(i).2))
}

/// The live windows of `key` in `store` with their values, in time order.
pub(crate) fn windows_of_key(
    store: &LoggedStore,
    windowing: &Windowing,
    key: &[u8],
) -> Result<Vec<(Window, Vec<u8>)>, StateError> {
    let windows = windows_between(store, windowing, key, i64::MIN, i64::MAX)?;
    Ok(windows.into_iter().map(|(w, _, v)| (w, v)).collect())
}

/// The live windows of `key` in `store` that start between `from` and `to`
/// (both included), in time order, with (of sliding windows; else 0) the
/// time of their latest event and their values.
fn windows_between(
    store: &LoggedStore,
    windowing: &Windowing,
    key: &[u8],
    from: i64,
    to: i64,
) -> Result<Vec<(Window, i64, Vec<u8>)>, StateError> {
    let (from, to) = (window_key(key, from), window_key(key, to));
    let mut windows = Vec::new();
    for (store_key, stored) in store.range(Bound::Included(&from), Bound::Included(&to))? {
        // Keys of other lengths sort in between: keep this key's only.
        match strom_state::window::split_window_key(&store_key) {
            Some((k, start)) if k == key => {
                let (window, latest, value) =
                    windowing.entry_with_latest(start, unstamp(&stored)?.1)?;
                windows.push((window, latest.unwrap_or(0), value.to_vec()));
            }
            _ => {}
        }
    }
    Ok(windows)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use strom_client::mock::{Action, ApiKey, MockCluster};
    use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
    use strom_state::{Durability, MemoryStore, Store};

    use super::*;
    use crate::{Context, Metrics};

    const MIN: i64 = 60_000;

    /// A context of partition 0 with windowed table "counts" over `store`.
    async fn context(
        cluster: &MockCluster,
        store: Arc<MemoryStore>,
        windowing: Windowing,
        exactly_once: bool,
    ) -> (Context, Metrics) {
        let client = strom_client::Client::connect(cluster.client_config())
            .await
            .unwrap();
        let producer = Producer::new(client, ProducerConfig::default()).unwrap();
        let logged = LoggedStore::new(store, producer.clone(), "counts-changelog", 0);
        let tables = BTreeMap::from([("counts".to_owned(), (logged, Some(windowing)))]);
        let metrics = Metrics::default();
        let ctx = Context::new(
            0,
            1,
            tables,
            Arc::default(),
            producer,
            metrics.clone(),
            exactly_once,
        );
        (ctx, metrics)
    }

    /// Adds one to `key`'s windows at `t`: (current count, closed windows
    /// as (key, start, count)).
    async fn count(ctx: &Context, key: &str, t: i64) -> (Option<u64>, Vec<(String, i64, u64)>) {
        ctx.observe_event_time(t);
        let update = ctx
            .update_windows(
                "counts",
                key.as_bytes(),
                t,
                |old| {
                    let n = old.map_or(0, number) + 1;
                    Ok::<_, ()>((n.to_be_bytes().to_vec(), n))
                },
                |a, b| Ok((number(a) + number(b)).to_be_bytes().to_vec()),
            )
            .await
            .unwrap()
            .unwrap();
        let closed = update
            .closed
            .into_iter()
            .map(|c| {
                let n = u64::from_be_bytes(c.value.as_slice().try_into().unwrap());
                (String::from_utf8(c.key).unwrap(), c.window.start, n)
            })
            .collect();
        (update.current, closed)
    }

    /// An event of key "b" at 130 s that closes "a"'s window [0, 60 s) of
    /// a one-minute tumbling table: the update, its emission under way.
    async fn close_a_window(ctx: &Context) -> WindowUpdate<()> {
        ctx.observe_event_time(130_000);
        let held = ctx
            .update_windows(
                "counts",
                b"b",
                130_000,
                |_| Ok::<_, ()>((1u64.to_be_bytes().to_vec(), ())),
                |_, _| Err(()),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(held.closed.len(), 1, "a's [0, 60s) closed");
        held
    }

    fn number(bytes: &[u8]) -> u64 {
        u64::from_be_bytes(bytes.try_into().unwrap())
    }

    fn late_events(metrics: &Metrics) -> u64 {
        let text = metrics.render();
        text.lines()
            .find(|l| l.starts_with("strom_late_events_total{table=\"counts\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Counts per window; windows close once at end + grace, in order; a
    /// late event is dropped and counted; retention deletes old windows.
    #[tokio::test]
    async fn windows_count_close_once_and_expire() {
        let cluster = MockCluster::new();
        cluster.create_topic("counts-changelog", 1);
        let tumbling = Windowing::tumbling(Duration::from_secs(60))
            .grace(Duration::from_secs(10))
            .expires(Duration::from_secs(120));
        let store = Arc::new(MemoryStore::new());
        let (ctx, metrics) = context(&cluster, store.clone(), tumbling, true).await;

        assert_eq!(count(&ctx, "b", 1_000).await, (Some(1), vec![]));
        assert_eq!(count(&ctx, "a", 2_000).await, (Some(1), vec![]));
        assert_eq!(count(&ctx, "a", 61_000).await, (Some(1), vec![]));
        // Within grace: [0, 60s) is still open.
        assert_eq!(count(&ctx, "a", 5_000).await, (Some(2), vec![]));
        // 70s closes [0, 60s) for both keys, in key order.
        let (current, closed) = count(&ctx, "c", 70_000).await;
        assert_eq!(current, Some(1));
        assert_eq!(closed, [("a".into(), 0, 2), ("b".into(), 0, 1)]);
        // Late: dropped, counted, nothing closes twice.
        assert_eq!(count(&ctx, "a", 59_999).await, (None, vec![]));
        assert_eq!(late_events(&metrics), 1);
        let windows = ctx.windows("counts", b"a").await.unwrap().unwrap();
        let starts: Vec<i64> = windows.iter().map(|(w, _)| w.start).collect();
        assert_eq!(starts, [0, MIN], "a's windows, in time order");

        // 180s: [0, 60s) ended 120s before: deleted, tombstoned.
        let (_, closed) = count(&ctx, "a", 180_000).await;
        assert_eq!(closed, [("a".into(), MIN, 1), ("c".into(), MIN, 1)]);
        let windows = ctx.windows("counts", b"a").await.unwrap().unwrap();
        let starts: Vec<i64> = windows.iter().map(|(w, _)| w.start).collect();
        assert_eq!(starts, [MIN, 3 * MIN]);
        ctx.checkpoint(Durability::Fast).await.unwrap();
        let changelog = cluster.records("counts-changelog", 0);
        let tombstones: Vec<_> = changelog
            .iter()
            .filter(|r| r.value.is_none())
            .map(|r| r.key.clone().unwrap().to_vec())
            .collect();
        assert_eq!(
            tombstones,
            [window_key(b"a", 0), window_key(b"b", 0)],
            "the expired windows are tombstoned"
        );
        assert!(store.get(&window_key(b"b", 0)).unwrap().is_none());
        assert!(store.get(STREAM_TIME_KEY).unwrap().is_some());
    }

    /// A task that starts again over the store knows what had closed,
    /// even when a late event closed it (no window written then).
    #[tokio::test]
    async fn a_new_task_knows_what_had_closed() {
        for exactly_once in [true, false] {
            let cluster = MockCluster::new();
            cluster.create_topic("counts-changelog", 1);
            let tumbling = Windowing::tumbling(Duration::from_secs(60));
            let store = Arc::new(MemoryStore::new());
            let (ctx, _) = context(&cluster, store.clone(), tumbling, exactly_once).await;
            count(&ctx, "a", 1_000).await;
            let (_, closed) = count(&ctx, "b", 61_000).await;
            assert_eq!(closed, [("a".into(), 0, 1)]);
            // Stream time moves on without this table (another agent's event).
            ctx.observe_event_time(200_000);
            let (current, closed) = count(&ctx, "a", 2_000).await;
            assert_eq!(current, None, "late");
            assert_eq!(closed, [("b".into(), MIN, 1)]);
            ctx.checkpoint(Durability::Fast).await.unwrap();
            drop(ctx);

            let (ctx, _) = context(&cluster, store, tumbling, exactly_once).await;
            let (current, closed) = count(&ctx, "b", 250_000).await;
            assert_eq!(current, Some(1));
            assert_eq!(closed, [], "nothing closes twice after a restart");
            assert_eq!(ctx.stream_time(), Some(250_000));
        }
    }

    /// At least once, a task that crashed after its changelog writes but
    /// before a checkpoint (so before what the closing sent is known to be
    /// acknowledged) closes those windows again: emitted twice, not lost.
    #[tokio::test]
    async fn at_least_once_a_crash_closes_again() {
        let cluster = MockCluster::new();
        cluster.create_topic("counts-changelog", 1);
        let tumbling = Windowing::tumbling(Duration::from_secs(60));
        let (ctx, _) = context(&cluster, Arc::new(MemoryStore::new()), tumbling, false).await;
        count(&ctx, "a", 1_000).await;
        ctx.checkpoint(Durability::Fast).await.unwrap();
        let (_, closed) = count(&ctx, "b", 61_000).await;
        assert_eq!(closed, [("a".into(), 0, 1)]);
        // The changelog has b's window, stamped 61 s; then the crash.
        ctx.table("counts")
            .await
            .unwrap()
            .flush(Durability::Fast)
            .await
            .unwrap();
        drop(ctx);
        let client = strom_client::Client::connect(cluster.client_config())
            .await
            .unwrap();
        let restored = Arc::new(MemoryStore::new());
        strom_state::recover(&client, restored.clone(), "counts-changelog", 0)
            .await
            .unwrap();
        assert!(restored.get(&window_key(b"b", MIN)).unwrap().is_some());
        let (ctx, _) = context(&cluster, restored, tumbling, false).await;
        let (_, closed) = count(&ctx, "b", 62_000).await;
        assert_eq!(closed, [("a".into(), 0, 1)], "closes again");
        assert_eq!(ctx.stream_time(), Some(62_000));
    }

    /// At least once, closed windows are marked as emitted only once no
    /// update's emission is under way, and deleted only once marked (so
    /// their tombstones cannot reach the changelog before their emission).
    #[tokio::test]
    async fn at_least_once_marks_and_expires_only_what_was_emitted() {
        let cluster = MockCluster::new();
        cluster.create_topic("counts-changelog", 1);
        let short = Windowing::tumbling(Duration::from_secs(60)).expires(Duration::from_secs(60));
        let store = Arc::new(MemoryStore::new());
        let (ctx, _) = context(&cluster, store.clone(), short, false).await;
        count(&ctx, "a", 1_000).await;
        let held = close_a_window(&ctx).await;
        let a_windows = || async { ctx.windows("counts", b"a").await.unwrap().unwrap().len() };
        assert_eq!(a_windows().await, 1, "not deleted before it is marked");
        ctx.checkpoint(Durability::Fast).await.unwrap();
        assert!(
            store.get(STREAM_TIME_KEY).unwrap().is_none(),
            "marked while its emission was under way"
        );
        drop(held);
        ctx.checkpoint(Durability::Fast).await.unwrap();
        let (marked, _) = unstamp(&store.get(STREAM_TIME_KEY).unwrap().unwrap())
            .map(|(t, v)| (t, v.to_vec()))
            .unwrap();
        assert_eq!(marked, 130_000);
        assert_eq!(a_windows().await, 0, "deleted with the mark");
    }

    /// An emission that ends while a checkpoint waits for the deliveries it
    /// took, and whose last record was sent after it took them, is not
    /// marked as emitted by that checkpoint: the record may still fail.
    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_does_not_mark_an_emission_whose_sends_it_did_not_wait_for() {
        let cluster = MockCluster::new();
        cluster.create_topic("counts-changelog", 1);
        cluster.create_topic("out", 1);
        let short = Windowing::tumbling(Duration::from_secs(60)).expires(Duration::from_secs(60));
        let store = Arc::new(MemoryStore::new());
        let (ctx, _) = context(&cluster, store.clone(), short, false).await;
        count(&ctx, "a", 1_000).await;
        // Records to "out" are acknowledged only after 10 s.
        cluster.set_hook(|call| {
            let out = call.partitions.iter().any(|tp| &*tp.topic == "out");
            if call.api == ApiKey::Produce && out {
                Action::Delay(Duration::from_secs(10))
            } else {
                Action::Answer
            }
        });
        let held = close_a_window(&ctx).await;
        // The emission sends its first record; a checkpoint starts and waits
        // for it; the emission sends its last record and ends.
        ctx.send(ProducerRecord::to("out").value(b"1"))
            .await
            .unwrap();
        let checkpoint = tokio::spawn({
            let ctx = ctx.clone();
            async move { ctx.checkpoint(Durability::Fast).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!checkpoint.is_finished(), "the checkpoint did not wait");
        ctx.send(ProducerRecord::to("out").value(b"2"))
            .await
            .unwrap();
        drop(held);
        checkpoint.await.unwrap().unwrap();
        assert!(
            store.get(STREAM_TIME_KEY).unwrap().is_none(),
            "marked emitted before its last record was acknowledged"
        );
        ctx.checkpoint(Durability::Fast).await.unwrap();
        assert!(store.get(STREAM_TIME_KEY).unwrap().is_some());
        assert_eq!(cluster.records("out", 0).len(), 2);
    }

    /// After an aborted transaction the windows close again, from the
    /// committed state and stream time.
    #[tokio::test]
    async fn an_abort_closes_again() {
        let cluster = MockCluster::new();
        cluster.create_topic("counts-changelog", 1);
        let hopping = Windowing::hopping(Duration::from_secs(60), Duration::from_secs(30));
        let store = Arc::new(MemoryStore::new());
        let (ctx, _) = context(&cluster, store, hopping, true).await;
        assert_eq!(count(&ctx, "a", 40_000).await, (Some(1), vec![]));
        ctx.checkpoint(Durability::Fast).await.unwrap();
        let (_, closed) = count(&ctx, "a", 70_000).await;
        assert_eq!(closed, [("a".into(), 0, 1)]);
        assert_eq!(ctx.stream_time(), Some(70_000));
        ctx.discard().await;
        assert_eq!(ctx.stream_time(), Some(40_000));
        let (current, closed) = count(&ctx, "a", 70_000).await;
        assert_eq!(current, Some(1), "[60s, 120s) after the abort");
        assert_eq!(
            closed,
            [("a".into(), 0, 1)],
            "closes again, with its committed value"
        );
        let windows = ctx.windows("counts", b"a").await.unwrap().unwrap();
        let counts: Vec<(i64, Vec<u8>)> = windows.into_iter().map(|(w, v)| (w.start, v)).collect();
        assert_eq!(
            counts,
            [
                (0, 1u64.to_be_bytes().to_vec()),
                (30_000, 2u64.to_be_bytes().to_vec()),
                (60_000, 1u64.to_be_bytes().to_vec())
            ]
        );
    }

    /// Sessions: an event within the gap extends a session, one between two
    /// merges them (values merged, the later entry deleted); a session
    /// closes gap + grace after its last event, and is final after that.
    #[tokio::test]
    async fn sessions_extend_merge_and_close() {
        let cluster = MockCluster::new();
        cluster.create_topic("counts-changelog", 1);
        let sessions = Windowing::session(Duration::from_secs(10)).grace(Duration::from_secs(20));
        let store = Arc::new(MemoryStore::new());
        let (ctx, metrics) = context(&cluster, store.clone(), sessions, true).await;
        let spans = |ctx: &Context| {
            let ctx = ctx.clone();
            async move {
                let windows = ctx.windows("counts", b"a").await.unwrap().unwrap();
                windows
                    .into_iter()
                    .map(|(w, v)| (w.start, w.end, number(&v)))
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(count(&ctx, "a", 1_000).await, (Some(1), vec![]));
        assert_eq!(
            count(&ctx, "a", 11_000).await,
            (Some(2), vec![]),
            "gap apart: extends"
        );
        assert_eq!(
            count(&ctx, "a", 30_000).await,
            (Some(1), vec![]),
            "a new session"
        );
        assert_eq!(spans(&ctx).await, [(1_000, 11_001, 2), (30_000, 30_001, 1)]);
        // Out of order, within the gap of both: one session of four.
        assert_eq!(count(&ctx, "a", 20_500).await, (Some(4), vec![]));
        assert_eq!(spans(&ctx).await, [(1_000, 30_001, 4)]);
        // A read at a time gets the session holding it, if any.
        for (t, want) in [
            (999, None),
            (1_000, Some(4)),
            (30_000, Some(4)),
            (30_001, None),
        ] {
            let got = ctx.value_at("counts", b"a", t).await.unwrap();
            assert_eq!(got.map(|v| number(&v)), want, "at {t}");
        }
        let tombstones: Vec<_> = {
            ctx.checkpoint(Durability::Fast).await.unwrap();
            cluster
                .records("counts-changelog", 0)
                .iter()
                .filter(|r| r.value.is_none())
                .map(|r| r.key.clone().unwrap().to_vec())
                .collect()
        };
        assert_eq!(
            tombstones,
            [window_key(b"a", 30_000)],
            "the later session's entry"
        );
        // The last event was at 30 s: closes past 30 + 10 + 20 s.
        assert_eq!(count(&ctx, "b", 60_000).await, (Some(1), vec![]));
        let (_, closed) = count(&ctx, "b", 60_001).await;
        assert_eq!(closed, [("a".into(), 1_000, 4)]);
        // Within the closed session: late, however it would merge.
        assert_eq!(count(&ctx, "a", 1_000).await, (None, vec![]));
        // Within a's gap but a is final: a session of its own, open since
        // its own close (32 + 10 + 20 s) is still ahead.
        assert_eq!(count(&ctx, "a", 32_000).await, (Some(1), vec![]));
        assert_eq!(spans(&ctx).await, [(1_000, 30_001, 4), (32_000, 32_001, 1)]);
        // Late: its session would have closed at 12 + 10 + 20 s.
        assert_eq!(count(&ctx, "c", 12_000).await, (None, vec![]));
        assert_eq!(late_events(&metrics), 2);

        // A task over the same store rebuilds the sessions with their ends.
        ctx.checkpoint(Durability::Fast).await.unwrap();
        drop(ctx);
        let (ctx, _) = context(&cluster, store, sessions, true).await;
        let (_, closed) = count(&ctx, "b", 90_002).await;
        assert_eq!(closed, [("a".into(), 32_000, 1), ("b".into(), 60_000, 2)]);
    }

    /// However short the retention, a session is kept until it closes: it
    /// is emitted, and an event within its gap still joins it.
    #[tokio::test]
    async fn a_session_outlives_a_short_retention_until_it_closes() {
        for exactly_once in [true, false] {
            let cluster = MockCluster::new();
            cluster.create_topic("counts-changelog", 1);
            let sessions = Windowing::session(Duration::from_secs(10)).expires(Duration::ZERO);
            let store = Arc::new(MemoryStore::new());
            let (ctx, _) = context(&cluster, store, sessions, exactly_once).await;
            count(&ctx, "a", 1_000).await;
            count(&ctx, "b", 5_000).await;
            assert_eq!(count(&ctx, "a", 8_000).await, (Some(2), vec![]), "joins");
            let (_, closed) = count(&ctx, "b", 30_000).await;
            assert_eq!(closed, [("b".into(), 5_000, 1), ("a".into(), 1_000, 2)]);
        }
    }

    /// An event within a closed session is late even when it would join an
    /// open one: the merged session would take the closed one's key, and
    /// the closed one's expiry would then delete it unsent.
    #[tokio::test]
    async fn an_event_within_a_closed_session_is_late() {
        const MINUTE: i64 = 60_000;
        let cluster = MockCluster::new();
        cluster.create_topic("counts-changelog", 1);
        let sessions = Windowing::session(Duration::from_secs(30 * 60));
        let store = Arc::new(MemoryStore::new());
        let (ctx, metrics) = context(&cluster, store, sessions, true).await;
        count(&ctx, "a", 0).await;
        let (_, closed) = count(&ctx, "x", 32 * MINUTE).await;
        assert_eq!(closed, [("a".into(), 0, 1)]);
        count(&ctx, "a", 29 * MINUTE).await;
        count(&ctx, "a", 31 * MINUTE).await;
        assert_eq!(count(&ctx, "a", 0).await, (None, vec![]));
        assert_eq!(late_events(&metrics), 1);
        // Past the retention of [0, 1 ms) and the close of [29, 31 min].
        let (_, closed) = count(&ctx, "x", 62 * MINUTE).await;
        assert_eq!(closed, [("a".into(), 29 * MINUTE, 2)], "sent once, whole");
    }

    /// Sliding windows, by hand: each event has the window ending at it,
    /// the one after the previous event is made when an event falls in it,
    /// and an out-of-order event updates what holds it and takes its first
    /// value from the window before it (Kafka Streams' SlidingWindows).
    #[tokio::test]
    async fn sliding_windows_hold_each_distinct_set_of_events() {
        let cluster = MockCluster::new();
        cluster.create_topic("counts-changelog", 1);
        let sliding = Windowing::sliding(Duration::from_millis(10)).grace(Duration::from_millis(5));
        let (ctx, metrics) = context(&cluster, Arc::new(MemoryStore::new()), sliding, true).await;
        let spans = |ctx: &Context| {
            let ctx = ctx.clone();
            async move {
                let windows = ctx.windows("counts", b"a").await.unwrap().unwrap();
                windows
                    .into_iter()
                    .map(|(w, v)| (w.start, w.end - 1, number(&v)))
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(count(&ctx, "a", 100).await, (Some(1), vec![]));
        assert_eq!(count(&ctx, "a", 105).await, (Some(2), vec![]));
        assert_eq!(
            spans(&ctx).await,
            [(90, 100, 1), (95, 105, 2), (101, 111, 1)]
        );
        // Out of order: every window holding 103 counts it; its own window
        // starts from [90, 100]; the one after it holds 105 only.
        assert_eq!(count(&ctx, "a", 103).await, (Some(2), vec![]));
        assert_eq!(
            spans(&ctx).await,
            [
                (90, 100, 1),
                (93, 103, 2),
                (95, 105, 3),
                (101, 111, 2),
                (104, 114, 1)
            ]
        );
        let at = |t| {
            let ctx = ctx.clone();
            async move {
                ctx.value_at("counts", b"a", t)
                    .await
                    .unwrap()
                    .map(|v| number(&v))
            }
        };
        assert_eq!(at(89).await, None);
        assert_eq!(at(100).await, Some(1));
        assert_eq!(at(110).await, Some(3));
        assert_eq!(at(113).await, Some(2), "103 and 105");
        assert_eq!(at(115).await, Some(1));
        assert_eq!(at(116).await, None);
        // 117 closes the windows that end by 111 (+ 1 ms + 5 ms grace).
        let (current, closed) = count(&ctx, "a", 117).await;
        assert_eq!(current, Some(1), "[107, 117]");
        let closed_ones = [(90, 1), (93, 2), (95, 3), (101, 2)];
        let want: Vec<_> = closed_ones
            .iter()
            .map(|&(s, n)| ("a".into(), s, n))
            .collect();
        assert_eq!(closed, want);
        // 110 is not late ([110, 120] is open), but its own window [100,
        // 110] and [101, 111] have closed: the open ones holding it count
        // it, and [106, 116] (after 105) and [111, 121] are made.
        assert_eq!(count(&ctx, "a", 110).await, (Some(2), vec![]));
        assert_eq!(
            spans(&ctx).await,
            [
                (90, 100, 1),
                (93, 103, 2),
                (95, 105, 3),
                (101, 111, 2),
                (104, 114, 2),
                (106, 116, 1),
                (107, 117, 2),
                (111, 121, 1)
            ]
        );
        // 99: its last window [99, 109] closed at 115.
        assert_eq!(count(&ctx, "a", 99).await, (None, vec![]));
        assert_eq!(late_events(&metrics), 1);
    }

    /// Sliding windows against a model: after any sequence of a key's
    /// events (in or out of order), every window counts exactly the events
    /// in it, each event's window exists, what the update returns is the
    /// count of the difference up to the event, and `value_at` any time is
    /// the count of the difference up to that time.
    #[tokio::test]
    async fn sliding_windows_count_like_the_model() {
        const D: i64 = 10;
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..60 {
            let cluster = MockCluster::new();
            cluster.create_topic("counts-changelog", 1);
            let sliding = Windowing::sliding(Duration::from_millis(D as u64))
                .grace(Duration::from_secs(3600));
            let (ctx, _) = context(&cluster, Arc::new(MemoryStore::new()), sliding, true).await;
            let (span, events) = (10 + next(60) as i64, 1 + next(25) as usize);
            let mut seen: Vec<i64> = Vec::new();
            for _ in 0..events {
                let t = next(span as u64) as i64;
                seen.push(t);
                let within = |from: i64, to: i64| {
                    seen.iter().filter(|&&e| from <= e && e <= to).count() as u64
                };
                let what = format!("round {round}, events {seen:?}");
                let (current, _) = count(&ctx, "a", t).await;
                assert_eq!(current, Some(within(t - D, t)), "{what}: current");
                let windows = ctx.windows("counts", b"a").await.unwrap().unwrap();
                for (w, v) in &windows {
                    assert_eq!(number(v), within(w.start, w.end - 1), "{what}: {w:?}");
                }
                for e in &seen {
                    assert!(
                        windows.iter().any(|(w, _)| w.end - 1 == *e),
                        "{what}: {e}'s window"
                    );
                }
                for at in -D..span + 2 * D {
                    let got = ctx
                        .value_at("counts", b"a", at)
                        .await
                        .unwrap()
                        .map(|v| number(&v));
                    let want = Some(within(at - D, at)).filter(|&n| n > 0);
                    assert_eq!(got, want, "{what}: value at {at}");
                }
            }
        }
    }

    /// A window that closes but has gone from the store behind the index's
    /// back would be lost unsent: damaged state, not a window skipped.
    #[tokio::test]
    async fn a_closing_window_missing_from_the_store_is_damage() {
        let cluster = MockCluster::new();
        cluster.create_topic("counts-changelog", 1);
        let store = Arc::new(MemoryStore::new());
        let tumbling = Windowing::tumbling(Duration::from_secs(60));
        let (ctx, _) = context(&cluster, store.clone(), tumbling, true).await;
        count(&ctx, "a", 1_000).await;
        ctx.checkpoint(Durability::Fast).await.unwrap();
        let mut batch = strom_state::WriteBatch::default();
        batch.delete(window_key(b"a", 0));
        store.apply(&batch, None, Durability::Fast).unwrap();
        ctx.observe_event_time(61_000);
        let e = failed_update(&ctx, b"b", 61_000).await;
        assert!(matches!(e, crate::WorkerError::DamagedState { .. }), "{e}");
        assert!(e.to_string().contains("not in the store"), "{e}");
    }

    /// A stored value too short to be a window's is damaged state.
    #[tokio::test]
    async fn a_damaged_entry_stops_the_update() {
        let cluster = MockCluster::new();
        cluster.create_topic("counts-changelog", 1);
        let store = Arc::new(MemoryStore::new());
        let mut batch = strom_state::WriteBatch::default();
        batch.put(window_key(b"a", 0), vec![1, 2, 3]);
        store.apply(&batch, Some(0), Durability::Fast).unwrap();
        let (ctx, _) = context(
            &cluster,
            store,
            Windowing::tumbling(Duration::from_secs(60)),
            false,
        )
        .await;
        let e = failed_update(&ctx, b"a", 1_000).await;
        assert!(matches!(e, crate::WorkerError::DamagedState { .. }), "{e}");
        assert!(ctx.take_failure().is_some(), "the event is not committed");
    }

    /// The error of an update of `key` at `t` that is expected to fail.
    async fn failed_update(ctx: &Context, key: &[u8], t: i64) -> crate::WorkerError {
        ctx.update_windows(
            "counts",
            key,
            t,
            |_| Ok::<_, ()>((vec![], ())),
            |_, _| Err(()),
        )
        .await
        .unwrap_err()
    }
}
