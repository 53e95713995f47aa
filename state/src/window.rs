//! Windowed tables: which windows an event falls in, how a window's entry is
//! keyed and stamped in a [`Store`](crate::Store), and the index that says
//! which windows close or expire as a partition's stream time moves on.
//!
//! Kafka Streams' semantics: windows are aligned to the epoch; a window
//! `[start, end)` closes when the stream time reaches `end + grace`, and an
//! event whose every window has closed is late (dropped); windows whose end
//! lies more than the retention before the stream time are deleted.
//!
//! Session windows are a key's bursts of activity: an event opens a session
//! `[t, t + 1)`, and sessions no more than the inactivity gap apart merge
//! into one from the first event's time to just after the last's. A session
//! closes when the stream time passes its last event's time plus the gap
//! plus the grace (as in Kafka Streams); once closed it is final: an event
//! within it is late, and one near it starts a new session rather than
//! change what was handed out.
//!
//! Sliding windows (Kafka Streams' `SlidingWindows`) are every span of the
//! time difference `d` (both ends included) that holds a distinct set of a
//! key's events: each event at `t` has its window `[t - d, t]`, and, when a
//! later event falls within `d` after it, the window `[t + 1, t + 1 + d]`.
//! A new window takes its first value from an existing one that holds
//! exactly its other events, so no aggregate needs to be subtracted from.
//!
//! # Layout in the store
//!
//! - key: the table key's bytes, then the window start as 8 big-endian bytes
//!   with the sign bit flipped, so one key's windows are contiguous and in
//!   time order ([`window_key`]);
//! - value: the partition's stream time when the entry was written (8
//!   big-endian bytes), then (of a session) its end or (of a sliding
//!   window) the time of its latest event, as 8 big-endian bytes, then the
//!   value's bytes ([`stamp`], [`Windowing::entry`]). The largest stamp
//!   among the live entries is the stream time the table had seen, so a task
//!   that starts on the partition again knows which windows had closed
//!   ([`WindowIndex::rebuild`]), as Kafka Streams keeps partition time in its
//!   commits;
//! - one more entry, under the empty key ([`STREAM_TIME_KEY`]), holds a
//!   stream time through which the closed windows are known to have been
//!   emitted. Under exactly-once it is stamped whenever windows close or
//!   expire, in the same transaction as what their closing sent, so the
//!   stream time at which they did is known after a restart even if no
//!   window was written then (a late event, or one of another key, closing
//!   them). Under at-least-once the stamps reach the changelog before what
//!   the closing sent is acknowledged, so only this entry counts, written
//!   at each checkpoint once everything sent before is acknowledged
//!   ([`WindowIndex::reopen`]): windows that closed after it close again
//!   after a crash (emitted twice, never lost).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::error::{Result, StateError};
use crate::table::TableKey;

/// One window: `[start, end)` in ms since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Window {
    /// The first millisecond in the window.
    pub start: i64,
    /// The first millisecond after it.
    pub end: i64,
}

/// The shape of a table's windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Windows of `size` ms, one after the other.
    Tumbling {
        /// Length of a window, ms.
        size: i64,
    },
    /// Windows of `size` ms starting every `advance` ms, so they overlap.
    Hopping {
        /// Length of a window, ms.
        size: i64,
        /// Time between two windows' starts, ms.
        advance: i64,
    },
    /// Sessions: events of a key no more than `gap` ms apart share one.
    Session {
        /// The inactivity gap, ms.
        gap: i64,
    },
    /// Sliding windows: `[start, start + difference]`, both ends included
    /// (as a [`Window`], `end` is `start + difference + 1`), one per
    /// distinct set of a key's events that far apart at most.
    Sliding {
        /// The time difference, ms.
        difference: i64,
    },
}

/// How a table is windowed: the windows, the grace before one closes and how
/// long closed windows are kept.
///
/// ```
/// use std::time::Duration;
/// use strom_state::window::{Window, Windowing};
/// let w = Windowing::tumbling(Duration::from_secs(60)).grace(Duration::from_secs(10));
/// assert_eq!(w.windows_of(61_000).collect::<Vec<_>>(), [Window { start: 60_000, end: 120_000 }]);
/// assert_eq!(w.closes_at(Window { start: 60_000, end: 120_000 }), 130_000);
/// // Kept for at least an hour by default, as Faust's `expires`.
/// assert_eq!(w.retention(), 3_600_000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windowing {
    kind: WindowKind,
    grace: i64,
    /// As set with [`Windowing::expires`]; `None`: the default.
    expires: Option<i64>,
}

