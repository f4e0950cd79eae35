//! Located policy errors: `file:line:column: path.to.field: message`.
//!
//! Every stage (YAML syntax, decoding, semantic validation, compilation) reports into a
//! [`PolicyErrors`], so a user sees every problem of a file at once.

use std::fmt;

/// One problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The file name as given by the caller (e.g. the path on the command line).
    pub file: String,
    /// 1-based line; 0 when the error has no position (e.g. the file could not be read).
    pub line: usize,
    /// 1-based column; 0 when the error has no position.
    pub column: usize,
    /// Dotted path to the field, e.g. `rules[2].when.user_agent`; empty for the document.
    pub path: String,
    /// What is wrong: lower case, no full stop.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for PolicyError {}

/// All problems found in one file, in file order. Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl PolicyErrors {
    /// Adds one error.
    pub fn push(&mut self, e: PolicyError) {
        self.0.push(e);
    }

    /// True when nothing was reported.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Iterates over the errors.
    pub fn iter(&self) -> std::slice::Iter<'_, PolicyError> {
        self.0.iter()
    }

    /// A single error without position (I/O and the like).
    pub fn unlocated(file: impl Into<String>, message: impl Into<String>) -> Self {
        PolicyErrors(vec![PolicyError {
            file: file.into(),
            line: 0,
            column: 0,
            path: String::new(),
            message: message.into(),
        }])
    }

    /// Sorts by position so output follows the file.
    pub fn sort(&mut self) {
        self.0.sort_by_key(|e| (e.line, e.column));
    }
}

impl fmt::Display for PolicyErrors {
    /// One error per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_as_file_line_column_path_message() {
        let e = PolicyError {
            file: "policy.yaml".into(),
            line: 12,
            column: 7,
            path: "rules[0].when.ip[1]".into(),
            message: "`10.0.0.1/8` has host bits set".into(),
        };
        assert_eq!(
            e.to_string(),
            "policy.yaml:12:7: rules[0].when.ip[1]: `10.0.0.1/8` has host bits set"
        );
        let u = PolicyErrors::unlocated("p.yaml", "no such file");
        assert_eq!(u.to_string(), "p.yaml: no such file");
    }
}
