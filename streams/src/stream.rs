//! Agents: a stream of typed events from one topic, shaped by operators and
//! consumed by an async handler. Each stage compiles to a worker processor.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use strom_client::consumer::ConsumerRecord;
use strom_client::producer::ProducerRecord;
use strom_client::Header;
use strom_state::TableKey;
use strom_worker::{AgentError, Context, DecodeError, ErrorPolicy, ProcessFuture, Processor};
use tokio::time::Instant;

use crate::app::App;
use crate::codec::{Codec, CodecError, Json};
use crate::context::Ctx;

/// One event: its key and value, and where it came from.
#[derive(Debug, Clone)]
pub struct Event<K, V> {
    /// The key.
    pub key: K,
    /// The value.
    pub value: V,
    /// The topic it was read from.
    pub topic: Arc<str>,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Milliseconds since the epoch.
    pub timestamp: i64,
    /// Its headers.
    pub headers: Vec<Header>,
}

impl<K, V> Event<K, V> {
    /// Where this event came from, its time and headers (moved, not
    /// cloned), and its key and value.
    pub(crate) fn split(self) -> (Event<(), ()>, K, V) {
        let Event {
            key,
            value,
            topic,
            partition,
            offset,
            timestamp,
            headers,
        } = self;
        let meta = Event {
            key: (),
            value: (),
            topic,
            partition,
            offset,
            timestamp,
            headers,
        };
        (meta, key, value)
    }

    /// A copy of where this event came from, its time and headers.
    fn meta(&self) -> Event<(), ()> {
        Event {
            key: (),
            value: (),
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            timestamp: self.timestamp,
            headers: self.headers.clone(),
        }
    }

    /// A copy of this event's key and metadata with `value` (for one event
    /// that becomes several).
    fn with_value<V2>(&self, value: V2) -> Event<K, V2>
    where
        K: Clone,
    {
        self.meta().join(self.key.clone(), value)
    }
}

impl Event<(), ()> {
    /// The event of this origin, time and headers with `key` and `value`.
    pub(crate) fn join<K, V>(self, key: K, value: V) -> Event<K, V> {
        Event {
            key,
            value,
            topic: self.topic,
            partition: self.partition,
            offset: self.offset,
            timestamp: self.timestamp,
            headers: self.headers,
        }
    }
}

/// Turns one record into the events a stage yields (decoding, then
/// operators), seeing the partition's context: at once, or, once an operator
/// must wait (a join reading a table), in a future.
pub(crate) enum Step<K, V> {
    Now(NowStep<K, V>),
    Later(LaterStep<K, V>),
}

impl<K, V> Clone for Step<K, V> {
    fn clone(&self) -> Self {
        match self {
            Step::Now(s) => Step::Now(s.clone()),
            Step::Later(s) => Step::Later(s.clone()),
        }
    }
}

type NowStep<K, V> =
    Arc<dyn Fn(&Context, ConsumerRecord) -> Result<Events<K, V>, CodecError> + Send + Sync>;
type LaterStep<K, V> = Arc<dyn Fn(&Context, ConsumerRecord) -> Later<K, V> + Send + Sync>;

/// The events of a record, once an operator that waits has made them.
pub(crate) type Later<K, V> =
    std::pin::Pin<Box<dyn Future<Output = Result<Events<K, V>, AgentError>> + Send>>;

/// The events of one record, made as they are taken: a stage sends or
/// handles each before the next is made, so one record that becomes many
/// events (a `flat_map` of a huge line) never holds them all in memory. An
/// operator that fails on an event (a join whose lookup fails) yields its
/// error in the event's place: the record fails there.
pub(crate) type Events<K, V> = Box<dyn Iterator<Item = Result<Event<K, V>, AgentError>> + Send>;

pub(crate) fn decode_step<K: Send + 'static, V: Send + 'static>(
    topic: &crate::Topic<K, V>,
) -> Step<K, V> {
    let (key, value, time) = (
        topic.spec.key.clone(),
        topic.spec.value.clone(),
        topic.spec.timestamp.clone(),
    );
    Step::Now(Arc::new(move |_: &Context, r: ConsumerRecord| {
        let mut event = Event {
            key: key.decode(r.key.as_deref())?,
            value: value.decode(r.value.as_deref())?,
            topic: r.topic,
            partition: r.partition,
            offset: r.offset,
            timestamp: r.timestamp,
            headers: r.headers,
        };
        if let Some(time) = &time {
            event.timestamp = time(&event);
        }
        Ok(Box::new(std::iter::once(Ok(event))) as Events<K, V>)
    }))
}

