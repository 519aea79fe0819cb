//! Error messages for operators: an error with every cause below it, on one line.

use std::error::Error;

/// `head: cause: its cause ...`, from `source` down, each text once: tonic, hyper and
/// etcd-client repeat their causes in their own messages, or say only "transport error"
/// without them.
pub fn with_sources(head: String, mut source: Option<&(dyn Error + 'static)>) -> String {
    let mut out = head;
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

/// `err: cause: its cause ...`.
pub fn chain(err: &(dyn Error + 'static)) -> String {
    with_sources(err.to_string(), err.source())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_once_each() {
        let e = Outer(std::io::Error::other("refused"));
        assert_eq!(chain(&e), "outer: refused");
        assert_eq!(with_sources("head: refused".into(), Some(&e.0)), "head: refused");
    }
}