/// The retention of a table that does not set one: Faust's `expires`.
const DEFAULT_RETENTION: i64 = 3_600_000;

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Windowing {
    /// Tumbling windows of `size`.
    ///
    /// # Panics
    /// If `size` is under a millisecond (a declaration error).
    pub fn tumbling(size: Duration) -> Self {
        let size = millis(size);
        assert!(size > 0, "a window must be at least 1 ms long");
        Windowing {
            kind: WindowKind::Tumbling { size },
            grace: 0,
            expires: None,
        }
    }

    /// Hopping windows of `size` starting every `advance`.
    ///
    /// # Panics
    /// If `advance` is under a millisecond or longer than `size` (a
    /// declaration error).
    pub fn hopping(size: Duration, advance: Duration) -> Self {
        let (size, advance) = (millis(size), millis(advance));
        assert!(
            advance > 0 && advance <= size,
            "a hopping window's advance must be between 1 ms and its size"
        );
        Windowing {
            kind: WindowKind::Hopping { size, advance },
            grace: 0,
            expires: None,
        }
    }

    /// Session windows with inactivity gap `gap`: a key's events no more
    /// than `gap` apart fall in one session.
    ///
    /// ```
    /// use std::time::Duration;
    /// use strom_state::window::{Window, Windowing};
    /// let s = Windowing::session(Duration::from_secs(30));
    /// let session = Window { start: 1_000, end: 20_001 };
    /// assert!(s.merges(session, 50_000));
    /// assert!(!s.merges(session, 50_001));
    /// // Closes once the stream time passes its last event (20 s) + 30 s.
    /// assert_eq!(s.closes_at(session), 50_001);
    /// ```
    ///
    /// # Panics
    /// If `gap` is under a millisecond (a declaration error).
    pub fn session(gap: Duration) -> Self {
        let gap = millis(gap);
        assert!(gap > 0, "a session's inactivity gap must be at least 1 ms");
        Windowing {
            kind: WindowKind::Session { gap },
            grace: 0,
            expires: None,
        }
    }

    /// Sliding windows of time difference `difference` (Kafka Streams'
    /// `SlidingWindows`): events of a key at most `difference` apart share a
    /// window `[start, start + difference]` (both ends included).
    ///
    /// ```
    /// use std::time::Duration;
    /// use strom_state::window::{Window, Windowing};
    /// let s = Windowing::sliding(Duration::from_secs(10));
    /// // The window of an event at 15 s: the ten seconds up to it.
    /// assert_eq!(s.window_at(15_000), Window { start: 5_000, end: 15_001 });
    /// ```
    ///
    /// # Panics
    /// If `difference` is under a millisecond (a declaration error).
    pub fn sliding(difference: Duration) -> Self {
        let difference = millis(difference);
        assert!(
            difference > 0,
            "a sliding window's time difference must be at least 1 ms"
        );
        Windowing {
            kind: WindowKind::Sliding { difference },
            grace: 0,
            expires: None,
        }
    }

    /// Whether the windows are sessions.
    pub fn is_session(&self) -> bool {
        matches!(self.kind, WindowKind::Session { .. })
    }

    /// The time difference of sliding windows; `None` for other kinds.
    pub fn sliding_difference(&self) -> Option<i64> {
        match self.kind {
            WindowKind::Sliding { difference } => Some(difference),
            _ => None,
        }
    }

    /// Whether an entry stores 8 bytes of time before its value: a
    /// session's end, a sliding window's latest event.
    fn stores_time(&self) -> bool {
        matches!(
            self.kind,
            WindowKind::Session { .. } | WindowKind::Sliding { .. }
        )
    }

    /// Whether an event at `t` falls in session `window` or within the gap
    /// of it (so the two merge). Never for tumbling or hopping windows.
    pub fn merges(&self, window: Window, t: i64) -> bool {
        match self.kind {
            WindowKind::Session { gap } => {
                t >= window.start.saturating_sub(gap)
                    && t <= window.end.saturating_sub(1).saturating_add(gap)
            }
            _ => false,
        }
    }

    /// How long after its end a window still takes late events (default 0).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = millis(grace);
        self
    }

    /// How long after its end a window is kept (for reads) before it is
    /// deleted; never less than the grace (of sessions: the gap and the
    /// grace). Default: an hour, or the size plus the grace when that is
    /// longer.
    pub fn expires(mut self, retention: Duration) -> Self {
        self.expires = Some(millis(retention));
        self
    }

    /// The windows' shape.
    pub fn kind(&self) -> WindowKind {
        self.kind
    }

    /// A window's length, ms (of sessions: the gap; of sliding windows:
    /// the time difference and the millisecond at its end).
    pub fn size(&self) -> i64 {
        match self.kind {
            WindowKind::Tumbling { size } | WindowKind::Hopping { size, .. } => size,
            WindowKind::Session { gap } => gap,
            WindowKind::Sliding { difference } => difference.saturating_add(1),
        }
    }

    fn advance(&self) -> i64 {
        match self.kind {
            WindowKind::Tumbling { size } => size,
            WindowKind::Hopping { advance, .. } => advance,
            // A session of one event is one millisecond long; a sliding
            // window ends at any millisecond.
            WindowKind::Session { .. } | WindowKind::Sliding { .. } => 1,
        }
    }

    /// How long after its end a window closes, ms: the grace, and of a
    /// session also the gap (its end is just after its last event).
    pub fn close_delay(&self) -> i64 {
        match self.kind {
            WindowKind::Session { gap } => gap.saturating_add(self.grace),
            _ => self.grace,
        }
    }

    /// The grace, ms.
    pub fn grace_ms(&self) -> i64 {
        self.grace
    }

    /// How long after its end a window is kept, ms (see [`Windowing::expires`]);
    /// never less than [`Windowing::close_delay`], so that no window is
    /// deleted before it closes.
    pub fn retention(&self) -> i64 {
        let floor = self.size().saturating_add(self.grace);
        match self.expires {
            Some(r) => r.max(self.close_delay()),
            None => DEFAULT_RETENTION.max(floor),
        }
    }

    /// The windows that hold time `t`, in start order (of sessions: the
    /// session of one event at `t`; of sliding windows: the window that
    /// ends at `t`, the only one an event at `t` is sure to have).
    pub fn windows_of(&self, t: i64) -> impl Iterator<Item = Window> + '_ {
        let sliding = self.sliding_difference().map(|_| self.window_at(t));
        let (size, advance) = (self.span(), self.advance());
        let last = t.saturating_sub(t.rem_euclid(advance));
        let count = if sliding.is_some() {
            0
        } else {
            (size - 1) / advance + 1
        };
        sliding
            .into_iter()
            .chain((0..count).rev().filter_map(move |i| {
                let start = last.checked_sub(i * advance)?;
                let end = start.saturating_add(size);
                (end > t).then_some(Window { start, end })
            }))
    }

    /// The latest window that holds time `t` (Faust's "current" window;
    /// of sessions, the session of one event at `t`; of sliding windows,
    /// the one that ends at `t`).
    pub fn window_at(&self, t: i64) -> Window {
        if let Some(difference) = self.sliding_difference() {
            return Window {
                start: t.saturating_sub(difference),
                end: t.saturating_add(1),
            };
        }
        let start = t.saturating_sub(t.rem_euclid(self.advance()));
        Window {
            start,
            end: start.saturating_add(self.span()),
        }
    }

    /// The length of the windows an event opens: the size (of a session of
    /// one event, a millisecond).
    fn span(&self) -> i64 {
        match self.kind {
            WindowKind::Session { .. } => 1,
            _ => self.size(),
        }
    }

    /// The window of an entry: its store key's `start` and the stored value
    /// after the stamp (`stored`), and the value's bytes. A session's end
    /// and a sliding window's latest event are stored before the value; a
    /// value too short for them is a codec error.
    pub fn entry<'a>(&self, start: i64, stored: &'a [u8]) -> Result<(Window, &'a [u8])> {
        let (window, _, value) = self.entry_with_latest(start, stored)?;
        Ok((window, value))
    }

    /// [`Windowing::entry`], and of a sliding window the time of its latest
    /// event.
    pub fn entry_with_latest<'a>(
        &self,
        start: i64,
        stored: &'a [u8],
    ) -> Result<(Window, Option<i64>, &'a [u8])> {
        match self.kind {
            WindowKind::Session { .. } => {
                let (end, value) = split_time(stored, "a session's value", "end")?;
                Ok((Window { start, end }, None, value))
            }
            WindowKind::Sliding { .. } => {
                let what = "a sliding window's value";
                let (latest, value) = split_time(stored, what, "latest event time")?;
                let end = start.saturating_add(self.size());
                Ok((Window { start, end }, Some(latest), value))
            }
            _ => {
                let end = start.saturating_add(self.size());
                Ok((Window { start, end }, None, stored))
            }
        }
    }

    /// What is stored after the stamp for `window` holding `value`: of a
    /// session its end, of a sliding window `latest` (the time of its latest
    /// event), then the value (see [`Windowing::entry`]).
    pub fn entry_value(&self, window: Window, latest: i64, value: &[u8]) -> Vec<u8> {
        if !self.stores_time() {
            return value.to_vec();
        }
        let time = if self.is_session() {
            window.end
        } else {
            latest
        };
        let mut bytes = Vec::with_capacity(8 + value.len());
        bytes.extend_from_slice(&time.to_be_bytes());
        bytes.extend_from_slice(value);
        bytes
    }

    /// Which of a key's `windows` (in start order, each with the time of
    /// its latest event, which only sliding windows use) is the one whose
    /// value is the key's at time `t`: the latest aligned window holding
    /// `t` (see [`Windowing::window_at`]), the session holding it, or the
    /// sliding window holding exactly the events within the time difference
    /// up to `t` (`[t - d, t]`); `None` when there is none.
    ///
    /// The sliding window is the latest-starting window that ends by `t`,
    /// if its latest event is within `d` of `t`: the window ending at the
    /// latest event by `t`, or, when an earlier event lies within `d` before
    /// that one but more than `d` before `t`, the window that starts just
    /// after the last such.
    ///
    /// ```
    /// use std::time::Duration;
    /// use strom_state::window::{Window, Windowing};
    /// let s = Windowing::sliding(Duration::from_millis(10));
    /// // Events at 100 and 105: windows [90, 100], [95, 105], [101, 111].
    /// let w = |start, latest| (Window { start, end: start + 11 }, latest);
    /// let windows = [w(90, 100), w(95, 105), w(101, 105)];
    /// assert_eq!(s.holding(&windows, 108), Some(1)); // both events
    /// assert_eq!(s.holding(&windows, 112), Some(2)); // 105 only
    /// assert_eq!(s.holding(&windows, 116), None);
    /// ```
    pub fn holding(&self, windows: &[(Window, i64)], t: i64) -> Option<usize> {
        match self.kind {
            WindowKind::Sliding { difference } => {
                let (i, (_, latest)) = windows
                    .iter()
                    .enumerate()
                    .rev()
                    .find(|(_, (w, _))| w.end <= t.saturating_add(1))?;
                (*latest >= t.saturating_sub(difference)).then_some(i)
            }
            WindowKind::Session { .. } => {
                windows.iter().position(|(w, _)| w.start <= t && t < w.end)
            }
            _ => {
                let aligned = self.window_at(t);
                windows.iter().position(|(w, _)| *w == aligned)
            }
        }
    }

    /// The stream time at which `window` closes: its end plus the grace (a
    /// session's: just after its last event's time plus the gap plus the
    /// grace).
    pub fn closes_at(&self, window: Window) -> i64 {
        window.end.saturating_add(self.close_delay())
    }

    /// Whether `window` has closed at stream time `stream_time`.
    pub fn is_closed(&self, window: Window, stream_time: Option<i64>) -> bool {
        stream_time.is_some_and(|s| self.closes_at(window) <= s)
    }

    /// A short description, e.g. `tumbling 60s, grace 10s, kept 3600s`.
    pub fn describe(&self) -> String {
        let secs = |ms: i64| {
            if ms % 1000 == 0 {
                format!("{}s", ms / 1000)
            } else {
                format!("{ms}ms")
            }
        };
        let shape = match self.kind {
            WindowKind::Tumbling { size } => format!("tumbling {}", secs(size)),
            WindowKind::Hopping { size, advance } => {
                format!("hopping {} every {}", secs(size), secs(advance))
            }
            WindowKind::Session { gap } => format!("session, gap {}", secs(gap)),
            WindowKind::Sliding { difference } => format!("sliding {}", secs(difference)),
        };
        format!(
            "{shape}, grace {}, kept {}",
            secs(self.grace),
            secs(self.retention())
        )
    }
}