/// `step`, then `f` of the events it makes.
pub(crate) fn then_step<K, V, K2, V2, F>(step: Step<K, V>, f: Arc<F>) -> Step<K2, V2>
where
    K: 'static,
    V: 'static,
    F: Fn(&Context, Events<K, V>) -> Events<K2, V2> + Send + Sync + 'static,
{
    match step {
        Step::Now(step) => Step::Now(Arc::new(move |ctx: &Context, r: ConsumerRecord| {
            step(ctx, r).map(|events| f(ctx, events))
        })),
        Step::Later(step) => Step::Later(Arc::new(move |ctx: &Context, r: ConsumerRecord| {
            let (made, ctx, f) = (step(ctx, r), ctx.clone(), f.clone());
            Box::pin(async move { made.await.map(|events| f(&ctx, events)) })
        })),
    }
}

/// A stream of events being defined on an [`App`]: apply operators, then end
/// it with [`Stream::for_each`] (or it ends at a [`Stream::group_by`]'s
/// repartition topic).
pub struct Stream<'a, K, V> {
    pub(crate) app: &'a mut App,
    /// The topics it reads (several for a merged agent), each with how its
    /// records become events.
    pub(crate) inputs: Vec<Input<K, V>>,
    pub(crate) stage: Stage,
}

/// One topic a stream reads, and how its records become the stream's events.
pub(crate) struct Input<K, V> {
    pub topic: Arc<str>,
    pub step: Step<K, V>,
}

impl<K, V> Input<K, V> {
    pub(crate) fn of(topic: &crate::Topic<K, V>) -> Input<K, V>
    where
        K: Send + 'static,
        V: Send + 'static,
    {
        Input {
            topic: topic.spec.name.clone(),
            step: decode_step(topic),
        }
    }
}

/// Forgets one partition's state of an operator.
type Reset = Arc<dyn Fn(i32) + Send + Sync>;

/// How the runtime runs a stage's processor.
#[derive(Clone)]
pub(crate) struct Stage {
    /// Events of one partition the handler may take at once.
    pub concurrency: usize,
    /// The agent's error policy (`None`: the app's).
    pub policy: Option<ErrorPolicy>,
    /// What the stage's operators keep per partition (`enumerate`'s
    /// counters), forgotten when a worker starts on the partition.
    pub resets: Vec<Reset>,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("concurrency", &self.concurrency)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Default for Stage {
    fn default() -> Self {
        Stage {
            concurrency: 1,
            policy: None,
            resets: Vec::new(),
        }
    }
}

impl Stage {
    /// The stage after a topic in between: in order again, same policy.
    fn next(&self) -> Stage {
        Stage {
            concurrency: 1,
            policy: self.policy.clone(),
            resets: Vec::new(),
        }
    }

    /// Forgets what the operators keep for `partition`.
    fn reset(&self, partition: i32) {
        for reset in &self.resets {
            reset(partition);
        }
    }
}

impl<K, V> std::fmt::Debug for Stream<'_, K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("topics", &self.topics())
            .finish()
    }
}

impl<K, V> Stream<'_, K, V> {
    fn topics(&self) -> Vec<&str> {
        self.inputs.iter().map(|i| &*i.topic).collect()
    }
}

