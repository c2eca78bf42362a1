//! The CEL type a real API server gives each schema node of a CRD, and the part of cel-go's
//! type checker that decides which field selections a `x-kubernetes-validations` rule may make.
//!
//! `kube-cel` only parses rules, so without this a rule naming a property the server leaves out
//! of the type (one with no `type`, or a name that cannot be escaped) would be accepted here and
//! refused by a real server at CRD create. The type follows apiextensions' `SchemaDeclType` and
//! the escaping of `k8s.io/apiserver/pkg/cel/escaping.go`; the checker follows cel-go's
//! `checkSelectField` and `checkComprehension`, with the same error texts and positions. What
//! it does not model (function overloads, undeclared names) it treats as `dyn`, so it never
//! refuses more than cel-go would.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// CEL words a property name must not be, escaped as `__word__` (`escaping.go`).
const RESERVED: &[&str] = &[
    "true",
    "false",
    "null",
    "in",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
];

/// cel-go leaves out the source line of an error whose line is longer than this (bytes).
const MAX_SNIPPET_LENGTH: usize = 16384;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Ty {
    /// Something this checker does not type; cel-go may know more, so anything goes.
    Unknown,
    /// cel-go's `dyn`, as `x-kubernetes-int-or-string` is declared.
    Dyn,
    Bool,
    Int,
    Uint,
    Double,
    String,
    Bytes,
    Duration,
    Timestamp,
    Null,
    List(Box<Ty>),
    Map(Box<Ty>, Box<Ty>),
    Object(Rc<Object>),
    Optional(Box<Ty>),
}

/// A schema object with `properties`: only the typed, escapable ones are fields.
#[derive(Debug, PartialEq)]
pub(crate) struct Object {
    name: String,
    fields: BTreeMap<String, Ty>,
}

impl Ty {
    /// How cel-go prints a type in its messages (`FormatCELType`).
    fn display(&self) -> String {
        match self {
            Ty::Unknown | Ty::Dyn => "dyn".into(),
            Ty::Bool => "bool".into(),
            Ty::Int => "int".into(),
            Ty::Uint => "uint".into(),
            Ty::Double => "double".into(),
            Ty::String => "string".into(),
            Ty::Bytes => "bytes".into(),
            Ty::Duration => "duration".into(),
            Ty::Timestamp => "timestamp".into(),
            Ty::Null => "null".into(),
            Ty::List(e) => format!("list({})", e.display()),
            Ty::Map(k, v) => format!("map({}, {})", k.display(), v.display()),
            Ty::Object(o) => o.name.clone(),
            Ty::Optional(t) => format!("optional_type({})", t.display()),
        }
    }

    /// The type of property `name` (unescaped) of an object type, as the server hands a
    /// child node its type from its parent's.
    pub(crate) fn property(&self, name: &str) -> Option<Ty> {
        match self {
            Ty::Object(o) => o.fields.get(&escape(name)?).cloned(),
            _ => None,
        }
    }

    /// The item type of a list type.
    pub(crate) fn items(&self) -> Option<Ty> {
        match self {
            Ty::List(e) => Some(e.as_ref().clone()),
            _ => None,
        }
    }

    /// The value type of a map type.
    pub(crate) fn values(&self) -> Option<Ty> {
        match self {
            Ty::Map(_, v) => Some(v.as_ref().clone()),
            _ => None,
        }
    }

    /// True where the type is known and is not `bool`: such a rule "must evaluate to a bool".
    pub(crate) fn known_non_bool(&self) -> bool {
        !matches!(self, Ty::Unknown | Ty::Bool)
    }
}

/// The unstable name the server gives each rule's `self` type (`generateUniqueSelfTypeName`).
pub(crate) fn self_type_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("selfType{nanos}")
}

/// A property name as CEL sees it, or `None` for a name the server leaves out of the type.
pub(crate) fn escape(ident: &str) -> Option<String> {
    if ident.is_empty() || ident.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    if RESERVED.contains(&ident) {
        return Some(format!("__{ident}__"));
    }
    if !ident
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
    {
        return None;
    }
    let mut out = String::with_capacity(ident.len());
    let mut rest = ident;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("__") {
            out.push_str("__underscores__");
            rest = &rest[2..];
            continue;
        }
        match c {
            '.' => out.push_str("__dot__"),
            '-' => out.push_str("__dash__"),
            '/' => out.push_str("__slash__"),
            c => out.push(c),
        }
        rest = &rest[c.len_utf8()..];
    }
    Some(out)
}

fn flag(schema: &Value, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool) == Some(true)
}

fn type_of(schema: Option<&Value>) -> Option<&str> {
    schema.and_then(|s| s.get("type")).and_then(Value::as_str)
}

