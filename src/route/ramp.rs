//! A variant's weight on a wall-clock schedule. The weight is a pure function of the
//! config and the time, so every replica computes the same weight at the same moment
//! without talking to the others; with monotone sticky assignment a rising weight only
//! moves keys into the variant.

use std::time::{Duration, SystemTime};

/// `ramp: {start, steps: [{weight, hold}, ...]}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ramp {
    pub start: SystemTime,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub weight: f64,
    /// How long this step lasts; the last step's weight stays after it.
    pub hold: Duration,
}

/// Where a ramp stands at a moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Position {
    /// Before `start`: the variant's own `weight` applies.
    Pending,
    /// In step `i` (0-based).
    Step(usize),
    /// Past the last step's hold: its weight stays.
    Done,
}

impl Ramp {
    /// The weight at `now`, and where the ramp stands; `base` is the variant's `weight`,
    /// which applies before the ramp starts.
    pub fn at(&self, base: f64, now: SystemTime) -> (f64, Position) {
        let Ok(mut elapsed) = now.duration_since(self.start) else {
            return (base, Position::Pending);
        };
        for (i, s) in self.steps.iter().enumerate() {
            if elapsed < s.hold {
                return (s.weight, Position::Step(i));
            }
            elapsed -= s.hold;
        }
        let last = self.steps.last().map_or(base, |s| s.weight);
        (last, Position::Done)
    }

    /// The next moment after `now` at which the weight may change; `None` once done.
    pub fn next_change(&self, now: SystemTime) -> Option<SystemTime> {
        let mut at = self.start;
        if now < at {
            return Some(at);
        }
        for s in &self.steps {
            at += s.hold;
            if now < at {
                return Some(at);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp() -> Ramp {
        Ramp {
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000),
            steps: vec![
                Step {
                    weight: 1.0,
                    hold: Duration::from_secs(600),
                },
                Step {
                    weight: 5.0,
                    hold: Duration::from_secs(1800),
                },
                Step {
                    weight: 50.0,
                    hold: Duration::from_secs(60),
                },
            ],
        }
    }

    #[test]
    fn steps_follow_the_clock() {
        let r = ramp();
        let at = |s: u64| r.at(0.0, SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(999), (0.0, Position::Pending));
        assert_eq!(at(1_000), (1.0, Position::Step(0)));
        assert_eq!(at(1_599), (1.0, Position::Step(0)));
        assert_eq!(at(1_600), (5.0, Position::Step(1)));
        assert_eq!(at(3_400), (50.0, Position::Step(2)));
        assert_eq!(at(3_460), (50.0, Position::Done));
        assert_eq!(at(99_999), (50.0, Position::Done));
    }

    #[test]
    fn next_change_is_the_next_step_boundary() {
        let r = ramp();
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(r.next_change(t(0)), Some(t(1_000)));
        assert_eq!(r.next_change(t(1_000)), Some(t(1_600)));
        assert_eq!(r.next_change(t(3_459)), Some(t(3_460)));
        assert_eq!(r.next_change(t(3_460)), None);
    }
}