/// Length of a window start in a store key.
const START_LEN: usize = 8;

/// The store key of `key`'s window starting at `start`.
///
/// ```
/// use strom_state::window::{split_window_key, window_key};
/// let k = window_key(b"page", -5);
/// assert_eq!(split_window_key(&k), Some((&b"page"[..], -5)));
/// assert!(window_key(b"page", -5) < window_key(b"page", 3));
/// ```
pub fn window_key(key: &[u8], start: i64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(key.len() + START_LEN);
    bytes.extend_from_slice(key);
    bytes.extend_from_slice(&start.encode_key());
    bytes
}

/// The table key and window start of a store key; `None` if it is too short.
pub fn split_window_key(bytes: &[u8]) -> Option<(&[u8], i64)> {
    let at = bytes.len().checked_sub(START_LEN)?;
    let (key, start) = bytes.split_at(at);
    Some((key, i64::decode_key(start).ok()?))
}

/// The store keys between which `key`'s windows lie (both included): every
/// store key of another table key in between is longer or shorter, so a
/// scan keeps the entries [`split_window_key`] gives `key` for.
pub fn key_bounds(key: &[u8]) -> (Vec<u8>, Vec<u8>) {
    (window_key(key, i64::MIN), window_key(key, i64::MAX))
}

/// The store key of the entry that records the stream time at which
/// windows last closed or expired (its value is [`stamp`]ed, with nothing
/// after the stamp). No window's key is this short.
pub const STREAM_TIME_KEY: &[u8] = b"";