/// The root of a resource (or embedded resource) always has `kind`, `apiVersion` and
/// `metadata.name`/`generateName`, and loses any `items`/`additionalProperties` when the
/// server has to add them (`WithTypeAndObjectMeta`).
fn with_type_and_object_meta(schema: &Value) -> Value {
    let props = schema.get("properties");
    let meta_props = props.and_then(|p| p.pointer("/metadata/properties"));
    let complete = type_of(props.and_then(|p| p.get("kind"))) == Some("string")
        && type_of(props.and_then(|p| p.get("apiVersion"))) == Some("string")
        && type_of(props.and_then(|p| p.get("metadata"))) == Some("object")
        && type_of(meta_props.and_then(|m| m.get("name"))) == Some("string")
        && type_of(meta_props.and_then(|m| m.get("generateName"))) == Some("string");
    if complete {
        return schema.clone();
    }
    let mut out = schema.clone();
    if let Some(map) = out.as_object_mut() {
        map.remove("items");
        map.remove("additionalProperties");
        let mut properties = props
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        properties.insert("kind".into(), json!({"type": "string"}));
        properties.insert("apiVersion".into(), json!({"type": "string"}));
        properties.insert(
            "metadata".into(),
            json!({"type": "object", "properties": {
                "name": {"type": "string"},
                "generateName": {"type": "string"},
            }}),
        );
        map.insert("properties".into(), Value::Object(properties));
    }
    out
}

/// The CEL type of a schema node (`SchemaDeclType`), named as the server names nested object
/// types; `None` where the server exposes nothing: no `type` (even with
/// `x-kubernetes-preserve-unknown-fields`), or a list or map of such values.
pub(crate) fn decl_type(schema: &Value, resource_root: bool, name: &str) -> Option<Ty> {
    if flag(schema, "x-kubernetes-int-or-string") {
        return Some(Ty::Dyn);
    }
    let completed;
    let schema = if resource_root {
        completed = with_type_and_object_meta(schema);
        &completed
    } else {
        schema
    };
    let embedded = |s: &Value| flag(s, "x-kubernetes-embedded-resource");
    match type_of(Some(schema))? {
        "array" => {
            let items = schema.get("items").filter(|i| i.is_object())?;
            let item = decl_type(items, embedded(items), &format!("{name}.@idx"))?;
            Some(Ty::List(Box::new(item)))
        }
        "object" => {
            if let Some(values) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                let value = decl_type(values, embedded(values), &format!("{name}.@elem"))?;
                return Some(Ty::Map(Box::new(Ty::String), Box::new(value)));
            }
            let mut fields = BTreeMap::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (prop, s) in props {
                    let Some(escaped) = escape(prop) else {
                        continue;
                    };
                    if let Some(t) = decl_type(s, embedded(s), &format!("{name}.{escaped}")) {
                        fields.insert(escaped, t);
                    }
                }
            }
            Some(Ty::Object(Rc::new(Object {
                name: name.to_string(),
                fields,
            })))
        }
        "string" => Some(match schema.get("format").and_then(Value::as_str) {
            Some("byte") => Ty::Bytes,
            Some("duration") => Ty::Duration,
            Some("date" | "date-time") => Ty::Timestamp,
            _ => Ty::String,
        }),
        "boolean" => Some(Ty::Bool),
        "number" => Some(Ty::Double),
        "integer" => Some(Ty::Int),
        _ => None,
    }
}

/// Type-checks one expression with `self` (and `oldSelf`, optional when `optionalOldSelf`) of
/// type `self_ty`. `Err` holds the text cel-go's `issues.String()` would give; an expression
/// this parser cannot follow is let through, since `kube-cel` already accepted its syntax.
pub(crate) fn check(source: &str, self_ty: &Ty, optional_old_self: bool) -> Result<Ty, String> {
    let chars: Vec<char> = source.chars().collect();
    let Some(tokens) = lex(&chars) else {
        return Ok(Ty::Unknown);
    };
    let mut parser = Parser { tokens, pos: 0 };
    let Some(expr) = parser.expr() else {
        return Ok(Ty::Unknown);
    };
    if parser.peek() != &Tok::Eof {
        return Ok(Ty::Unknown);
    }
    let old_self = if optional_old_self {
        Ty::Optional(Box::new(self_ty.clone()))
    } else {
        self_ty.clone()
    };
    let mut checker = Checker {
        scopes: vec![
            ("self".into(), self_ty.clone()),
            ("oldSelf".into(), old_self),
        ],
        errors: Vec::new(),
    };
    let result = checker.check(&expr);
    if checker.errors.is_empty() {
        return Ok(result);
    }
    Err(render(&chars, checker.errors))
}

