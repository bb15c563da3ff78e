//! The environment's tuning and comparison switches (STRATA_TENSOR_CORES, STRATA_HV_STAGES, ...):
//! each caller reads its own once. A value that means nothing is refused with a note on stderr
//! naming the variable and what it takes, never silently taken as the default.

use std::ops::RangeInclusive;

/// Whether `var` is set to `on` (unset, empty or "0": off).
pub fn flag(var: &str, on: &str) -> bool {
    match std::env::var(var) {
        Err(_) => false,
        Ok(v) if v == on => true,
        Ok(v) if v.is_empty() || v == "0" => false,
        Ok(v) => {
            eprintln!("strata: {var}={v} is not understood ({var}={on} turns it on); ignoring it");
            false
        }
    }
}

/// Which of `choices` `var` names, if set to one of them.
pub fn choice(var: &str, choices: &[&'static str]) -> Option<&'static str> {
    let v = std::env::var(var).ok()?;
    if v.is_empty() {
        return None;
    }
    let found = choices.iter().copied().find(|c| *c == v);
    if found.is_none() {
        eprintln!(
            "strata: {var}={v} is not one of {}; ignoring it",
            choices.join(", ")
        );
    }
    found
}

/// The number `var` holds, if set to one in `range`.
pub fn number(var: &str, range: RangeInclusive<usize>) -> Option<usize> {
    let v = std::env::var(var).ok()?;
    if v.is_empty() {
        return None;
    }
    let found = v.trim().parse::<usize>().ok().filter(|n| range.contains(n));
    if found.is_none() {
        eprintln!(
            "strata: {var}={v} is not a number from {} to {}; ignoring it",
            range.start(),
            range.end()
        );
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each case its own variable: tests run in parallel threads of one process.
    #[test]
    fn knobs_take_what_they_understand_and_nothing_else() {
        std::env::set_var("STRATA_KNOB_TEST_FLAG", "1");
        assert!(flag("STRATA_KNOB_TEST_FLAG", "1"));
        std::env::set_var("STRATA_KNOB_TEST_FLAG_OFF", "0");
        assert!(!flag("STRATA_KNOB_TEST_FLAG_OFF", "1"));
        std::env::set_var("STRATA_KNOB_TEST_FLAG_BAD", "yes");
        assert!(!flag("STRATA_KNOB_TEST_FLAG_BAD", "1"));
        assert!(!flag("STRATA_KNOB_TEST_UNSET", "1"));
        std::env::set_var("STRATA_KNOB_TEST_CHOICE", "mma");
        assert_eq!(
            choice("STRATA_KNOB_TEST_CHOICE", &["wgmma", "mma"]),
            Some("mma")
        );
        std::env::set_var("STRATA_KNOB_TEST_CHOICE_BAD", "tensor");
        assert_eq!(
            choice("STRATA_KNOB_TEST_CHOICE_BAD", &["wgmma", "mma"]),
            None
        );
        std::env::set_var("STRATA_KNOB_TEST_NUMBER", " 4");
        assert_eq!(number("STRATA_KNOB_TEST_NUMBER", 2..=8), Some(4));
        std::env::set_var("STRATA_KNOB_TEST_NUMBER_BIG", "9");
        assert_eq!(number("STRATA_KNOB_TEST_NUMBER_BIG", 2..=8), None);
        std::env::set_var("STRATA_KNOB_TEST_NUMBER_BAD", "four");
        assert_eq!(number("STRATA_KNOB_TEST_NUMBER_BAD", 2..=8), None);
    }
}
