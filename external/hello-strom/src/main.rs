//! Declares a small app with the public API and prints what it declared; with
//! `worker` it would run it (see the wordcount example).

use strom::codec::{NoKey, Utf8};
use strom::App;

fn main() {
    let mut app = App::new("hello-strom");
    let lines = app
        .topic::<(), String>("lines")
        .with_key_codec(NoKey)
        .with_value_codec(Utf8);
    let lengths = app.table::<String, u64>("line-lengths", 0);
    app.agent(&lines)
        .filter(|event| !event.value.is_empty())
        .map(|line: String| line.len() as u64)
        .for_each(move |_ctx, event| {
            let _ = (&lengths, event.value);
            async move { Ok(()) }
        });
    println!("declared {app:?}");
}