/// Parse errors, given as 1-based (line, column) and message, shown as cel-go shows them.
pub(crate) fn render_positioned(source: &str, errors: Vec<(usize, usize, String)>) -> String {
    let chars: Vec<char> = source.chars().collect();
    let line_starts: Vec<usize> = std::iter::once(0)
        .chain(
            chars
                .iter()
                .enumerate()
                .filter(|(_, c)| **c == '\n')
                .map(|(i, _)| i + 1),
        )
        .collect();
    let located = errors
        .into_iter()
        .map(|(line, col, msg)| {
            let start = line_starts
                .get(line.saturating_sub(1))
                .copied()
                .unwrap_or(0);
            ((start + col.saturating_sub(1)).min(chars.len()), msg)
        })
        .collect();
    render(&chars, located)
}

/// cel-go's `Errors.ToDisplayString`: sorted by position, each with its source line and a
/// caret under the 0-based column (shown 1-based).
fn render(chars: &[char], mut errors: Vec<(usize, String)>) -> String {
    let position = |at: usize| {
        let line_start = chars[..at]
            .iter()
            .rposition(|c| *c == '\n')
            .map_or(0, |i| i + 1);
        let line = chars[..at].iter().filter(|c| **c == '\n').count() + 1;
        (line, line_start, at - line_start)
    };
    errors.sort_by_key(|(at, _)| {
        let (line, _, col) = position(*at);
        (line, col)
    });
    let shown: Vec<String> = errors
        .iter()
        .map(|(at, msg)| {
            let (line, start, col) = position(*at);
            let mut out = format!("ERROR: <input>:{line}:{}: {msg}", col + 1);
            let snippet: Vec<char> = chars[start..]
                .iter()
                .take_while(|c| **c != '\n')
                .map(|c| if *c == '\t' { ' ' } else { *c })
                .collect();
            let snippet_bytes: usize = snippet.iter().map(|c| c.len_utf8()).sum();
            if snippet_bytes <= MAX_SNIPPET_LENGTH {
                out.push_str("\n | ");
                out.extend(snippet.iter());
                out.push_str("\n | ");
                for c in snippet.iter().take(col) {
                    out.push(if c.len_utf8() > 1 { '\u{FF0E}' } else { '.' });
                }
                let wide = snippet.get(col).is_some_and(|c| c.len_utf8() > 1);
                out.push(if wide { '\u{FF3E}' } else { '^' });
            }
            out
        })
        .collect();
    shown.join("\n")
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Lit(Ty),
    In,
    Punct(&'static str),
    Eof,
}

const PUNCT2: &[&str] = &["==", "!=", "<=", ">=", "&&", "||"];
const PUNCT1: &[&str] = &[
    "<", ">", "!", "+", "-", "*", "/", "%", "?", ":", ".", ",", "(", ")", "[", "]", "{", "}",
];

/// CEL's lexer, keeping each token's start as a code-point offset as ANTLR does for cel-go.
fn lex(src: &[char]) -> Option<Vec<(Tok, usize)>> {
    let mut out = Vec::new();
    let mut i = 0;
    let at = |i: usize| src.get(i).copied();
    while i < src.len() {
        let c = src[i];
        if matches!(c, ' ' | '\t' | '\r' | '\n' | '\x0c') {
            i += 1;
            continue;
        }
        if c == '/' && at(i + 1) == Some('/') {
            while i < src.len() && !matches!(src[i], '\n' | '\r') {
                i += 1;
            }
            continue;
        }
        let start = i;
        if let Some((prefix, raw, ty)) = string_prefix(src, i) {
            i = skip_string(src, i + prefix, raw)?;
            out.push((Tok::Lit(ty), start));
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            while at(i).is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                i += 1;
            }
            let word: String = src[start..i].iter().collect();
            let tok = match word.as_str() {
                "true" | "false" => Tok::Lit(Ty::Bool),
                "null" => Tok::Lit(Ty::Null),
                "in" => Tok::In,
                _ => Tok::Ident(word),
            };
            out.push((tok, start));
            continue;
        }
        if c == '`' {
            i += 1;
            while at(i).is_some_and(|c| c != '`') {
                i += 1;
            }
            at(i)?;
            let word: String = src[start + 1..i].iter().collect();
            i += 1;
            out.push((Tok::Ident(word), start));
            continue;
        }
        if c.is_ascii_digit() || (c == '.' && at(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            let (end, ty) = number(src, i);
            i = end;
            out.push((Tok::Lit(ty), start));
            continue;
        }
        let two: String = src[i..(i + 2).min(src.len())].iter().collect();
        if let Some(p) = PUNCT2.iter().find(|p| **p == two) {
            out.push((Tok::Punct(p), start));
            i += 2;
            continue;
        }
        let one = c.to_string();
        let p = PUNCT1.iter().find(|p| **p == one)?;
        out.push((Tok::Punct(p), start));
        i += 1;
    }
    out.push((Tok::Eof, src.len()));
    Some(out)
}

/// A string or bytes literal starting at `i`: its prefix length, whether it is raw, its type.
fn string_prefix(src: &[char], i: usize) -> Option<(usize, bool, Ty)> {
    let lower: Vec<char> = src[i..(i + 3).min(src.len())]
        .iter()
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let quote = |k: usize| lower.get(k).is_some_and(|c| matches!(c, '"' | '\''));
    match lower.as_slice() {
        ['"' | '\'', ..] => Some((0, false, Ty::String)),
        ['r', ..] if quote(1) => Some((1, true, Ty::String)),
        ['b', 'r', ..] if quote(2) => Some((2, true, Ty::Bytes)),
        ['b', ..] if quote(1) => Some((1, false, Ty::Bytes)),
        _ => None,
    }
}

/// The offset just past the string literal whose quote is at `i`.
fn skip_string(src: &[char], i: usize, raw: bool) -> Option<usize> {
    let q = src[i];
    let triple = src.get(i + 1) == Some(&q) && src.get(i + 2) == Some(&q);
    let mut j = if triple { i + 3 } else { i + 1 };
    while j < src.len() {
        if !raw && src[j] == '\\' {
            j += 2;
            continue;
        }
        if src[j] == q && (!triple || (src.get(j + 1) == Some(&q) && src.get(j + 2) == Some(&q))) {
            return Some(j + if triple { 3 } else { 1 });
        }
        j += 1;
    }
    None
}

fn number(src: &[char], mut i: usize) -> (usize, Ty) {
    let at = |i: usize| src.get(i).copied();
    if at(i) == Some('0') && matches!(at(i + 1), Some('x' | 'X')) {
        i += 2;
        while at(i).is_some_and(|c| c.is_ascii_hexdigit()) {
            i += 1;
        }
    } else {
        let mut float = false;
        while at(i).is_some_and(|c| c.is_ascii_digit()) {
            i += 1;
        }
        if at(i) == Some('.') && at(i + 1).is_some_and(|c| c.is_ascii_digit()) {
            float = true;
            i += 1;
            while at(i).is_some_and(|c| c.is_ascii_digit()) {
                i += 1;
            }
        }
        if matches!(at(i), Some('e' | 'E')) {
            let digits = if matches!(at(i + 1), Some('+' | '-')) {
                i + 2
            } else {
                i + 1
            };
            if at(digits).is_some_and(|c| c.is_ascii_digit()) {
                float = true;
                i = digits;
                while at(i).is_some_and(|c| c.is_ascii_digit()) {
                    i += 1;
                }
            }
        }
        if float {
            return (i, Ty::Double);
        }
    }
    if matches!(at(i), Some('u' | 'U')) {
        return (i + 1, Ty::Uint);
    }
    (i, Ty::Int)
}

/// An expression and where cel-go places it: the `.` of a selection, the `(` of a call or
/// macro, the `[` of an index, an operator, or a token's start.
#[derive(Debug)]
struct Expr {
    at: usize,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Ident(String),
    Lit(Ty),
    Select {
        operand: Box<Expr>,
        field: String,
        optional: bool,
    },
    /// `has(operand.field)`.
    Presence {
        operand: Box<Expr>,
        field: String,
    },
    Index {
        operand: Box<Expr>,
        index: Box<Expr>,
        optional: bool,
    },
    Call {
        target: Option<Box<Expr>>,
        name: String,
        args: Vec<Expr>,
    },
    /// A macro binding `var` over `range` (`all`, `exists`, `exists_one`, `map`, `filter`,
    /// `optMap`, `optFlatMap`) or to a value (`cel.bind`).
    Bind {
        macro_name: String,
        range: Box<Expr>,
        var: String,
        body: Vec<Expr>,
    },
    List(Vec<Expr>),
    Map(Vec<(Expr, Expr)>),
    Struct(Vec<Expr>),
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
}

struct Parser {
    tokens: Vec<(Tok, usize)>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.tokens[self.pos].0
    }

    fn peek_at(&self, n: usize) -> &Tok {
        &self.tokens[(self.pos + n).min(self.tokens.len() - 1)].0
    }

    fn offset(&self) -> usize {
        self.tokens[self.pos].1
    }

    fn bump(&mut self) -> (Tok, usize) {
        let t = self.tokens[self.pos].clone();
        if self.pos < self.tokens.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn eat(&mut self, p: &str) -> Option<usize> {
        if self.peek() == &Tok::Punct(punct(p)) {
            Some(self.bump().1)
        } else {
            None
        }
    }

    fn ident(&mut self) -> Option<String> {
        match self.bump().0 {
            Tok::Ident(name) => Some(name),
            _ => None,
        }
    }

    fn expr(&mut self) -> Option<Expr> {
        let cond = self.binary(0)?;
        let Some(at) = self.eat("?") else {
            return Some(cond);
        };
        let yes = self.binary(0)?;
        self.eat(":")?;
        let no = self.expr()?;
        Some(Expr {
            at,
            kind: Kind::Cond(Box::new(cond), Box::new(yes), Box::new(no)),
        })
    }

    /// Left-associative binary operators, loosest first: `||`, `&&`, relations, `+ -`, `* / %`.
    fn binary(&mut self, level: usize) -> Option<Expr> {
        const LEVELS: &[&[&str]] = &[
            &["||"],
            &["&&"],
            &["<", "<=", ">=", ">", "==", "!=", "in"],
            &["+", "-"],
            &["*", "/", "%"],
        ];
        if level == LEVELS.len() {
            return self.unary();
        }
        let mut left = self.binary(level + 1)?;
        loop {
            let op = match self.peek() {
                Tok::In => "in",
                Tok::Punct(p) => p,
                _ => break,
            };
            if !LEVELS[level].contains(&op) {
                break;
            }
            let at = self.bump().1;
            let right = self.binary(level + 1)?;
            left = Expr {
                at,
                kind: Kind::Call {
                    target: None,
                    name: op.to_string(),
                    args: vec![left, right],
                },
            };
        }
        Some(left)
    }

    fn unary(&mut self) -> Option<Expr> {
        for op in ["!", "-"] {
            if self.peek() == &Tok::Punct(punct(op)) {
                let at = self.offset();
                while self.eat(op).is_some() {}
                let operand = self.member()?;
                return Some(Expr {
                    at,
                    kind: Kind::Call {
                        target: None,
                        name: op.to_string(),
                        args: vec![operand],
                    },
                });
            }
        }
        self.member()
    }

    fn member(&mut self) -> Option<Expr> {
        let mut e = self.primary()?;
        loop {
            if let Some(at) = self.eat(".") {
                let optional = self.eat("?").is_some();
                let field = self.ident()?;
                if !optional && let Some(open) = self.eat("(") {
                    let args = self.list_until(")")?;
                    e = member_call(e, field, args, open);
                } else {
                    e = Expr {
                        at,
                        kind: Kind::Select {
                            operand: Box::new(e),
                            field,
                            optional,
                        },
                    };
                }
            } else if let Some(at) = self.eat("[") {
                let optional = self.eat("?").is_some();
                let index = self.expr()?;
                self.eat("]")?;
                e = Expr {
                    at,
                    kind: Kind::Index {
                        operand: Box::new(e),
                        index: Box::new(index),
                        optional,
                    },
                };
            } else {
                return Some(e);
            }
        }
    }

    /// Comma-separated expressions (each may be marked optional with `?`) up to `close`.
    fn list_until(&mut self, close: &str) -> Option<Vec<Expr>> {
        let mut items = Vec::new();
        loop {
            if self.eat(close).is_some() {
                return Some(items);
            }
            self.eat("?");
            items.push(self.expr()?);
            if self.eat(",").is_none() {
                self.eat(close)?;
                return Some(items);
            }
        }
    }

    fn primary(&mut self) -> Option<Expr> {
        let at = self.offset();
        match self.peek().clone() {
            Tok::Lit(ty) => {
                self.bump();
                Some(Expr {
                    at,
                    kind: Kind::Lit(ty),
                })
            }
            Tok::Punct(".") if matches!(self.peek_at(1), Tok::Ident(_)) => {
                self.bump();
                self.ident_or_call()
            }
            Tok::Ident(_) => self.ident_or_call(),
            Tok::Punct("(") => {
                self.bump();
                let e = self.expr()?;
                self.eat(")")?;
                Some(e)
            }
            Tok::Punct("[") => {
                self.bump();
                Some(Expr {
                    at,
                    kind: Kind::List(self.list_until("]")?),
                })
            }
            Tok::Punct("{") => {
                self.bump();
                let mut entries = Vec::new();
                while self.eat("}").is_none() {
                    self.eat("?");
                    let key = self.expr()?;
                    self.eat(":")?;
                    entries.push((key, self.expr()?));
                    if self.eat(",").is_none() {
                        self.eat("}")?;
                        break;
                    }
                }
                Some(Expr {
                    at,
                    kind: Kind::Map(entries),
                })
            }
            _ => None,
        }
    }

    /// An identifier, a global call or macro, or a message literal `a.b.C{f: v}`.
    fn ident_or_call(&mut self) -> Option<Expr> {
        let mut n = 1;
        while self.peek_at(n) == &Tok::Punct(".") && matches!(self.peek_at(n + 1), Tok::Ident(_)) {
            n += 2;
        }
        if self.peek_at(n) == &Tok::Punct("{") {
            for _ in 0..n {
                self.bump();
            }
            let at = self.bump().1;
            let mut values = Vec::new();
            while self.eat("}").is_none() {
                self.eat("?");
                self.ident()?;
                self.eat(":")?;
                values.push(self.expr()?);
                if self.eat(",").is_none() {
                    self.eat("}")?;
                    break;
                }
            }
            return Some(Expr {
                at,
                kind: Kind::Struct(values),
            });
        }
        let at = self.offset();
        let name = self.ident()?;
        let Some(open) = self.eat("(") else {
            return Some(Expr {
                at,
                kind: Kind::Ident(name),
            });
        };
        let mut args = self.list_until(")")?;
        if name == "has"
            && args.len() == 1
            && matches!(
                args[0].kind,
                Kind::Select {
                    optional: false,
                    ..
                }
            )
            && let Kind::Select { operand, field, .. } = args.remove(0).kind
        {
            return Some(Expr {
                at: open,
                kind: Kind::Presence { operand, field },
            });
        }
        Some(Expr {
            at: open,
            kind: Kind::Call {
                target: None,
                name,
                args,
            },
        })
    }
}

fn punct(p: &str) -> &'static str {
    PUNCT2
        .iter()
        .chain(PUNCT1)
        .find(|q| **q == p)
        .copied()
        .unwrap_or("")
}