impl<'a, K, V> Stream<'a, K, V>
where
    K: Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    pub(crate) fn then<K2, V2>(
        self,
        f: impl Fn(&Context, Events<K, V>) -> Events<K2, V2> + Send + Sync + 'static,
    ) -> Stream<'a, K2, V2> {
        let f = Arc::new(f);
        self.each_step(move |step| then_step(step, f.clone()))
    }

    /// Adds an operator that waits (reads a table) to make each record's
    /// events: `f` gets them as the stages before it made them.
    pub(crate) fn then_later<K2: 'static, V2: 'static>(
        self,
        f: impl Fn(Context, Events<K, V>) -> Later<K2, V2> + Send + Sync + 'static,
    ) -> Stream<'a, K2, V2> {
        let f = Arc::new(f);
        self.each_step(move |step| match step {
            Step::Now(step) => {
                let f = f.clone();
                Step::Later(Arc::new(
                    move |ctx: &Context, r: ConsumerRecord| match step(ctx, r) {
                        Ok(events) => f(ctx.clone(), events),
                        Err(e) => Box::pin(std::future::ready(Err(undecodable(e)))),
                    },
                ))
            }
            Step::Later(step) => {
                let f = f.clone();
                Step::Later(Arc::new(move |ctx: &Context, r: ConsumerRecord| {
                    let (made, ctx, f) = (step(ctx, r), ctx.clone(), f.clone());
                    Box::pin(async move { f(ctx, made.await?).await })
                }))
            }
        })
    }

    /// The stream with `f` of each input's step.
    fn each_step<K2, V2>(self, f: impl Fn(Step<K, V>) -> Step<K2, V2>) -> Stream<'a, K2, V2> {
        let inputs = (self.inputs.into_iter())
            .map(|Input { topic, step }| Input {
                topic,
                step: f(step),
            })
            .collect();
        Stream {
            app: self.app,
            inputs,
            stage: self.stage,
        }
    }

    /// Replaces each event with `f(event)`.
    fn map_each<K2, V2>(
        self,
        f: impl Fn(Event<K, V>) -> Event<K2, V2> + Send + Sync + 'static,
    ) -> Stream<'a, K2, V2>
    where
        K2: Send + 'static,
        V2: Send + 'static,
    {
        let f = Arc::new(f);
        self.then(move |_, events| {
            let f = f.clone();
            Box::new(events.map(move |e| e.map(|e| f(e))))
        })
    }

    /// Lets the stream's handler ([`Stream::for_each`], [`Batches::for_each`],
    /// [`Stream::sink`]) work on up to `n` events of one partition at once, as
    /// Faust's agent `concurrency` does: for handlers that wait on something
    /// slow. Their order is then not kept, and offsets are committed up to the
    /// first event not yet done. Default 1: in order.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.stage.concurrency = n.max(1);
        self
    }

    /// What happens to events this agent fails on, or that do not decode
    /// (default: the app's policy, see
    /// [`App::with_error_policy`](crate::App::with_error_policy)). Applies to
    /// every stage of the agent, including those after a `group_by`.
    ///
    /// ```no_run
    /// use strom::ErrorPolicy;
    /// let mut app = strom::App::new("orders");
    /// let orders = app.topic::<String, u64>("orders");
    /// app.agent(&orders)
    ///     .on_error(ErrorPolicy::DeadLetter("orders-dead".into()))
    ///     .for_each(|_ctx, _event| async { Ok(()) });
    /// ```
    pub fn on_error(mut self, policy: ErrorPolicy) -> Self {
        self.stage.policy = Some(policy);
        self
    }

    /// Keeps the events `f` accepts.
    pub fn filter(
        self,
        f: impl Fn(&Event<K, V>) -> bool + Send + Sync + 'static,
    ) -> Stream<'a, K, V> {
        let f = Arc::new(f);
        self.then(move |_, events| {
            let f = f.clone();
            Box::new(events.filter(move |e| e.as_ref().map_or(true, |e| f(e))))
        })
    }

    /// Replaces each value with `f(value)`.
    pub fn map<V2: Send + Sync + 'static>(
        self,
        f: impl Fn(V) -> V2 + Send + Sync + 'static,
    ) -> Stream<'a, K, V2> {
        self.map_each(move |e| {
            let (meta, key, value) = e.split();
            meta.join(key, f(value))
        })
    }

    /// Replaces each event's key and value with what `f` makes of the whole
    /// event (Kafka Streams' `map`): its time, headers and where it came
    /// from stay. The events stay in their partition: to have them meet by
    /// the new key, [`group_by`](Stream::group_by) it.
    ///
    /// ```no_run
    /// let mut app = strom::App::new("shop");
    /// // Orders keyed by order id, valued by customer.
    /// let orders = app.topic::<String, String>("orders");
    /// app.agent(&orders)
    ///     // Keyed by customer now, the order id kept in the value.
    ///     .map_event(|e| (e.value, e.key))
    ///     .group_by(|e| e.key.clone(), "by-customer")
    ///     .for_each(|_ctx, e| async move {
    ///         println!("customer {} ordered {}", e.key, e.value);
    ///         Ok(())
    ///     });
    /// ```
    pub fn map_event<K2, V2>(
        self,
        f: impl Fn(Event<K, V>) -> (K2, V2) + Send + Sync + 'static,
    ) -> Stream<'a, K2, V2>
    where
        K2: Clone + Send + Sync + 'static,
        V2: Send + Sync + 'static,
    {
        self.map_each(move |e| {
            let meta = e.meta();
            let (key, value) = f(e);
            meta.join(key, value)
        })
    }

    /// Replaces each event's key with `f(event)` (Kafka Streams'
    /// `selectKey`), keeping its value. Like [`map_event`](Stream::map_event),
    /// it does not move events between partitions.
    pub fn select_key<K2>(
        self,
        f: impl Fn(&Event<K, V>) -> K2 + Send + Sync + 'static,
    ) -> Stream<'a, K2, V>
    where
        K2: Clone + Send + Sync + 'static,
    {
        self.map_each(move |e| {
            let key = f(&e);
            let (meta, _, value) = e.split();
            meta.join(key, value)
        })
    }

    /// Replaces each event's key with `f(key)`, keeping its value. Like
    /// [`map_event`](Stream::map_event), it does not move events between
    /// partitions.
    pub fn map_key<K2>(self, f: impl Fn(K) -> K2 + Send + Sync + 'static) -> Stream<'a, K2, V>
    where
        K2: Clone + Send + Sync + 'static,
    {
        self.map_each(move |e| {
            let (meta, key, value) = e.split();
            meta.join(f(key), value)
        })
    }

    /// Replaces each event with one event per item of `f(value)`.
    pub fn flat_map<V2, I>(self, f: impl Fn(V) -> I + Send + Sync + 'static) -> Stream<'a, K, V2>
    where
        V2: Send + Sync + 'static,
        I: IntoIterator<Item = V2>,
        I::IntoIter: Send + 'static,
    {
        let f = Arc::new(f);
        self.then(move |_, events| {
            let f = f.clone();
            Box::new(events.flat_map(move |e| {
                let (made, failed) = match e {
                    Ok(e) => {
                        let (meta, key, value) = e.split();
                        let meta = meta.join(key, ());
                        (
                            Some(f(value).into_iter().map(move |v| Ok(meta.with_value(v)))),
                            None,
                        )
                    }
                    Err(e) => (None, Some(Err(e))),
                };
                made.into_iter().flatten().chain(failed)
            }))
        })
    }

    /// Pairs each value with its position in the stream: 0, 1, 2, … per
    /// partition, counted from when this worker started processing it.
    pub fn enumerate(mut self) -> Stream<'a, K, (u64, V)> {
        let counters: Arc<std::sync::Mutex<std::collections::HashMap<i32, u64>>> = Arc::default();
        let forget = counters.clone();
        self.stage.resets.push(Arc::new(move |partition| {
            let mut counters = forget.lock().unwrap_or_else(|e| e.into_inner());
            counters.remove(&partition);
        }));
        // Numbered when the record is handed over, in offset order, whatever
        // the concurrency; so this stage holds a record's events at once.
        self.then(move |_, events| {
            let mut counters = counters.lock().unwrap_or_else(|e| e.into_inner());
            let numbered: Vec<_> = events
                .map(|e| {
                    e.map(|e| {
                        let n = counters.entry(e.partition).or_default();
                        let i = *n;
                        *n += 1;
                        let (meta, key, value) = e.split();
                        meta.join(key, (i, value))
                    })
                })
                .collect();
            Box::new(numbered.into_iter())
        })
    }

    /// Writes the events to `topic` (with its codecs, partitioned by key) and
    /// goes on from there: later stages read `topic`, so the events are durable
    /// in between and another app can read them too.
    pub fn through(self, topic: &crate::Topic<K, V>) -> Stream<'a, K, V> {
        let stage = self.stage.next();
        let app = self.sink_to(topic);
        Stream {
            app,
            inputs: vec![Input::of(topic)],
            stage,
        }
    }

    /// Ends the stream by sending every event to `topic` (with its codecs,
    /// partitioned by key, headers kept): Faust's agent sink.
    pub fn sink(self, topic: &crate::Topic<K, V>) {
        self.sink_to(topic);
    }

    fn sink_to(self, topic: &crate::Topic<K, V>) -> &'a mut App {
        if topic.spec.pattern {
            (self.app.misdeclared).push(format!(
                "an agent sends to {:?}, a pattern of topic names, which is read only",
                topic.spec.name
            ));
        }
        for Input {
            topic: source,
            step,
        } in self.inputs
        {
            self.app.add_processor(
                Arc::new(Through {
                    source,
                    step,
                    target: topic.spec.name.clone(),
                    key: topic.spec.key.clone(),
                    value: topic.spec.value.clone(),
                    stage: self.stage.clone(),
                }),
                format!("sink → {}", topic.spec.name),
            );
        }
        self.app
    }

    /// Collects the events of each partition into batches of `n`, handing
    /// over a shorter batch once its first event has waited `within` (Faust's
    /// `stream.take`), or when the partition is revoked or the worker stops.
    /// Offsets are committed only below the events a batch still holds.
    pub fn take(self, n: usize, within: Duration) -> Batches<'a, K, V> {
        Batches {
            stream: self,
            n: n.max(1),
            within,
        }
    }

    /// Re-keys the stream by `key` through the internal topic
    /// `<app-id>-<topic>-<name>-repartition` (created with the source's
    /// partition count), so events with the same key meet in one partition —
    /// the one holding that key's table entries. The new key is written as
    /// JSON, so it lands where a table with the default key codec keeps it
    /// (see [`Table`](crate::Table)'s partitioning rule).
    pub fn group_by<K2>(
        self,
        key: impl Fn(&Event<K, V>) -> K2 + Send + Sync + 'static,
        name: &str,
    ) -> Stream<'a, K2, V>
    where
        K2: TableKey + Clone + Send + Sync + 'static,
        Json: Codec<K2>,
        V: Serialize + DeserializeOwned,
    {
        let first = self.inputs.first().map_or("", |i| &*i.topic).to_owned();
        let target: Arc<str> = Arc::from(format!("{}-{first}-{name}-repartition", self.app.id(),));
        self.app.declare_repartition(&target, &first);
        let stage = self.stage.next();
        let key: Arc<KeyFn<K, V, K2>> = Arc::new(key);
        for Input {
            topic: source,
            step,
        } in self.inputs
        {
            self.app.add_processor(
                Arc::new(Repartition {
                    source,
                    step,
                    key: key.clone(),
                    target: target.clone(),
                    stage: self.stage.clone(),
                }),
                format!("group_by → {target}"),
            );
        }
        let step: Step<K2, V> = Step::Now(Arc::new(|_: &Context, r: ConsumerRecord| {
            let key = Codec::<K2>::decode(&Json, r.key.as_deref())?;
            let value = Codec::<V>::decode(&Json, r.value.as_deref())?;
            Ok(Box::new(std::iter::once(Ok(Event {
                key,
                value,
                topic: r.topic,
                partition: r.partition,
                offset: r.offset,
                timestamp: r.timestamp,
                headers: r.headers,
            }))) as Events<K2, V>)
        }));
        Stream {
            app: self.app,
            stage,
            inputs: vec![Input {
                topic: target,
                step,
            }],
        }
    }

    /// Ends the stream: `f` handles each event, in order per partition. An error
    /// it returns is logged with the event's coordinates; the partition goes on.
    pub fn for_each<F, Fut>(self, f: F)
    where
        F: Fn(Ctx, Event<K, V>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
    {
        let f = Arc::new(f);
        for Input { topic, step } in self.inputs {
            self.app.add_processor(
                Arc::new(ForEach {
                    source: topic,
                    step,
                    f: f.clone(),
                    stage: self.stage.clone(),
                }),
                "for_each".into(),
            );
        }
    }

    /// [`for_each`](Stream::for_each) with `with` handed to `f` for each
    /// event, cloned: put the tables and topics the handler uses in it
    /// (their handles are cheap to clone), and the handler needs no
    /// `let x = x.clone();` lines. (An `async` closure borrowing what it
    /// captures cannot be required to make `Send` futures on stable Rust,
    /// so handlers stay closures returning `async move` blocks.)
    ///
    /// ```no_run
    /// let mut app = strom::App::new("shop");
    /// let orders = app.topic::<String, u64>("orders");
    /// let big = app.topic::<String, u64>("big-orders");
    /// let totals = app.table::<String, u64>("totals", 0);
    /// app.agent(&orders).for_each_with((totals, big), |ctx, order, (totals, big)| async move {
    ///     let total = ctx.update(&totals, &order.key, |t| t + order.value).await?;
    ///     if order.value > 1_000 {
    ///         ctx.send(&big, &order.key, &total).await?;
    ///     }
    ///     Ok(())
    /// });
    /// ```
    pub fn for_each_with<S, F, Fut>(self, with: S, f: F)
    where
        S: Clone + Send + Sync + 'static,
        F: Fn(Ctx, Event<K, V>, S) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
    {
        self.for_each(move |ctx, event| f(ctx, event, with.clone()))
    }
}

