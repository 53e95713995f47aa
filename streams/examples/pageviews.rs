//! Page views per page and minute: views from `page-views` (keyed by the
//! page, valued `{"user": ...}`) are counted in one-minute tumbling windows
//! of their event time, with 10 s of grace for late views; when a minute
//! closes its final count goes to `page-views-per-minute` as
//! `{"start": ms, "end": ms, "count": n}` — once per page and minute.
//!
//! ```text
//! STROM_BROKERS=127.0.0.1:9092 cargo run -p strom --example pageviews -- worker
//! curl localhost:6066/tables/views-per-minute/%2Fhome
//! ```

use std::process::ExitCode;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strom::codec::Utf8;
use strom::{App, Topic, WindowedTable};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageView {
    pub user: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinuteCount {
    pub start: i64,
    pub end: i64,
    pub count: u64,
}

/// The pageviews app, with the topics and the table its tests use.
pub struct PageViews {
    pub app: App,
    pub views: Topic<String, PageView>,
    pub per_minute: Topic<String, MinuteCount>,
    pub counts: WindowedTable<String, u64>,
}

/// Declares the count on `app`, from `page-views` to `page-views-per-minute`.
pub fn pageviews(app: App) -> PageViews {
    pageviews_between(app, "page-views", "page-views-per-minute")
}

/// [`pageviews`] from topic `input` to topic `output`.
pub fn pageviews_between(mut app: App, input: &str, output: &str) -> PageViews {
    let views = app.topic::<String, PageView>(input).with_key_codec(Utf8);
    let per_minute = app
        .topic::<String, MinuteCount>(output)
        .with_key_codec(Utf8);
    let out = per_minute.clone();
    let counts = app
        .table::<String, u64>("views-per-minute", 0)
        .with_key_codec(Utf8)
        .tumbling(Duration::from_secs(60))
        .grace(Duration::from_secs(10))
        .emit_on_close(move |ctx, page, window, count| {
            let out = out.clone();
            async move {
                let minute = MinuteCount {
                    start: window.start,
                    end: window.end,
                    count,
                };
                ctx.send(&out, &page, &minute).await?;
                Ok(())
            }
        });
    app.agent(&views)
        .for_each_with(counts.clone(), |ctx, event, counts| async move {
            ctx.update_windows(&counts, &event.key, |n| n + 1).await?;
            Ok(())
        });
    PageViews {
        app,
        views,
        per_minute,
        counts,
    }
}

#[allow(dead_code)]
fn main() -> ExitCode {
    pageviews(App::new("pageviews")).app.main()
}
