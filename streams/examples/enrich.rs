//! Page views enriched with user profiles: the global table `profiles` holds
//! all of topic `users` (user id → profile) on every worker; an agent reads
//! it for each page view from `page-views` and sends the enriched view to
//! `enriched-views`. The two topics may have any partition counts: a global
//! table needs no common partitioning. A view of a user without a profile
//! gets an empty name and country.
//!
//! ```text
//! STROM_BROKERS=127.0.0.1:9092 cargo run -p strom --example enrich -- worker
//! ```

use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use strom::codec::Utf8;
use strom::{App, GlobalTable, Topic};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    pub country: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageView {
    pub url: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EnrichedView {
    pub user: String,
    pub name: String,
    pub country: String,
    pub url: String,
}

/// The enrich app, with the topics and the global table its tests use.
pub struct Enrich {
    pub app: App,
    pub users: Topic<String, Profile>,
    pub views: Topic<String, PageView>,
    pub enriched: Topic<String, EnrichedView>,
    pub profiles: GlobalTable<String, Profile>,
}

/// Declares the enrichment on `app`, with topics `<prefix>users`,
/// `<prefix>page-views` and `<prefix>enriched-views`.
pub fn enrich(mut app: App, prefix: &str) -> Enrich {
    let users = app
        .topic::<String, Profile>(&format!("{prefix}users"))
        .with_key_codec(Utf8);
    let views = app
        .topic::<String, PageView>(&format!("{prefix}page-views"))
        .with_key_codec(Utf8);
    let enriched = app
        .topic::<String, EnrichedView>(&format!("{prefix}enriched-views"))
        .with_key_codec(Utf8);
    // All of `users` on every worker: the views need no common partitioning.
    let profiles = app.global_table("profiles", &users);

    let (table, out) = (profiles.clone(), enriched.clone());
    app.agent(&views).for_each(move |ctx, event| {
        let (profiles, enriched) = (table.clone(), out.clone());
        async move {
            let profile = ctx.get_global(&profiles, &event.key)?.unwrap_or_default();
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
    Enrich {
        app,
        users,
        views,
        enriched,
        profiles,
    }
}

#[allow(dead_code)]
fn main() -> ExitCode {
    enrich(App::new("enrich"), "").app.main()
}
