//! The app the command-line tests run as a process: the word count of
//! `strom_it::wordcount`, its names from the environment (`STROM_IT_APP_ID`,
//! `STROM_IT_INPUT`, `STROM_IT_OUTPUT`). The word `boom` makes the agent
//! panic; with `STROM_IT_POLICY=stop` that stops the worker, otherwise the
//! event is skipped.

use std::process::ExitCode;

use strom::{App, ErrorPolicy};

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn main() -> ExitCode {
    let mut app = App::new(&var("STROM_IT_APP_ID", "strom-it-app")).with_partitions(3);
    if var("STROM_IT_POLICY", "skip") == "stop" {
        app = app.with_error_policy(ErrorPolicy::Stop);
    }
    let input = var("STROM_IT_INPUT", "sentences");
    let output = var("STROM_IT_OUTPUT", "word-counts-out");
    strom_it::wordcount_panicking_on(app, &input, &output, Some("boom")).main()
}
