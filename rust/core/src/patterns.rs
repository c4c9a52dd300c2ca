//! PEFT's `rank_pattern` / `alpha_pattern` keys, matched as PEFT matches them but in linear time.
//!
//! PEFT (`peft.utils.other.get_pattern_key`) takes the first key, in the config's order, for which
//! `re.match(rf"(.*\.)?({key})$", module_name)` matches, and otherwise the module name itself (an exact-name
//! entry). Python's `re` backtracks, so a key like `(.*.*)*x` never finishes; here every key is compiled by the
//! `regex` crate, whose matching time is linear in the name. A key that uses Python syntax this engine cannot
//! express (backreferences, look-around, ...) is refused with an error naming it, and so is a key whose meaning
//! would differ silently between the two engines (nested classes and set operations inside `[...]`, `\<`/`\>`
//! word boundaries, the `x` verbose flag).

use regex::{Regex, RegexBuilder};

use crate::error::{Error, Result};

/// Largest compiled program per key, in bytes (`regex`'s own default is 10 MiB; keys are short).
pub const MAX_PROGRAM_BYTES: usize = 1 << 20;
/// Deepest nesting of groups and repetitions in a key.
pub const MAX_NESTING: u32 = 64;
/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;

/// Compiled pattern keys, in the config's order.
#[derive(Debug, Clone)]
pub struct PatternKeys {
    keys: Vec<String>,
    regexes: Vec<Regex>,
}

fn refuse(key: &str, reason: impl Into<String>) -> Error {
    let shown: String = key.chars().take(200).collect();
    Error::PatternKey { key: shown, reason: reason.into() }
}

/// Constructs whose meaning differs between Python's `re` and the `regex` crate while both accept them.
fn silent_difference(key: &str) -> Option<&'static str> {
    let bytes = key.as_bytes();
    let mut in_class = false;
    let mut class_start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'\\' {
            let next = bytes.get(i + 1).copied();
            if !in_class && matches!(next, Some(b'<' | b'>')) {
                return Some("\\< and \\> are word boundaries here but literal characters in Python");
            }
            if !in_class && next == Some(b'b') && bytes.get(i + 2) == Some(&b'{') {
                return Some("\\b{...} is a word boundary here but a boundary and a repetition in Python");
            }
            i += 2;
            continue;
        }
        if in_class {
            // a ']' right after '[' or '[^' is a literal in both engines
            if c == b']' && i > class_start {
                in_class = false;
            } else if c == b'[' {
                return Some("'[' inside a character class starts a nested class here but is a literal in Python");
            } else if matches!(&bytes[i..], [b'&', b'&', ..] | [b'-', b'-', ..] | [b'~', b'~', ..]) {
                return Some("&&, -- and ~~ inside a character class are set operations here but literals in Python");
            }
            i += 1;
            continue;
        }
        if c == b'[' {
            in_class = true;
            class_start = i + 1 + usize::from(bytes.get(i + 1) == Some(&b'^'));
        } else if c == b'(' && bytes.get(i + 1) == Some(&b'?') {
            let flags = bytes[i + 2..].iter().take_while(|b| b.is_ascii_alphabetic() || **b == b'-');
            if flags.clone().any(|&b| b == b'x') {
                return Some("the verbose flag (?x) treats whitespace in classes differently from Python");
            }
        }
        i += 1;
    }
    None
}

impl PatternKeys {
    /// Compiles each key as PEFT's `(.*\.)?(key)$`, anchored at the start as `re.match` is.
    pub fn new<S: AsRef<str>>(keys: &[S]) -> Result<PatternKeys> {
        let mut regexes = Vec::with_capacity(keys.len());
        for key in keys {
            let key = key.as_ref();
            if key.len() > MAX_KEY_BYTES {
                return Err(refuse(key, format!("is {} bytes long (at most {MAX_KEY_BYTES})", key.len())));
            }
            if let Some(why) = silent_difference(key) {
                return Err(refuse(key, format!("cannot be matched exactly as Python's re would: {why}")));
            }
            // PEFT's pattern as written (the key may close and reopen its group, as in Python); `re.match`
            // anchors every alternative at the start, and Python's `$` also matches before a final newline
            let regex = RegexBuilder::new(&format!(r"\A(?:(.*\.)?({key})(?:\n?\z))"))
                .size_limit(MAX_PROGRAM_BYTES)
                .nest_limit(MAX_NESTING)
                .build()
                .map_err(|e| {
                    let detail = e.to_string().lines().last().unwrap_or_default().trim().to_string();
                    refuse(
                        key,
                        format!(
                            "is not a regular expression the linear-time matcher can run (backreferences, \
                             look-around and possessive or atomic groups are not supported; nor are patterns \
                             too large): {detail}"
                        ),
                    )
                })?;
            regexes.push(regex);
        }
        Ok(PatternKeys { keys: keys.iter().map(|k| k.as_ref().to_string()).collect(), regexes })
    }

    /// The index of the key PEFT chooses for `module`: the first whose pattern matches, else the key equal to
    /// the module name, else `None`.
    pub fn first_match(&self, module: &str) -> Option<usize> {
        self.regexes.iter().position(|r| r.is_match(module)).or_else(|| self.keys.iter().position(|k| k == module))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_key_in_order_wins_and_matches_whole_dotted_suffixes() {
        // expected values worked by hand from PEFT's rule: re.match(rf"(.*\.)?({key})$", name)
        let keys = PatternKeys::new(&["q_proj", "layers.0.self_attn.q_proj", r"layers\.\d+\.mlp\..*"]).unwrap();
        assert_eq!(keys.first_match("model.layers.0.self_attn.q_proj"), Some(0));
        assert_eq!(keys.first_match("model.layers.3.mlp.up_proj"), Some(2));
        assert_eq!(keys.first_match("model.layers.0.self_attn.xq_proj"), None); // not at a dot boundary
        assert_eq!(keys.first_match("q_proj"), Some(0)); // the optional prefix may be empty
    }

    #[test]
    fn catastrophic_backtracking_pattern_runs_in_linear_time() {
        let keys = PatternKeys::new(&["(.*.*)*x"]).unwrap();
        assert_eq!(keys.first_match(&"a".repeat(10_000)), None);
        assert_eq!(keys.first_match(&format!("{}x", "a".repeat(10_000))), Some(0));
    }

    #[test]
    fn python_only_syntax_is_refused_naming_the_key() {
        for key in [r"(a)\1", "(?=q)q_proj", "(?<!k)v_proj", "(?P=x)", "[[:alpha:]]", r"a\<b", "[a&&b]", "(?x)a b"] {
            match PatternKeys::new(&[key]) {
                Err(Error::PatternKey { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        }
    }
}