/// A stored value: the stream time `stream_time`, then `value`.
pub fn stamp(stream_time: i64, value: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(8 + value.len());
    bytes.extend_from_slice(&stream_time.to_be_bytes());
    bytes.extend_from_slice(value);
    bytes
}

/// The stream time and value of a stored value.
pub fn unstamp(bytes: &[u8]) -> Result<(i64, &[u8])> {
    split_time(bytes, "a windowed table's value", "stream time")
}

/// The time in the first 8 bytes of `bytes` (big-endian) and the rest; a
/// codec error naming `what` and the `time` when they are too short.
fn split_time<'a>(bytes: &'a [u8], what: &str, time: &str) -> Result<(i64, &'a [u8])> {
    let Some((head, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(StateError::Codec {
            what: format!(
                "{what} has {} bytes, less than its 8-byte {time}",
                bytes.len()
            ),
        });
    };
    Ok((i64::from_be_bytes(*head), rest))
}

/// The live windows of one table partition, by end: which close and which
/// expire as its stream time moves on.
#[derive(Debug, Clone, Default)]
pub struct WindowIndex {
    /// (end, table key, start) of every window in the store.
    live: BTreeSet<(i64, Vec<u8>, i64)>,
    /// Windows that close at this stream time or before have closed.
    closed_through: Option<i64>,
}

impl WindowIndex {
    /// The index of a store's entries (`(store key, stored value)`), and the
    /// stream time the store had seen (the largest stamp).
    pub fn rebuild(
        entries: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
        windowing: &Windowing,
    ) -> Result<(WindowIndex, Option<i64>)> {
        let mut index = WindowIndex::default();
        let mut stream_time = None;
        for (key, value) in entries {
            let (stamped, stored) = unstamp(&value)?;
            stream_time = stream_time.max(Some(stamped));
            if key == STREAM_TIME_KEY {
                continue;
            }
            let (table_key, start) = split_window_key(&key).ok_or_else(|| StateError::Codec {
                what: format!(
                    "a windowed table's key has {} bytes, less than its 8-byte window start",
                    key.len()
                ),
            })?;
            index.insert(table_key, windowing.entry(start, stored)?.0);
        }
        index.closed_through = stream_time;
        Ok((index, stream_time))
    }

    /// The stream time through which windows have closed (been handed out
    /// by [`WindowIndex::close`]).
    pub fn closed_through(&self) -> Option<i64> {
        self.closed_through
    }

    /// Makes the windows that close after `closed_through` (every window
    /// when `None`) close again, as if the stream time had not passed them.
    pub fn reopen(&mut self, closed_through: Option<i64>) {
        self.closed_through = closed_through;
    }

    /// Notes that `key` has an entry for `window`.
    pub fn insert(&mut self, key: &[u8], window: Window) {
        self.live.insert((window.end, key.to_vec(), window.start));
    }

    /// Notes that `key`'s entry for `window` is gone (a session merged into
    /// another).
    pub fn remove(&mut self, key: &[u8], window: Window) {
        self.live.remove(&(window.end, key.to_vec(), window.start));
    }

    /// Number of live windows.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether no window is live.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The windows that close once the stream time is `stream_time` and had
    /// not closed before, in order of end, then key: each is returned once.
    pub fn close(&mut self, windowing: &Windowing, stream_time: i64) -> Vec<(Vec<u8>, Window)> {
        let before = self.closed_through;
        if before.is_some_and(|b| b >= stream_time) {
            return Vec::new();
        }
        self.closed_through = Some(stream_time);
        let delay = windowing.close_delay();
        let closes = |end: i64| end.saturating_add(delay);
        // The first end that closes after `before` (`before` is below
        // `stream_time`, so below i64::MAX: no saturation hides one).
        let from = before.map_or(i64::MIN, |b| b.saturating_sub(delay).saturating_add(1));
        self.live
            .range((from, Vec::new(), i64::MIN)..)
            .take_while(|(end, _, _)| closes(*end) <= stream_time)
            .map(|(end, key, start)| {
                (
                    key.clone(),
                    Window {
                        start: *start,
                        end: *end,
                    },
                )
            })
            .collect()
    }

    /// Removes and returns the windows that end at or before
    /// `stream_time` minus the retention: their entries are to be deleted.
    pub fn expire(&mut self, windowing: &Windowing, stream_time: i64) -> Vec<(Vec<u8>, Window)> {
        let horizon = stream_time.saturating_sub(windowing.retention());
        let mut gone = Vec::new();
        while let Some(first) = self.live.first() {
            if first.0 > horizon {
                break;
            }
            if let Some((end, key, start)) = self.live.pop_first() {
                gone.push((key, Window { start, end }));
            }
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn w(start: i64, end: i64) -> Window {
        Window { start, end }
    }

    #[test]
    fn tumbling_windows_are_aligned_to_the_epoch() {
        let t = Windowing::tumbling(MIN);
        let of = |ts| t.windows_of(ts).collect::<Vec<_>>();
        assert_eq!(of(0), [w(0, 60_000)]);
        assert_eq!(of(59_999), [w(0, 60_000)]);
        assert_eq!(of(60_000), [w(60_000, 120_000)], "the end is exclusive");
        assert_eq!(of(-1), [w(-60_000, 0)]);
        assert_eq!(t.window_at(61_000), w(60_000, 120_000));
    }

    #[test]
    fn hopping_windows_overlap_in_start_order() {
        let h = Windowing::hopping(MIN, Duration::from_secs(20));
        let of = |ts| h.windows_of(ts).collect::<Vec<_>>();
        assert_eq!(
            of(65_000),
            [w(20_000, 80_000), w(40_000, 100_000), w(60_000, 120_000)]
        );
        assert_eq!(
            of(60_000),
            [w(20_000, 80_000), w(40_000, 100_000), w(60_000, 120_000)]
        );
        assert_eq!(
            of(59_999),
            [w(0, 60_000), w(20_000, 80_000), w(40_000, 100_000)]
        );
        assert_eq!(h.window_at(65_000), w(60_000, 120_000));
        // An advance that does not divide the size.
        let odd = Windowing::hopping(Duration::from_millis(10), Duration::from_millis(4));
        assert_eq!(
            odd.windows_of(9).collect::<Vec<_>>(),
            [w(0, 10), w(4, 14), w(8, 18)]
        );
        assert_eq!(odd.windows_of(10).collect::<Vec<_>>(), [w(4, 14), w(8, 18)]);
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let h = Windowing::hopping(MIN, Duration::from_secs(20));
        assert!(h.windows_of(i64::MIN).all(|x| x.start <= x.end));
        assert!(h.windows_of(i64::MAX).all(|x| x.end == i64::MAX));
        let huge = Windowing::tumbling(Duration::MAX).grace(Duration::MAX);
        assert_eq!(huge.closes_at(huge.window_at(5)), i64::MAX);
        assert_eq!(huge.retention(), i64::MAX);
    }

    proptest::proptest! {
        /// The windows of a time are exactly the aligned windows holding it,
        /// in start order, and the latest of them is the current one.
        #[test]
        fn windows_of_a_time_are_the_aligned_ones_holding_it(
            t in -1_000_000i64..1_000_000,
            size in 1i64..5_000,
            advance_part in 1i64..5_000,
        ) {
            let advance = 1 + advance_part % size;
            let h = Windowing::hopping(
                Duration::from_millis(size as u64),
                Duration::from_millis(advance as u64),
            );
            let got: Vec<_> = h.windows_of(t).collect();
            let first = (t - size + 1).div_euclid(advance) * advance;
            let expected: Vec<_> = (0..)
                .map(|i| first + i * advance)
                .take_while(|s| *s <= t)
                .filter(|s| s + size > t)
                .map(|s| w(s, s + size))
                .collect();
            proptest::prop_assert_eq!(&got, &expected);
            proptest::prop_assert_eq!(got.last().copied(), Some(h.window_at(t)));
        }
    }

    #[test]
    fn retention_defaults_and_floors() {
        let t = Windowing::tumbling(MIN).grace(Duration::from_secs(10));
        assert_eq!(t.retention(), 3_600_000);
        let long = Windowing::tumbling(Duration::from_secs(7200));
        assert_eq!(long.retention(), 7_200_000, "size + grace when longer");
        let set = t.expires(Duration::from_secs(1));
        assert_eq!(set.retention(), 10_000, "never less than the grace");
        assert_eq!(
            t.expires(Duration::from_secs(120)).describe(),
            "tumbling 60s, grace 10s, kept 120s"
        );
    }

    #[test]
    fn keys_keep_one_keys_windows_together_in_time_order() {
        let mut keys = [
            window_key(b"b", 0),
            window_key(b"a", 60_000),
            window_key(b"a", -60_000),
            window_key(b"a", 0),
        ];
        keys.sort();
        let split: Vec<_> = keys.iter().map(|k| split_window_key(k).unwrap()).collect();
        assert_eq!(
            split,
            [
                (&b"a"[..], -60_000),
                (&b"a"[..], 0),
                (&b"a"[..], 60_000),
                (&b"b"[..], 0)
            ]
        );
        assert_eq!(split_window_key(b"short"), None);
        let (lo, hi) = key_bounds(b"a");
        assert!(keys.iter().filter(|k| **k >= lo && **k <= hi).count() == 3);
    }

    #[test]
    fn stamps_round_trip_and_short_values_are_errors() {
        let v = stamp(-7, b"{\"n\":1}");
        assert_eq!(unstamp(&v).unwrap(), (-7, &b"{\"n\":1}"[..]));
        assert!(unstamp(b"1234567").is_err());
    }

    #[test]
    fn windows_close_once_in_order_and_expire_after_retention() {
        let t = Windowing::tumbling(MIN)
            .grace(Duration::from_secs(10))
            .expires(Duration::from_secs(120));
        let mut index = WindowIndex::default();
        index.insert(b"b", w(0, 60_000));
        index.insert(b"a", w(0, 60_000));
        index.insert(b"a", w(60_000, 120_000));
        assert!(index.close(&t, 69_999).is_empty(), "within grace");
        assert_eq!(
            index.close(&t, 70_000),
            [(b"a".to_vec(), w(0, 60_000)), (b"b".to_vec(), w(0, 60_000))]
        );
        assert!(index.close(&t, 70_000).is_empty(), "closed once");
        assert!(index.close(&t, 50_000).is_empty(), "time does not go back");
        assert_eq!(
            index.close(&t, 500_000),
            [(b"a".to_vec(), w(60_000, 120_000))]
        );
        assert!(index.expire(&t, 179_999).is_empty());
        assert_eq!(index.expire(&t, 180_000).len(), 2);
        assert_eq!(index.len(), 1);
        assert_eq!(index.expire(&t, 240_000).len(), 1);
        assert!(index.is_empty());
    }

    #[test]
    fn a_rebuilt_index_knows_what_had_closed() {
        let t = Windowing::tumbling(MIN).grace(Duration::from_secs(10));
        let entries = vec![
            (window_key(b"a", 0), stamp(75_000, b"1")),
            (window_key(b"a", 60_000), stamp(65_000, b"2")),
        ];
        let (mut index, stream_time) = WindowIndex::rebuild(entries, &t).unwrap();
        assert_eq!(stream_time, Some(75_000));
        assert!(index.close(&t, 75_000).is_empty(), "[0, 60s) had closed");
        assert_eq!(
            index.close(&t, 130_000),
            [(b"a".to_vec(), w(60_000, 120_000))]
        );
        let damaged = vec![(b"a".to_vec(), stamp(1, b"1"))];
        assert!(WindowIndex::rebuild(damaged, &t).is_err());
    }

    /// The stream-time entry counts for the stream time (a late event that
    /// closed windows wrote no window) but is no window.
    #[test]
    fn the_stream_time_entry_is_no_window() {
        let t = Windowing::tumbling(MIN);
        let entries = vec![
            (STREAM_TIME_KEY.to_vec(), stamp(130_000, b"")),
            (window_key(b"", 60_000), stamp(65_000, b"2")),
        ];
        let (mut index, stream_time) = WindowIndex::rebuild(entries, &t).unwrap();
        assert_eq!(stream_time, Some(130_000));
        assert_eq!(index.len(), 1, "only the empty key's window is one");
        assert!(
            index.close(&t, 130_000).is_empty(),
            "[60s, 120s) had closed"
        );
        index.reopen(Some(60_000));
        assert_eq!(
            index.close(&t, 130_000),
            [(b"".to_vec(), w(60_000, 120_000))]
        );
        let short = vec![(STREAM_TIME_KEY.to_vec(), vec![1, 2])];
        assert!(WindowIndex::rebuild(short, &t).is_err());
    }

    #[test]
    fn sessions_merge_within_the_gap_and_close_after_it() {
        let s = Windowing::session(Duration::from_secs(10)).grace(Duration::from_secs(5));
        let session = w(1_000, 3_001);
        // Boundaries: exactly the gap before the first or after the last
        // event merges, a millisecond more does not.
        assert!(s.merges(session, -9_000) && s.merges(session, 13_000));
        assert!(!s.merges(session, -9_001) && !s.merges(session, 13_001));
        assert!(!Windowing::tumbling(MIN).merges(w(0, 60_000), 1));
        assert_eq!(s.windows_of(7).collect::<Vec<_>>(), [w(7, 8)]);
        assert_eq!(s.window_at(7), w(7, 8));
        // Last event 3 s, gap 10 s, grace 5 s: closes past 18 s.
        assert_eq!(s.closes_at(session), 18_001);
        assert!(!s.is_closed(session, Some(18_000)) && s.is_closed(session, Some(18_001)));
        assert_eq!(s.retention(), 3_600_000);
        assert_eq!(s.describe(), "session, gap 10s, grace 5s, kept 3600s");
        // Kept at least until it closes, however short `expires` is.
        assert_eq!(s.expires(Duration::ZERO).retention(), 15_000);

        // The end is stored before the value, and read back.
        let stored = s.entry_value(session, 0, b"v");
        assert_eq!(s.entry(1_000, &stored).unwrap(), (session, &b"v"[..]));
        assert!(s.entry(1_000, &[0; 7]).is_err(), "too short for an end");

        // The index closes sessions gap + grace after their last event,
        // once, and a rebuilt one knows their ends.
        let entries = vec![
            (window_key(b"a", 1_000), stamp(3_000, &stored)),
            (
                window_key(b"b", 2_000),
                stamp(3_000, &s.entry_value(w(2_000, 2_001), 0, b"v")),
            ),
        ];
        let (mut index, time) = WindowIndex::rebuild(entries, &s).unwrap();
        assert_eq!(time, Some(3_000));
        assert_eq!(index.close(&s, 18_000), [(b"b".to_vec(), w(2_000, 2_001))]);
        assert_eq!(index.close(&s, 18_001), [(b"a".to_vec(), session)]);
        assert_eq!(index.close(&s, 19_000), []);
        index.remove(b"a", session);
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn sliding_windows_end_at_events_and_store_the_latest() {
        let s = Windowing::sliding(Duration::from_secs(10)).grace(Duration::from_secs(5));
        // [5 s, 15 s], both ends included.
        let left = w(5_000, 15_001);
        assert_eq!(s.window_at(15_000), left);
        assert_eq!(s.windows_of(15_000).collect::<Vec<_>>(), [left]);
        assert_eq!(s.size(), 10_001);
        assert_eq!(s.sliding_difference(), Some(10_000));
        assert_eq!(Windowing::tumbling(MIN).sliding_difference(), None);
        // Closes once the stream time passes its end by the grace.
        assert!(!s.is_closed(left, Some(20_000)) && s.is_closed(left, Some(20_001)));
        assert_eq!(s.describe(), "sliding 10s, grace 5s, kept 3600s");
        assert_eq!(s.expires(Duration::ZERO).retention(), 5_000);

        // The latest event is stored before the value, and read back.
        let stored = s.entry_value(left, 12_000, b"v");
        assert_eq!(
            s.entry_with_latest(5_000, &stored).unwrap(),
            (left, Some(12_000), &b"v"[..])
        );
        assert_eq!(s.entry(5_000, &stored).unwrap(), (left, &b"v"[..]));
        assert!(s.entry(5_000, &[0; 7]).is_err(), "too short for a time");

        // Which window holds the events up to t: none before the first.
        // Events at 0 and 5 s: [-10, 0], [-5, 5] and [0.001, 10.001] s.
        let d = |start: i64, latest| (w(start, start + 10_001), latest);
        let windows = [d(-10_000, 0), d(-5_000, 5_000), d(1, 5_000)];
        assert_eq!(s.holding(&windows, -1), None);
        assert_eq!(s.holding(&windows, 0), Some(0));
        assert_eq!(s.holding(&windows, 5_000), Some(1));
        assert_eq!(s.holding(&windows, 10_000), Some(1));
        assert_eq!(s.holding(&windows, 10_001), Some(2), "5 s only");
        assert_eq!(s.holding(&windows, 15_000), Some(2));
        assert_eq!(s.holding(&windows, 15_001), None, "the last is 5 s");
        assert_eq!(Windowing::tumbling(MIN).holding(&windows, 0), None);
    }
}
