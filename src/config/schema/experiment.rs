//! The experiment's parts of a route: its guardrail (with fleet mode) and its
//! variants' ramps, with RFC 3339 times.

use super::*;

pub(super) fn guardrail(node: &Node, path: String, errs: &mut Errors) -> Option<GuardrailSpec> {
    let mut obj = Obj::new(node, path.clone(), errs)?;
    let control = obj.req("control", name);
    let errors = obj.opt("errors", boolean).unwrap_or(true);
    let slow = obj.opt("slow", duration);
    let slow_ttft = obj.opt("slow_ttft", duration);
    let slow_tpot = obj.opt("slow_tpot", duration);
    let alpha = obj.opt("alpha", alpha).unwrap_or(0.001);
    let min_bad_events = obj.opt("min_bad_events", positive_int).unwrap_or(10);
    let warmup = obj
        .opt("warmup", duration_or_zero)
        .unwrap_or(Duration::from_secs(30));
    let action = obj.opt("action", action).unwrap_or(Action::Rollback);
    let fleet_max_pods = obj.opt("fleet", fleet);
    obj.finish(&[
        "fleet",
        "control",
        "errors",
        "slow",
        "slow_ttft",
        "slow_tpot",
        "alpha",
        "min_bad_events",
        "warmup",
        "action",
    ]);
    if !errors && slow.is_none() && slow_ttft.is_none() && slow_tpot.is_none() {
        return errs.push(
            path,
            "watches nothing: set `errors: true` or a `slow`, `slow_ttft` or `slow_tpot` threshold"
                .into(),
        );
    }
    Some(GuardrailSpec {
        control: control?,
        guardrail: Guardrail {
            control: 0,
            errors,
            slow,
            slow_ttft,
            slow_tpot,
            alpha,
            min_bad_events,
            warmup,
            action,
            fleet_max_pods,
        },
    })
}

/// `guardrail.fleet: {max_pods: N}`: judged across the fleet by `braid controller`.
pub(super) fn fleet(node: &Node, path: String, errs: &mut Errors) -> Option<u32> {
    let mut obj = Obj::new(node, path, errs)?;
    let max_pods = obj.req("max_pods", positive_int);
    obj.finish(&["max_pods"]);
    let n = max_pods?;
    Some(n.min(u64::from(u32::MAX)) as u32)
}

/// A false-trip probability: strictly between 0 and 0.5.
pub(super) fn alpha(node: &Node, path: String, errs: &mut Errors) -> Option<f64> {
    let a = number(node, path.clone(), errs)?;
    if !(a > 0.0 && a < 0.5) {
        return errs.push(path, format!("{a} must be between 0 and 0.5 (exclusive)"));
    }
    Some(a)
}

pub(super) fn action(node: &Node, path: String, errs: &mut Errors) -> Option<Action> {
    match string(node, path.clone(), errs)?.as_str() {
        "rollback" => Some(Action::Rollback),
        "hold" => Some(Action::Hold),
        other => errs.push(path, format!("{other:?} must be \"rollback\" or \"hold\"")),
    }
}

pub(super) fn ramp(node: &Node, path: String, errs: &mut Errors) -> Option<Ramp> {
    let mut obj = Obj::new(node, path.clone(), errs)?;
    let start = obj.req("start", time);
    let steps = obj.req("steps", |n, p, e| seq(n, p, e, ramp_step));
    obj.finish(&["start", "steps"]);
    let steps: Vec<Step> = steps?.into_iter().map(|(_, s)| s).collect();
    if steps.is_empty() {
        return errs.push(
            format!("{path}.steps"),
            "must list at least one step".into(),
        );
    }
    Some(Ramp {
        start: start?,
        steps,
    })
}

/// One step; its start is the ramp's start plus the holds before it, so steps are in
/// order by construction and a hold must be longer than zero.
pub(super) fn ramp_step(node: &Node, path: String, errs: &mut Errors) -> Option<Step> {
    let mut obj = Obj::new(node, path, errs)?;
    let weight = obj.req("weight", weight);
    let hold = obj.req("hold", duration);
    obj.finish(&["weight", "hold"]);
    Some(Step {
        weight: weight?,
        hold: hold?,
    })
}

/// An RFC 3339 time with its offset: `2026-12-01T09:00:00Z`, `2026-12-01T10:00:00+01:00`.
pub(super) fn time(node: &Node, path: String, errs: &mut Errors) -> Option<std::time::SystemTime> {
    let s = string(node, path.clone(), errs)?;
    match parse_rfc3339(&s) {
        Some(t) => Some(t),
        None => errs.push(
            path,
            format!("{s:?} is not an RFC 3339 time such as \"2026-12-01T09:00:00Z\""),
        ),
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)`; `None` when it is not one.
pub fn parse_rfc3339(s: &str) -> Option<std::time::SystemTime> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| std::str::from_utf8(part).ok()?.parse().ok())?
    };
    let sep = |i: usize, c: &[u8]| b.get(i).is_some_and(|x| c.contains(x));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month[(month - 1) as usize]
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0u32;
    if b.get(i) == Some(&b'.') {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        let frac = &s[i + 1..i + 1 + digits.min(9)];
        nanos = frac.parse::<u32>().ok()? * 10u32.pow(9 - frac.len() as u32);
        i += 1 + digits;
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && sep(i + 3, b":") => {
            let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            let o = h * 3600 + m * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    // Days since 1970-01-01 from a civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::new(secs, nanos))
}
