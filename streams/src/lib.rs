//! Strom: Faust-style stream processing for Kafka, in Rust.
//!
//! Declare an [`App`] with typed [`Topic`]s, [`Table`]s and agents, and run
//! it as a worker; start more workers with the same app id and they share the
//! partitions (and the tables that follow them).
//!
//! ```no_run
//! use strom::{App, codec::{NoKey, Utf8}};
//!
//! let mut app = App::new("wordcount");
//! let sentences = app.topic::<(), String>("sentences").with_key_codec(NoKey).with_value_codec(Utf8);
//! let counts = app.table::<String, u64>("word-counts", 0);
//! app.agent(&sentences)
//!     .flat_map(|line: String| line.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>())
//!     .group_by(|event| event.value.clone(), "words")
//!     .for_each_with(counts, |ctx, event, counts| async move {
//!         ctx.update(&counts, &event.key, |n| n + 1).await?;
//!         Ok(())
//!     });
//! app.main();
//! ```
//!
//! # Layout
//!
//! - [`app`]: [`App`] — settings, declarations, `run`, the command line.
//! - [`topic`]: [`Topic<K, V>`](Topic) and its codecs ([`codec`]).
//! - [`stream`]: agents — [`Stream`] operators (`filter`, `map`, `flat_map`,
//!   `group_by` through a repartition topic) ending in `for_each`.
//! - [`table`] and [`context`]: typed tables, read and written through [`Ctx`].
//! - `testing` (feature `testing`): `TestDriver`, the app run in a test
//!   without a broker.
//!
//! Underneath: `strom-worker` (the runtime), `strom-state` (tables),
//! `strom-client` (Kafka).
#![warn(missing_docs, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod app;
mod cli;
pub mod codec;
pub mod context;
pub mod error;
pub mod global;
mod join;
pub mod punctuator;
pub mod stream;
pub mod table;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topic;
mod window_join;

pub use app::App;
pub use context::{Ctx, TimerCtx};
pub use error::{Error, Result};
pub use global::GlobalTable;
pub use punctuator::Punctuation;
pub use stream::{Batches, Event, Stream};
pub use strom_client::{Compression, Header};
pub use strom_state::table_key;
pub use strom_worker::{axum, AgentError, ErrorPolicy, ProcessingGuarantee, Schedule, StoreKind};
pub use table::{SetTable, Table, Window, WindowedTable};
pub use topic::{Topic, TopicSettings};
pub use window_join::JoinWindows;