/// A receiver call, expanded as cel-go's parser expands macros.
fn member_call(target: Expr, name: String, mut args: Vec<Expr>, open: usize) -> Expr {
    let arity_ok = match name.as_str() {
        "all" | "exists" | "exists_one" | "filter" | "optMap" | "optFlatMap" => args.len() == 2,
        "map" => matches!(args.len(), 2 | 3),
        "bind" => args.len() == 3 && matches!(&target.kind, Kind::Ident(t) if t == "cel"),
        _ => false,
    };
    if arity_ok && let Kind::Ident(var) = &args[0].kind {
        let var = var.clone();
        args.remove(0);
        let range = if name == "bind" {
            args.remove(0)
        } else {
            target
        };
        return Expr {
            at: open,
            kind: Kind::Bind {
                macro_name: name,
                range: Box::new(range),
                var,
                body: args,
            },
        };
    }
    Expr {
        at: open,
        kind: Kind::Call {
            target: Some(Box::new(target)),
            name,
            args,
        },
    }
}

struct Checker {
    scopes: Vec<(String, Ty)>,
    errors: Vec<(usize, String)>,
}

impl Checker {
    fn lookup(&self, name: &str) -> Ty {
        self.scopes
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map_or(Ty::Unknown, |(_, t)| t.clone())
    }

