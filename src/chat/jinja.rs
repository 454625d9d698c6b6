//! The Jinja environment transformers renders chat templates in, rebuilt on minijinja: the same
//! whitespace rules and the extra functions and filters its templates call.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};

/// An environment set up as transformers' `_compile_jinja_template`: blocks trimmed and
/// left-stripped, `raise_exception`, `strftime_now`, its `tojson`, and Python's string and
/// dictionary methods (`.strip()`, `.startswith()`, `.items()`), which Jinja templates call
/// because Jinja runs on Python.
pub(super) fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    let mut syntax = minijinja::syntax::SyntaxConfig::builder();
    syntax.trim_blocks(true).lstrip_blocks(true);
    env.set_syntax(syntax.build().expect("the default delimiters are valid"));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

/// The template's own error (a role it does not know, roles out of order), as its message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, as transformers' `tojson`:
/// minijinja's own escapes `<`, `>`, `&` and `'` for HTML, which would change the prompt. Keys
/// keep the order minijinja gives them (sorted), where Python keeps the insertion order.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let formatter = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            serde::Serialize::serialize(
                &value,
                &mut serde_json::Serializer::with_formatter(&mut out, formatter),
            )
        }
        None => serde::Serialize::serialize(
            &value,
            &mut serde_json::Serializer::with_formatter(&mut out, PythonCompact),
        ),
    };
    written.map_err(|e| Error::new(ErrorKind::BadSerialization, e.to_string()))?;
    let text = String::from_utf8(out).expect("serde_json writes UTF-8");
    Ok(Value::from_safe_string(text))
}

/// Python's default JSON separators without indent: `", "` between items, `": "` after keys.
struct PythonCompact;

impl serde_json::ser::Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Today's date (UTC) in Python's `strftime` format, as Llama 3.1's template asks for it
/// (`strftime_now("%d %b %Y")`). The date and time directives are supported; others are errors.
fn strftime_now(format: String) -> Result<String, Error> {
    let seconds = web_time::SystemTime::now()
        .duration_since(web_time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    strftime(&format, seconds)
}

/// `format` for the UTC time `seconds` after 1970-01-01.
fn strftime(format: &str, seconds: u64) -> Result<String, Error> {
    let (year, month, day) = civil_date(seconds / 86_400);
    let time = seconds % 86_400;
    let (hour, minute, second) = (time / 3600, time / 60 % 60, time % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let month_name = MONTHS[month as usize - 1];
        match chars.next() {
            Some('d') => out += &format!("{day:02}"),
            Some('m') => out += &format!("{month:02}"),
            Some('Y') => out += &year.to_string(),
            Some('y') => out += &format!("{:02}", year % 100),
            Some('b') => out += &month_name[..3],
            Some('B') => out += month_name,
            Some('H') => out += &format!("{hour:02}"),
            Some('M') => out += &format!("{minute:02}"),
            Some('S') => out += &format!("{second:02}"),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: %{} is not supported", other.unwrap_or(' ')),
                ));
            }
        }
    }
    Ok(out)
}

/// Year, month (1-12) and day of the month of `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_format_as_python_formats_them() {
        // 2024-07-26 12:34:56 UTC, the date in Llama 3.1's template.
        let t = 1_721_997_296;
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %B %y %%", t).unwrap(),
            "2024-07-26 12:34:56 July 24 %"
        );
        assert_eq!(strftime("%d %b %Y", 0).unwrap(), "01 Jan 1970");
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert!(strftime("%Q", t).is_err());
    }

    #[test]
    fn tojson_writes_as_python_json_dumps() {
        let env = environment();
        let render = |source: &str| {
            env.render_str(
                source,
                minijinja::context! { x => Value::from(minijinja::value::Serde(serde_json::json!({"a": [1, "<é>"], "b": null}))) },
            )
            .unwrap()
        };
        assert_eq!(
            render("{{ x | tojson }}"),
            r#"{"a": [1, "<é>"], "b": null}"#
        );
        assert_eq!(
            render("{{ x | tojson(indent=2) }}"),
            "{\n  \"a\": [\n    1,\n    \"<é>\"\n  ],\n  \"b\": null\n}"
        );
    }
}
