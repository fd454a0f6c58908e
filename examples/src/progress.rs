//! The weight-generation progress bar. Generating a big model's experts takes a while, so the
//! user sees it advance; it draws on stderr so stdout stays clean for the report.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// A bar over `total` expert matrices, hidden when `quiet` (JSON output) or when stderr is not
/// a terminal (logs and pipes get no control characters).
pub fn weight_bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    // The template is fixed, so this only falls back if indicatif changes its syntax.
    let style = ProgressStyle::with_template(
        "generating weights [{bar:40}] {pos}/{len} expert matrices, {elapsed}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}