    fn check(&mut self, e: &Expr) -> Ty {
        match &e.kind {
            Kind::Ident(name) => self.lookup(name),
            Kind::Lit(ty) => ty.clone(),
            Kind::Select {
                operand,
                field,
                optional,
            } => {
                let t = self.check(operand);
                self.select(e.at, &t, field, *optional)
            }
            Kind::Presence { operand, field } => {
                let t = self.check(operand);
                self.select(e.at, &t, field, false);
                Ty::Bool
            }
            Kind::Index {
                operand,
                index,
                optional,
            } => {
                let t = self.check(operand);
                self.check(index);
                let elem = match t {
                    Ty::List(e) => *e,
                    Ty::Map(_, v) => *v,
                    _ => return Ty::Unknown,
                };
                if *optional {
                    Ty::Optional(Box::new(elem))
                } else {
                    elem
                }
            }
            Kind::Call { target, name, args } => {
                if let Some(t) = target {
                    self.check(t);
                }
                for a in args {
                    self.check(a);
                }
                match name.as_str() {
                    "!" | "&&" | "||" | "==" | "!=" | "<" | "<=" | ">" | ">=" | "in" => Ty::Bool,
                    _ => Ty::Unknown,
                }
            }
            Kind::Bind {
                macro_name,
                range,
                var,
                body,
            } => self.bind(macro_name, range, var, body),
            Kind::List(items) => {
                let types: Vec<Ty> = items.iter().map(|i| self.check(i)).collect();
                let elem = match types.split_first() {
                    Some((first, rest)) if rest.iter().all(|t| t == first) => first.clone(),
                    _ => Ty::Unknown,
                };
                Ty::List(Box::new(elem))
            }
            Kind::Map(entries) => {
                for (k, v) in entries {
                    self.check(k);
                    self.check(v);
                }
                Ty::Map(Box::new(Ty::Unknown), Box::new(Ty::Unknown))
            }
            Kind::Struct(values) => {
                for v in values {
                    self.check(v);
                }
                Ty::Unknown
            }
            Kind::Cond(c, yes, no) => {
                self.check(c);
                let (a, b) = (self.check(yes), self.check(no));
                if a == b { a } else { Ty::Unknown }
            }
        }
    }