/// A stream cut into batches by [`Stream::take`]; end it with
/// [`Batches::for_each`].
pub struct Batches<'a, K, V> {
    stream: Stream<'a, K, V>,
    n: usize,
    within: Duration,
}

impl<K, V> std::fmt::Debug for Batches<'_, K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batches")
            .field("topics", &self.stream.topics())
            .field("n", &self.n)
            .field("within", &self.within)
            .finish()
    }
}

impl<K, V> Batches<'_, K, V>
where
    K: Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// Ends the stream: `f` handles each batch (never empty), in order per
    /// partition. An error it returns is logged; the partition goes on.
    pub fn for_each<F, Fut>(self, f: F)
    where
        F: Fn(Ctx, Vec<Event<K, V>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
    {
        let stream = self.stream;
        let f = Arc::new(f);
        for Input { topic, step } in stream.inputs {
            stream.app.add_processor(
                Arc::new(TakeForEach {
                    source: topic,
                    step,
                    n: self.n,
                    within: self.within,
                    f: f.clone(),
                    stage: stream.stage.clone(),
                    held: std::sync::Mutex::new(HashMap::new()),
                    handing_on: Arc::default(),
                }),
                format!("take({}, {:?}).for_each", self.n, self.within),
            );
        }
    }

    /// [`for_each`](Batches::for_each) with `with` handed to `f` for each
    /// batch, cloned (see [`Stream::for_each_with`]).
    pub fn for_each_with<S, F, Fut>(self, with: S, f: F)
    where
        S: Clone + Send + Sync + 'static,
        F: Fn(Ctx, Vec<Event<K, V>>, S) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
    {
        self.for_each(move |ctx, batch| f(ctx, batch, with.clone()))
    }
}

