//! Effective configs: a preset, then a TOML file, then command-line values, each overriding the
//! one before. The result is what a manifest records and hashes.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Error;
use crate::storage::Location;

/// Layers `file` (TOML, any location) and then `overrides` (command-line values; nulls mean
/// "not given") over `preset`. Unknown keys are rejected when `T` denies unknown fields, so a
/// typo in a config file is an error, not a silently ignored setting.
pub fn layered<T: Serialize + DeserializeOwned>(
    preset: &T,
    file: Option<&str>,
    overrides: Value,
) -> Result<T, Error> {
    let mut value = serde_json::to_value(preset).map_err(|e| Error::Config {
        source_name: "preset".into(),
        reason: e.to_string(),
    })?;
    if let Some(uri) = file {
        let bytes = Location::parse(uri)?.get()?;
        let text = std::str::from_utf8(&bytes).map_err(|e| Error::Config {
            source_name: uri.to_string(),
            reason: format!("not UTF-8: {e}"),
        })?;
        let table: toml::Table = toml::from_str(text).map_err(|e| Error::Config {
            source_name: uri.to_string(),
            reason: e.to_string(),
        })?;
        // JSON has no inf or NaN: they would become null, read as "not given".
        if let Some((key, number)) = non_finite(&table, "") {
            return Err(Error::Config {
                source_name: uri.to_string(),
                reason: format!("{key} = {number}: a setting must be a finite number"),
            });
        }
        let from_file = serde_json::to_value(table).map_err(|e| Error::Config {
            source_name: uri.to_string(),
            reason: e.to_string(),
        })?;
        merge_into(&mut value, from_file);
    }
    merge_into(&mut value, overrides);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        Error::Config {
            source_name: file.unwrap_or("command line").to_string(),
            reason: if path == "." {
                e.into_inner().to_string()
            } else {
                format!("{path}: {}", e.into_inner())
            },
        }
    })
}

/// The first float of `table` that is infinite or NaN, with its key path (`inner.rates[2]`).
fn non_finite(table: &toml::Table, prefix: &str) -> Option<(String, f64)> {
    fn walk(value: &toml::Value, path: String) -> Option<(String, f64)> {
        match value {
            toml::Value::Float(number) if !number.is_finite() => Some((path, *number)),
            toml::Value::Table(table) => non_finite(table, &path),
            toml::Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, item)| walk(item, format!("{path}[{i}]"))),
            _ => None,
        }
    }
    table.iter().find_map(|(key, value)| {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        walk(value, path)
    })
}

fn merge_into(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (_, Value::Null) => {}
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(slot) => merge_into(slot, value),
                    None if !value.is_null() => {
                        base.insert(key, value);
                    }
                    None => {}
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        size: u32,
        name: String,
        inner: Inner,
    }
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        rate: f64,
        steps: u32,
    }

    fn preset() -> Cfg {
        Cfg {
            size: 64,
            name: "tiny".into(),
            inner: Inner {
                rate: 0.1,
                steps: 10,
            },
        }
    }

    #[test]
    fn file_overrides_preset_and_command_line_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "size = 128\n[inner]\nsteps = 99\n").unwrap();
        let cli = serde_json::json!({"size": 256, "name": null, "inner": {"rate": null}});
        let cfg = layered(&preset(), Some(file.to_str().unwrap()), cli).unwrap();
        assert_eq!(
            cfg,
            Cfg {
                size: 256,
                name: "tiny".into(),
                inner: Inner {
                    rate: 0.1,
                    steps: 99
                }
            }
        );
    }

    #[test]
    fn a_typo_in_a_config_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "sise = 128\n").unwrap();
        let err = layered(&preset(), Some(file.to_str().unwrap()), Value::Null)
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.toml") && err.contains("sise"), "{err}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[inner]\nsteps = \"ten\"\n").unwrap();
        let err = layered(&preset(), Some(file.to_str().unwrap()), Value::Null)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.toml") && err.contains("inner.steps"),
            "{err}"
        );
    }

    /// TOML has inf and nan, JSON has not: such a value used to become null ("not given") and
    /// leave the preset's value in force.
    #[test]
    fn an_infinite_or_nan_setting_is_refused_naming_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        for text in ["[inner]\nrate = inf\n", "[inner]\nrate = nan\n"] {
            std::fs::write(&file, text).unwrap();
            let err = layered(&preset(), Some(file.to_str().unwrap()), Value::Null)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("inner.rate") && err.contains("finite"),
                "{err}"
            );
        }
        assert!(crate::cli::finite_f64("inf").is_err());
        assert!(crate::cli::finite_f64("NaN").is_err());
        assert_eq!(crate::cli::finite_f64("2.5"), Ok(2.5));
    }
}
