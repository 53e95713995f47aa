//! Clicks per visit: clicks from `clicks` (keyed by the user, valued by the
//! page as text) are counted per session of their event time: a visit ends
//! after 30 minutes without a click, with a minute of grace for clicks that
//! arrive late.
//! When a visit closes it goes to `visits` as `{"start": ms, "end": ms,
//! "clicks": n}` (end: just after the last click), once per visit. Clicks
//! too late for any open visit go to `clicks-late` as they were read.
//!
//! ```text
//! STROM_BROKERS=127.0.0.1:9092 cargo run -p strom --example visits -- worker
//! curl localhost:6066/tables/clicks-per-visit/ann
//! ```

use std::process::ExitCode;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strom::codec::Utf8;
use strom::App;

/// A closed visit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Visit {
    pub start: i64,
    pub end: i64,
    pub clicks: u64,
}

fn main() -> ExitCode {
    let mut app = App::new("visits");
    let clicks = app
        .topic::<String, String>("clicks")
        .with_key_codec(Utf8)
        .with_value_codec(Utf8);
    let visits = app.topic::<String, Visit>("visits").with_key_codec(Utf8);
    let late = app
        .topic::<String, String>("clicks-late")
        .with_key_codec(Utf8)
        .with_value_codec(Utf8);
    let per_visit = app
        .table::<String, u64>("clicks-per-visit", 0)
        .with_key_codec(Utf8)
        .session(Duration::from_secs(30 * 60), |a, b| a + b)
        .grace(Duration::from_secs(60))
        .late_events(&late)
        .emit_on_close(move |ctx, user, window, clicks| {
            let visits = visits.clone();
            async move {
                let visit = Visit {
                    start: window.start,
                    end: window.end,
                    clicks,
                };
                ctx.send(&visits, &user, &visit).await?;
                Ok(())
            }
        });
    app.agent(&clicks)
        .for_each_with(per_visit, |ctx, click, per_visit| async move {
            ctx.update_windows(&per_visit, &click.key, |n| n + 1)
                .await?;
            Ok(())
        });
    app.main()
}