/// Events of one partition waiting for their batch to fill.
struct Held<K, V> {
    events: Vec<Event<K, V>>,
    since: Instant,
}

/// Per partition, the first offsets of batches being handed on (their
/// handler still runs), with how many start there.
type HandingOn = Arc<std::sync::Mutex<HashMap<i32, BTreeMap<i64, usize>>>>;

struct TakeForEach<K, V, F> {
    source: Arc<str>,
    step: Step<K, V>,
    n: usize,
    within: Duration,
    f: Arc<F>,
    stage: Stage,
    held: std::sync::Mutex<HashMap<i32, Held<K, V>>>,
    /// Batches taken out of `held` whose handler has not finished: they still
    /// count as held, so no offset is committed past them — with
    /// `concurrency`, the event that completes a batch may finish long after
    /// the events in it.
    handing_on: HandingOn,
}

impl<K, V, F> TakeForEach<K, V, F> {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Held<K, V>>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Books a batch starting at `first` as being handed on until the guard
    /// drops (the handler ended, failed, panicked or was cancelled).
    fn handing_on(&self, partition: i32, first: i64) -> HandedOn {
        let mut flying = self.handing_on.lock().unwrap_or_else(|e| e.into_inner());
        *flying
            .entry(partition)
            .or_default()
            .entry(first)
            .or_default() += 1;
        HandedOn {
            map: self.handing_on.clone(),
            partition,
            first,
        }
    }
}

