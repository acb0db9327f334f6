//! The ledger as text, for `GET /admin/usage?format=csv|ndjson` and
//! `tollgate usage`: one line per usage row.

use crate::routes::account::usage_item;
use crate::store::UsageEntry;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    Ndjson,
}

pub const CSV_HEADER: &str =
    "time,key_id,endpoint,model,status,prompt_tokens,completion_tokens,credits,duration_ms";

/// One row, without the line end.
pub fn line(entry: UsageEntry, format: Format) -> String {
    let key_id = entry.record.key_id;
    let item = usage_item(entry, true);
    match format {
        Format::Csv => format!(
            "{},{},{},{},{},{},{},{},{}",
            item.time,
            key_id,
            csv_field(&item.endpoint),
            csv_field(item.model.as_deref().unwrap_or("")),
            item.status,
            item.prompt_tokens,
            item.completion_tokens,
            item.credits,
            item.duration_ms
        ),
        // A struct of strings and numbers always serializes.
        Format::Ndjson => serde_json::to_string(&item).unwrap_or_default(),
    }
}

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_csv_fields_that_need_it() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
