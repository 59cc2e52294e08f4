//! The sentiment trend of a conversation: where it stands, where it is heading, and whether it
//! just fell sharply. A *swing* is a fall of more than `swing_delta` from the highest score of the
//! recent window to the current turn; it triggers even when the current level alone would not
//! (from a pleased 0.6 to a flat −0.1 is a swing; a steady −0.3 is not).

use serde::{Deserialize, Serialize};

/// Settings of [`sentiment_trend`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrendOptions {
    /// Number of most recent turns (the current one included) looked at for the slope and peak.
    pub window: usize,
    /// Fall from the window's peak to the current turn that counts as a swing.
    pub swing_delta: f32,
    /// Weight of the newest turn in the level (exponential smoothing), in `(0, 1]`.
    pub level_alpha: f32,
}

impl Default for TrendOptions {
    fn default() -> Self {
        Self {
            window: 4,
            swing_delta: 0.5,
            level_alpha: 0.5,
        }
    }
}

/// The trend over a conversation's per-turn scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SentimentTrend {
    /// Turns scored.
    pub turns: usize,
    /// The current turn's score (0 without turns).
    pub current: f32,
    /// Exponentially smoothed score, weighting recent turns most.
    pub level: f32,
    /// Least-squares slope over the window, in score per turn (0 with fewer than two turns).
    pub slope: f32,
    /// The highest score in the window before the current turn (the current score when alone).
    pub peak: f32,
    /// How far the current turn is below that peak (never negative).
    pub drop_from_peak: f32,
    /// True when the drop exceeds the swing delta.
    pub swing: bool,
}

/// Returns the trend of `scores`, oldest first; the last is the current turn.
pub fn sentiment_trend(scores: &[f32], options: &TrendOptions) -> SentimentTrend {
    let scores: Vec<f32> = scores
        .iter()
        .map(|s| if s.is_finite() { *s } else { 0.0 })
        .collect();
    let Some(&current) = scores.last() else {
        return SentimentTrend {
            turns: 0,
            current: 0.0,
            level: 0.0,
            slope: 0.0,
            peak: 0.0,
            drop_from_peak: 0.0,
            swing: false,
        };
    };
    let alpha = if options.level_alpha > 0.0 && options.level_alpha <= 1.0 {
        options.level_alpha
    } else {
        TrendOptions::default().level_alpha
    };
    let mut level = scores[0];
    for &s in &scores[1..] {
        level = alpha * s + (1.0 - alpha) * level;
    }
    let window = &scores[scores.len().saturating_sub(options.window.max(1))..];
    let slope = least_squares_slope(window);
    let earlier = &window[..window.len() - 1];
    let peak = earlier.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let peak = if peak.is_finite() { peak } else { current };
    let drop_from_peak = (peak - current).max(0.0);
    SentimentTrend {
        turns: scores.len(),
        current,
        level,
        slope,
        peak,
        drop_from_peak,
        swing: drop_from_peak > options.swing_delta,
    }
}

fn least_squares_slope(values: &[f32]) -> f32 {
    let n = values.len() as f32;
    if values.len() < 2 {
        return 0.0;
    }
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = values.iter().sum::<f32>() / n;
    let mut covariance = 0.0;
    let mut variance = 0.0;
    for (i, &y) in values.iter().enumerate() {
        let dx = i as f32 - mean_x;
        covariance += dx * (y - mean_y);
        variance += dx * dx;
    }
    covariance / variance
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_a_sharp_fall_even_at_a_moderate_level() {
        let trend = sentiment_trend(&[0.6, 0.5, -0.1], &TrendOptions::default());
        assert!(trend.swing, "{trend:?}");
        assert!((trend.drop_from_peak - 0.7).abs() < 1e-6);
        assert!(trend.slope < 0.0);
        assert!(trend.current > -0.3, "the level alone is not alarming");
    }

    #[test]
    fn does_not_flag_a_steady_negative_conversation() {
        let trend = sentiment_trend(&[-0.3, -0.35, -0.3, -0.32], &TrendOptions::default());
        assert!(!trend.swing, "{trend:?}");
        assert!(trend.level < -0.25);
    }

    #[test]
    fn looks_only_at_the_window() {
        let options = TrendOptions {
            window: 3,
            ..TrendOptions::default()
        };
        let trend = sentiment_trend(&[0.9, 0.0, 0.0, -0.2], &options);
        assert!(!trend.swing, "the 0.9 is outside the window: {trend:?}");
        let wide = sentiment_trend(&[0.9, 0.0, 0.0, -0.2], &TrendOptions::default());
        assert!(wide.swing);
    }

    #[test]
    fn handles_short_and_odd_input() {
        let empty = sentiment_trend(&[], &TrendOptions::default());
        assert_eq!(empty.turns, 0);
        assert!(!empty.swing);
        let one = sentiment_trend(&[-0.9], &TrendOptions::default());
        assert!(!one.swing);
        assert_eq!(one.slope, 0.0);
        let odd = sentiment_trend(&[f32::NAN, 0.8, -0.5], &TrendOptions::default());
        assert!(odd.swing);
        assert!(odd.level.is_finite());
    }

    #[test]
    fn levels_toward_recent_turns() {
        let trend = sentiment_trend(&[1.0, 0.0], &TrendOptions::default());
        assert!((trend.level - 0.5).abs() < 1e-6);
        let trend = sentiment_trend(&[0.0, 0.0, 1.0], &TrendOptions::default());
        assert!((trend.level - 0.5).abs() < 1e-6);
        assert!(trend.slope > 0.0);
    }
}