/// Keeps a batch booked as being handed on while it lives.
struct HandedOn {
    map: HandingOn,
    partition: i32,
    first: i64,
}

impl Drop for HandedOn {
    fn drop(&mut self) {
        let mut flying = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(batches) = flying.get_mut(&self.partition) {
            if let Some(n) = batches.get_mut(&self.first) {
                *n -= 1;
                if *n == 0 {
                    batches.remove(&self.first);
                }
            }
        }
    }
}

impl<K, V, F, Fut> Processor for TakeForEach<K, V, F>
where
    K: Send + 'static,
    V: Send + 'static,
    F: Fn(Ctx, Vec<Event<K, V>>) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
{
    fn topic(&self) -> &str {
        &self.source
    }

    fn concurrency(&self) -> usize {
        self.stage.concurrency
    }

    fn error_policy(&self) -> Option<&ErrorPolicy> {
        self.stage.policy.as_ref()
    }

    fn process(&self, ctx: Context, record: ConsumerRecord) -> ProcessFuture<'_> {
        // A record's events are made before any joins a batch: one that
        // fails fails the record with nothing of it held (its policy may
        // process it again, or skip it whole).
        let collect = |events: Events<K, V>| events.collect::<Result<Vec<_>, _>>();
        match events(&self.step, &ctx, record) {
            Made::Now(events) => match events.and_then(collect) {
                Ok(events) => self.hand_on(ctx, events),
                Err(e) => failed(e),
            },
            Made::Later(events) => Box::pin(async move {
                let events = collect(events.await?)?;
                self.hand_on(ctx, events).await
            }),
        }
    }

    fn flush(&self, ctx: Context) -> ProcessFuture<'_> {
        let partition = ctx.partition();
        let batch = self.held().remove(&partition);
        let work = batch.map(|b| {
            let first = b.events.iter().map(|e| e.offset).min().unwrap_or(i64::MAX);
            let ctx = Ctx::for_batch(ctx, &b.events);
            (self.handing_on(partition, first), (*self.f)(ctx, b.events))
        });
        Box::pin(async move {
            match work {
                Some((_handing_on, w)) => w.await,
                None => Ok(()),
            }
        })
    }

    fn held_from(&self, partition: i32) -> Option<i64> {
        let held = self
            .held()
            .get(&partition)
            .and_then(|b| b.events.iter().map(|e| e.offset).min());
        let flying = self
            .handing_on
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&partition)
            .and_then(|b| b.keys().next().copied());
        held.into_iter().chain(flying).min()
    }

    fn deadline(&self, partition: i32) -> Option<Instant> {
        self.held().get(&partition).map(|b| b.since + self.within)
    }

    fn reset(&self, partition: i32) {
        self.held().remove(&partition);
        self.stage.reset(partition);
    }
}

