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
        let from_file = serde_json::to_value(table).map_err(|e| Error::Config {
            source_name: uri.to_string(),
            reason: e.to_string(),
        })?;
        merge_into(&mut value, from_file);
    }
    merge_into(&mut value, overrides);
    serde_json::from_value(value).map_err(|e| Error::Config {
        source_name: file.unwrap_or("command line").to_string(),
        reason: e.to_string(),
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
}