    /// cel-go's `checkSelectField`: maps yield their values, objects their declared fields,
    /// `dyn` anything; any other type has no fields.
    fn select(&mut self, at: usize, operand: &Ty, field: &str, optional: bool) -> Ty {
        let (target, was_optional) = match operand {
            Ty::Optional(inner) => (inner.as_ref(), true),
            other => (other, false),
        };
        let result = match target {
            Ty::Map(_, v) => v.as_ref().clone(),
            Ty::Object(o) => match o.fields.get(field) {
                Some(t) => t.clone(),
                None => {
                    self.errors.push((at, format!("undefined field '{field}'")));
                    Ty::Unknown
                }
            },
            Ty::Unknown => Ty::Unknown,
            Ty::Dyn => Ty::Dyn,
            other => {
                self.errors.push((
                    at,
                    format!(
                        "type '{}' does not support field selection",
                        other.display()
                    ),
                ));
                Ty::Unknown
            }
        };
        if was_optional || optional {
            Ty::Optional(Box::new(result))
        } else {
            result
        }
    }

    /// cel-go's `checkComprehension` for one-variable macros, and `cel.bind`.
    fn bind(&mut self, macro_name: &str, range: &Expr, var: &str, body: &[Expr]) -> Ty {
        let range_ty = self.check(range);
        let var_ty = match (macro_name, &range_ty) {
            ("bind", t) => t.clone(),
            ("optMap" | "optFlatMap", Ty::Optional(inner)) => inner.as_ref().clone(),
            ("optMap" | "optFlatMap", _) => Ty::Unknown,
            (_, Ty::List(e)) => e.as_ref().clone(),
            (_, Ty::Map(k, _)) => k.as_ref().clone(),
            (_, Ty::Unknown) => Ty::Unknown,
            (_, Ty::Dyn) => Ty::Dyn,
            (_, other) => {
                self.errors.push((
                    range.at,
                    format!(
                        "expression of type '{}' cannot be range of a comprehension (must be list, map, or dynamic)",
                        other.display()
                    ),
                ));
                Ty::Unknown
            }
        };
        self.scopes.push((var.to_string(), var_ty.clone()));
        let body_types: Vec<Ty> = body.iter().map(|b| self.check(b)).collect();
        self.scopes.pop();
        match macro_name {
            "all" | "exists" | "exists_one" => Ty::Bool,
            "filter" => Ty::List(Box::new(var_ty)),
            "map" => Ty::List(Box::new(Ty::Unknown)),
            "bind" => body_types.into_iter().last().unwrap_or(Ty::Unknown),
            _ => Ty::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(fields: &[(&str, Ty)]) -> Ty {
        Ty::Object(Rc::new(Object {
            name: "selfType1".into(),
            fields: fields
                .iter()
                .map(|(k, t)| (k.to_string(), t.clone()))
                .collect(),
        }))
    }

    #[test]
    fn escaping_follows_the_apiserver() {
        assert_eq!(escape("namespace").as_deref(), Some("__namespace__"));
        assert_eq!(escape("x-prop").as_deref(), Some("x__dash__prop"));
        assert_eq!(escape("a.b/c").as_deref(), Some("a__dot__b__slash__c"));
        assert_eq!(
            escape("redact__d").as_deref(),
            Some("redact__underscores__d")
        );
        assert_eq!(escape("a_b").as_deref(), Some("a_b"));
        assert_eq!(escape("___").as_deref(), Some("__underscores___"));
        assert_eq!(escape("1st"), None);
        assert_eq!(escape("a b"), None);
        assert_eq!(escape("é"), None);
        assert_eq!(escape(""), None);
    }

    #[test]
    fn untyped_properties_are_not_fields() {
        let schema = json!({"type": "object", "properties": {
            "value": {"x-kubernetes-preserve-unknown-fields": true},
            "ref": {"type": "object", "properties": {"name": {"type": "string"}}},
            "port": {"x-kubernetes-int-or-string": true},
        }});
        let Some(Ty::Object(o)) = decl_type(&schema, false, "selfType1") else {
            panic!("an object");
        };
        assert_eq!(
            o.fields.keys().collect::<Vec<_>>(),
            vec!["port", "ref"],
            "value has no type"
        );
        assert_eq!(o.fields["port"], Ty::Dyn);
    }

    #[test]
    fn maps_lists_and_embedded_resources() {
        let untyped_map = json!({"type": "object", "additionalProperties":
            {"x-kubernetes-preserve-unknown-fields": true}});
        assert_eq!(decl_type(&untyped_map, false, "t"), None);
        let embedded = json!({"type": "object", "x-kubernetes-embedded-resource": true,
            "x-kubernetes-preserve-unknown-fields": true});
        let Some(Ty::Object(o)) = decl_type(&embedded, true, "t") else {
            panic!("an object");
        };
        assert_eq!(
            o.fields.keys().collect::<Vec<_>>(),
            vec!["apiVersion", "kind", "metadata"]
        );
        let Ty::Object(meta) = &o.fields["metadata"] else {
            panic!("metadata is an object");
        };
        assert_eq!(
            meta.fields.keys().collect::<Vec<_>>(),
            vec!["generateName", "name"]
        );
        let list = json!({"type": "array", "items": {"type": "string", "format": "date-time"}});
        assert_eq!(
            decl_type(&list, false, "t"),
            Some(Ty::List(Box::new(Ty::Timestamp)))
        );
    }

    #[test]
    fn an_undefined_field_is_reported_where_cel_go_reports_it() {
        let self_ty = object(&[("secretKeyRef", object(&[]))]);
        let err = check("has(self.value) != has(self.secretKeyRef)", &self_ty, false).unwrap_err();
        assert_eq!(
            err,
            "ERROR: <input>:1:4: undefined field 'value'\n \
             | has(self.value) != has(self.secretKeyRef)\n \
             | ...^"
        );
        let err = check("self.a.b == 1 || self.c", &object(&[]), false).unwrap_err();
        assert!(
            err.starts_with("ERROR: <input>:1:5: undefined field 'a'"),
            "{err}"
        );
        assert!(
            err.contains("ERROR: <input>:1:22: undefined field 'c'"),
            "{err}"
        );
    }

    #[test]
    fn macros_bind_items_keys_and_values() {
        let item = object(&[("name", Ty::String)]);
        let self_ty = object(&[
            ("items", Ty::List(Box::new(item))),
            (
                "labels",
                Ty::Map(Box::new(Ty::String), Box::new(Ty::String)),
            ),
        ]);
        for ok in [
            "self.items.all(i, i.name != '')",
            "self.items.exists(i, has(i.name))",
            "self.items.map(i, i.name).all(n, n.x == 1)",
            "self.items.filter(i, i.name == 'a').size() == 1",
            "self.labels.all(k, self.labels[k] != '') && self.labels.anyKey == 'x'",
            "has(self.labels.x) && self.items[0].name == 'a'",
            "cel.bind(f, self.items[0], f.name == 'a')",
            "self.items.all(self, self.name == 'a')",
        ] {
            check(ok, &self_ty, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let err = check("self.items.all(i, i.nope)", &self_ty, false).unwrap_err();
        assert!(err.contains("undefined field 'nope'"), "{err}");
        let err = check("self.items.x == 1", &self_ty, false).unwrap_err();
        assert!(
            err.contains("type 'list(selfType1)' does not support field selection"),
            "{err}"
        );
        let err = check("self.items[0].name.all(c, c)", &self_ty, false).unwrap_err();
        assert!(
            err.contains("expression of type 'string' cannot be range of a comprehension"),
            "{err}"
        );
    }

    #[test]
    fn result_types_and_lenient_corners() {
        let self_ty = object(&[("n", Ty::Int), ("v", Ty::Dyn)]);
        assert_eq!(check("self.n >= 1", &self_ty, false), Ok(Ty::Bool));
        assert!(check("self.n", &self_ty, false).unwrap().known_non_bool());
        assert!(
            !check("self.n.foo()", &self_ty, false)
                .unwrap()
                .known_non_bool()
        );
        check("self.v.anything == 1 && dyn(self).x", &self_ty, false).unwrap();
        check("oldSelf.hasValue() && oldSelf.n == 1", &self_ty, true).unwrap();
        check("self.?n.orValue(0) > 1 // comment", &self_ty, false).unwrap();
        check(
            r#"self.n in [1, 2u, 3.0e1] && "a'b" + r'\d' + b"x" != ''"#,
            &self_ty,
            false,
        )
        .unwrap();
        let err = check("oldSelf.missing == 1", &self_ty, true).unwrap_err();
        assert!(err.contains("undefined field 'missing'"), "{err}");
    }
}