impl<K, V, F, Fut> TakeForEach<K, V, F>
where
    K: Send + 'static,
    V: Send + 'static,
    F: Fn(Ctx, Vec<Event<K, V>>) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
{
    /// Adds a record's events to their partition's batch; hands on each
    /// batch they fill.
    fn hand_on(&self, ctx: Context, decoded: Vec<Event<K, V>>) -> ProcessFuture<'_> {
        let partition = ctx.partition();
        let mut full = Vec::new();
        {
            let mut held = self.held();
            for event in decoded {
                ctx.observe_event_time(event.timestamp);
                let batch = held.entry(partition).or_insert_with(|| Held {
                    events: Vec::with_capacity(self.n),
                    since: Instant::now(),
                });
                batch.events.push(event);
                if batch.events.len() >= self.n {
                    full.extend(held.remove(&partition).map(|b| b.events));
                }
            }
        }
        let work: Vec<(HandedOn, Fut)> = full
            .into_iter()
            .map(|b| {
                let first = b.iter().map(|e| e.offset).min().unwrap_or(i64::MAX);
                let ctx = Ctx::for_batch(ctx.clone(), &b);
                (self.handing_on(partition, first), (*self.f)(ctx, b))
            })
            .collect();
        Box::pin(async move {
            for (_handing_on, w) in work {
                w.await?;
            }
            Ok(())
        })
    }
}

/// A record that does not decode: a [`DecodeError`], which the runtime
/// handles by the agent's error policy.
fn undecodable(e: CodecError) -> AgentError {
    Box::new(DecodeError(e.to_string()))
}

/// A record's events, made now or later (see [`Step`]).
enum Made<K, V> {
    Now(Result<Events<K, V>, AgentError>),
    Later(Later<K, V>),
}

impl<K, V> Made<K, V> {
    async fn get(self) -> Result<Events<K, V>, AgentError> {
        match self {
            Made::Now(events) => events,
            Made::Later(events) => events.await,
        }
    }
}

/// Makes a record's events.
fn events<K, V>(step: &Step<K, V>, ctx: &Context, record: ConsumerRecord) -> Made<K, V> {
    match step {
        Step::Now(step) => Made::Now(step(ctx, record).map_err(undecodable)),
        Step::Later(step) => Made::Later(step(ctx, record)),
    }
}

/// An event's time to send on with it; `None` (the producer stamps the
/// current time) for an event without one (a negative timestamp).
fn known_time(timestamp: i64) -> Option<i64> {
    (timestamp >= 0).then_some(timestamp)
}

