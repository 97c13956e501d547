//! The tokens of Rust source that the module graph reads: identifiers and keywords, `::` and
//! other punctuation, with their lines; comments, string, byte and char literals, lifetimes and
//! numbers are skipped, so a path in a comment or a string is no reference.

/// One token of Rust source: an identifier or keyword, `::`, or another punctuation character.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

#[derive(Debug, Clone)]
pub(super) struct Token {
    pub(super) tok: Tok,
    pub(super) line: usize,
}

/// Tokens of `src` without comments, string/char literals, lifetimes and numbers.
pub(super) fn lex(src: &str) -> Vec<Token> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let ident_start = |ch: char| ch.is_alphabetic() || ch == '_';
    let ident_char = |ch: char| ch.is_alphanumeric() || ch == '_';
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    line += usize::from(c[i] == '\n');
                    i += 1;
                }
            }
        } else if ch == '"' {
            i = skip_string(&c, i + 1, &mut line);
        } else if ch == '\'' {
            // A char literal ('a', '\n', '\u{..}') or a lifetime / label ('a).
            if next == Some('\\') {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
            }
        } else if ident_start(ch) {
            let start = i;
            while i < c.len() && ident_char(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let at = c.get(i).copied();
            match (word.as_str(), at) {
                // Raw strings (r"…", r#"…"#, br"…", cr"…") and raw identifiers (r#type).
                ("r" | "br" | "cr", Some('"' | '#')) => {
                    let mut hashes = 0;
                    while c.get(i) == Some(&'#') {
                        hashes += 1;
                        i += 1;
                    }
                    if c.get(i) == Some(&'"') {
                        i = skip_raw_string(&c, i + 1, hashes, &mut line);
                    } else {
                        let s = i;
                        while i < c.len() && ident_char(c[i]) {
                            i += 1;
                        }
                        let raw: String = c[s..i].iter().collect();
                        out.push(Token {
                            tok: Tok::Ident(raw),
                            line,
                        });
                    }
                }
                ("b" | "c", Some('"')) => i = skip_string(&c, i + 1, &mut line),
                ("b", Some('\'')) => {
                    i += 1;
                    if c.get(i) == Some(&'\\') {
                        i += 1;
                    }
                    i += 1;
                    while i < c.len() && c[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                }
                _ => out.push(Token {
                    tok: Tok::Ident(word),
                    line,
                }),
            }
        } else if ch.is_ascii_digit() {
            while i < c.len() && ident_char(c[i]) {
                i += 1;
            }
        } else if ch == ':' && next == Some(':') {
            out.push(Token {
                tok: Tok::PathSep,
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                tok: Tok::Punct(ch),
                line,
            });
            i += 1;
        }
    }
    out
}

/// Index past the closing quote of a string whose body starts at `i`.
fn skip_string(c: &[char], mut i: usize, line: &mut usize) -> usize {
    while i < c.len() {
        match c[i] {
            '\\' => {
                *line += usize::from(c.get(i + 1) == Some(&'\n'));
                i += 2;
            }
            '"' => return i + 1,
            ch => {
                *line += usize::from(ch == '\n');
                i += 1;
            }
        }
    }
    i
}

/// Index past the end (`"` and `hashes` times `#`) of a raw string whose body starts at `i`.
fn skip_raw_string(c: &[char], mut i: usize, hashes: usize, line: &mut usize) -> usize {
    while i < c.len() {
        if c[i] == '"' && (0..hashes).all(|h| c.get(i + 1 + h) == Some(&'#')) {
            return i + 1 + hashes;
        }
        *line += usize::from(c[i] == '\n');
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexing_skips_comments_and_literals() {
        let idents = |src: &str| -> Vec<String> {
            lex(src)
                .into_iter()
                .filter_map(|t| match t.tok {
                    Tok::Ident(s) => Some(s),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(
            idents("a // crate::x\n/* crate::y /* z */ */ b \"crate::s\" r#\"q\"# 'c' '\\n' c"),
            ["a", "b", "c"]
        );
        assert_eq!(idents("fn f<'a>(x: &'a T) {}"), ["fn", "f", "x", "T"]);
        assert_eq!(idents("b'x' b\"y\" br#\"z\"# w"), ["w"]);
        let lines: Vec<usize> = lex("a\n\"x\ny\"\nb").iter().map(|t| t.line).collect();
        assert_eq!(lines, [1, 4]);
    }
}
