//! Page views enriched with user profiles: one agent keeps the table
//! `profiles` (user id → profile) from topic `users`; another reads it for each
//! page view from `page-views` (keyed by user id, so co-partitioned with the
//! table) and sends the enriched view to `enriched-views`.
//!
//! ```text
//! STROM_BROKERS=127.0.0.1:9092 cargo run -p strom --example enrich -- worker
//! ```

use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use strom::codec::Utf8;
use strom::App;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Profile {
    name: String,
    country: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct PageView {
    url: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct EnrichedView {
    user: String,
    name: String,
    country: String,
    url: String,
}

fn main() -> ExitCode {
    let mut app = App::new("enrich");
    let users = app.topic::<String, Profile>("users").with_key_codec(Utf8);
    let views = app
        .topic::<String, PageView>("page-views")
        .with_key_codec(Utf8);
    let enriched = app
        .topic::<String, EnrichedView>("enriched-views")
        .with_key_codec(Utf8);
    let profiles = app.table::<String, Profile>("profiles", Profile::default());

    let table = profiles.clone();
    app.agent(&users).for_each(move |ctx, event| {
        let table = table.clone();
        async move {
            ctx.set(&table, &event.key, &event.value).await?;
            Ok(())
        }
    });
    app.agent(&views).for_each(move |ctx, event| {
        let (profiles, enriched) = (profiles.clone(), enriched.clone());
        async move {
            let profile = ctx.get(&profiles, &event.key).await?;
            let view = EnrichedView {
                user: event.key.clone(),
                name: profile.name,
                country: profile.country,
                url: event.value.url,
            };
            ctx.send(&enriched, &event.key, &view).await?;
            Ok(())
        }
    });
    app.main()
}