/// The future of an event that failed before any work began.
fn failed(e: AgentError) -> ProcessFuture<'static> {
    Box::pin(async move { Err(e) })
}

struct ForEach<K, V, F> {
    source: Arc<str>,
    step: Step<K, V>,
    f: Arc<F>,
    stage: Stage,
}

impl<K, V, F, Fut> Processor for ForEach<K, V, F>
where
    K: Send + 'static,
    V: Send + 'static,
    F: Fn(Ctx, Event<K, V>) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
{
    fn topic(&self) -> &str {
        &self.source
    }

    fn concurrency(&self) -> usize {
        self.stage.concurrency
    }

    fn error_policy(&self) -> Option<&ErrorPolicy> {
        self.stage.policy.as_ref()
    }

    fn reset(&self, partition: i32) {
        self.stage.reset(partition);
    }

    fn process(&self, ctx: Context, record: ConsumerRecord) -> ProcessFuture<'_> {
        let source = crate::context::Source::new(record.clone());
        let made = events(&self.step, &ctx, record);
        Box::pin(async move {
            for e in made.get().await? {
                let e = e?;
                ctx.observe_event_time(e.timestamp);
                let ctx = Ctx {
                    inner: ctx.clone(),
                    event_time: Some(e.timestamp),
                    source: Some(source.clone()),
                };
                (*self.f)(ctx, e).await?;
            }
            Ok(())
        })
    }
}

/// Computes an event's new key.
type KeyFn<K, V, K2> = dyn Fn(&Event<K, V>) -> K2 + Send + Sync;

struct Repartition<K, V, K2> {
    source: Arc<str>,
    step: Step<K, V>,
    key: Arc<KeyFn<K, V, K2>>,
    target: Arc<str>,
    stage: Stage,
}

impl<K, V, K2> Processor for Repartition<K, V, K2>
where
    K: Send + 'static,
    V: Serialize + Send + 'static,
    K2: Send + 'static,
    Json: Codec<K2>,
{
    fn topic(&self) -> &str {
        &self.source
    }

    fn error_policy(&self) -> Option<&ErrorPolicy> {
        self.stage.policy.as_ref()
    }

    fn reset(&self, partition: i32) {
        self.stage.reset(partition);
    }

    fn process(&self, ctx: Context, record: ConsumerRecord) -> ProcessFuture<'_> {
        let made = events(&self.step, &ctx, record);
        Box::pin(async move {
            for e in made.get().await? {
                let e = e?;
                ctx.observe_event_time(e.timestamp);
                let key = Codec::<K2>::encode(&Json, &(self.key)(&e))?;
                let value = serde_json::to_vec(&e.value)?;
                let mut record = ProducerRecord::to(&self.target).value(&value);
                record.key = key.as_deref();
                record.timestamp = known_time(e.timestamp);
                record.headers = &e.headers;
                ctx.send(record).await?;
            }
            Ok(())
        })
    }
}

struct Through<K, V> {
    source: Arc<str>,
    step: Step<K, V>,
    target: Arc<str>,
    key: Arc<dyn Codec<K>>,
    value: Arc<dyn Codec<V>>,
    stage: Stage,
}

impl<K, V> Processor for Through<K, V>
where
    K: Send + 'static,
    V: Send + 'static,
{
    fn topic(&self) -> &str {
        &self.source
    }

    fn concurrency(&self) -> usize {
        self.stage.concurrency
    }

    fn error_policy(&self) -> Option<&ErrorPolicy> {
        self.stage.policy.as_ref()
    }

    fn reset(&self, partition: i32) {
        self.stage.reset(partition);
    }

    fn process(&self, ctx: Context, record: ConsumerRecord) -> ProcessFuture<'_> {
        let made = events(&self.step, &ctx, record);
        Box::pin(async move {
            for e in made.get().await? {
                let e = e?;
                ctx.observe_event_time(e.timestamp);
                let (key, value) = (self.key.encode(&e.key)?, self.value.encode(&e.value)?);
                let mut record = ProducerRecord::to(&self.target);
                record.timestamp = known_time(e.timestamp);
                record.key = key.as_deref();
                record.value = value.as_deref();
                record.headers = &e.headers;
                ctx.send(record).await?;
            }
            Ok(())
        })
    }
}
