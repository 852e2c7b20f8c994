//! The progress bar of a long `fm publish FILE` on a terminal.

use super::*;

/// The progress bar: for a file (or a pipe), on a terminal, once publishing has taken a
/// while.
pub(super) struct Progress {
    pub(super) bar: Option<ProgressBar>,
    pub(super) started: Instant,
    pub(super) shown: bool,
    /// Updates are throttled: the loop runs once per message and confirm.
    pub(super) last: Instant,
}

/// How often the progress bar is updated.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_millis(100);

impl Progress {
    pub(super) fn new(source: &Source) -> Progress {
        let template = |t: &str| ProgressStyle::with_template(t).expect("the template is valid");
        let bar = match source {
            Source::Lines { size, .. } if std::io::stderr().is_terminal() => Some(match size {
                Some(size) => {
                    ProgressBar::with_draw_target(Some(*size), ProgressDrawTarget::hidden())
                        .with_style(template(
                            "{bar:40} {percent:>3}% {msg} ({elapsed}, {eta} left)",
                        ))
                }
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
                    .with_style(template("{spinner} {msg} ({elapsed})")),
            }),
            _ => None,
        };
        let now = Instant::now();
        Progress {
            bar,
            started: now,
            shown: false,
            last: now,
        }
    }

    pub(super) fn update(&mut self, bytes: u64, published: u64) {
        let Some(bar) = &self.bar else { return };
        let now = Instant::now();
        if now < self.last + PROGRESS_EVERY {
            return;
        }
        self.last = now;
        if !self.shown && now >= self.started + SHOW_PROGRESS_AFTER {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            self.shown = true;
        }
        bar.set_position(bytes);
        bar.set_message(format!("{published} published"));
    }

    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
